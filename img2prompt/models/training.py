"""The training loops: the mapper (loss 1 − cosine, early stopping on validation cosine) and
the prompt decoder (cross-entropy with teacher forcing, early stopping on validation loss)."""

import copy
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
from img2prompt.devices import autocast
from img2prompt.encoders.allocator import keep_freed_memory
from img2prompt.errors import DataError, RunError, TrainingDiverged

from img2prompt.storage.files import atomic_path
from img2prompt.models.decoder import TINY, next_token_loss
from img2prompt.models.early_learning import EarlyLearning
from img2prompt.models.mapper import Mapper
from img2prompt.progress import progress_bar


def cosine_loss(predicted, target):
    return 1.0 - F.cosine_similarity(predicted, target, dim=1).mean()


def validation_loss(model, x_val, y_val, batch_size=256) -> float:
    """``cosine_loss`` of the mapper's predictions for ``x_val``, a batch at a time: only the
    cosines are held, not the predictions and their normalised copies (the same number)."""
    cosines = torch.cat([F.cosine_similarity(model.predict(x_val[s:s + batch_size]), y_val[s:s + batch_size], dim=1)
                         for s in range(0, len(x_val), batch_size)])
    return (1.0 - cosines.mean()).item()


def batch_share_loss(model, mapper, inputs, targets, index, dropper, device):
    """This process's part of the mean 1 − cosine of the batch ``index`` (the parts of all
    processes add up to it; the whole of it in one process), with ``mapper``'s dropout
    masks drawn for the whole batch from ``dropper`` (``Mapper.dropout_masks``)."""
    mine = distributed.share(index)
    keep = [distributed.share(mask).to(device) for mask in mapper.dropout_masks(len(index), dropper)]
    with autocast(device):
        cosines = F.cosine_similarity(model(inputs[mine].to(device), keep), targets[mine].to(device), dim=1)
        return (1.0 - cosines).sum() / len(index)


def stop_if_diverged(what, epoch, setting, config, **losses):
    """TrainingDiverged naming the epoch, the losses and the setting to lower, when a loss
    is infinite or NaN (the weights overflowed: nothing after this epoch is worth keeping)."""
    if all(math.isfinite(value) for value in losses.values()):
        return
    shown = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in losses.items())
    raise TrainingDiverged(
        f"the {what}'s training diverged in epoch {epoch} ({shown}): its weights overflowed. Lower "
        f"--{setting.replace('_', '-')} (now {getattr(config, setting):g}) and train again with --force.")


CPU = torch.device("cpu")
CHECKPOINT_SECONDS = 20  # least time between two saves of the training state


