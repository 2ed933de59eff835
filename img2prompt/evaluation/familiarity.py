"""Familiarity: how close an image comes to the images the model was trained on.

A model answers every image, but it only knows the world of its training images: a
photograph given to a model trained on generated shapes gets a confident-looking shapes
prompt. So each prediction carries a *familiarity*: the image's closeness to the training
images (the highest cosine between its embedding and theirs, centred on the training mean,
as kNN compares them), as a percentile of the validation images' own closeness (0–100: a
validation image as typical as this one or less). The validation images were not trained
on, so they show how close a new image of the training world comes. Below
``FLAG_BELOW`` (the 1st percentile), the image is unlike anything the model was trained on
and its prompt is a guess: the output says so.
"""

import numpy as np

from img2prompt.evaluation.search import nearest, unit_rows
from img2prompt.storage.checkpoints import (
    PROVENANCE,
    check_provenance,
    load_tensors,
    save_tensors,
)

FAMILIARITY_FILE = "familiarity.safetensors"
FLAG_BELOW = 1.0  # percentile of the validation images' closeness under which an image is unfamiliar
REFERENCE_ROWS = 5_000  # training images kept to compare with (a seeded sample beyond that)


class Familiarity:
    """The training images' centred unit rows (a sample) and the validation images'
    closeness to them, sorted."""

    def __init__(self, reference, centre, validation):
        self.reference, self.centre = np.asarray(reference, np.float32), np.asarray(centre, np.float32)
        self.validation = np.sort(np.asarray(validation, np.float64))

    @classmethod
    def fit(cls, train_emb, val_emb, seed=0) -> "Familiarity":
        """From a split's pooled image embeddings (training and validation rows)."""
        train_emb = np.asarray(train_emb, np.float32)
        centre = train_emb.mean(axis=0)
        rows = np.arange(len(train_emb))
        if len(rows) > REFERENCE_ROWS:
            rows = np.sort(np.random.default_rng(seed).choice(rows, REFERENCE_ROWS, replace=False))
        made = cls(unit_rows(train_emb[rows] - centre), centre, [])
        made.validation = np.sort(made.closeness(val_emb))
        return made

    def closeness(self, image_emb) -> np.ndarray:
        """The highest cosine of each image (pooled embedding) with a training image."""
        unit = unit_rows(np.asarray(image_emb, np.float32) - self.centre)
        found = nearest(unit, self.reference)
        return np.sum(unit * self.reference[found], axis=1).astype(np.float64)

    def percentile(self, image_emb) -> np.ndarray:
        """Each image's familiarity: the share (0–100) of validation images no closer."""
        closeness = self.closeness(image_emb)
        return 100.0 * np.searchsorted(self.validation, closeness, side="right") / max(1, len(self.validation))

    def save(self, path, provenance: dict):
        tensors = {"reference": self.reference, "centre": self.centre[None], "validation": self.validation[None]}
        save_tensors(path, tensors, {PROVENANCE: provenance})

    @classmethod
    def load(cls, path, provenance: dict) -> "Familiarity":
        """The record at ``path``, refused (RunError) unless made from ``provenance``."""
        fix = "Train the run again ('img2prompt train --force')."
        tensors, metadata = load_tensors(path, "familiarity record", fix, framework="numpy")
        check_provenance(path, metadata, provenance, fix)
        return cls(tensors["reference"], tensors["centre"][0], tensors["validation"][0])


def unfamiliar(percentile) -> bool:
    return percentile < FLAG_BELOW


def guess_warning(unfamiliar_images, total) -> str:
    """What the output says of the images too unlike the training images (their names)."""
    shown = ", ".join(map(str, unfamiliar_images[:3])) + (", …" if len(unfamiliar_images) > 3 else "")
    return (f"{len(unfamiliar_images)} of {total} image(s) are unlike the images the model was trained on "
            f"(familiarity below {FLAG_BELOW:g}: at least {100 - FLAG_BELOW:g}% of its validation images come closer "
            f"to them): {shown}. Their prompts are guesses. A model knows the world of its training images only: "
            "train one on image–prompt pairs like yours (README: \"Your own images\").")
