"""Embedding extraction in batches, with an on-disk cache.

Images are decoded and preprocessed in DataLoader workers so that decoding overlaps the
model's forward pass (on machines with cores to spare; see ``decode_workers``), and they
stream: only a few batches are held decoded; the result goes into a preallocated array.
Results are cached in one safetensors file per key (dataset content + encoder +
preprocessing), written atomically, outside the dataset.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .errors import DataError
from .files import atomic_path
from .images import open_image
from .progress import progress_bar


RESUME_CHUNK = 512  # images between two saves of an unfinished extraction


class EmbeddingCache:
    """Arrays stored under ``root/embeddings/<kind>-<sha256 of key>.safetensors``."""

    def __init__(self, root):
        self.root = Path(root) / "embeddings"

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, kind, key) -> Path:
        return self.root / f"{kind}-{self.digest(key)[:32]}.safetensors"

    def partial_path(self, kind, key) -> Path:
        """Where an unfinished extraction keeps the rows done so far."""
        return self.path(kind, key).with_suffix(".partial.safetensors")

    def load(self, kind, key, partial=False):
        path = self.partial_path(kind, key) if partial else self.path(kind, key)
        if not path.is_file():
            return None
        try:
            return load_file(path)["embeddings"]
        except (SafetensorError, KeyError, OSError):
            return None  # unreadable entry: recompute and overwrite it

    def save(self, kind, key, array, partial=False):
        with atomic_path(self.partial_path(kind, key) if partial else self.path(kind, key)) as tmp:
            save_file({"embeddings": np.ascontiguousarray(array, dtype=np.float32)}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True, default=str)})


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item; a bad file becomes an error message."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, self.preprocess(open_image(self.paths[index]))
        except DataError as error:
            return index, str(error)


def _collate(items):
    indices = [i for i, _ in items]
    errors = [value for _, value in items if isinstance(value, str)]
    tensors = [value for _, value in items if not isinstance(value, str)]
    return indices, (torch.stack(tensors) if not errors else None), errors


def decode_workers(requested=-1) -> int:
    """DataLoader workers to decode images: ``requested``, or for -1 one per core beyond two
    (at most 4). With two cores the forward pass already keeps both busy, and a decoding
    process only competes with it: measured here, 0 workers ran ~20% faster than 1."""
    if requested >= 0:
        return requested
    return min(4, max(0, len(os.sched_getaffinity(0)) - 2))


def extract_image_embeddings(paths, encoder, batch_size=32, num_workers=-1, progress=True) -> np.ndarray:
    """Features of the images at ``paths`` (float32, one row per path)."""
    paths = list(paths)
    _ = encoder.model  # load the weights before the workers fork and the bar starts
    out = np.zeros((len(paths), encoder.dim), dtype=np.float32)
    workers = decode_workers(num_workers) if len(paths) > batch_size else 0
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, encoder.preprocess), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, prefetch_factor=2 if workers else None,
    )
    with progress_bar(len(paths), "img", enabled=progress, description=encoder.name) as bar:
        for indices, batch, errors in loader:
            if errors:
                raise DataError(f"{errors[0]}" + (f" (and {len(errors) - 1} more bad image(s) in the "
                                                  "same batch)" if len(errors) > 1 else ""))
            out[indices] = encoder.forward(batch).numpy()
            bar.update(len(indices))
    return out


def image_embeddings(dataset, encoder, cache: EmbeddingCache = None, batch_size=32, num_workers=-1,
                     progress=True, resume=False):
    """Image embeddings of a dataset, from the cache when the same data and encoder ran before.

    With a cache, the rows done so far are saved every ``RESUME_CHUNK`` images; ``resume``
    continues an interrupted extraction from there instead of starting over. Returns
    (array, info) where info says whether the cache was used, the cache file, the rows
    resumed and the extraction throughput.
    """
    key = {"kind": "image", "images": dataset.images_fingerprint(), "encoder": encoder.fingerprint()}
    info = {"cache_file": str(cache.path("image", key)) if cache else None}
    if cache is not None:
        cached = cache.load("image", key)
        if cached is not None and cached.shape[0] == len(dataset):
            return cached, {**info, "cached": True}
    done = cache.load("image", key, partial=True) if cache is not None and resume else None
    parts = [done] if done is not None and len(done) <= len(dataset) else []
    resumed = len(parts[0]) if parts else 0
    start = time.perf_counter()
    for begin in range(resumed, len(dataset), RESUME_CHUNK):
        chunk = dataset.paths[begin:begin + RESUME_CHUNK]
        parts.append(extract_image_embeddings(chunk, encoder, batch_size, num_workers, progress))
        if cache is not None and begin + RESUME_CHUNK < len(dataset):
            cache.save("image", key, np.concatenate(parts), partial=True)
    seconds = time.perf_counter() - start
    array = np.concatenate(parts)
    if cache is not None:
        cache.save("image", key, array)
        cache.partial_path("image", key).unlink(missing_ok=True)
    return array, {**info, "cached": False, "resumed_rows": resumed, "seconds": seconds,
                   "images_per_s": (len(dataset) - resumed) / max(seconds, 1e-9)}


def text_embeddings(texts, encoder, cache: EmbeddingCache = None, batch_size=64, progress=True):
    """Embeddings of ``texts`` with ``encoder``, cached by the texts and the encoder."""
    texts = list(texts)
    key = {"kind": "text", "texts": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
           "n": len(texts), "encoder": encoder.fingerprint()}
    if cache is not None:
        cached = cache.load("text", key)
        if cached is not None and cached.shape[0] == len(texts):
            return cached
    array = encoder.encode(texts, batch_size=batch_size, progress=progress)
    if cache is not None:
        cache.save("text", key, array)
    return array
