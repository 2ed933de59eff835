"""Helpers for the notebooks in ``notebooks/``."""

import os
import warnings
from pathlib import Path


def setup_notebook():
    """Run from the project root, as ``./run_all.sh`` does, so that relative paths in the
    parameters (``runs/default``, ``data/…``) mean the same in JupyterLab, which starts a
    notebook in its own folder. Also silence tqdm's "IProgress not found" warning, which
    libraries trigger in kernels without ipywidgets (the project's bars are off there)."""
    warnings.filterwarnings("ignore", message="IProgress not found")
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "run_all.sh").is_file():
        os.chdir(here.parent)
