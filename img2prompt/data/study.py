"""A study's data: a dataset with its split and its embeddings, read a split at a time."""

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from img2prompt.data.dataset import ImageDataset, take


@dataclass
class StudyData:
    """A dataset with its split and its embeddings (image, target text, metric text, and
    the decoder's input: the image embedding followed by its feature-map grid and colour
    histograms, ``ImageEncoder.forward``, read by ``load_decoder_emb`` when first used).
    Its rows come grouped by split (train, val, test; each in the dataset's order), so that
    a split's rows are a slice of each array."""

    dataset: ImageDataset
    splits: np.ndarray
    image_emb: np.ndarray
    target_emb: np.ndarray
    metric_emb: np.ndarray
    load_decoder_emb: Callable = None

    @functools.cached_property
    def decoder_emb(self) -> np.ndarray:
        return self.image_emb if self.load_decoder_emb is None else self.load_decoder_emb()

    def part(self, split) -> "SplitPart":
        return SplitPart(self, self.splits == split)


class SplitPart(Mapping):
    """One split's rows of a StudyData, read like a dict: ``ids``, ``prompts``, ``images``
    (lists) and the embeddings. An embedding is a view of the whole array when the split's rows are
    one slice of it (as a run's data holds them), else a copy made when first read; either
    way a stage holds only what it uses (the decoder's input is 14,448 numbers per image)."""

    FIELDS = ("ids", "prompts", "images", "image_emb", "target_emb", "metric_emb", "decoder_emb")

    def __init__(self, data: StudyData, mask):
        self._data, self._mask, self._read = data, mask, {}

    def __getitem__(self, name):
        if name not in self._read:
            self._read[name] = self._select(name)
        return self._read[name]

    def _select(self, name):
        data, mask = self._data, self._mask
        if name not in self.FIELDS:
            raise KeyError(name)
        rows = np.flatnonzero(mask)
        texts = {"ids": data.dataset.ids, "prompts": data.dataset.prompts, "images": data.dataset.files}
        if name in texts:
            return take(texts[name], rows)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # one slice: a view, no copy
            return getattr(data, name)[rows[0]:rows[-1] + 1]
        return getattr(data, name)[mask]

    def __iter__(self):
        return iter(self.FIELDS)

    def __len__(self):
        return len(self.FIELDS)
