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
the project wrote there. Under torchrun (``distributed``) every process trains and only the
main one locks and writes.

Files: config.json, splits.csv, rejects.csv (rows skipped), best_model.safetensors,
prompt_bank.safetensors, history.csv, training_state.pt (while a training is unfinished);
with ``tune="encoder"`` also encoder.safetensors (the fine-tuned top layers),
frozen_model.safetensors (the mapper before fine-tuning), tune_history.csv, tune_state.pt;
decoder.safetensors, decoder_history.csv, decoder_state.pt, test_results.csv,
metrics.json, figures/, and the summaries behind each notebook's conclusions (``SUMMARIES``).

Importing this module loads no training, plotting or notebook code: those load when a
stage runs, so that inference (``predict``) stays light.
"""

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from img2prompt import distributed
from img2prompt.config import CONFIG_FILE, StudyConfig
from img2prompt.data.dataset import (
    REJECTS_FILE,
    SPLITS,
    ImageDataset,
    check_split_sizes,
    grouped_split,
    load_dataset,
    load_splits,
    record_rejects,
    save_splits,
    split_summary,
)
from img2prompt.data.study import StudyData
from img2prompt.errors import RunError, TrainingDiverged
from img2prompt.evaluation.scores import Metrics
from img2prompt.storage.files import read_csv, read_json, write_csv, write_json
from img2prompt.storage.ownership import (
    MANIFEST_FILE,
    claim,
    find_owned,
    unreadable_manifest,
)

if TYPE_CHECKING:  # pandas loads where it is used: prediction needs none
    import pandas

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
DECODER_STATE_FILE = "decoder_state.pt"
RESULTS_FILE = "test_results.csv"
METRICS_FILE = "metrics.json"
FIGURES = {"loss": "figures/loss_curve.png", "tune": "figures/tune_curve.png",
           "decoder_loss": "figures/decoder_loss.png"}
SUMMARIES = {"data": "data_summary.json", "embedding": "embedding_summary.json",
             "training": "training_summary.json", "decoder": "decoder_summary.json",
             "error_analysis": "error_analysis.json", "generation": "generation_summary.json"}


def _quiet(*_args, **_kwargs):
    pass


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
        dataset = load_dataset(config.data_dir, config.on_error, config.max_pixels)
        splits = grouped_split(dataset.prompts, config.seed, config.val_fraction, config.test_fraction)
        check_split_sizes(dataset, splits, config)  # a dataset too small costs nothing either
        folder = claim(config.run_dir, RUN_KIND)
        with folder.lock(f"run folder {folder.root}"):
            rerun = origin == "notebooks" and folder.origin == origin
            if folder.is_finished(TRAIN) and not force and not rerun:
                raise RunError(f"{config.run_dir}: already holds a trained model. Pass --force "
                               "(notebooks: -p force True) to train it anew (its split is made anew "
                               "too), or choose another --out.")
            folder.clear()
            folder.set_origin(origin)
            config.save(folder.root)
            run = cls(folder, config.device)
            record_rejects(dataset, run._path(REJECTS_FILE), log)
            save_splits(run._path(SPLITS_FILE), dataset, splits)
            log(split_summary(dataset, splits))
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
            if not Path(run_dir).exists():
                raise RunError(f"{run_dir}: no run here yet. Make the default study's with ./run_all.sh (about "
                               "12 minutes on 2 cores), or train one on your images: img2prompt train --data "
                               f"DATASET --out {run_dir} (README: \"Your own images\").")
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
        config = dataclasses.replace(self.config, **settings).validate()
        if config != self.config:
            if distributed.is_main():
                with self._lock():
                    config.save(self.root)
            self.config, self._data = config, None
        return config

    def is_finished(self, stage) -> bool:
        return self.folder.is_finished(stage)

    def _lock(self):
        """The folder's lock, held by the main process (torchrun's followers only read)."""
        return self.folder.lock(f"run folder {self.root}") if distributed.is_main() else contextlib.nullcontext()

    def _path(self, name) -> Path:
        return self.root / name

    # --- data and embeddings --------------------------------------------------------------------

    def dataset(self, log=_quiet, config=None) -> ImageDataset:
        """The run's dataset, loaded with its error policy and pixel limit; skipped rows are
        listed in the run's rejects.csv."""
        config = config or self.config
        dataset = load_dataset(config.data_dir, config.on_error, config.max_pixels)
        if distributed.is_main():
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
        log(split_summary(dataset, splits))
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
            self._data, self._data_tuned = self.prepare(self.config, progress, log, resume), tuned
        return self._data

    def prepare(self, config, progress=None, log=_quiet, resume=False, tuned=None) -> StudyData:
        """The dataset, split and embeddings of ``config`` (the run's, or a variant of it).
        Under torchrun the main process extracts the embeddings first; the others then read
        them from the cache."""
        from img2prompt.encoders.embeddings import dataset_embeddings

        def embedded():
            with self._lock():
                dataset = self.dataset(log, config)
                splits = self._split(dataset, log) if distributed.is_main() else self.splits(dataset)
                found = dataset_embeddings(config, dataset, progress, log, resume, self.image_encoder(tuned, config),
                                           group=[SPLITS.index(split) for split in splits])
                if distributed.is_main() and found.dataset.rejects != dataset.rejects:  # found while embedded
                    record_rejects(found.dataset, self._path(REJECTS_FILE), log)
                return StudyData(found.dataset, splits[found.rows], found.image_emb, found.target_emb,
                                 found.metric_emb, found.load_decoder_emb)

        return distributed.main_first(embedded) or embedded()

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
        if self.is_finished(TUNE) if tuned is None else tuned:
            encoder.use_tuned(self._path(TUNED_ENCODER_FILE))
        return encoder

    # --- the mapper -------------------------------------------------------------------------------

    def train(self, resume=False, progress=None, log=_quiet) -> dict:
        """Train the mapper on frozen features; with ``tune="encoder"`` then fine-tune the
        encoder's top blocks with it (``models.finetune``). Save the model(s), the prompt bank
        (the training prompts, for retrieval), the histories and curves. The training state
        is saved as it goes; ``resume`` continues an interrupted training (and embedding
        extraction) instead."""
        from img2prompt.evaluation.familiarity import FAMILIARITY_FILE, Familiarity
        from img2prompt.evaluation.search import save_prompt_bank

        def refuse():
            if resume and self.is_finished(TRAIN):
                raise RunError(f"{self.root}: this run finished; nothing to resume (--force trains it anew).")

        main = distributed.is_main()
        with self._stage(TRAIN, refuse, also=(TUNE,)):  # TUNE unfinished: the data is the frozen encoder's features
            data = self.data(progress, log, resume=resume)
            summary, mapper = self._train_mapper(data, resume, progress, log if main else _quiet)
            summary = {"run_dir": str(self.root), **summary}
            if self.config.tune == "encoder":
                summary["tuned"] = self._fine_tune(data, mapper, resume, progress, log if main else _quiet)
            data = self.data(progress, log)  # after fine-tuning, the tuned encoder's features (every process)
            if main:
                save_prompt_bank(self._path(BANK_FILE), data.part("train")["prompts"], data.part("train")["target_emb"],
                                 self.provenance("text_encoder"))
                Familiarity.fit(data.part("train")["image_emb"], data.part("val")["image_emb"], self.config.seed).save(
                    self._path(FAMILIARITY_FILE), self.provenance("image_encoder"))
        log(f"best epoch {summary['best_epoch']} of {summary['epochs']}: validation cosine "
            f"{summary['val_cosine']:.4f}; model in {self._path(MODEL_FILE)}")
        return summary

    def _train_mapper(self, data, resume, progress, log) -> tuple:
        """(summary, mapper) of the mapper on frozen features, continuing a saved training
        state if ``resume``; its model, history and curve saved (the main process)."""
        from img2prompt.models.mapper import save_mapper
        from img2prompt.models.training import mapper_summary, train_study_mapper
        from img2prompt.reports.plots import plot_history

        head_file = self._path(FROZEN_MODEL_FILE if self.config.tune == "encoder" else MODEL_FILE)
        state = self._path(TRAINING_STATE_FILE)
        if resume and self.config.tune == "encoder" and self.folder.owns(head_file) and head_file.is_file():
            log("resuming: the mapper on frozen features is trained; fine-tuning")
            return mapper_summary(self.history(), data), self._head()
        model, history, summary = train_study_mapper(data, self.config, self.device, progress, log, state,
                                                     resume and state.is_file())
        if distributed.is_main():
            save_mapper(model, head_file, self.provenance("image_encoder", "text_encoder", tuned=False))
            self._save_training(history, HISTORY_FILE, plot_history(history), "loss", state)
        return summary, model

    def _save_training(self, history, history_file, figure, curve, state):
        """A training's history and curve; then its state goes (only once everything it led
        to is saved)."""
        from img2prompt.reports.plots import save_figure
        write_csv(self._path(history_file), history)
        save_figure(figure, self._path(FIGURES[curve]))
        if self.folder.owns(state):
            self.folder.remove(state)

    def _fine_tune(self, data, mapper, resume, progress, log) -> dict:
        """Fine-tune the encoder's top blocks with the mapper on frozen features; save them and
        the tuned mapper (the run's features are the tuned encoder's from then on)."""
        from img2prompt.models.finetune import fine_tune_study, save_tuned
        from img2prompt.models.mapper import save_mapper
        from img2prompt.reports.plots import plot_tune_history

        state = self._path(TUNE_STATE_FILE)
        model, history, summary = fine_tune_study(data, self.image_encoder(tuned=False), mapper, self.config,
                                                  self.device, progress, log, state, resume and state.is_file())

        def save():
            save_tuned(model, self._path(TUNED_ENCODER_FILE))
            save_mapper(model.mapper, self._path(MODEL_FILE), self.provenance("image_encoder", "text_encoder", tuned=True))
            self._save_training(history, TUNE_HISTORY_FILE, plot_tune_history(history, self.history()), "tune", state)
            self.folder.mark_finished(TUNE)

        distributed.main_first(save)  # the followers go on once the run's features are the tuned encoder's
        return summary

    def familiarity(self):
        """The run's Familiarity, or None for a run trained before runs recorded it."""
        from img2prompt.evaluation.familiarity import FAMILIARITY_FILE, Familiarity
        self._require(TRAIN, "train --resume --out")
        path = self._path(FAMILIARITY_FILE)
        return Familiarity.load(path, self.provenance("image_encoder")) if path.is_file() else None

    def mapper(self):
        from img2prompt.models.mapper import load_mapper
        self._require(TRAIN, "train --resume --out")
        return load_mapper(self._path(MODEL_FILE), self.provenance("image_encoder", "text_encoder"))

    def prompt_bank(self):
        """(prompts, target-space embeddings) of the prompts retrieval answers with."""
        from img2prompt.evaluation.search import load_prompt_bank
        self._require(TRAIN, "train --resume --out")
        return load_prompt_bank(self._path(BANK_FILE), self.provenance("text_encoder"))

    def history(self) -> "pandas.DataFrame":
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

    def train_decoder(self, force=False, resume=False, progress=None, log=_quiet) -> dict:
        """Train the prompt decoder on the run's data (cached embeddings); save it, its
        history, loss curve and summary. A trained decoder is only replaced with ``force``;
        ``resume`` continues an interrupted training."""
        from img2prompt.models.decoder import save_decoder
        from img2prompt.models.training import train_study_decoder
        from img2prompt.reports.plots import plot_decoder_history

        def refuse():
            if self.is_finished(DECODER) and not (force or resume):
                raise RunError(f"{self.root}: already holds a trained decoder. Pass --force to train it anew.")

        main, state = distributed.is_main(), self._path(DECODER_STATE_FILE)
        with self._stage(DECODER, refuse):
            decoder, summary, history = train_study_decoder(self.data(progress, log), self.config, self.device, progress,
                                                            log if main else _quiet, state, resume and state.is_file())
            if main:
                save_decoder(decoder, self._path(DECODER_FILE), self.provenance("image_encoder", "decoder_input"))
                self.save_summary("decoder", summary)
                self._save_training(history, DECODER_HISTORY_FILE, plot_decoder_history(history), "decoder_loss", state)
        log(f"best epoch {summary['best_epoch']} of {summary['epochs']}: validation cosine "
            f"{summary['val_cosine']:.4f} (greedy); {summary['seconds']:.0f} s; decoder in "
            f"{self._path(DECODER_FILE)}")
        return summary

    def decoder(self):
        from img2prompt.models.decoder import load_decoder
        self._require(DECODER, "train-decoder --run")
        return load_decoder(self._path(DECODER_FILE), self.provenance("image_encoder", "decoder_input"))

    def decoder_history(self) -> "pandas.DataFrame":
        return read_csv(self._path(DECODER_HISTORY_FILE), "Train the decoder again ('img2prompt train-decoder "
                        f"--force --run {self.root}').", columns=("epoch", "val_loss", "best"))

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(self, bank=None, search=None, data_dir=None, progress=None, log=_quiet) -> Metrics:
        """Score every method on the test split (the decoder's text too, once trained); write
        test_results.csv and metrics.json. ``bank`` (train | all), ``search`` (auto | exact |
        approximate) and ``data_dir`` (the dataset moved) apply to this evaluation only."""
        from img2prompt.evaluation.study import evaluate_run

        with self._lock():
            self._require(TRAIN, "train --resume --out")
            if not self._path(SPLITS_FILE).is_file():  # a new split would leak training images into test
                raise RunError(f"{self._path(SPLITS_FILE)}: not found; the run's split is lost. Train "
                               "the run again with --force.")
            config = dataclasses.replace(self.config, bank=bank or self.config.bank, search=search or self.config.search,
                                         data_dir=str(data_dir or self.config.data_dir)).validate()
            data = self.prepare(config, progress, log) if data_dir else self.data(progress, log)
            self.folder.mark_unfinished(EVALUATE)
            frame, metrics = evaluate_run(self, data, config, progress, log)
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

    def results(self) -> "pandas.DataFrame":
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
        self.folder.require(stage, f"img2prompt {command} {self.root}")

    @contextlib.contextmanager
    def _stage(self, stage, refuse=lambda: None, also=()):
        """Run a stage under the folder's lock: the main process calls ``refuse`` (which may
        raise to refuse the stage) and marks the stage (and ``also``) unfinished first, and
        finished last. A training that diverges marks it failed, with the message, so that a
        later command says why instead of suggesting --resume (which would diverge again)."""
        def start():
            refuse()
            for name in (stage, *also):
                self.folder.mark_unfinished(name)

        with self._lock():
            distributed.main_first(start)
            try:
                yield
            except TrainingDiverged as error:
                if distributed.is_main():
                    self.folder.mark_failed(stage, str(error))
                raise
            if distributed.is_main():
                self.folder.mark_finished(stage)
