"""A run: the run folder and the study's stages over it. The only code that knows the folder.

    run = Run.create(StudyConfig(data_dir=..., run_dir="runs/mine"))   # data, split, config
    run.train()                  # the mapper, on the run's embeddings (cached)
    run.train_decoder()          # the prompt decoder
    metrics = run.evaluate()     # every method on the test split
    run.predictor().predict([...])

The command line and the notebooks call these same methods. Settings change only through
``update`` (checked, then saved with the run). Each stage holds the folder's lock, writes
its files, and marks itself finished in the folder's manifest last (``storage.ownership``):
a run is finished only when its manifest says so, and starting it anew removes only what
the project wrote there.

Files: config.json, splits.csv, rejects.csv (rows skipped), best_model.safetensors,
prompt_bank.safetensors, history.csv, training_state.pt (while a training is unfinished);
with ``tune="encoder"`` also encoder.safetensors (the fine-tuned top layers),
frozen_model.safetensors (the mapper before fine-tuning), tune_history.csv, tune_state.pt;
decoder.safetensors, decoder_history.csv, test_results.csv, metrics.json, figures/, and the
summaries behind each notebook's conclusions (``SUMMARIES``).

Importing this module loads no training, plotting or notebook code: those load when a
stage runs, so that inference (``predict``) stays light.
"""

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from img2prompt.config import CONFIG_FILE, StudyConfig
from img2prompt.data.dataset import (REJECTS_FILE, SPLITS, ImageDataset, grouped_split, load_dataset,
                                     load_splits, record_rejects, save_splits, unique_prompts)
from img2prompt.errors import RunError, TrainingDiverged

from img2prompt.evaluation.scores import Metrics
from img2prompt.storage.checkpoints import PROVENANCE, check_provenance, load_tensors, save_tensors

from img2prompt.storage.files import read_csv, read_json, write_csv, write_json

from img2prompt.storage.ownership import MANIFEST_FILE, claim, find_owned, unreadable_manifest


RUN_KIND = "run"
# stages recorded as finished in the manifest
SPLIT, TRAIN, TUNE, DECODER, EVALUATE = "split", "train", "tune", "decoder", "evaluate"
SPLITS_FILE = "splits.csv"
MODEL_FILE = "best_model.safetensors"
BANK_FILE = "prompt_bank.safetensors"
HISTORY_FILE = "history.csv"
TRAINING_STATE_FILE = "training_state.pt"
FROZEN_MODEL_FILE = "frozen_model.safetensors"  # --tune encoder: the mapper before fine-tuning
TUNED_ENCODER_FILE = "encoder.safetensors"  # --tune encoder: the encoder's tuned top layers
TUNE_HISTORY_FILE = "tune_history.csv"
TUNE_STATE_FILE = "tune_state.pt"
DECODER_FILE = "decoder.safetensors"
DECODER_HISTORY_FILE = "decoder_history.csv"
RESULTS_FILE = "test_results.csv"
METRICS_FILE = "metrics.json"
FIGURES = {"loss": "figures/loss_curve.png", "tune": "figures/tune_curve.png",
           "decoder_loss": "figures/decoder_loss.png"}
SUMMARIES = {"data": "data_summary.json", "embedding": "embedding_summary.json",
             "training": "training_summary.json", "decoder": "decoder_summary.json",
             "error_analysis": "error_analysis.json", "generation": "generation_summary.json"}


def _quiet(*_args, **_kwargs):
    pass


def decoder_input(grid, colors, grid_map="last") -> str:
    """What a decoder reads, in words."""
    parts = ["the pooled vector"]
    if grid:
        maps = "the middle and last maps" if grid_map == "both" else f"the {grid_map} map"
        parts.append(f"a {grid}x{grid} grid of {maps}")
    if colors:
        parts.append(f"colour histograms ({colors} levels)")
    return " + ".join(parts)


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
    (``TextColumn``s) and the embeddings. An embedding is a view of the whole array when the split's rows are
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
        if name in texts:  # a TextColumn of the split's rows
            return texts[name].take(rows)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # one slice: a view, no copy
            return getattr(data, name)[rows[0]:rows[-1] + 1]
        return getattr(data, name)[mask]

    def __iter__(self):
        return iter(self.FIELDS)

    def __len__(self):
        return len(self.FIELDS)


def _block_predictions(mapper, test):
    """The mapper's predictions for a slice of ``test``'s rows, as ``evaluate_methods`` asks
    for them a block at a time."""
    return lambda rows: mapper.predict(test["image_emb"][rows]).numpy()