def train_mapper(x_train, y_train, x_val, y_val, config, progress=True, state_path=None, resume=False,
                 device=CPU):
    """Train a Mapper on ``device``; return (best model, on the CPU; history DataFrame).

    Seeded from ``config.seed``: the same inputs and config give the same model.
    ``history`` has one row per epoch: train_loss, val_loss, val_cosine, seconds.
    With ``state_path``, the whole training state (model, optimiser, best epoch so far,
    history, random generators) is saved there every ``CHECKPOINT_SECONDS``; ``resume``
    continues from it, giving the same result as an uninterrupted run, and refuses a state
    saved for other data or settings. The caller removes the file once the model it leads
    to is saved. Under torchrun each process trains on its share of every batch and the
    gradients are summed (``distributed``); only the main process saves the state.
    """
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"training needs images in both the train and val splits (got "
                        f"{len(x_train)} and {len(x_val)}); use a larger dataset or --val-fraction > 0.")
    keep_freed_memory()  # the batches' buffers are reused, not handed back (20% faster here)
    torch.manual_seed(config.seed)
    x_train, y_train, x_val, y_val = (torch.as_tensor(a, dtype=torch.float32)
                                      for a in (x_train, y_train, x_val, y_val))
    model = Mapper(x_train.shape[1], y_train.shape[1], config.hidden_size, config.depth, config.dropout)
    model.fit_to_data(x_train, y_train)
    inputs = training_fingerprint(config, TRAINING_SETTINGS, x_train, y_train, x_val, y_val)
    model.to(device)
    x_train, y_train, x_val, y_val = (a.to(device) for a in (x_train, y_train, x_val, y_val))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    shuffler = torch.Generator().manual_seed(config.seed)  # on the CPU: the same order anywhere
    dropper = torch.Generator().manual_seed(config.seed + 1)  # dropout masks, alike in every process
    best_state, best_cosine, best_epoch, rows, first_epoch = None, -np.inf, 0, [], 1
    if resume:
        state = restore_training_state(state_path, inputs, model, optimizer, shuffler, dropper)
        best_state, best_cosine, best_epoch = state["best_state"], state["best_cosine"], state["best_epoch"]
        rows, first_epoch = state["history"], state["epoch"] + 1
    last_save = time.perf_counter()
    with progress_bar(config.max_epochs, "epoch", enabled=progress, description="train") as bar:
        bar.update(first_epoch - 1)
        for epoch in range(first_epoch, config.max_epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(x_train), generator=shuffler)
            total = 0.0
            for begin in range(0, len(order), config.batch_size):
                index = order[begin:begin + config.batch_size]
                loss = batch_share_loss(model, model, x_train, y_train, index, dropper, device)
                optimizer.zero_grad()
                loss.backward()
                distributed.sum_gradients(model.parameters())
                optimizer.step()
                total += loss.item() * len(index)
            total = distributed.sum_number(total)
            val_loss = validation_loss(model, x_val, y_val)
            stop_if_diverged("mapper", epoch, "learning_rate", config, training_loss=total / len(x_train),
                             validation_loss=val_loss)
            rows.append({"epoch": epoch, "train_loss": total / len(x_train), "val_loss": val_loss,
                         "val_cosine": 1.0 - val_loss, "seconds": time.perf_counter() - start})
            if 1.0 - val_loss > best_cosine:
                best_cosine, best_epoch = 1.0 - val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.update(1)
            bar.set_postfix(val_cos=f"{1.0 - val_loss:.4f}", best=best_epoch)
            if epoch - best_epoch >= config.patience:
                break
            if state_path and distributed.is_main() and time.perf_counter() - last_save >= CHECKPOINT_SECONDS:
                save_training_state(state_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "shuffler": shuffler.get_state(), "dropper": dropper.get_state(),
                    "best_state": best_state,
                    "best_cosine": best_cosine, "best_epoch": best_epoch, "history": rows,
                    "epoch": epoch, "inputs": inputs})
                last_save = time.perf_counter()
    model.load_state_dict(best_state)
    history = pd.DataFrame(rows)
    history["best"] = history["epoch"] == best_epoch
    return model.to(CPU).eval(), history


TRAINING_SETTINGS = ("seed", "hidden_size", "depth", "dropout", "learning_rate", "weight_decay",
                     "batch_size", "max_epochs", "patience")


def training_fingerprint(config, settings, *arrays) -> str:
    """What a training state is bound to: the training and validation arrays and settings."""
    digest = hashlib.sha256(repr([getattr(config, name) for name in settings]).encode())
    for array in arrays:
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(np.ascontiguousarray(array.numpy()))  # its buffer, not a copy of it
    return digest.hexdigest()


def restore_training_state(path, inputs, model, optimizer, shuffler, dropper) -> dict:
    """Load the training state saved at ``path`` into the model, the optimiser, the shuffling
    generator and the dropout masks' generator, and return it; refused when it was saved for
    other ``inputs`` (``training_fingerprint``)."""
    state = load_training_state(path)
    if state.get("inputs") != inputs:
        raise RunError(f"{path}: this training state was saved for other data or settings, so it "
                       "cannot be resumed here. Train without --resume (--force starts the run anew).")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    shuffler.set_state(state["shuffler"])
    if "dropper" in state:  # (states saved before the masks were shared have none)
        dropper.set_state(state["dropper"])
    return state


STATE_CHECKSUM = b"\nimg2prompt-crc32:"  # then 8 hex digits: the checksum of the bytes before it


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
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        raise RunError(f"{path}: unreadable training state ({error}). {fix}") from None


