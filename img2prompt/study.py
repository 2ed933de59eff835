"""The study's steps over a run folder: prepare data and embeddings, train, evaluate.

Run folder layout: config.json, splits.csv, best_model.safetensors, prompt_bank.safetensors,
history.csv, figures/, test_results.csv, metrics.json; with the decoder decoder.safetensors,
decoder_history.csv, decoder_summary.json; rejects.csv when rows were skipped;
training_state.pt while a training is unfinished; the notebooks' *_summary.json; and the
folder's manifest (``ownership``): what the project wrote there, and which stages finished.
A stage is finished only when its manifest record, written after all its files, says so.
Each stage holds the run folder's lock, so a second writer is refused.
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .analysis import attribute_matches, load_attributes
from .checkpoints import load_tensors, save_tensors
from .decoder import build_decoder, load_decoder, save_decoder
from .config import CONFIG_FILE, StudyConfig
from .data import (REJECTS_FILE, ImageDataset, grouped_split, load_dataset, load_splits,
                   save_splits, write_rejects)
from .embeddings import EmbeddingCache, image_embeddings, text_embeddings
from .errors import RunError
from .evaluation import cosine_rows, evaluate_methods, fit_linear_map
from .files import write_csv, write_json
from .image_encoders import image_encoder
from .images import set_max_pixels
from .mapper import load_mapper, save_mapper
from .ownership import MANIFEST_FILE, claim, find_owned
from .plots import plot_decoder_history, plot_history, save_figure
from .text_encoders import METRIC_ENCODER, metric_encoder, text_encoder
from .training import train_decoder, train_mapper

MODEL_FILE = "best_model.safetensors"
BANK_FILE = "prompt_bank.safetensors"
DECODER_FILE = "decoder.safetensors"
TRAINING_STATE_FILE = "training_state.pt"  # an unfinished training, for --resume
RUN_KIND = "run"
# stages recorded as finished in the run folder's manifest
SPLIT, TRAIN, DECODER, EVALUATE = "split", "train", "decoder", "evaluate"


def _quiet(*_args, **_kwargs):
    pass


@dataclass
class StudyData:
    """A dataset with its split and its embeddings (image, target text, metric text)."""

    dataset: ImageDataset
    splits: np.ndarray
    image_emb: np.ndarray
    target_emb: np.ndarray
    metric_emb: np.ndarray

    def part(self, split):
        mask = self.splits == split
        return {"ids": list(np.asarray(self.dataset.ids)[mask]),
                "prompts": list(np.asarray(self.dataset.prompts, dtype=object)[mask]),
                "images": [p.name for p, keep in zip(self.dataset.paths, mask) if keep],
                "image_emb": self.image_emb[mask], "target_emb": self.target_emb[mask],
                "metric_emb": self.metric_emb[mask]}


def target_encoder(config: StudyConfig):
    return text_encoder(config.text_encoder, config.text_model, config.text_pooling)


def compute_embeddings(config: StudyConfig, dataset: ImageDataset, progress=True, log=_quiet,
                       resume=False):
    """(image, target-space prompt, metric-space prompt) embeddings, through the cache;
    ``resume`` continues an interrupted image extraction."""
    cache = EmbeddingCache(config.cache_dir)
    encoder = image_encoder(config.image_encoder, config.image_weights)
    image_emb, info = image_embeddings(dataset, encoder, cache, config.embed_batch_size,
                                       config.num_workers, progress, resume)
    if info.get("resumed_rows"):
        log(f"image embeddings: resumed after {info['resumed_rows']} images done by an earlier run")
    if info["cached"]:
        log(f"image embeddings ({encoder.name}): from cache {info['cache_file']}")
    else:
        log(f"image embeddings ({encoder.name}): {len(dataset)} images in {info['seconds']:.1f} s "
            f"({info['images_per_s']:.1f} images/s), cached in {info['cache_file']}")
    target = target_encoder(config)
    truncated = target.count_truncated(dataset.prompts)
    if truncated:
        log(f"{truncated} prompt(s) are longer than {target.name} reads ({target.max_length} tokens): "
            "their embeddings see the beginning only")
    target_emb = text_embeddings(dataset.prompts, target, cache, progress=progress)
    metric_emb = (target_emb if config.text_encoder == METRIC_ENCODER
                  else text_embeddings(dataset.prompts, metric_encoder(), cache, progress=progress))
    return image_emb, target_emb, metric_emb


def split_dataset(config: StudyConfig, dataset: ImageDataset, log=_quiet) -> np.ndarray:
    """The run's split: reused from its splits.csv when there, else made and saved."""
    splits_path = Path(config.run_dir) / "splits.csv"
    if splits_path.exists():
        splits = load_splits(splits_path, dataset)
    else:
        splits = grouped_split(dataset.prompts, config.seed, config.val_fraction, config.test_fraction)
        save_splits(splits_path, dataset, splits)
    counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    log(f"dataset {dataset.root}: {len(dataset)} images; split {counts} (grouped by prompt)")
    return splits


