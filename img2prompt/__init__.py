"""img2prompt: recover the text prompt behind an image.

The library under the study's notebooks and command line, one sub-package per stage of
the data flow:

    data/        datasets on disk, the generated default data, imports and downloads
    encoders/    image and text encoders, embedding extraction and its cache
    models/      the mapper, the prompt decoder, decoding, the training loops
    evaluation/  scores in the metric space, the analyses behind the notebooks
    run.py       Run: the run folder and the study's stages over it
    predict.py   Predictor: prompts for new images
    reports/     figures, the notebooks run with papermill, HTML reports
    storage/     atomic writes, the manifest of what was written, checkpoints
    devices.py   --device auto|cpu|cuda|mps

``from img2prompt import Run, Predictor, StudyConfig`` gives the entry points.
"""

import os

__version__ = "0.1.0"

# Offline first: models load from packages or local folders, never from a hub at run time
# (set HF_HUB_OFFLINE=0 to allow it). Set before anything imports huggingface_hub, which
# reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from img2prompt.config import StudyConfig
from img2prompt.errors import (
    DataError,
    Img2PromptError,
    ModelUnavailableError,
    RunError,
)

__all__ = ["StudyConfig", "Run", "Predictor", "Img2PromptError", "DataError", "ModelUnavailableError",
           "RunError"]


def __getattr__(name):
    """``Run`` and ``Predictor`` load on first use: the command line starts without torch."""
    if name == "Run":
        from img2prompt.run import Run
        return Run
    if name == "Predictor":
        from img2prompt.predict import Predictor
        return Predictor
    raise AttributeError(f"module 'img2prompt' has no attribute {name!r}")
