"""One training loop for the mapper, the encoder's fine-tuning and the prompt decoder.

``fit`` is a plain loop, the same for the three: epochs over shuffled batches, validation
after each, early stopping, the best state (or that of an exponential moving average) kept,
the training state saved every ``CHECKPOINT_SECONDS`` for ``--resume``, and one history row
per epoch. Each model brings its loss for a batch of rows and its validation. Under torchrun
the model is wrapped in DistributedDataParallel and each process trains on its share of
every batch (``distributed``); the main process validates and decides.

    train_mapper(...)      the mapper on cached image embeddings (loss 1 − cosine)
    fine_tune(...)         models.finetune: the encoder's top blocks with the mapper
    train_decoder(...)     the prompt decoder (next-token cross-entropy)
"""

import hashlib
import io
import math
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from img2prompt import distributed
from img2prompt.data.dataset import split_counts
from img2prompt.devices import autocast
from img2prompt.encoders.allocator import keep_freed_memory
from img2prompt.errors import DataError, RunError, TrainingDiverged
from img2prompt.models.decoder import TINY, next_token_loss
from img2prompt.models.early_learning import EarlyLearning
from img2prompt.models.mapper import Mapper
from img2prompt.progress import progress_bar
from img2prompt.storage.files import atomic_path

CPU = torch.device("cpu")
CHECKPOINT_SECONDS = 20  # least time between two saves of the training state


def fit(model, batch_loss, validate, rows, *, optimizer, epochs, patience, batch_size, seed, what, setting,
        config, device=CPU, accumulate=1, clip=None, scheduler=None, average=None, state=None,
        first_row=None, lengths=None, progress=True):
    """Train ``model`` (on ``device``) for at most ``epochs``; return the history DataFrame
    (one row per epoch: epoch, train_loss, what ``validate`` gave, seconds, samples_per_s,
    best) with the kept weights loaded into ``model``.

    ``batch_loss(model, batch)`` gives, for this process's share of the ``batch`` (indices of
    the ``rows`` training examples; ``distributed.share``), (the loss to minimise: the share's
    part of the batch's mean loss, times the number of processes, whose gradients
    DistributedDataParallel averages; the batch's training loss, summed over the share's rows,
    as a tensor on the device). ``validate(model) -> dict`` scores the model being kept (``average``'s when
    there is one) and holds ``val_cosine``, the higher the better. ``accumulate`` batches'
    gradients add up before each ``optimizer`` step; ``clip`` bounds their norm; ``scheduler``
    steps with the optimiser. ``state`` (a ``TrainingState``) saves and resumes the loop;
    ``first_row`` is an epoch-0 row to start from (fine-tuning: the start it must beat);
    ``lengths`` (of each row's token sequence) groups rows of about the same length in a batch.
    ``what`` and ``setting`` name the model and its learning rate in the message of a
    training that diverges."""
    trained = distributed.wrap(model, device)
    kept = average.module if average is not None else model
    shuffler = torch.Generator().manual_seed(seed)  # on the CPU: the same order anywhere
    torch.manual_seed(seed + distributed.rank())  # each process its own dropout
    history, best = [], {"score": -np.inf, "epoch": 0, "weights": None}
    if first_row is not None:
        history.append(first_row)
        best = {"score": first_row["val_cosine"], "epoch": first_row["epoch"], "weights": _weights(kept)}
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "average": average}
    if state is not None and state.resume:
        history, best = state.restore(parts, shuffler)
    last_save = time.perf_counter()
    with progress_bar(epochs, "epoch", enabled=progress, description=what) as bar:
        bar.update(len([row for row in history if row["epoch"] > 0]))
        for epoch in range(len([row for row in history if row["epoch"] > 0]) + 1, epochs + 1):
            started = time.perf_counter()
            model.train()
            total = torch.zeros((), device=device)  # read once per epoch: no wait on the device each step
            batches = _batches(_shuffled(rows, lengths, batch_size, shuffler), batch_size)
            optimizer.zero_grad()
            for number, batch in enumerate(batches, start=1):
                objective, loss_sum = batch_loss(trained, batch)
                (objective / accumulate).backward()
                total += loss_sum.detach()
                if number % accumulate == 0 or number == len(batches):
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    optimizer.step()
                    optimizer.zero_grad()
                    if scheduler is not None:
                        scheduler.step()
                    if average is not None:
                        average.update_parameters(model)
            train_seconds = time.perf_counter() - started
            train_loss = distributed.sum_over_processes(total).item() / rows
            stop_if_diverged(what, epoch, setting, config, training_loss=train_loss)
            row = {"epoch": epoch, "train_loss": train_loss, **distributed.from_main(lambda: validate(kept))}
            stop_if_diverged(what, epoch, setting, config, **{k: v for k, v in row.items() if k.startswith("val_")})
            history.append({**row, "seconds": time.perf_counter() - started, "samples_per_s": rows / train_seconds})
            if row["val_cosine"] > best["score"]:
                best = {"score": row["val_cosine"], "epoch": epoch, "weights": _weights(kept)}
            bar.update(1)
            bar.set_postfix(val_cos=f"{row['val_cosine']:.4f}", best=best["epoch"], refresh=False)
            if epoch - best["epoch"] >= patience:
                break
            if state is not None and time.perf_counter() - last_save >= CHECKPOINT_SECONDS:
                state.save(parts, shuffler, history, best)
                last_save = time.perf_counter()
    model.load_state_dict(best["weights"], strict=False)
    model.eval()
    frame = pd.DataFrame(history)
    frame["best"] = frame["epoch"] == best["epoch"]
    return frame


