"""Progress bars for long loops: tqdm with items/s, silent when not on a terminal."""

import sys

from tqdm import tqdm  # tqdm.auto warns in kernels without ipywidgets; bars are tty-only anyway


def progress_bar(total, unit, enabled=True, description=None):
    """A tqdm bar counting ``unit``s; disabled when ``enabled`` is false or stderr is not a tty."""
    return tqdm(total=total, unit=f" {unit}", desc=description, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()), leave=False)
