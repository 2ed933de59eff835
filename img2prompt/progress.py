"""Progress bars for long loops, where people look: tqdm with items/s in a terminal, tqdm's
widget bars in JupyterLab, and nothing in logs, tests and reports.

``enabled``: True (a bar when there is somewhere to show it), False (none), or None
(automatic: the same as True). Setting ``IMG2PROMPT_PROGRESS=0`` turns bars off in notebook
kernels; ``IMG2PROMPT_PROGRESS=lines``, which ``img2prompt report`` sets, writes a line of
progress now and then instead (no widget state in executed notebooks, and lines that papermill
passes on to the terminal while a notebook runs).
"""

import os
import sys

from tqdm import tqdm

QUIET_VARIABLE = "IMG2PROMPT_PROGRESS"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (not a terminal IPython)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


LINES = "lines"  # IMG2PROMPT_PROGRESS=lines: a line every LINE_SECONDS (the reports' kernels)
LINE_SECONDS = 10


def progress_bar(total, unit, enabled=None, description=None):
    """A bar counting ``unit``s, shown in a notebook or on a terminal; silent otherwise, or a
    line every ``LINE_SECONDS`` on standard output with ``IMG2PROMPT_PROGRESS=lines``."""
    if enabled is not False and os.environ.get(QUIET_VARIABLE) == LINES:
        return tqdm(total=total, unit=f" {unit}", desc=description, file=sys.stdout, mininterval=LINE_SECONDS,
                    maxinterval=LINE_SECONDS * 6, ascii=True,
                    bar_format="{desc}: {n_fmt}/{total_fmt}{unit} ({elapsed}, {rate_fmt}){postfix}\n")
    if enabled is not False and os.environ.get(QUIET_VARIABLE) != "0" and in_notebook():
        from tqdm.notebook import tqdm as notebook_tqdm
        return notebook_tqdm(total=total, unit=f" {unit}", desc=description, leave=False)
    return tqdm(total=total, unit=f" {unit}", desc=description, dynamic_ncols=True,
                disable=enabled is False or not sys.stderr.isatty(), leave=False)


def bars_shown(enabled=None) -> bool:
    """Whether ``progress_bar(..., enabled)`` shows a bar (for libraries that draw their own)."""
    return (enabled is not False and os.environ.get(QUIET_VARIABLE) not in ("0", LINES)
            and (in_notebook() or sys.stderr.isatty()))