def train_decoder(decoder, x_train, prompts_train, x_val, prompts_val, config, progress=True,
                  val_score=None, device=CPU):
    """Train a PromptDecoder with teacher forcing and cross-entropy; return (history
    DataFrame, how many training prompts were cut to max_length).

    With ``config.decoder_early_learning`` the tiny decoder's loss adds the early-learning
    regulariser (``early_learning``); ``train_loss`` stays the cross-entropy.
    The kept epoch is the one with the highest ``val_score(decoder)`` when given (the study
    passes the validation cosine of generated prompts: the validation loss bottoms out long
    before the generated text stops improving), else the lowest validation loss. ``history``
    has one row per epoch: train_loss, val_loss, [val_cosine,] seconds, samples_per_s, best.
    Under torchrun each process trains on its share of every batch and the gradients are
    summed (``distributed``); each validates on the whole validation set.
    """
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"the decoder needs images in both the train and val splits (got "
                        f"{len(x_train)} and {len(x_val)}).")
    keep_freed_memory()  # the batches' buffers are reused, not handed back
    torch.manual_seed(config.seed)
    x_train, x_val = (torch.as_tensor(a, dtype=torch.float32) for a in (x_train, x_val))
    train_tokens, cut = decoder.encode_prompts(prompts_train, config.max_length)
    val_tokens, _ = decoder.encode_prompts(prompts_val, config.max_length)
    decoder.model.fit_to_data(x_train)
    decoder.to(device)
    x_train, x_val = x_train.to(device), x_val.to(device)
    trainable = decoder.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=config.decoder_learning_rate, weight_decay=0.01)
    frozen_lm = not any(p.requires_grad for p in decoder.model.lm.parameters())
    shuffler = torch.Generator().manual_seed(config.seed)
    dropper = torch.Generator(device).manual_seed(config.seed + 1)  # dropout masks, alike in every process
    batch = config.decoder_batch_size
    scheduler = warmup_cosine(optimizer, -(-len(x_train) // batch), config.decoder_epochs)
    early = (EarlyLearning(train_tokens, decoder.tokens.size, config.decoder_early_learning, device)
             if config.decoder_early_learning and decoder.spec["decoder"] == TINY else None)
    best_state, best_value, best_epoch, rows = None, -np.inf, 0, []
    with progress_bar(config.decoder_epochs, "epoch", enabled=progress, description="decoder") as bar:
        for epoch in range(1, config.decoder_epochs + 1):
            start = time.perf_counter()
            decoder.model.train()
            if frozen_lm:
                decoder.model.lm.eval()  # a frozen LM keeps its dropout off
            order = torch.randperm(len(x_train), generator=shuffler).tolist()
            total = 0.0
            for begin in range(0, len(order), batch):
                index = order[begin:begin + batch]
                mine = distributed.share(index)  # the whole batch in one process
                # drawn for the whole batch: this share's rows get what one process gives them
                masks = decoder.dropout_masks([train_tokens[i] for i in index], dropper, distributed.share)
                optimizer.zero_grad()
                loss = torch.zeros(())
                if mine:
                    with autocast(device):
                        # this share's part of the batch's mean token loss: the parts add up to it
                        logits, targets = decoder.logits(x_train[mine], [train_tokens[i] for i in mine], masks)
                        predicted = sum(len(train_tokens[i]) - 1 for i in index)
                        loss = next_token_loss(logits, targets, "sum") / predicted
                        objective = loss
                        if early is not None:
                            objective = loss + (early.penalty(logits, mine) * (targets != -100)).sum() / predicted
                    objective.backward()
                distributed.sum_gradients(trainable)
                if early is not None:
                    early.share(index, mine)
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(index)
            total = distributed.sum_number(total)
            train_seconds = time.perf_counter() - start
            row = {"epoch": epoch, "train_loss": total / len(x_train),
                   "val_loss": _decoder_loss(decoder, x_val, val_tokens, batch)}
            stop_if_diverged("decoder", epoch, "decoder_learning_rate", config, training_loss=row["train_loss"],
                             validation_loss=row["val_loss"])
            if val_score is not None:
                row["val_cosine"] = val_score(decoder)
            value = row["val_cosine"] if val_score is not None else -row["val_loss"]
            rows.append({**row, "seconds": time.perf_counter() - start,
                         "samples_per_s": len(x_train) / train_seconds})
            if value > best_value:
                best_value, best_epoch = value, epoch
                best_state = {k: v.clone() for k, v in decoder.model.state_dict().items()
                              if not frozen_lm or not k.startswith("lm.")}
            bar.update(1)
            bar.set_postfix(val_loss=f"{row['val_loss']:.4f}", best=best_epoch)
            if epoch - best_epoch >= config.decoder_patience:
                break
    decoder.model.load_state_dict(best_state, strict=not frozen_lm)
    decoder.model.eval()
    history = pd.DataFrame(rows)
    history["best"] = history["epoch"] == best_epoch
    return history, cut


def warmup_cosine(optimizer, steps_per_epoch, epochs):
    """The learning rate rises linearly over the first epoch, then falls along a cosine to 0
    at the last: measured on the default data, 24 such epochs at 1e-3 train the decoder as
    well as 36 at a constant 5e-4 (test cosine 0.910 and 0.911) in two thirds of the time."""
    total = steps_per_epoch * epochs

    def factor(step):
        return min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _decoder_loss(decoder, x, sequences, batch):
    decoder.model.eval()
    total = 0.0
    with torch.inference_mode():
        for begin in range(0, len(x), batch):
            chunk = sequences[begin:begin + batch]
            total += decoder.loss(x[begin:begin + batch], chunk).item() * len(chunk)
    return total / len(x)
