"""Predicting the prompt of any image with a trained run.

    from img2prompt import Predictor
    Predictor("runs/mine").predict(Image.open("my.png"))          # or paths, or arrays
    Predictor("runs/mine", method="decoder").predict(["a.png", "b.jpg"], batch_size=16)

Images are what users hold — file paths, PIL images, numpy arrays (H x W x 3, uint8) —
one or a list; they are encoded in batches, as sentence-transformers' ``encode`` does.
Two methods: ``retrieval`` answers with the run's bank prompt nearest to the mapper's
predicted embedding (score: their cosine similarity); ``decoder`` writes the prompt with
the run's decoder (score: the mean probability of its tokens).

Importing this module loads no training, plotting, papermill or matplotlib code.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from img2prompt.data.images import open_image, to_rgb
from img2prompt.encoders.embeddings import extract_image_embeddings
from img2prompt.errors import DataError, RunError
from img2prompt.evaluation.scores import unit_rows
from img2prompt.run import Run

METHODS = ("retrieval", "decoder")


class Predictor:
    """A trained run's image encoder with its mapper and prompt bank (``retrieval``) or its
    decoder (``decoder``), ready to caption images. ``run`` is a Run or its folder."""

    def __init__(self, run, method="retrieval", decode_options=None, num_workers=-1):
        if method not in METHODS:
            raise RunError(f"unknown method '{method}'; use {' or '.join(METHODS)}.")
        self.run = run if isinstance(run, Run) else Run.open(run)
        self.method, self.config, self.num_workers = method, self.run.config, num_workers
        if method == "decoder":
            self.decoder = self.run.decoder().to(self.run.device)
            self.decode_options = decode_options or self.config.decode_options()
            self.in_dim, self.grid = self.decoder.spec["image_dim"], self.decoder.spec.get("grid", 0)
            self.colors = self.decoder.spec.get("colors", 0)
            self.grid_map = self.decoder.spec.get("grid_map", "last")
        else:
            self.mapper = self.run.mapper()
            self.bank_prompts, bank_emb = self.run.prompt_bank()
            self.bank_emb = unit_rows(bank_emb)
            self.in_dim, self.grid, self.colors, self.grid_map = self.mapper.hparams["in_dim"], 0, 0, "last"
        self.encoder = self.run.image_encoder()  # fine-tuned when the run tuned it

    def predict(self, images, top_k=1, batch_size=32, progress=False) -> list:
        """One dict per image: ``image`` (its path, or its position in the input),
        ``method``, ``prompt`` and ``score``; ``retrieval`` adds ``candidates``, the
        ``top_k`` best bank prompts with their scores."""
        images = _as_list(images)
        features = self.encode(images, batch_size, progress)
        names = [str(i) if isinstance(i, (str, Path)) else f"#{n}" for n, i in enumerate(images)]
        if self.method == "decoder":
            texts = self.decoder.generate(features, self.decode_options)
            scores = self.decoder.token_probability(features, texts)
            return [{"image": name, "method": "decoder", "prompt": text, "score": float(score)}
                    for name, text, score in zip(names, texts, scores)]
        similarities = unit_rows(self.mapper.predict(features).numpy()) @ self.bank_emb.T
        results = []
        for name, row in zip(names, similarities):
            best = np.argsort(-row, kind="stable")[:top_k]
            candidates = [{"prompt": self.bank_prompts[i], "score": float(row[i])} for i in best]
            results.append({"image": name, "method": "retrieval", "prompt": candidates[0]["prompt"],
                            "score": candidates[0]["score"], "candidates": candidates})
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
        if features.shape[1] != self.in_dim:
            raise RunError(f"{self.run.root}: the {self.method} model expects {self.in_dim}-d image "
                           f"features but {self.encoder.name} gives {features.shape[1]}-d.")
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
