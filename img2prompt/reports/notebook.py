"""The setup every notebook in ``notebooks/`` calls first."""

import ast
import os
from pathlib import Path

from img2prompt.errors import Img2PromptError, RunError

INJECTED = "# Parameters"  # how papermill heads the cell of the parameters it was given


def setup_notebook(name=None, names=None):
    """Run from the project root, as ``./run_all.sh`` does, so that relative paths in the
    parameters (``runs/default``, ``data/…``) mean the same in JupyterLab, which starts a
    notebook in its own folder; show the project's errors as their message, without a
    traceback. With the notebook's file ``name`` and its ``globals()``, refuse a parameter it
    does not declare: papermill run directly only warns of one, and the notebook would go on
    with its default (a misspelt ``run_dir`` would evaluate another run)."""
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "run_all.sh").is_file():
        os.chdir(here.parent)
    _show_errors_as_messages()
    if name is not None and names is not None:
        check_parameters(Path("notebooks") / name, names)


def check_parameters(notebook, names: dict):
    """RunError naming the parameters papermill injected into a notebook (its cell headed
    ``# Parameters``, among the inputs the kernel ran: ``names["In"]``) that the notebook's
    ``parameters`` cell does not declare."""
    from img2prompt.reports.notebooks import declared_parameters
    if not Path(notebook).is_file():
        return  # a copy run elsewhere: nothing to compare with
    injected = {target.id for source in names.get("In", []) if source.startswith(INJECTED)
                for node in ast.parse(source).body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    declared = declared_parameters(notebook)
    unknown = sorted(injected - set(declared))
    if unknown:
        raise RunError(f"{Path(notebook).name}: unknown parameter(s) {', '.join(unknown)}. It declares: "
                       f"{', '.join(sorted(declared))}.")


def _show_errors_as_messages():
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((Img2PromptError,), _message_only)


def _message_only(shell, kind, error, traceback, tb_offset=None):
    """What a notebook shows for the project's errors: what is wrong and how to fix it; the
    traceback of code the user did not write would only hide it. (The cell still fails.)"""
    shell.showtraceback((kind, error, traceback), exception_only=True)
