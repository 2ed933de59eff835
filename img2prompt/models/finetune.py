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

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from img2prompt import distributed
from img2prompt.devices import autocast, per_device
from img2prompt.errors import DataError, RunError
from img2prompt.models.training import (
    CPU,
    TrainingState,
    adamw,
    fit,
    mapper_cosines,
    on_device,
    training_fingerprint,
)
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

    def forward(self, hidden):
        return self.mapper(self.features(hidden))

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
    with one row per epoch, epoch 0 the start: train_loss, val_cosine, seconds,
    samples_per_s, best). Seeded from ``config.seed``; the training loop is the mapper's
    (``training.fit``): with ``state_path`` its state is saved as it goes and ``resume``
    continues it."""
    if len(trunk_train) == 0 or len(trunk_val) == 0:
        raise DataError("fine-tuning needs images in both the train and val splits.")
    torch.manual_seed(config.seed)
    y_train, y_val = (torch.as_tensor(a, dtype=torch.float32) for a in (y_train, y_val))
    model = TunedTop(encoder, mapper, config.tune_blocks).to(device)
    encoder.model.requires_grad_(False)
    groups = parameter_groups(model, config)
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    optimizer = adamw(groups, device, weight_decay=0.01)
    average = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay))
        if config.ema_decay > 0 else None)

    def batch_loss(trained, batch):
        mine = distributed.share(batch)
        with autocast(device):
            cosines = F.cosine_similarity(trained(on_device(trunk_train[mine], device)),
                                          on_device(y_train[mine], device), dim=1).float()
        losses = (1.0 - cosines).sum()
        return losses * distributed.world_size() / len(batch), losses

    def validate(kept):
        return {"val_cosine": mapper_cosines(kept, trunk_val, y_val, device, batch_size=128).mean().item()}

    start = {"epoch": 0, "train_loss": np.nan, **validate(model), "seconds": 0.0, "samples_per_s": np.nan}
    state = (TrainingState(state_path, training_fingerprint(config, TUNING_SETTINGS, trunk_train, y_train, trunk_val,
                                                            y_val), resume) if state_path else None)
    history = fit(model, batch_loss, validate, len(trunk_train), optimizer=optimizer, epochs=config.tune_epochs,
                  patience=config.tune_patience, batch_size=per_device(config.tune_batch_size, device, 32, 128),
                  seed=config.seed,
                  what="fine-tuning", setting="tune_learning_rate", config=config, device=device,
                  accumulate=config.accumulate_steps, average=average, state=state, first_row=start,
                  progress=progress)
    return model.to(CPU).eval(), history


def save_tuned(model: TunedTop, path):
    """The tuned layers' weights, named as in the encoder's own state_dict (``use_tuned``),
    with the identity of the encoder they were tuned from."""
    tuned = {id(p) for layer in model.layers for p in [*layer.parameters(), *layer.buffers()]}
    state = {name: tensor for name, tensor in model.encoder.model.state_dict(keep_vars=True).items()
             if id(tensor) in tuned}
    save_tensors(path, {name: tensor.detach() for name, tensor in state.items()},
                 {"encoder": model.encoder.name, "tune_blocks": model.tune_blocks,
                  PROVENANCE: {"image_encoder": model.encoder.identity()}})


def fine_tune_study(data, encoder, mapper, config, device=CPU, progress=True, log=print, state_path=None,
                    resume=False):
    """Fine-tune ``encoder``'s top blocks with ``mapper`` on a study's data (a StudyData): the
    frozen blocks' output of every image through the cache (under torchrun the main process
    fills it first), then ``fine_tune``. Returns (TunedTop, history, summary)."""
    from img2prompt.encoders.embeddings import (
        EmbeddingCache,
        embed_batch_size,
        trunk_features,
    )
    from img2prompt.models.training import best_epoch

    started = time.perf_counter()

    def trunk_of_every_image():
        return trunk_features(data.dataset, encoder, config.tune_blocks, EmbeddingCache(config.cache_dir),
                              embed_batch_size(config, encoder), config.num_workers, progress)

    trunk = distributed.main_first(trunk_of_every_image)
    trunk = trunk_of_every_image() if trunk is None else trunk  # a follower: from the cache
    trunk_seconds = time.perf_counter() - started
    log(f"fine-tuning the top {config.tune_blocks} block(s) of {encoder.name} with the mapper "
        f"({'resumed; ' if resume else ''}frozen blocks run once: {trunk_seconds:.0f} s)")
    train, val = (data.splits == "train"), (data.splits == "val")
    model, history = fine_tune(encoder, mapper, trunk[train], data.target_emb[train], trunk[val],
                               data.target_emb[val], config, progress, state_path=state_path, resume=resume,
                               device=device)
    summary = {**best_epoch(history), "start_val_cosine": float(history["val_cosine"].iloc[0]),
               "tune_blocks": config.tune_blocks, "trunk_seconds": trunk_seconds,
               "seconds": float(history["seconds"].sum()), "images_per_s": float(history["samples_per_s"].median())}
    return model, history, summary