def load_study_dataset(config: StudyConfig, log=_quiet, rejects_path=None) -> ImageDataset:
    """The dataset with the config's error policy and pixel limit; skipped rows are written
    to ``rejects_path`` (default: the run folder's rejects.csv; False: not written)."""
    set_max_pixels(config.max_pixels)
    dataset = load_dataset(config.data_dir, config.on_error)
    if dataset.rejects and rejects_path is not False:
        rejects_path = Path(rejects_path or Path(config.run_dir) / REJECTS_FILE)
        write_rejects(rejects_path, dataset.rejects)
        log(f"dataset {dataset.root}: kept {len(dataset)} images, skipped {len(dataset.rejects)} "
            f"(each with its reason in {rejects_path})")
    return dataset


def open_run(run_dir):
    """The run folder of an existing run (its manifest says so), else a RunError."""
    folder = find_owned(run_dir)
    if folder is None or folder.kind != RUN_KIND:
        if (Path(run_dir) / CONFIG_FILE).is_file():
            raise RunError(f"{run_dir}: has no {MANIFEST_FILE} recording what img2prompt wrote "
                           "(made by an older img2prompt, or not a run folder). Train it anew in a "
                           "new folder with 'img2prompt train'.")
        raise RunError(f"{run_dir}: not a run folder. Is it a run folder made by 'img2prompt "
                       "train' (or notebook 01)?")
    return folder


def run_lock(folder):
    return folder.lock(f"run folder {folder.root}")


def prepare(config: StudyConfig, progress=True, log=_quiet, resume=False) -> StudyData:
    """Load the dataset, its split and its embeddings."""
    dataset = load_study_dataset(config, log)
    splits = split_dataset(config, dataset, log)
    return StudyData(dataset, splits, *compute_embeddings(config, dataset, progress, log, resume))


def unique_prompts(prompts):
    """(distinct prompts in first-seen order, index of each one's first occurrence)."""
    first = {}
    for index, prompt in enumerate(prompts):
        first.setdefault(prompt, index)
    return list(first), list(first.values())


def save_prompt_bank(path, prompts, target_emb):
    save_tensors(path, {"target_emb": np.asarray(target_emb, dtype=np.float32)},
                 {"prompts": list(prompts)})


def load_prompt_bank(path):
    """(prompts, target-space embeddings) of a run's prompt bank."""
    tensors, metadata = load_tensors(path, "prompt bank", "Train the run again.", framework="numpy",
                                     required=("prompts",))
    prompts, bank = metadata["prompts"], tensors.get("target_emb")
    if bank is None or not isinstance(prompts, list) or len(prompts) != len(bank):
        raise RunError(f"{path}: not an img2prompt prompt bank (prompts and embeddings do not "
                       "match). Train the run again.")
    return prompts, bank


