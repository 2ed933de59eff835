"""Fine-tuning the image encoder with the mapper, after the mapper alone (LP-FT).

The mapper is first trained on frozen features (``training.train_mapper``: "linear
probing"); then the encoder's top ``tune_blocks`` blocks and its head learn together with
it, with loss 1 − cosine, so the features themselves move towards what the prompts say.
The blocks below stay frozen: their output is computed once per image (``trunk``) and read
by every epoch, which is what makes this affordable on a CPU. The learning rate decays by
``layer_decay`` per block downwards (the lower a block, the more general and the less it
should move), an exponential moving average of the weights (``ema_decay``) is what is
validated and kept, gradients of ``accumulate_steps`` batches add up before each step, and
training stops early when the validation cosine stops improving. BatchNorm statistics stay
frozen (batches of 32 estimate them worse than ImageNet did).

No image augmentation: the trunk's output is computed once. The generated prompts name
left and right, so a horizontal flip would make them false anyway.
"""

import copy
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from img2prompt import distributed
from img2prompt.devices import autocast
from img2prompt.errors import DataError, RunError
from img2prompt.models.training import (CHECKPOINT_SECONDS, CPU, batch_share_loss, cosine_loss,
                                        restore_training_state, save_training_state, stop_if_diverged,
                                        training_fingerprint)

from img2prompt.progress import progress_bar
from img2prompt.storage.checkpoints import PROVENANCE, save_tensors


TUNING_SETTINGS = ("seed", "tune_blocks", "tune_learning_rate", "layer_decay", "ema_decay",
                   "tune_batch_size", "accumulate_steps", "tune_epochs", "tune_patience")


class TunedTop(nn.Module):
    """The encoder's tuned top layers with the mapper: trunk output -> predicted embedding."""

    def __init__(self, encoder, mapper, tune_blocks):
        super().__init__()
        available = len(encoder.blocks(encoder.model))
        if tune_blocks > available:
            raise RunError(f"--tune-blocks {tune_blocks}: {encoder.name} has {available} blocks.")
        self.encoder, self.tune_blocks = encoder, tune_blocks
        self.layers = nn.ModuleList(encoder.top_layers(encoder.model, tune_blocks))
        self.mapper = mapper

    def features(self, hidden):
        hidden = hidden.float()
        if self.encoder.channels_last:
            hidden = hidden.contiguous(memory_format=torch.channels_last)
        return self.encoder.top(self.encoder.model, hidden, self.tune_blocks).mean(dim=(2, 3))

    def forward(self, hidden, keep=None):
        return self.mapper(self.features(hidden), keep)

    def train(self, mode=True):
        super().train(mode)
        for module in self.modules():  # BatchNorm keeps ImageNet's statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def parameter_groups(model: TunedTop, config) -> list:
    """The mapper and the top layer at ``tune_learning_rate``; each layer below at
    ``layer_decay`` times the one above."""
    groups = [{"params": list(model.mapper.parameters()), "lr": config.tune_learning_rate}]
    for depth, layer in enumerate(reversed(model.layers)):
        groups.append({"params": list(layer.parameters()),
                       "lr": config.tune_learning_rate * config.layer_decay ** depth})
    return groups