class Run:
    """A run folder and its stages; make one with ``Run.create`` or ``Run.open``."""

    def __init__(self, folder, device=None):
        self.folder, self.root = folder, folder.root
        config = StudyConfig.load(self.root)
        # where to run is this session's choice, not the run's: a run trained on a GPU opens anywhere
        self.config = dataclasses.replace(config, run_dir=str(self.root), device=device or "auto")
        self.config.validate()
        self._data = None  # prepared data, kept while the settings stay the same
        self._data_tuned = False  # whether it holds the fine-tuned encoder's features

    # --- making and opening -------------------------------------------------------------------

    @classmethod
    def create(cls, config: StudyConfig, force=False, origin="cli", log=_quiet) -> "Run":
        """Start (or start anew) the run in ``config.run_dir``: its config and split.

        The dataset is loaded and checked before anything in the folder changes, so a bad
        dataset costs nothing. Starting anew removes only the files the project wrote there;
        a folder it did not make is refused. A finished run is only replaced with ``force``,
        except that the notebooks (``origin="notebooks"``) rerun a study they made."""
        from img2prompt.data.synth import study_dataset
        config.validate()
        claim(config.run_dir, RUN_KIND, create=False)  # a folder it may not use: refused before the data is made
        config = dataclasses.replace(config, data_dir=study_dataset(config))
        folder = claim(config.run_dir, RUN_KIND)
        with folder.lock(f"run folder {folder.root}"):
            rerun = origin == "notebooks" and folder.origin == origin
            if folder.is_finished(TRAIN) and not force and not rerun:
                raise RunError(f"{config.run_dir}: already holds a trained model. Pass --force "
                               "(notebooks: -p force True) to train it anew (its split is made anew "
                               "too), or choose another --out.")
            dataset = load_dataset(config.data_dir, config.on_error, config.max_pixels)
            folder.clear()
            folder.set_origin(origin)
            config.save(folder.root)
            run = cls(folder, config.device)
            record_rejects(dataset, run._path(REJECTS_FILE), log)
            run._split(dataset, log)
            folder.mark_finished(SPLIT)
        return run

    @classmethod
    def open(cls, run_dir, device=None) -> "Run":
        """The run in ``run_dir``, working on ``device`` (default auto); RunError when the
        folder is not a run the project made."""
        folder = find_owned(run_dir)
        if folder is not None and folder.kind is None:
            raise unreadable_manifest(folder)
        if folder is None or folder.kind != RUN_KIND:
            if (Path(run_dir) / CONFIG_FILE).is_file():
                raise RunError(f"{run_dir}: has no {MANIFEST_FILE} recording what img2prompt wrote "
                               "(made by an older img2prompt, or not a run folder). Train it anew in "
                               "a new folder with 'img2prompt train'.")
            raise RunError(f"{run_dir}: not a run folder. Is it a run folder made by 'img2prompt "
                           "train' (or notebook 01)?")
        return cls(folder, device)

    @property
    def device(self):
        from img2prompt.devices import resolve_device
        return resolve_device(self.config.device)

    def update(self, **settings) -> StudyConfig:
        """Change settings (StudyConfig fields), checked, and save them with the run."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(StudyConfig)})
        if unknown:
            raise RunError(f"unknown setting(s) {', '.join(unknown)}.")
        config = dataclasses.replace(self.config, **settings)
        config.validate()
        if config != self.config:
            with self._lock():
                config.save(self.root)
            self.config, self._data = config, None
        return config

    def is_finished(self, stage) -> bool:
        return self.folder.is_finished(stage)

    def _lock(self):
        return self.folder.lock(f"run folder {self.root}")

    def _path(self, name) -> Path:
        return self.root / name

    # --- data and embeddings --------------------------------------------------------------------

    def dataset(self, log=_quiet, config=None) -> ImageDataset:
        """The run's dataset, loaded with its error policy and pixel limit; skipped rows are
        listed in the run's rejects.csv."""
        config = config or self.config
        dataset = load_dataset(config.data_dir, config.on_error, config.max_pixels)
        record_rejects(dataset, self._path(REJECTS_FILE), log)
        return dataset

    def _split(self, dataset, log=_quiet) -> np.ndarray:
        """The run's split: reused from splits.csv when there, else made and saved."""
        path = self._path(SPLITS_FILE)
        if path.exists():
            splits = load_splits(path, dataset)
        else:
            config = self.config
            splits = grouped_split(dataset.prompts, config.seed, config.val_fraction, config.test_fraction)
            save_splits(path, dataset, splits)
        counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
        log(f"dataset {dataset.root}: {len(dataset)} images; split {counts} (grouped by prompt)")
        return splits

    def splits(self, dataset) -> np.ndarray:
        """train/val/test of each image of ``dataset``, from the run's split."""
        return load_splits(self._path(SPLITS_FILE), dataset)

    def data(self, progress=None, log=_quiet, resume=False) -> StudyData:
        """The dataset, its split and its embeddings (through the cache; ``resume``
        continues an interrupted image extraction)."""
        tuned = self.is_finished(TUNE)  # whose features: the frozen or the fine-tuned encoder's
        if self._data is None or resume or self._data_tuned != tuned:
            self._data = None  # not held twice while read again
            self._data, self._data_tuned = self._prepare(self.config, progress, log, resume), tuned
        return self._data

    def _prepare(self, config, progress, log, resume=False, tuned=None, lock=True) -> StudyData:
        """The dataset, split and embeddings; ``lock=False`` only reads (a torchrun follower,
        while the main process holds the lock)."""
        from img2prompt.encoders.allocator import hand_back_freed_memory
        from img2prompt.encoders.embeddings import dataset_embeddings
        with self._lock() if lock else contextlib.nullcontext():
            if lock:
                dataset = self.dataset(log, config)
                splits = self._split(dataset, log)
            else:  # made by the main process: read them
                dataset = load_dataset(config.data_dir, config.on_error, config.max_pixels)
                splits = self.splits(dataset)
            found = dataset_embeddings(config, dataset, progress, log, resume, self.image_encoder(tuned, config),
                                       group=[SPLITS.index(split) for split in splits])
            if lock and found.dataset.rejects != dataset.rejects:  # images found unreadable while embedded
                record_rejects(found.dataset, self._path(REJECTS_FILE), log)
            del dataset  # the listing in the file's order: the data holds it in split order
            hand_back_freed_memory()  # what reading freed stays out of the stage's peak
            return StudyData(found.dataset, splits[found.rows], found.image_emb, found.target_emb,
                             found.metric_emb, found.load_decoder_emb)

    def provenance(self, *parts, tuned=None) -> dict:
        """What the run's models are made from, as its settings say now: for each part asked,
        ``image_encoder`` (its identity; fine-tuned per ``tuned``, by default as the run is),
        ``text_encoder`` (the target space's), ``decoder_input`` (what the decoder reads
        beside the pooled vector). Saved in each model file and compared when it is loaded."""
        from img2prompt.encoders.text import text_encoder
        config, made = self.config, {}
        if "image_encoder" in parts:
            made["image_encoder"] = self.image_encoder(tuned).identity()
        if "text_encoder" in parts:
            made["text_encoder"] = text_encoder(config.text_encoder, config.text_model,
                                                config.text_pooling).fingerprint()
        if "decoder_input" in parts:
            made["decoder_input"] = {"grid": config.decoder_grid, "colors": config.decoder_colors,
                                     "grid_map": config.decoder_map}
        return made

    def image_encoder(self, tuned=None, config=None):
        """The run's image encoder: with its fine-tuned top layers once ``--tune encoder``
        finished (``tuned=False``: the frozen one it started from)."""
        from img2prompt.encoders.image import image_encoder
        config = config or self.config
        encoder = image_encoder(config.image_encoder, config.image_weights, config.device)
        if tuned is None:
            tuned = self.is_finished(TUNE)
        if tuned:
            encoder.use_tuned(self._path(TUNED_ENCODER_FILE))
        return encoder

    # --- the mapper -------------------------------------------------------------------------------

    def train(self, resume=False, progress=None, log=_quiet) -> dict:
        """Train the mapper on frozen features; with ``tune="encoder"`` then fine-tune the
        encoder's top blocks with it (``models.finetune``). Save the model(s), the prompt bank
        (the training prompts, for retrieval), the histories and curves. The training state
        is saved as it goes; ``resume`` continues an interrupted training (and embedding
        extraction) instead."""
        from img2prompt import distributed

        if not distributed.is_main():
            return self._follow_training(resume)
        with self._lock():
            def prepare():
                if resume and self.is_finished(TRAIN):
                    raise RunError(f"{self.root}: this run finished; nothing to resume (--force trains "
                                   "it anew).")
                self.folder.mark_unfinished(TRAIN)
                self.folder.mark_unfinished(TUNE)  # so the data is the frozen encoder's features
                return self.data(progress, log, resume=resume)

            data = distributed.main_first(prepare)
            with self._failing(TRAIN):
                summary = self._train_stages(data, resume, progress, log)
            self.folder.mark_finished(TRAIN)
        log(f"best epoch {summary['best_epoch']} of {summary['epochs']}: validation cosine "
            f"{summary['val_cosine']:.4f}; model in {self._path(MODEL_FILE)}")
        return summary

    def _train_stages(self, data, resume, progress, log) -> dict:
        """The mapper on frozen features, then with ``tune="encoder"`` the fine-tuning; the
        prompt bank; their files saved (the main process)."""
        from img2prompt.evaluation.search import Rows
        from img2prompt.models.mapper import save_mapper
        from img2prompt.reports.plots import plot_history, save_figure

        config = self.config
        train_part, val_part = data.part("train"), data.part("val")
        tune = config.tune == "encoder"
        head_file = self._path(FROZEN_MODEL_FILE if tune else MODEL_FILE)
        state = self._path(TRAINING_STATE_FILE)
        mapper_made_from = self.provenance("image_encoder", "text_encoder", tuned=False)
        if self._head_trained(resume):
            log("resuming: the mapper on frozen features is trained; fine-tuning")
            model, history = self._head(), self.history()

        else:
            if resume and state.is_file():
                log("resuming the training")
            log(f"training the mapper ({config.depth} hidden layer(s) of {config.hidden_size}) on "
                f"{len(train_part['ids'])} images, validating on {len(val_part['ids'])}")
            model, history = self._train_mapper(train_part, val_part, progress, resume)
            save_mapper(model, head_file, mapper_made_from)
            write_csv(self._path(HISTORY_FILE), history)
            save_figure(plot_history(history), self._path(FIGURES["loss"]))
            if self.folder.owns(state):
                self.folder.remove(state)  # only once everything it led to is saved
        summary = self._summary(history, train_part, val_part)
        if tune:
            summary["tuned"] = self._fine_tune(data, model, resume, progress, log)
        prompts, first = unique_prompts(train_part["prompts"])
        save_tensors(self._path(BANK_FILE), {"target_emb": Rows(train_part["target_emb"], first)},
                     {"prompts": prompts, PROVENANCE: self.provenance("text_encoder")})  # rows written in place
        return summary

    def _train_mapper(self, train_part, val_part, progress, resume):
        """(mapper, history) on frozen features, continuing a saved training state if ``resume``."""
        from img2prompt.models.training import train_mapper
        state = self._path(TRAINING_STATE_FILE)
        return train_mapper(train_part["image_emb"], train_part["target_emb"], val_part["image_emb"],
                            val_part["target_emb"], self.config, progress, state_path=state,
                            resume=resume and state.is_file(), device=self.device)

    def _head_trained(self, resume) -> bool:
        """Whether a resumed ``--tune encoder`` run has its mapper on frozen features already."""
        head_file = self._path(FROZEN_MODEL_FILE)
        return resume and self.config.tune == "encoder" and self.folder.owns(head_file) and head_file.is_file()

    def _follow_training(self, resume) -> dict:
        """A follower under torchrun (``distributed``): once the main process has the
        embeddings in the cache, train beside it on a share of each batch (the mapper, then
        the encoder's top with it); write nothing."""
        data = self._follower_data()
        train_part, val_part = data.part("train"), data.part("val")
        if self._head_trained(resume):  # as the main process does
            model, history = self._head(), self.history()
        else:
            model, history = self._train_mapper(train_part, val_part, False, resume)
        if self.config.tune == "encoder":
            self._fine_tune(data, model, resume, False, _quiet)
        return self._summary(history, train_part, val_part)

    def _follower_data(self) -> StudyData:
        """A torchrun follower's data: once the main process has it, read from the cache."""
        from img2prompt import distributed
        distributed.main_first(None)
        return self._prepare(self.config, False, _quiet, lock=False)

    def _summary(self, history, train_part, val_part) -> dict:
        best = history[history["best"]].iloc[0]
        return {"run_dir": str(self.root), "best_epoch": int(best["epoch"]), "epochs": len(history),
                "val_cosine": float(best["val_cosine"]), "train_loss_at_best": float(best["train_loss"]),
                "val_loss_at_best": float(best["val_loss"]), "seconds": float(history["seconds"].sum()),
                "train_images": len(train_part["ids"]), "val_images": len(val_part["ids"])}

    def _fine_tune(self, data, mapper, resume, progress, log) -> dict:
        """Fine-tune the encoder's top blocks with ``mapper``; save them and the tuned mapper,
        then make the run's features anew with the tuned encoder (a torchrun follower only
        trains beside the main process: None)."""
        from img2prompt import distributed
        from img2prompt.encoders.embeddings import EmbeddingCache, trunk_features
        from img2prompt.models.finetune import fine_tune, save_tuned
        from img2prompt.models.mapper import save_mapper
        from img2prompt.reports.plots import plot_tune_history, save_figure

        config, encoder = self.config, self.image_encoder(tuned=False)
        started = time.perf_counter()

        def trunk_of_every_image():
            return trunk_features(data.dataset, encoder, config.tune_blocks, EmbeddingCache(config.cache_dir),
                                  config.embed_batch_size, config.num_workers, progress)

        trunk = distributed.main_first(trunk_of_every_image)
        if trunk is None:  # a follower: from the cache, once the main process has put it there
            trunk = trunk_of_every_image()
        trunk_seconds = time.perf_counter() - started
        state = self._path(TUNE_STATE_FILE)
        resumed = resume and state.is_file()
        log(f"fine-tuning the top {config.tune_blocks} block(s) of {encoder.name} with the mapper "
            f"({'resumed; ' if resumed else ''}frozen blocks run once: {trunk_seconds:.0f} s)")
        train, val = (data.splits == "train"), (data.splits == "val")
        model, history = fine_tune(encoder, mapper, trunk[train], data.target_emb[train], trunk[val],
                                   data.target_emb[val], config, progress, state_path=state,
                                   resume=resumed, device=self.device)
        if not distributed.is_main():
            return None
        save_tuned(model, self._path(TUNED_ENCODER_FILE))
        save_mapper(model.mapper, self._path(MODEL_FILE), self.provenance("image_encoder", "text_encoder", tuned=True))
        write_csv(self._path(TUNE_HISTORY_FILE), history)
        save_figure(plot_tune_history(history, self.history()), self._path(FIGURES["tune"]))
        if self.folder.owns(state):
            self.folder.remove(state)
        self.folder.mark_finished(TUNE)
        self.data(progress, log)  # from now on: the fine-tuned encoder's features
        best = history[history["best"]].iloc[0]
        return {"best_epoch": int(best["epoch"]), "epochs": int(history["epoch"].max()),
                "val_cosine": float(best["val_cosine"]), "start_val_cosine": float(history["val_cosine"].iloc[0]),
                "tune_blocks": config.tune_blocks, "trunk_seconds": trunk_seconds,
                "seconds": float(history["seconds"].sum()),
                "images_per_s": float(history["images_per_s"].median())}

    def mapper(self):
        from img2prompt.models.mapper import load_mapper
        self._require(TRAIN, "train --resume --out")
        return load_mapper(self._path(MODEL_FILE), self.provenance("image_encoder", "text_encoder"))

    def prompt_bank(self):
        """(prompts, target-space embeddings) of the prompts retrieval answers with."""
        self._require(TRAIN, "train --resume --out")
        path = self._path(BANK_FILE)
        fix = "Train the run again ('img2prompt train --force')."
        tensors, metadata = load_tensors(path, "prompt bank", fix, framework="numpy", required=("prompts",))
        check_provenance(path, metadata, self.provenance("text_encoder"), fix)
        prompts, bank = metadata["prompts"], tensors.get("target_emb")
        if bank is None or not isinstance(prompts, list) or len(prompts) != len(bank):
            raise RunError(f"{path}: not an img2prompt prompt bank (prompts and embeddings do not "
                           "match). Train the run again.")
        return prompts, bank

    def history(self) -> pd.DataFrame:
        """The mapper's training on frozen features, one row per epoch."""
        return read_csv(self._path(HISTORY_FILE), f"Train the run again ('img2prompt train --force --out {self.root}').",
                        columns=("epoch", "val_cosine", "best"))

    def tune_history(self):
        """Fine-tuning (``tune="encoder"``), one row per epoch (0: before it); None otherwise."""
        if not self.is_finished(TUNE):
            return None
        return read_csv(self._path(TUNE_HISTORY_FILE), "Train the run again ('img2prompt train --tune encoder "
                        f"--force --out {self.root}').", columns=("epoch", "val_cosine", "best"))

    def frozen_mapper(self):
        """The mapper trained on frozen features before fine-tuning."""
        self._require(TUNE, "train --tune encoder --force --out")
        return self._head()

    def _head(self):
        """The mapper on frozen features of a ``--tune encoder`` run (saved before fine-tuning)."""
        from img2prompt.models.mapper import load_mapper
        return load_mapper(self._path(FROZEN_MODEL_FILE), self.provenance("image_encoder", "text_encoder",
                                                                           tuned=False))

    # --- the decoder -------------------------------------------------------------------------------

    def train_decoder(self, force=False, progress=None, log=_quiet) -> dict:
        """Train the prompt decoder on the run's data (cached embeddings); save it, its
        history, loss curve and summary. A trained decoder is only replaced with ``force``."""
        from img2prompt import distributed
        from img2prompt.models.decoder import save_decoder
        from img2prompt.reports.plots import plot_decoder_history, save_figure

        if not distributed.is_main():  # a torchrun follower: train beside the main process, write nothing
            return self._fit_decoder(self._follower_data(), self.config, False, _quiet)[1]
        with self._lock():
            def prepare():
                if self.is_finished(DECODER) and not force:
                    raise RunError(f"{self.root}: already holds a trained decoder. Pass --force to train "
                                   "it anew.")
                return self.data(progress, log)

            data = distributed.main_first(prepare)
            self.folder.mark_unfinished(DECODER)
            with self._failing(DECODER):
                decoder, summary, history = self._fit_decoder(data, self.config, progress, log)
            save_decoder(decoder, self._path(DECODER_FILE), self.provenance("image_encoder", "decoder_input"))
            write_csv(self._path(DECODER_HISTORY_FILE), history)
            save_figure(plot_decoder_history(history), self._path(FIGURES["decoder_loss"]))
            self.save_summary("decoder", summary)
            self.folder.mark_finished(DECODER)
        log(f"best epoch {summary['best_epoch']} of {summary['epochs']}: validation cosine "
            f"{summary['val_cosine']:.4f} (greedy); {summary['seconds']:.0f} s; decoder in "
            f"{self._path(DECODER_FILE)}")
        return summary

    def _fit_decoder(self, data, config, progress, log):
        """A decoder of ``config`` trained on ``data`` (its decoder input): (decoder, summary, history)."""
        from img2prompt.encoders.embeddings import text_embeddings
        from img2prompt.encoders.text import metric_encoder
        from img2prompt.evaluation.scores import cosine_rows
        from img2prompt.models.decoder import build_decoder
        from img2prompt.models.training import train_decoder

        train_part, val_part = data.part("train"), data.part("val")
        decoder = build_decoder(config.decoder, data.decoder_emb.shape[1], train_part["prompts"],
                                config.prefix_length, config.decoder_width, config.decoder_layers,
                                config.decoder_heads, config.decoder_dropout, config.decoder_tune,
                                config.seed, config.decoder_grid, config.decoder_colors, config.decoder_map,
                                data.image_emb.shape[1], config.decoder_prefix_dropout)
        trainable = sum(p.numel() for p in decoder.trainable_parameters())
        reads = decoder_input(config.decoder_grid, config.decoder_colors, config.decoder_map)
        log(f"training the {config.decoder} decoder ({trainable:,} trainable parameters, reads {reads}) "
            f"on {len(train_part['ids'])} images, validating on {len(val_part['ids'])}")
        metric, greedy = metric_encoder(config.device), config.decode_options("greedy")

        scored = slice(0, config.decoder_val_images or None)

        def val_cosine(model):  # what the evaluation measures, on (some of) the validation images
            texts = model.generate(val_part["decoder_emb"][scored], greedy)
            return float(cosine_rows(text_embeddings(texts, metric, progress=False),
                                     val_part["metric_emb"][scored]).mean())

        started = time.perf_counter()
        history, cut = train_decoder(decoder, train_part["decoder_emb"], train_part["prompts"],
                                     val_part["decoder_emb"], val_part["prompts"], config, progress,
                                     val_score=val_cosine, device=self.device)
        best = history[history["best"]].iloc[0]
        summary = {"decoder": config.decoder, "grid": config.decoder_grid, "grid_map": config.decoder_map,
                   "trainable_parameters": trainable,
                   "best_epoch": int(best["epoch"]), "epochs": len(history),
                   "val_cosine": float(best["val_cosine"]), "val_loss": float(best["val_loss"]),
                   "train_loss": float(best["train_loss"]),
                   "train_samples_per_s": float(history["samples_per_s"].median()),
                   "seconds": time.perf_counter() - started, "prompts_cut_to_max_length": cut,
                   "vocabulary": decoder.tokens.size}
        return decoder, summary, history

    def compare_decoder_inputs(self, progress=None, log=_quiet) -> pd.DataFrame:
        """The run's decoder against one trained the same way on the pooled vector alone (or,
        when the run's decoder reads only that, on the default grid and colours): per input,
        its training, and on the test split its greedy prompts' mean cosine, exact-prompt
        rate and the attribute families it names right (generated data). Nothing is saved."""
        from img2prompt.encoders.embeddings import text_embeddings
        from img2prompt.encoders.text import metric_encoder
        from img2prompt.evaluation.analysis import attribute_matches, has_attributes
        from img2prompt.evaluation.scores import cosine_rows, exact_prompt_rate

        self._require(DECODER, "train-decoder --run")
        own = (self.config.decoder_grid, self.config.decoder_colors, self.config.decoder_map)
        default = (StudyConfig.decoder_grid, StudyConfig.decoder_colors, StudyConfig.decoder_map)
        rows = {}
        for grid, colors, grid_map in ((0, 0, own[2]), own if own[:2] != (0, 0) else default):
            config = dataclasses.replace(self.config, decoder_grid=grid, decoder_colors=colors,
                                         decoder_map=grid_map)
            if (grid, colors, grid_map) == own:
                decoder, summary = self.decoder().to(self.device), self.summary("decoder")
                data = self.data(progress, log)
            else:
                with self._lock():
                    data = self._prepare(config, progress, log)
                decoder, summary, _ = self._fit_decoder(data, config, progress, log)
            test = data.part("test")
            texts = decoder.generate(test["decoder_emb"], config.decode_options("greedy"))
            cosine = cosine_rows(text_embeddings(texts, metric_encoder(config.device), progress=False),
                                 test["metric_emb"])
            name = decoder_input(grid, colors, grid_map)
            rows[name] = {"test cosine (greedy)": float(cosine.mean()),
                          "exact prompts": exact_prompt_rate(texts, test["prompts"]),
                          "val cosine": summary["val_cosine"], "epochs": summary["epochs"],
                          "seconds": summary["seconds"], "input width": data.decoder_emb.shape[1]}
            if has_attributes(config.data_dir):
                rows[name].update(attribute_matches(test["prompts"], texts).mean().to_dict())
        return pd.DataFrame(rows).T

    def decoder(self):
        from img2prompt.models.decoder import load_decoder
        self._require(DECODER, "train-decoder --run")
        return load_decoder(self._path(DECODER_FILE), self.provenance("image_encoder", "decoder_input"))

    def decoder_history(self) -> pd.DataFrame:
        return read_csv(self._path(DECODER_HISTORY_FILE), "Train the decoder again ('img2prompt train-decoder "
                        f"--force --run {self.root}').", columns=("epoch", "val_loss", "best"))

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self, bank=None, search=None, data_dir=None, progress=None, log=_quiet) -> Metrics:
        """Score every method on the test split (the decoder's text too, once trained); write
        test_results.csv and metrics.json. ``bank`` (train | all), ``search`` (auto | exact |
        approximate) and ``data_dir`` (the dataset moved) apply to this evaluation only."""
        from img2prompt.encoders.embeddings import text_embeddings
        from img2prompt.encoders.text import METRIC_ENCODER, metric_encoder
        from img2prompt.evaluation.analysis import attribute_matches, has_attributes
        from img2prompt.evaluation.scores import evaluate_methods, fit_linear_map, paired_difference
        from img2prompt.evaluation.search import Rows

        with self._lock():
            self._require(TRAIN, "train --resume --out")
            if not self._path(SPLITS_FILE).is_file():  # a new split would leak training images into test
                raise RunError(f"{self._path(SPLITS_FILE)}: not found; the run's split is lost. Train "
                               "the run again with --force.")
            config = dataclasses.replace(self.config, bank=bank or self.config.bank,
                                         search=search or self.config.search,
                                         data_dir=str(data_dir or self.config.data_dir))
            config.validate()
            data = self._prepare(config, progress, log) if data_dir else self.data(progress, log)
            self.folder.mark_unfinished(EVALUATE)
            test, train_part = data.part("test"), data.part("train")
            if not test["ids"]:
                raise RunError(f"{self.root}: the test split is empty; train with --test-fraction > 0.")
            bank_mask = np.ones(len(data.splits), bool) if config.bank == "all" else data.splits == "train"
            bank_rows = np.flatnonzero(bank_mask)
            first_of_each = unique_prompts(Rows(data.dataset.prompts, bank_rows))[1]
            bank_rows = bank_rows[first_of_each]  # each distinct prompt once, read in place (texts too)
            bank_part = {name: Rows(array, bank_rows) for name, array in (
                ("prompts", data.dataset.prompts), ("target_emb", data.target_emb), ("metric_emb", data.metric_emb))}
            # the training prompts are read for kNN's answers only: in place, not a column of their own
            train_texts = {"prompts": Rows(data.dataset.prompts, np.flatnonzero(data.splits == "train")),
                           **{name: train_part[name] for name in ("image_emb", "metric_emb")}}
            to_metric = (None if config.text_encoder == METRIC_ENCODER
                         else fit_linear_map(train_part["target_emb"], train_part["metric_emb"]))
            generated = {}
            if self.is_finished(DECODER):
                texts = self.decoder().to(self.device).generate(test["decoder_emb"], config.decode_options())
                log(f"decoder: {len(texts)} prompts generated ({config.decode_strategy})")
                generated["decoder"] = (texts, text_embeddings(texts, metric_encoder(config.device),
                                                               progress=progress))
            frame, scores = evaluate_methods(test, train_texts, bank_part, _block_predictions(self.mapper(), test),
                                             to_metric, config.bootstrap, config.seed, generated, config.search)
            text_columns = {"retrieval": "predicted_prompt", **{n: f"{n}_prompt" for n in generated}}
            if self.is_finished(TUNE):  # the same methods on the frozen features, paired
                frozen = self._prepare(config, progress, log, tuned=False)
                frozen_test = frozen.part("test")
                frozen_frame, frozen_scores = evaluate_methods(
                    frozen_test, frozen.part("train"), bank_part,
                    _block_predictions(self.frozen_mapper(), frozen_test), to_metric,
                    config.bootstrap, config.seed, search_method=config.search)
                for name in ("mapper", "retrieval"):
                    scores["methods"][f"frozen_{name}"] = frozen_scores["methods"][name]
                    frame[f"cosine_frozen_{name}"] = frozen_frame[f"cosine_{name}"]
                    scores["comparisons"][f"{name}_minus_frozen_{name}"] = paired_difference(
                        frame[f"cosine_{name}"].to_numpy(), frozen_frame[f"cosine_{name}"].to_numpy(),
                        config.bootstrap, config.seed)
                frame["frozen_predicted_prompt"] = frozen_frame["predicted_prompt"]
                text_columns["frozen_retrieval"] = "frozen_predicted_prompt"
            if has_attributes(config.data_dir):  # generated data: which attributes each text method states
                for name, column in text_columns.items():
                    accuracy = attribute_matches(test["prompts"], frame[column]).mean()
                    scores["methods"][name]["attribute_accuracy"] = accuracy.round(6).to_dict()
            metrics = {"run_dir": str(self.root), "data_dir": config.data_dir, "n_test": len(test["ids"]),
                       "n_train": len(train_part["ids"]), "image_encoder": config.image_encoder,
                       "tune": "encoder" if self.is_finished(TUNE) else "head",
                       "text_encoder": config.text_encoder, "metric_encoder": "all-MiniLM-L6-v2",
                       "bank": config.bank, **scores}
            write_csv(self._path(RESULTS_FILE), frame)
            write_json(self._path(METRICS_FILE), metrics)
            self.folder.mark_finished(EVALUATE)
        return Metrics(metrics)

    def metrics(self) -> Metrics:
        self._require(EVALUATE, "evaluate --run")
        fix = f"Evaluate the run again ('img2prompt evaluate --run {self.root}')."
        metrics = read_json(self._path(METRICS_FILE), fix)
        if not isinstance(metrics.get("methods"), dict):
            raise RunError(f"{self._path(METRICS_FILE)}: holds no scores of methods. {fix}")
        return Metrics(metrics)


    def results(self) -> pd.DataFrame:
        """Per test image: its prompt, each method's prompt and cosine (test_results.csv)."""
        self._require(EVALUATE, "evaluate --run")
        return read_csv(self._path(RESULTS_FILE), f"Evaluate the run again ('img2prompt evaluate --run {self.root}').",
                        columns=("imgId", "prompt"), keep_default_na=False)

    def image_paths(self, names) -> list:
        """The dataset files of the test images named in ``results()['image']``."""
        return [Path(self.config.data_dir) / "images" / name for name in names]

    # --- summaries and prediction -----------------------------------------------------------------

    def save_summary(self, name, summary: dict):
        """The numbers behind a notebook's conclusions (``SUMMARIES`` names them)."""
        write_json(self._path(SUMMARIES[name]), summary)

    def summary(self, name) -> dict:
        return read_json(self._path(SUMMARIES[name]), "Run the notebook or stage that writes it.")

    def predictor(self, method="retrieval", decode_options=None):
        from img2prompt.predict import Predictor
        return Predictor(self, method, decode_options)

    def _require(self, stage, command):
        if self.is_finished(stage):
            return
        writer = self.folder.writer()
        if writer:
            raise RunError(f"{self.root}: its {stage} stage is being run by process {writer} now. Wait "
                           "for it to finish, then run this again.")
        if stage in self.folder.failed:
            raise RunError(f"{self.root}: its {stage} stage failed: {self.folder.failed[stage]}")
        raise RunError(f"{self.root}: its {stage} stage did not finish. Run it with 'img2prompt "
                       f"{command} {self.root}' (or start the run anew).")

    @contextlib.contextmanager
    def _failing(self, stage):
        """A training that diverges marks its stage failed, with the message, so that a later
        command says why instead of suggesting --resume (which would diverge again)."""
        try:
            yield
        except TrainingDiverged as error:
            self.folder.mark_failed(stage, str(error))
            raise

