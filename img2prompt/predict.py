"""Predicting the prompt of any image with a trained run: ``Predictor(run_dir).predict(paths)``.

Two methods: ``retrieval`` (the mapper's predicted embedding, answered with the nearest
prompts of the run's bank) and ``decoder`` (prompt text written by the run's decoder).
"""

from pathlib import Path

import numpy as np

from .config import StudyConfig
from .embeddings import extract_image_embeddings
from .errors import RunError
from .evaluation import unit_rows
from .image_encoders import image_encoder
from .decoder import load_decoder
from .mapper import load_mapper
from .study import BANK_FILE, DECODER, DECODER_FILE, MODEL_FILE, TRAIN, load_prompt_bank, open_run

METHODS = ("retrieval", "decoder")


class Predictor:
    """A trained run's image encoder with its mapper and prompt bank (``retrieval``) or its
    decoder (``decoder``), ready to caption images."""

    def __init__(self, run_dir, method="retrieval", decode_options=None, num_workers=-1, batch_size=32):
        if method not in METHODS:
            raise RunError(f"unknown method '{method}'; use {' or '.join(METHODS)}.")
        self.run_dir, self.method = Path(run_dir), method
        if not open_run(self.run_dir).is_finished(DECODER if method == "decoder" else TRAIN):
            command = "train-decoder --run" if method == "decoder" else "train --resume --out"
            raise RunError(f"{self.run_dir}: its {method} model did not finish training; finish it "
                           f"with 'img2prompt {command} {self.run_dir}' (or train it anew).")
        self.config = StudyConfig.load(self.run_dir)
        if method == "decoder":
            self.decoder = load_decoder(self.run_dir / DECODER_FILE)
            self.decode_options = decode_options or self.config.decode_options()
            self.in_dim = self.decoder.spec["image_dim"]
        else:
            self.mapper = load_mapper(self.run_dir / MODEL_FILE)
            if not (self.run_dir / BANK_FILE).is_file():
                raise RunError(f"{self.run_dir / BANK_FILE}: not found; train the run again.")
            self.bank_prompts, bank_emb = load_prompt_bank(self.run_dir / BANK_FILE)
            self.bank_emb = unit_rows(bank_emb)
            self.in_dim = self.mapper.hparams["in_dim"]
        self.encoder = image_encoder(self.config.image_encoder, self.config.image_weights)
        self.num_workers, self.batch_size = num_workers, batch_size

    def predict(self, images, top_k=1, progress=False) -> list:
        """One dict per image path: ``image``, ``method`` and ``prompt``.

        ``retrieval`` adds ``similarity`` (cosine of the best bank prompt to the predicted
        embedding, in the target space) and ``candidates`` (the ``top_k`` best prompts with
        their similarities); ``decoder`` writes the prompt with the run's decoding options.
        """
        paths = [Path(p) for p in images]
        features = extract_image_embeddings(paths, self.encoder, self.batch_size,
                                            self.num_workers, progress)
        if features.shape[1] != self.in_dim:
            raise RunError(f"{self.run_dir}: the {self.method} model expects {self.in_dim}-d "
                           f"image features but {self.encoder.name} gives {features.shape[1]}-d.")
        if self.method == "decoder":
            texts = self.decoder.generate(features, self.decode_options)
            return [{"image": str(path), "method": "decoder", "prompt": text}
                    for path, text in zip(paths, texts)]
        similarities = unit_rows(self.mapper.predict(features).numpy()) @ self.bank_emb.T
        results = []
        for path, row in zip(paths, similarities):
            best = np.argsort(-row, kind="stable")[:top_k]
            candidates = [{"prompt": self.bank_prompts[i], "similarity": float(row[i])} for i in best]
            results.append({"image": str(path), "method": "retrieval", "prompt": candidates[0]["prompt"],
                            "similarity": candidates[0]["similarity"], "candidates": candidates})
        return results