def start_run(config: StudyConfig, force=False, origin="cli", log=_quiet):
    """Start (or start anew) the run in ``config.run_dir``; return its dataset and split.

    The dataset is loaded and checked before anything in the folder changes, so a bad
    dataset costs nothing. Starting anew removes only the files the project wrote there
    (its manifest lists them); a folder it did not make is refused. A finished run is only
    replaced with ``force``, except that the notebooks (``origin="notebooks"``) rerun a
    study that the notebooks made."""
    folder = claim(config.run_dir, RUN_KIND)
    with run_lock(folder):
        rerun = origin == "notebooks" and folder.origin == origin
        if folder.is_finished(TRAIN) and not force and not rerun:
            raise RunError(f"{config.run_dir}: already holds a trained model. Pass --force (notebooks: "
                           "-p force True) to train it anew (its split is made anew too), or choose "
                           "another --out.")
        dataset = load_study_dataset(config, log, rejects_path=False)
        folder.clear()
        folder.set_origin(origin)
        config.save(config.run_dir)
        if dataset.rejects:
            load_study_dataset(config, log)  # now the run folder can receive rejects.csv
        splits = split_dataset(config, dataset, log)
        folder.mark_finished(SPLIT)
    return dataset, splits


def fit(config: StudyConfig, data: StudyData, progress=True, log=_quiet, resume=False) -> dict:
    """Train the mapper on the prepared data; save it, the prompt bank and the history.
    The training state is saved as it goes (``TRAINING_STATE_FILE``); ``resume`` continues
    from it."""
    run_dir = Path(config.run_dir)
    folder = open_run(run_dir)
    with run_lock(folder):
        return _fit(config, data, folder, progress, log, resume)


def _fit(config, data, folder, progress, log, resume):
    run_dir = folder.root
    folder.mark_unfinished(TRAIN)
    train_part, val_part = data.part("train"), data.part("val")
    log(f"training the mapper ({config.depth} hidden layer(s) of {config.hidden_size}) on "
        f"{len(train_part['ids'])} images, validating on {len(val_part['ids'])}")
    model, history = train_mapper(train_part["image_emb"], train_part["target_emb"],
                                  val_part["image_emb"], val_part["target_emb"], config, progress,
                                  state_path=run_dir / TRAINING_STATE_FILE, resume=resume)
    save_mapper(model, run_dir / MODEL_FILE)
    prompts, first = unique_prompts(train_part["prompts"])
    save_prompt_bank(run_dir / BANK_FILE, prompts, train_part["target_emb"][first])
    write_csv(run_dir / "history.csv", history)
    save_figure(plot_history(history), run_dir / "figures" / "loss_curve.png")
    if folder.owns(run_dir / TRAINING_STATE_FILE):
        folder.remove(run_dir / TRAINING_STATE_FILE)  # only once everything it led to is saved
    folder.mark_finished(TRAIN)
    best = history[history["best"]].iloc[0]
    summary = {"run_dir": str(run_dir), "best_epoch": int(best["epoch"]), "epochs": len(history),
               "val_cosine": float(best["val_cosine"])}
    log(f"best epoch {summary['best_epoch']} of {summary['epochs']}: validation cosine "
        f"{summary['val_cosine']:.4f}; model in {run_dir / MODEL_FILE}")
    return summary


def train(config: StudyConfig, force=False, progress=True, log=_quiet, resume=False) -> dict:
    """Train the mapper of ``config`` into ``config.run_dir``; return a short summary.

    ``resume`` continues an interrupted run with the settings saved in its config.json
    (its split, the cached or partly extracted embeddings, and the training state)."""
    if not resume:
        start_run(config, force, log=log)
        return fit(config, prepare(config, progress, log), progress, log)
    folder = open_run(config.run_dir)
    with run_lock(folder):
        if folder.is_finished(TRAIN):
            raise RunError(f"{config.run_dir}: this run finished; nothing to resume (--force trains it anew).")
        config = dataclasses.replace(StudyConfig.load(folder.root), run_dir=str(config.run_dir))
        data = prepare(config, progress, log, resume=True)
        state_saved = (folder.root / TRAINING_STATE_FILE).is_file()
        log("resuming the training" if state_saved else "no training state saved yet: training from the start")
        return _fit(config, data, folder, progress, log, resume=state_saved)


