"""Predicting the prompt of any image with a trained run: ``Predictor(run_dir).predict(paths)``."""

from pathlib import Path

import numpy as np

from .config import StudyConfig
from .embeddings import extract_image_embeddings
from .errors import RunError
from .evaluation import unit_rows
from .image_encoders import image_encoder
from .mapper import load_mapper
from .study import BANK_FILE, MODEL_FILE, load_prompt_bank


class Predictor:
    """A trained run's image encoder, mapper and prompt bank, ready to caption images."""

    def __init__(self, run_dir, num_workers=-1, batch_size=32):
        self.run_dir = Path(run_dir)
        self.config = StudyConfig.load(self.run_dir)
        self.mapper = load_mapper(self.run_dir / MODEL_FILE)
        if not (self.run_dir / BANK_FILE).is_file():
            raise RunError(f"{self.run_dir / BANK_FILE}: not found; train the run again.")
        self.bank_prompts, bank_emb = load_prompt_bank(self.run_dir / BANK_FILE)
        self.bank_emb = unit_rows(bank_emb)
        self.encoder = image_encoder(self.config.image_encoder, self.config.image_weights)
        self.num_workers, self.batch_size = num_workers, batch_size

    def predict(self, images, top_k=1, progress=False) -> list:
        """For each image path: the nearest bank prompts to its predicted prompt embedding.

        Returns one dict per image: ``image``, ``prompt`` (the best), ``similarity`` (cosine
        in the target space) and ``candidates`` (the ``top_k`` best, with similarities).
        """
        paths = [Path(p) for p in images]
        features = extract_image_embeddings(paths, self.encoder, self.batch_size,
                                            self.num_workers, progress)
        if features.shape[1] != self.mapper.hparams["in_dim"]:
            raise RunError(f"{self.run_dir}: the mapper expects {self.mapper.hparams['in_dim']}-d "
                           f"image features but {self.encoder.name} gives {features.shape[1]}-d.")
        similarities = unit_rows(self.mapper.predict(features).numpy()) @ self.bank_emb.T
        results = []
        for path, row in zip(paths, similarities):
            best = np.argsort(-row, kind="stable")[:top_k]
            candidates = [{"prompt": self.bank_prompts[i], "similarity": float(row[i])} for i in best]
            results.append({"image": str(path), "prompt": candidates[0]["prompt"],
                            "similarity": candidates[0]["similarity"], "candidates": candidates})
        return results