def fine_tune(encoder, mapper, trunk_train, y_train, trunk_val, y_val, config, progress=True,
              state_path=None, resume=False, device=CPU):
    """Fine-tune the top of ``encoder`` with ``mapper`` (already trained on frozen features)
    on trunk outputs; return (TunedTop with the kept weights, on the CPU; history DataFrame
    with one row per epoch: train_loss, val_cosine, seconds, images_per_s, best).

    Seeded from ``config.seed``. With ``state_path`` the training state is saved as it goes
    and ``resume`` continues it (refused for other data or settings), as for the mapper.
    Under torchrun each process trains on its share of every batch (``distributed``), with
    the mapper's dropout masks of one process, and the gradients are summed before each step."""
    if len(trunk_train) == 0 or len(trunk_val) == 0:
        raise DataError("fine-tuning needs images in both the train and val splits.")
    torch.manual_seed(config.seed)
    y_train, y_val = (torch.as_tensor(a, dtype=torch.float32) for a in (y_train, y_val))
    inputs = training_fingerprint(config, TUNING_SETTINGS, trunk_train, y_train, trunk_val, y_val)
    model = TunedTop(encoder, mapper, config.tune_blocks).to(device)
    encoder.model.requires_grad_(False)
    groups = parameter_groups(model, config)
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    average = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay))
        if config.ema_decay > 0 else None)
    kept = lambda: average.module if average is not None else model  # noqa: E731 - what is validated
    shuffler = torch.Generator().manual_seed(config.seed)
    dropper = torch.Generator().manual_seed(config.seed + 1)  # the mapper's dropout masks, alike everywhere
    best_state, best_cosine, best_epoch, rows, first_epoch = None, -np.inf, 0, [], 1
    if resume:
        state = restore_training_state(state_path, inputs, model, optimizer, shuffler, dropper)
        if average is not None:
            average.load_state_dict(state["average"])
        best_state, best_cosine, best_epoch = state["best_state"], state["best_cosine"], state["best_epoch"]
        rows, first_epoch = state["history"], state["epoch"] + 1
    else:  # epoch 0: the linear-probed start, so fine-tuning is kept only when it helps
        best_cosine = _val_cosine(model, trunk_val, y_val, device)
        best_state = copy.deepcopy(model.state_dict())
        rows.append({"epoch": 0, "train_loss": np.nan, "val_cosine": best_cosine, "seconds": 0.0,
                     "images_per_s": np.nan})
    batch, steps = config.tune_batch_size, config.accumulate_steps
    last_save = time.perf_counter()
    with progress_bar(config.tune_epochs, "epoch", enabled=progress, description="fine-tune") as bar:
        bar.update(first_epoch - 1)
        for epoch in range(first_epoch, config.tune_epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(trunk_train), generator=shuffler)
            total = 0.0
            optimizer.zero_grad()
            for number, begin in enumerate(range(0, len(order), batch), start=1):
                index = order[begin:begin + batch]
                loss = batch_share_loss(model, model.mapper, trunk_train, y_train, index, dropper, device)
                (loss / steps).backward()
                total += loss.item() * len(index)
                if number % steps == 0 or begin + batch >= len(order):
                    distributed.sum_gradients(model.parameters())
                    optimizer.step()
                    optimizer.zero_grad()
                    if average is not None:
                        average.update_parameters(model)
            seconds = time.perf_counter() - start
            total = distributed.sum_number(total)
            val_cosine = _val_cosine(kept(), trunk_val, y_val, device)
            stop_if_diverged("fine-tuning", epoch, "tune_learning_rate", config,
                             training_loss=total / len(trunk_train), validation_cosine=val_cosine)
            rows.append({"epoch": epoch, "train_loss": total / len(trunk_train), "val_cosine": val_cosine,
                         "seconds": time.perf_counter() - start, "images_per_s": len(trunk_train) / seconds})
            if val_cosine > best_cosine:
                best_cosine, best_epoch = val_cosine, epoch
                best_state = copy.deepcopy(kept().state_dict())
            bar.update(1)
            bar.set_postfix(val_cos=f"{val_cosine:.4f}", best=best_epoch)
            if epoch - best_epoch >= config.tune_patience:
                break
            if state_path and distributed.is_main() and time.perf_counter() - last_save >= CHECKPOINT_SECONDS:
                save_training_state(state_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "average": average.state_dict() if average is not None else {},
                    "shuffler": shuffler.get_state(), "dropper": dropper.get_state(),
                    "best_state": best_state, "best_cosine": best_cosine, "best_epoch": best_epoch,
                    "history": rows, "epoch": epoch, "inputs": inputs})
                last_save = time.perf_counter()
    model.load_state_dict(best_state)
    history = pd.DataFrame(rows)
    history["best"] = history["epoch"] == best_epoch
    return model.to(CPU).eval(), history


def _val_cosine(model, trunk, target, device, batch=128) -> float:
    model.eval()
    with torch.inference_mode(), autocast(device):
        predicted = torch.cat([model(trunk[s:s + batch].to(device)).float().cpu()
                               for s in range(0, len(trunk), batch)])
    return 1.0 - cosine_loss(predicted, target).item()


def save_tuned(model: TunedTop, path):
    """The tuned layers' weights, named as in the encoder's own state_dict (``use_tuned``),
    with the identity of the encoder they were tuned from."""
    tuned = {id(p) for layer in model.layers for p in [*layer.parameters(), *layer.buffers()]}
    state = {name: tensor for name, tensor in model.encoder.model.state_dict(keep_vars=True).items()
             if id(tensor) in tuned}
    save_tensors(path, {name: tensor.detach() for name, tensor in state.items()},
                 {"encoder": model.encoder.name, "tune_blocks": model.tune_blocks,
                  PROVENANCE: {"image_encoder": model.encoder.identity()}})