def fit_decoder(config: StudyConfig, data: StudyData, progress=True, log=_quiet) -> dict:
    """Train the prompt decoder on the prepared data; save it, its history and a summary."""
    folder = open_run(config.run_dir)
    with run_lock(folder):
        folder.mark_unfinished(DECODER)
        summary = _fit_decoder(config, data, folder.root, progress, log)
        folder.mark_finished(DECODER)
    return summary


def _fit_decoder(config, data, run_dir, progress, log):
    train_part, val_part = data.part("train"), data.part("val")
    decoder = build_decoder(config.decoder, data.image_emb.shape[1], train_part["prompts"],
                            config.prefix_length, config.decoder_width, config.decoder_layers,
                            config.decoder_heads, config.decoder_dropout, config.decoder_tune,
                            config.seed)
    trainable = sum(p.numel() for p in decoder.trainable_parameters())
    log(f"training the {config.decoder} decoder ({trainable:,} trainable parameters) on "
        f"{len(train_part['ids'])} images, validating on {len(val_part['ids'])}")
    metric, greedy = metric_encoder(), dataclasses.replace(config, decode_strategy="greedy").decode_options()

    def val_cosine(model):  # what the evaluation measures, on the validation images
        texts = model.generate(val_part["image_emb"], greedy)
        return float(cosine_rows(text_embeddings(texts, metric, progress=False),
                                 val_part["metric_emb"]).mean())

    started = time.perf_counter()
    history, cut = train_decoder(decoder, train_part["image_emb"], train_part["prompts"],
                                 val_part["image_emb"], val_part["prompts"], config, progress,
                                 val_score=val_cosine)
    save_decoder(decoder, run_dir / DECODER_FILE)
    write_csv(run_dir / "decoder_history.csv", history)
    save_figure(plot_decoder_history(history), run_dir / "figures" / "decoder_loss.png")
    best = history[history["best"]].iloc[0]
    summary = {"decoder": config.decoder, "trainable_parameters": trainable,
               "best_epoch": int(best["epoch"]), "epochs": len(history),
               "val_cosine": float(best["val_cosine"]), "val_loss": float(best["val_loss"]),
               "train_loss": float(best["train_loss"]),
               "train_samples_per_s": float(history["samples_per_s"].median()),
               "seconds": time.perf_counter() - started, "prompts_cut_to_max_length": cut,
               "vocabulary": decoder.tokens.size}
    write_json(run_dir / "decoder_summary.json", summary)
    log(f"best epoch {summary['best_epoch']} of {summary['epochs']}: validation cosine "
        f"{summary['val_cosine']:.4f} (greedy); {summary['seconds']:.0f} s; decoder in "
        f"{run_dir / DECODER_FILE}")
    return summary


def train_decoder_run(run_dir, force=False, progress=True, log=_quiet, **settings) -> dict:
    """Train the decoder of an existing run (its data, split and cached image embeddings),
    with ``settings`` (StudyConfig fields) recorded in its config.json."""
    folder = open_run(run_dir)
    with run_lock(folder):
        if folder.is_finished(DECODER) and not force:
            raise RunError(f"{run_dir}: already holds a trained decoder. Pass --force to train it anew.")
        config = dataclasses.replace(StudyConfig.load(run_dir), run_dir=str(run_dir), **settings)
        config.save(run_dir)
        return fit_decoder(config, prepare(config, progress, log), progress, log)


def evaluate(run_dir, data_dir=None, bank=None, progress=True, log=_quiet) -> dict:
    """Score every method on the run's test split; write test_results.csv and metrics.json."""
    folder = open_run(run_dir)
    with run_lock(folder):
        folder.mark_unfinished(EVALUATE)
        metrics = _evaluate(folder.root, data_dir, bank, progress, log)
        folder.mark_finished(EVALUATE)
    return metrics