def adamw(parameters, device, **settings) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel on a CPU or a CUDA GPU: a decoder epoch takes 8%
    less time on 2 cores than with its default step (``benchmarks/bench_decoder_epochs.py``)."""
    return torch.optim.AdamW(parameters, fused=torch.device(device).type in ("cpu", "cuda") or None, **settings)


def _shuffled(rows, lengths, batch_size, shuffler) -> torch.Tensor:
    """The rows in a random order; with ``lengths`` (of each row's sequence), in batches of
    rows of about the same length (transformers' grouping: sorted by length within random
    groups of at most 50 batches and a quarter of the rows), which leaves less padding."""
    if lengths is None:
        return torch.randperm(rows, generator=shuffler)
    from transformers.trainer_pt_utils import get_length_grouped_indices
    return torch.tensor(get_length_grouped_indices(lengths, batch_size, generator=shuffler))


def _batches(order, batch_size) -> list:
    """The shuffled rows in batches; a last batch too small to give every process a row
    joins the one before (one process: never)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < distributed.world_size():
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _weights(model) -> dict:
    """A copy of what training changes in ``model``: its trainable weights and its buffers (a
    frozen pretrained language model is not copied)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {name: value.detach().clone() for name, value in model.state_dict().items() if name not in frozen}


def stop_if_diverged(what, epoch, setting, config, **losses):
    """TrainingDiverged naming the epoch, the losses and the setting to lower, when a loss
    is infinite or NaN (the weights overflowed: nothing after this epoch is worth keeping)."""
    if all(math.isfinite(value) for value in losses.values()):
        return
    shown = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in losses.items())
    raise TrainingDiverged(
        f"the {what}'s training diverged in epoch {epoch} ({shown}): its weights overflowed. Lower "
        f"--{setting.replace('_', '-')} (now {getattr(config, setting):g}) and train again with --force.")


# --- the training state: saved as the loop goes, resumed after an interruption ----------------

STATE_CHECKSUM = b"\nimg2prompt-crc32:"  # then 8 hex digits: the checksum of the bytes before it


class TrainingState:
    """The file at ``path`` that holds a loop's state (the model, the optimiser and the rest
    of ``fit``'s parts, the random generators, the history and the best epoch so far), bound to
    ``inputs`` (``training_fingerprint``): ``resume`` continues from it, to the result an
    uninterrupted run gives, and refuses one saved for other data or settings. Only the main
    process saves it; every process reads it. ``extra`` objects with ``state_dict`` and
    ``load_state_dict`` (the early-learning averages) are saved with it."""

    def __init__(self, path, inputs, resume=False, **extra):
        self.path, self.inputs, self.resume, self.extra = path, inputs, resume, extra

    def save(self, parts, shuffler, history, best):
        if not distributed.is_main():
            return
        save_training_state(self.path, {
            **{name: part.state_dict() for name, part in {**parts, **self.extra}.items() if part is not None},
            "shuffler": shuffler.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
            "best": best, "inputs": self.inputs})

    def restore(self, parts, shuffler):
        """Load the saved state into ``parts`` and ``shuffler``; (history, best)."""
        saved = load_training_state(self.path)
        if saved.get("inputs") != self.inputs:
            raise RunError(f"{self.path}: this training state was saved for other data or settings, so it "
                           "cannot be resumed here. Train without --resume (--force starts the run anew).")
        for name, part in {**parts, **self.extra}.items():
            if part is not None:
                part.load_state_dict(saved[name])
        shuffler.set_state(saved["shuffler"])
        torch.set_rng_state(saved["torch_rng"])
        return saved["history"], saved["best"]


def training_fingerprint(config, settings, *arrays) -> str:
    """What a training state is bound to: the training and validation arrays and settings."""
    digest = hashlib.sha256(repr([getattr(config, name) for name in settings]).encode())
    for array in arrays:
        array = np.ascontiguousarray(array.numpy() if isinstance(array, torch.Tensor) else array)
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(array)  # its buffer, not a copy of it
    return digest.hexdigest()


def save_training_state(path, state):
    """``torch.save``'s bytes followed by their checksum (``load_training_state`` checks it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data + STATE_CHECKSUM + f"{zlib.crc32(data):08x}".encode())


def load_training_state(path):
    """The state ``save_training_state`` wrote; RunError naming the file when it is missing,
    damaged (its checksum) or unreadable."""
    if not path or not Path(path).is_file():
        raise RunError(f"{path}: no interrupted training to resume. Train without --resume.")
    fix = "Train without --resume (--force starts the run anew)."
    stored = Path(path).read_bytes()
    data, _, checksum = stored.rpartition(STATE_CHECKSUM)
    if checksum.decode("ascii", "replace") != f"{zlib.crc32(data):08x}":
        raise RunError(f"{path}: damaged training state (its data does not match its checksum). {fix}")
    try:
        # tensors and plain values only, no pickled code; onto the CPU whatever device saved it
        return torch.load(io.BytesIO(data), weights_only=True, map_location=CPU)
    except Exception as error:  # torch raises many types for a bad file
        raise RunError(f"{path}: unreadable training state ({error}). {fix}") from None


def on_device(array, device) -> torch.Tensor:
    """Rows of a float32 array as a tensor on ``device``: a batch at a time, so a dataset
    never needs to fit the device (pinned for an asynchronous copy to a GPU)."""
    tensor = torch.as_tensor(array, dtype=torch.float32)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# --- the mapper -----------------------------------------------------------------------------------

TRAINING_SETTINGS = ("seed", "hidden_size", "depth", "dropout", "learning_rate", "weight_decay",
                     "batch_size", "max_epochs", "patience")


def train_mapper(x_train, y_train, x_val, y_val, config, progress=True, state_path=None, resume=False,
                 device=CPU):
    """Train a Mapper on ``device`` with loss 1 − cosine; return (the best model, on the
    CPU; history). Seeded from ``config.seed``: the same inputs and config give the same
    model. With ``state_path`` the training state is saved as it goes and ``resume``
    continues it."""
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"training needs images in both the train and val splits (got "
                        f"{len(x_train)} and {len(x_val)}); use a larger dataset or --val-fraction > 0.")
    keep_freed_memory()  # the batches' buffers are reused, not handed back (20% faster here)
    torch.manual_seed(config.seed)
    x_train, y_train, x_val, y_val = (torch.as_tensor(a, dtype=torch.float32) for a in (x_train, y_train, x_val, y_val))
    model = Mapper(x_train.shape[1], y_train.shape[1], config.hidden_size, config.depth, config.dropout)
    model.fit_to_data(x_train, y_train)
    model.to(device)
    optimizer = adamw(model.parameters(), device, lr=config.learning_rate, weight_decay=config.weight_decay)

    def batch_loss(trained, batch):
        mine = distributed.share(batch)
        with autocast(device):
            cosines = F.cosine_similarity(trained(on_device(x_train[mine], device)),
                                          on_device(y_train[mine], device), dim=1).float()
        losses = (1.0 - cosines).sum()
        return losses * distributed.world_size() / len(batch), losses

    def validate(kept):
        val_loss = 1.0 - mapper_cosines(kept, x_val, y_val, device).mean().item()
        return {"val_loss": val_loss, "val_cosine": 1.0 - val_loss}

    state = (TrainingState(state_path, training_fingerprint(config, TRAINING_SETTINGS, x_train, y_train, x_val, y_val),
                           resume) if state_path else None)
    history = fit(model, batch_loss, validate, len(x_train), optimizer=optimizer, epochs=config.max_epochs,
                  patience=config.patience, batch_size=config.batch_size, seed=config.seed, what="mapper",
                  setting="learning_rate", config=config, device=device, state=state, progress=progress)
    return model.to(CPU), history


