"""The setup every notebook in ``notebooks/`` calls first."""

import os
from pathlib import Path


def setup_notebook():
    """Run from the project root, as ``./run_all.sh`` does, so that relative paths in the
    parameters (``runs/default``, ``data/…``) mean the same in JupyterLab, which starts a
    notebook in its own folder."""
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "run_all.sh").is_file():
        os.chdir(here.parent)