def _evaluate(run_dir, data_dir, bank, progress, log):
    config = StudyConfig.load(run_dir)
    config.run_dir = str(run_dir)
    config.data_dir = str(data_dir or config.data_dir)
    config.bank = bank or config.bank
    if config.bank not in ("train", "all"):
        raise RunError(f"unknown prompt bank '{config.bank}': use train or all.")
    if not open_run(run_dir).is_finished(TRAIN):
        raise RunError(f"{run_dir}: its training did not finish. Continue it with 'img2prompt train "
                       f"--out {run_dir} --data {config.data_dir} --resume', or train it anew.")
    model = load_mapper(run_dir / MODEL_FILE)
    if not (run_dir / "splits.csv").is_file():  # a new split would leak training images into test
        raise RunError(f"{run_dir / 'splits.csv'}: not found; the run's split is lost. Train the run "
                       "again with --force.")
    data = prepare(config, progress, log)
    test, train_part = data.part("test"), data.part("train")
    if not test["ids"]:
        raise RunError(f"{run_dir}: the test split is empty; train with --test-fraction > 0.")
    bank_mask = np.ones(len(data.splits), bool) if config.bank == "all" else data.splits == "train"
    bank_prompts = list(np.asarray(data.dataset.prompts, dtype=object)[bank_mask])
    prompts, keep = unique_prompts(bank_prompts)
    bank_part = {"prompts": prompts,
                 "target_emb": data.target_emb[bank_mask][keep],
                 "metric_emb": data.metric_emb[bank_mask][keep]}
    to_metric = (None if config.text_encoder == METRIC_ENCODER
                 else fit_linear_map(train_part["target_emb"], train_part["metric_emb"]))
    predicted = model.predict(test["image_emb"]).numpy()
    generated = {}
    if open_run(run_dir).is_finished(DECODER):
        texts = load_decoder(run_dir / DECODER_FILE).generate(test["image_emb"], config.decode_options())
        log(f"decoder: {len(texts)} prompts generated ({config.decode_strategy})")
        generated["decoder"] = (texts, text_embeddings(texts, metric_encoder(), progress=progress))
    frame, metrics = evaluate_methods(test, train_part, bank_part, predicted, to_metric,
                                      config.bootstrap, config.seed, generated)
    attributes = load_attributes(config.data_dir, test["ids"])
    if attributes is not None:  # generated data: which attributes each text method states
        for name, column in (("retrieval", "predicted_prompt"), *((n, f"{n}_prompt") for n in generated)):
            accuracy = attribute_matches(test["prompts"], frame[column]).mean()
            metrics["methods"][name]["attribute_accuracy"] = accuracy.round(6).to_dict()
    metrics = {"run_dir": str(run_dir), "data_dir": config.data_dir, "n_test": len(test["ids"]),
               "n_train": len(train_part["ids"]), "image_encoder": config.image_encoder,
               "text_encoder": config.text_encoder, "metric_encoder": "all-MiniLM-L6-v2",
               "bank": config.bank, **metrics}
    write_csv(run_dir / "test_results.csv", frame)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def format_metrics(metrics) -> str:
    """The metrics as a small text table."""
    lines = [f"test images: {metrics['n_test']}  (image encoder {metrics['image_encoder']}, "
             f"target {metrics['text_encoder']}, scored with {metrics['metric_encoder']})",
             f"{'method':<12} {'mean cos':>9} {'median':>8}   95% interval"]
    for name, m in metrics["methods"].items():
        lines.append(f"{name:<12} {m['mean_cosine']:>9.4f} {m['median_cosine']:>8.4f}   "
                     f"[{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]")
    retrieval = metrics["methods"]["retrieval"]
    lines.append(f"retrieval exact-prompt rate: {retrieval['exact_prompt_rate']:.3f} "
                 f"(bank: {metrics['bank']}, {retrieval['bank_size']} prompts)")
    if "decoder" in metrics["methods"]:
        decoder = metrics["methods"]["decoder"]
        lines.append(f"decoder exact-prompt rate: {decoder['exact_prompt_rate']:.3f}; distinct "
                     f"1-grams {decoder['distinct_1']:.3f}, 2-grams {decoder['distinct_2']:.3f}, "
                     f"distinct prompts {decoder['distinct_prompts']:.3f}")
    for name, c in metrics["comparisons"].items():
        lines.append(f"{name.replace('_minus_', ' − '):<26} {c['mean_difference']:+.4f}  "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]")
    return "\n".join(lines)