def train_study_mapper(data, config, device=CPU, progress=True, log=print, state_path=None, resume=False):
    """The study's mapper of ``config`` trained on ``data`` (a StudyData: its image and
    target embeddings): (mapper, history, summary)."""
    train_part, val_part = data.part("train"), data.part("val")
    log(f"{'resuming' if resume else 'training'} the mapper ({config.depth} hidden layer(s) of "
        f"{config.hidden_size}) on {len(train_part['ids'])} images, validating on {len(val_part['ids'])}")
    model, history = train_mapper(train_part["image_emb"], train_part["target_emb"], val_part["image_emb"],
                                  val_part["target_emb"], config, progress, state_path, resume, device)
    return model, history, mapper_summary(history, data)


def mapper_summary(history, data) -> dict:
    best, counts = history_best(history), split_counts(data.splits)
    return {**best_epoch(history), "train_loss_at_best": float(best["train_loss"]),
            "val_loss_at_best": float(best["val_loss"]), "seconds": float(history["seconds"].sum()),
            "train_images": counts["train"], "val_images": counts["val"]}


def mapper_cosines(model, x, y, device, batch_size=256) -> torch.Tensor:
    """The cosine of the model's prediction and the target for each row (on the CPU), a batch
    at a time."""
    model.eval()
    with torch.inference_mode(), autocast(device):
        return torch.cat([F.cosine_similarity(model(on_device(x[s:s + batch_size], device)).float(),
                                              on_device(y[s:s + batch_size], device), dim=1).cpu()
                          for s in range(0, len(x), batch_size)])


