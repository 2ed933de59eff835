"""The setup every notebook in ``notebooks/`` calls first."""

import os
from pathlib import Path

from img2prompt.errors import Img2PromptError, RunError

# names every kernel holds before a notebook's first cell runs
KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
PARAMETER_TYPES = (str, int, float, bool, type(None), list, tuple, dict)


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
    """RunError naming the values in ``names`` (a notebook's globals, once papermill has
    injected its parameters) that the notebook's ``parameters`` cell does not declare."""
    from img2prompt.reports.notebooks import declared_parameters
    if not Path(notebook).is_file():
        return  # a copy run elsewhere: nothing to compare with
    declared = declared_parameters(notebook)
    unknown = sorted(key for key, value in names.items() if key not in declared and not key.startswith("_")
                     and key not in KERNEL_NAMES and isinstance(value, PARAMETER_TYPES))
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
