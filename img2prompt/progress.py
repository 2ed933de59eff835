"""Progress bars for long loops, where people look: tqdm with items/s in a terminal, tqdm's
widget bars in JupyterLab, and nothing in logs, tests and reports.

``enabled``: True (a bar when there is somewhere to show it), False (none), or None
(automatic: the same as True). Setting ``IMG2PROMPT_PROGRESS=0`` turns bars off in notebook
kernels, as ``img2prompt report`` does so that executed notebooks hold no widget state.
"""

import os
import sys

from tqdm import tqdm

QUIET_VARIABLE = "IMG2PROMPT_PROGRESS"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (not a terminal IPython)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(total, unit, enabled=None, description=None):
    """A bar counting ``unit``s, shown in a notebook or on a terminal; silent otherwise."""
    if enabled is not False and os.environ.get(QUIET_VARIABLE) != "0" and in_notebook():
        from tqdm.notebook import tqdm as notebook_tqdm
        return notebook_tqdm(total=total, unit=f" {unit}", desc=description, leave=False)
    return tqdm(total=total, unit=f" {unit}", desc=description, dynamic_ncols=True,
                disable=enabled is False or not sys.stderr.isatty(), leave=False)


def bars_shown(enabled=None) -> bool:
    """Whether ``progress_bar(..., enabled)`` shows a bar (for libraries that draw their own)."""
    return enabled is not False and os.environ.get(QUIET_VARIABLE) != "0" and (in_notebook() or sys.stderr.isatty())