# --- the decoder -------------------------------------------------------------------------------------

def train_decoder(decoder, x_train, prompts_train, x_val, prompts_val, config, progress=True,
                  val_score=None, device=CPU, state_path=None, resume=False):
    """Train a PromptDecoder with teacher forcing and cross-entropy; return (history
    DataFrame, how many training prompts were cut to max_length).

    With ``config.decoder_early_learning`` the tiny decoder's loss adds the early-learning
    regulariser (``early_learning``); ``train_loss`` stays the cross-entropy. The kept epoch
    is the one with the highest ``val_score(decoder)`` when given (the study passes the
    validation cosine of generated prompts: the validation loss bottoms out long before the
    generated text stops improving), else the lowest validation loss. The learning rate rises
    over the first epoch and falls along a cosine (``warmup_cosine``)."""
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"the decoder needs images in both the train and val splits (got "
                        f"{len(x_train)} and {len(x_val)}).")
    keep_freed_memory()  # the batches' buffers are reused, not handed back
    decoder.check_length(config.max_length)
    torch.manual_seed(config.seed)
    x_train, x_val = (torch.as_tensor(a, dtype=torch.float32) for a in (x_train, x_val))
    train_tokens, cut = decoder.encode_prompts(prompts_train, config.max_length)
    val_tokens, _ = decoder.encode_prompts(prompts_val, config.max_length)
    decoder.model.fit_to_data(x_train)
    decoder.to(device)
    optimizer = adamw(decoder.trainable_parameters(), device, lr=config.decoder_learning_rate, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, -(-len(x_train) // config.decoder_batch_size), config.decoder_epochs)
    early = (EarlyLearning(train_tokens, decoder.tokens.size, config.decoder_early_learning)
             if config.decoder_early_learning and decoder.spec["decoder"] == TINY else None)

    def batch_loss(trained, batch):
        batch = batch.tolist()
        mine = distributed.share(batch)
        predicted = sum(len(train_tokens[i]) - 1 for i in batch)  # the batch's tokens to predict
        with autocast(device):
            logits, targets = decoder.logits(on_device(x_train[mine], device), [train_tokens[i] for i in mine],
                                             model=trained)
            loss_sum = next_token_loss(logits, targets, "sum")
            objective = loss_sum
            if early is not None:
                objective = objective + (early.penalty(logits, mine) * (targets != -100)).sum()
                early.share(batch, mine, device)
        # the batch's mean token loss, per prompt: summed over the processes' shares, it is the batch's
        return objective * distributed.world_size() / predicted, loss_sum * len(batch) / predicted

    def validate(kept):
        row = {"val_loss": decoder_loss(decoder, x_val, val_tokens, config.decoder_batch_size)}
        row["val_cosine"] = val_score(decoder) if val_score is not None else -row["val_loss"]
        return row

    state = None
    if state_path:
        inputs = training_fingerprint(config, DECODER_SETTINGS, x_train, x_val) + texts_fingerprint(prompts_train)
        state = TrainingState(state_path, inputs, resume, **({"early_learning": early} if early else {}))
    history = fit(decoder.model, batch_loss, validate, len(x_train), optimizer=optimizer, epochs=config.decoder_epochs,
                  patience=config.decoder_patience, batch_size=config.decoder_batch_size, seed=config.seed,
                  what="decoder", setting="decoder_learning_rate", config=config, device=device, clip=1.0,
                  scheduler=scheduler, state=state, lengths=[len(tokens) for tokens in train_tokens],
                  progress=progress)
    if val_score is None:
        history = history.drop(columns="val_cosine")
    return history, cut


DECODER_SETTINGS = ("seed", "decoder", "decoder_tune", "prefix_length", "decoder_width", "decoder_layers",
                    "decoder_heads", "decoder_dropout", "decoder_prefix_dropout", "decoder_early_learning",
                    "decoder_learning_rate", "decoder_batch_size", "decoder_epochs", "decoder_patience",
                    "decoder_val_images", "max_length")


def texts_fingerprint(texts) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


def warmup_cosine(optimizer, steps_per_epoch, epochs):
    """The learning rate rises linearly over the first epoch, then falls along a cosine to 0
    at the last: measured on the default data, 24 such epochs at 1e-3 train the decoder as
    well as 36 at a constant 5e-4 (test cosine 0.910 and 0.911) in two thirds of the time."""
    total = steps_per_epoch * epochs

    def factor(step):
        return min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decoder_loss(decoder, x, sequences, batch) -> float:
    """The decoder's mean next-token loss per prompt on ``x`` and its token ``sequences``."""
    decoder.model.eval()
    total = 0.0
    with torch.inference_mode():
        for begin in range(0, len(x), batch):
            chunk = sequences[begin:begin + batch]
            total += decoder.loss(on_device(x[begin:begin + batch], decoder.device), chunk).item() * len(chunk)
    return total / len(x)


def study_decoder(data, config):
    """A new, untrained decoder of ``config`` for ``data`` (a StudyData): its input and the
    training prompts' vocabulary."""
    from img2prompt.models.decoder import build_decoder
    return build_decoder(config.decoder, data.decoder_emb.shape[1], data.part("train")["prompts"],
                         config.prefix_length, config.decoder_width, config.decoder_layers, config.decoder_heads,
                         config.decoder_dropout, config.decoder_tune, config.seed, config.decoder_grid,
                         config.decoder_colors, config.decoder_map, data.image_emb.shape[1],
                         config.decoder_prefix_dropout)


def train_study_decoder(data, config, device=CPU, progress=True, log=print, state_path=None, resume=False):
    """The study's decoder of ``config`` trained on ``data`` (a StudyData: its decoder input
    and prompts): (decoder, summary, history). The epoch kept is the one whose greedy prompts
    for the validation images come closest to the true ones (metric cosine)."""
    from img2prompt.encoders.embeddings import text_embeddings
    from img2prompt.encoders.text import metric_encoder
    from img2prompt.evaluation.scores import cosine_rows
    from img2prompt.models.decoder import describe_input

    train_part, val_part = data.part("train"), data.part("val")
    decoder = study_decoder(data, config)
    trainable = sum(p.numel() for p in decoder.trainable_parameters())
    log(f"training the {config.decoder} decoder ({trainable:,} trainable parameters, reads "
        f"{describe_input(config.decoder_grid, config.decoder_colors, config.decoder_map)}) on "
        f"{len(train_part['ids'])} images, validating on {len(val_part['ids'])}")
    metric, greedy = metric_encoder(config.device), config.decode_options("greedy")
    scored = slice(0, config.decoder_val_images or None)

    truths = val_part["metric_emb"][scored]
    # texts whose metric embedding is known: the true prompts, then those written so far (most
    # of an epoch's prompts were written the epoch before; encoding them all took 10% of an epoch)
    known = dict(zip(val_part["prompts"][scored], truths))

    def val_cosine(model):  # what the evaluation measures, on (some of) the validation images
        texts = model.generate(val_part["decoder_emb"][scored], greedy)
        new = sorted(set(texts) - known.keys())
        known.update(zip(new, text_embeddings(new, metric, progress=False) if new else []))
        return float(cosine_rows(np.stack([known[text] for text in texts]), truths).mean())

    started = time.perf_counter()
    history, cut = train_decoder(decoder, train_part["decoder_emb"], train_part["prompts"], val_part["decoder_emb"],
                                 val_part["prompts"], config, progress, val_score=val_cosine, device=device,
                                 state_path=state_path, resume=resume)
    best = history_best(history)
    summary = {"decoder": config.decoder, "grid": config.decoder_grid, "grid_map": config.decoder_map,
               "trainable_parameters": trainable, **best_epoch(history), "val_loss": float(best["val_loss"]),
               "train_loss": float(best["train_loss"]), "train_samples_per_s": float(history["samples_per_s"].median()),
               "seconds": time.perf_counter() - started, "prompts_cut_to_max_length": cut,
               "vocabulary": decoder.tokens.size}
    return decoder, summary, history


def history_best(history) -> pd.Series:
    """The kept epoch's row of a history."""
    return history[history["best"]].iloc[0]


def best_epoch(history) -> dict:
    """The kept epoch, the epochs trained and the kept epoch's validation cosine."""
    best = history_best(history)
    return {"best_epoch": int(best["epoch"]), "epochs": int(history["epoch"].max()),
            "val_cosine": float(best["val_cosine"])}
