"""The mapper: an MLP from image embeddings to prompt embeddings, saved as safetensors + JSON."""

import torch
from torch import nn

from img2prompt.config import StudyConfig
from img2prompt.storage.checkpoints import (
    PROVENANCE,
    check_provenance,
    foreign,
    load_tensors,
    save_tensors,
)


class Mapper(nn.Module):
    """Centre and scale the image embedding, then ``depth`` hidden layers (GELU, dropout), then linear."""

    def __init__(self, in_dim, out_dim, hidden_size=StudyConfig.hidden_size, depth=StudyConfig.depth,
                 dropout=StudyConfig.dropout):
        super().__init__()
        self.hparams = {"in_dim": in_dim, "out_dim": out_dim, "hidden_size": hidden_size,
                        "depth": depth, "dropout": dropout}
        # statistics of the training images, set by ``fit_to_data``
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_scale", torch.ones(()))
        layers, width = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_size), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_size
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def fit_to_data(self, x: torch.Tensor, y: torch.Tensor):
        """Centre inputs on the training mean and start the output at the mean training target:
        the untrained mapper is the mean-prompt baseline, and training moves away from it
        only as far as the images tell it to.

        All features share one scale (their mean std): dividing each by its own std would
        blow up features that are nearly constant in training (dead CNN channels) whenever
        they fire on a new image."""
        self.input_mean.copy_(x.mean(dim=0))
        self.input_scale.fill_(x.std(dim=0).mean().clamp(min=1e-6).item())
        last = self.net[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.copy_(y.mean(dim=0))

    def forward(self, x):
        return self.net((x - self.input_mean) / self.input_scale)

    def predict(self, x, batch_size=256) -> torch.Tensor:
        """Predicted embeddings for a float32 array or tensor, in eval mode (a batch of rows at
        a time: the hidden layers' working memory stays that of one batch)."""
        self.eval()
        x = torch.as_tensor(x, dtype=torch.float32).to(self.input_mean.device)
        with torch.inference_mode():
            predicted = torch.empty((len(x), self.hparams["out_dim"]), device=x.device)  # filled in place
            for s in range(0, len(x), batch_size):
                predicted[s:s + batch_size] = self(x[s:s + batch_size])
            return predicted


def save_mapper(model: Mapper, path, provenance: dict = None):
    """The weights, the shape and ``provenance``: the encoders the mapper was trained with."""
    save_tensors(path, model.state_dict(), {"hparams": model.hparams,
                                            **({PROVENANCE: provenance} if provenance else {})})


def load_mapper(path, provenance: dict = None) -> Mapper:
    """The mapper saved at ``path``; refused when ``provenance`` (the run's encoders) is not
    what it was trained with."""
    fix = "Train the run again ('img2prompt train --force')."
    state, metadata = load_tensors(path, "trained mapper", fix, required=("hparams",))
    if provenance is not None:
        check_provenance(path, metadata, provenance, fix)
    try:
        model = Mapper(**metadata["hparams"])
        model.load_state_dict(state)
    except (TypeError, RuntimeError, ValueError) as error:
        raise foreign(path, "mapper", error, fix) from None
    return model.eval()
