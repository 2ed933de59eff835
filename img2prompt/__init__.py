"""img2prompt: recover the text prompt behind an image.

The library under the study's notebooks and CLI: datasets (``data``), the generated
default data (``synth``), encoders (``image_encoders``, ``text_encoders``), embedding
extraction and cache (``embeddings``), the mapper and its training (``mapper``,
``training``), scoring (``evaluation``), the run steps (``study``) and prediction
(``predict.Predictor``).
"""

import os

__version__ = "0.1.0"

# Offline first: models load from packages or local folders, never from a hub at run time
# (set HF_HUB_OFFLINE=0 to allow it). Set before anything imports huggingface_hub, which
# reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .config import StudyConfig  # noqa: E402
from .errors import DataError, Img2PromptError, ModelUnavailableError, RunError  # noqa: E402

__all__ = ["StudyConfig", "Img2PromptError", "DataError", "ModelUnavailableError", "RunError"]
