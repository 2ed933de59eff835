"""Predicting the prompt of any image with a trained run.

    from img2prompt import Predictor
    Predictor("runs/default").predict("my.png")                       # the run's best method
    Predictor("runs/mine", method="retrieval").predict([Image.open("a.png"), "b.jpg"], top_k=5)

Images are what users hold — file paths, PIL images, numpy arrays (H x W x 3, uint8) —
one or a list; they are encoded in batches, as sentence-transformers' ``encode`` does.
Two methods: ``decoder`` writes the prompt with the run's decoder (its ``token_probability``:
the geometric mean probability of the prompt's tokens), ``retrieval`` answers with the
run's stored prompt nearest to the mapper's predicted embedding (its ``similarity``: their
cosine). The default is the run's best: the decoder once the run has one. Every answer
carries the image's ``familiarity`` (``evaluation.familiarity``): below 1, the image is
unlike the training images and the prompt is a guess (``unfamiliar``).

Importing this module loads no pandas, training, plotting, papermill or matplotlib code.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from img2prompt.data.images import open_image, to_rgb
from img2prompt.encoders.embeddings import extract_image_embeddings
from img2prompt.errors import DataError, RunError
from img2prompt.evaluation.familiarity import unfamiliar
from img2prompt.evaluation.search import unit_rows
from img2prompt.run import DECODER, Run

METHODS = ("decoder", "retrieval")


class Predictor:
    """A trained run's image encoder with its mapper and stored prompts, and its decoder
    (``method="decoder"``, the default when the run has one), ready to caption images.
    ``run`` is a Run or its folder."""

    def __init__(self, run, method=None, decode_options=None, num_workers=-1):
        self.run = run if isinstance(run, Run) else Run.open(run)
        method = method or ("decoder" if self.run.is_finished(DECODER) else "retrieval")
        if method not in METHODS:
            raise RunError(f"unknown method '{method}'; use {' or '.join(METHODS)}.")
        self.method, self.config, self.num_workers = method, self.run.config, num_workers
        self.mapper = self.run.mapper()
        self.bank_prompts, bank_emb = self.run.prompt_bank()
        self.bank_emb = unit_rows(bank_emb)
        self.familiarity = self.run.familiarity()
        self.grid, self.colors, self.grid_map = 0, 0, "last"  # what the encoder gives: the pooled vector
        if method == "decoder":
            self.decoder = self.run.decoder().to(self.run.device)
            self.decode_options = decode_options or self.config.decode_options()
            spec = self.decoder.spec
            self.grid, self.colors, self.grid_map = spec["grid"], spec["colors"], spec["grid_map"]
        self.encoder = self.run.image_encoder()  # fine-tuned when the run tuned it

    def predict(self, images, top_k=5, batch_size=32, progress=False) -> list:
        """One dict per image: ``image`` (its path, or its position in the input),
        ``method``, ``prompt``, ``familiarity`` (0–100, None for a run that did not record
        it) and ``unfamiliar``; ``similarity`` (retrieval) or ``token_probability``
        (decoder); ``nearest``: the ``top_k`` stored prompts nearest to the mapper's
        prediction, each with its ``similarity``."""
        images = _as_list(images)
        features = self.encode(images, batch_size, progress)
        pooled = features[:, :self.encoder.dim]  # the pooled vector leads the decoder's input
        names = [str(i) if isinstance(i, (str, Path)) else f"#{n}" for n, i in enumerate(images)]
        similarities = unit_rows(self.mapper.predict(pooled).cpu().numpy()) @ self.bank_emb.T
        familiarity = (self.familiarity.percentile(pooled) if self.familiarity is not None
                       else [None] * len(images))
        results = []
        for name, row, known in zip(names, similarities, familiarity):
            nearest = [{"prompt": self.bank_prompts[i], "similarity": float(row[i])}
                       for i in np.argsort(-row, kind="stable")[:top_k]]
            results.append({"image": name, "method": self.method, "prompt": nearest[0]["prompt"],
                            "similarity": nearest[0]["similarity"],
                            "familiarity": None if known is None else float(known),
                            "unfamiliar": bool(known is not None and unfamiliar(known)), "nearest": nearest})
        if self.method == "decoder":
            texts = self.decoder.generate(features, self.decode_options)
            for result, text, probability in zip(results, texts, self.decoder.token_probability(features, texts)):
                del result["similarity"]
                result.update(prompt=text, token_probability=float(probability))
        return results

    def encode(self, images, batch_size=32, progress=False) -> np.ndarray:
        """The image encoder's features the method reads (the decoder's with their grid):
        files decoded in DataLoader workers, images in memory converted and batched here."""
        if all(isinstance(i, (str, Path)) for i in images):
            features = extract_image_embeddings([Path(i) for i in images], self.encoder, batch_size,
                                                self.num_workers, progress, self.config.max_pixels, self.grid,
                                                self.colors, self.grid_map)
        else:
            tensors = [self.encoder.preprocess(_as_rgb(i, self.config.max_pixels)) for i in images]
            features = torch.cat([self.encoder.forward(torch.stack(tensors[s:s + batch_size]), self.grid,
                                                       self.colors, self.grid_map)
                                  for s in range(0, len(tensors), batch_size)]).numpy()
        expected = self.mapper.hparams["in_dim"]
        if features.shape[1] < expected:
            raise RunError(f"{self.run.root}: its models expect {expected}-d image features but "
                           f"{self.encoder.name} gives {features.shape[1]}-d.")
        return features


def _as_list(images) -> list:
    if isinstance(images, (str, Path, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3):
        return [images]
    return list(images)


def _as_rgb(image, max_pixels) -> Image.Image:
    """A path, PIL image or uint8 array (H x W, H x W x 3 or 4) as an RGB PIL image."""
    if isinstance(image, (str, Path)):
        return open_image(image, max_pixels)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise DataError(f"an image array must be uint8 of shape H x W or H x W x 3|4 (got "
                            f"{image.dtype} {image.shape}).")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise DataError(f"cannot read an image from a {type(image).__name__}: give a path, a PIL "
                        "image or a numpy array.")
    return to_rgb(image)


def image_files(inputs, recursive=False) -> list:
    """The image files named by ``inputs`` (files, or folders: their images, with
    ``recursive`` those of their subfolders too), in order; DataError for a name that is
    neither, or a folder without images."""
    from img2prompt.data.images import IMAGE_EXTENSIONS
    files = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted(p for p in (given.rglob("*") if recursive else given.iterdir())
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise DataError(f"{given}: no image files (PNG, JPEG, WebP, …) in this folder"
                                f"{'' if recursive else ' (--recursive reads its subfolders)'}.")
            files += found
        elif given.is_file() or not given.exists():
            files.append(given)  # a missing file is named when it is read
        else:
            raise DataError(f"{given}: neither an image file nor a folder.")
    return files


def caption_path(image) -> Path:
    """Where a caption goes: beside the image, with its name and ``.txt`` (what caption-training
    tools read)."""
    return Path(image).with_suffix(".txt")


def write_captions(results, overwrite=False) -> tuple:
    """Each result's prompt into the caption file beside its image; an existing caption is
    kept unless ``overwrite``. Returns (written, kept) paths."""
    from img2prompt.storage.files import write_text
    written, kept = [], []
    for result in results:
        path = caption_path(result["image"])
        if path.exists() and not overwrite:
            kept.append(path)
            continue
        write_text(path, result["prompt"] + "\n")
        written.append(path)
    return written, kept


PREDICTION_COLUMNS = ("image", "prompt", "method", "familiarity", "unfamiliar", "top_k")


def write_predictions(path, results):
    """A CSV of the results: image, prompt, method, familiarity, unfamiliar, and the top-k
    stored prompts with their similarity (``prompt (0.912) | …``)."""
    import csv
    import io

    from img2prompt.storage.files import write_text
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(PREDICTION_COLUMNS)
    for result in results:
        familiarity = "" if result["familiarity"] is None else f"{result['familiarity']:.1f}"
        nearest = " | ".join(f"{n['prompt']} ({n['similarity']:.3f})" for n in result["nearest"])
        writer.writerow([result["image"], result["prompt"], result["method"], familiarity, result["unfamiliar"],
                         nearest])
    write_text(path, table.getvalue())


def images_to_describe(images, run, count=8) -> tuple:
    """(image paths, their true prompts or None) to describe: ``images`` is a file, a folder
    of images, or a dataset folder (``prompts.csv`` beside ``images/``: its prompts are the
    true ones); empty, ``count`` of the run's own test images with theirs. At most ``count``."""
    from img2prompt.data.dataset import PROMPTS_FILE, load_dataset
    if images and not (Path(images) / PROMPTS_FILE).is_file():
        return image_files([images])[:count], None
    if images:
        dataset = load_dataset(images, on_error="skip")
    else:  # the run's test images, in its split's order
        dataset = run.dataset()
        dataset = dataset.take(np.flatnonzero(run.splits(dataset) == "test"))
    return list(dataset.paths[:count]), list(dataset.prompts[:count])
