"""The training loop: loss 1 − cosine, AdamW, early stopping on validation cosine."""

import copy
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import DataError
from .mapper import Mapper
from .progress import progress_bar


def cosine_loss(predicted, target):
    return 1.0 - F.cosine_similarity(predicted, target, dim=1).mean()


def train_mapper(x_train, y_train, x_val, y_val, config, progress=True):
    """Train a Mapper; return (best model, history DataFrame).

    Seeded from ``config.seed``: the same inputs and config give the same model.
    ``history`` has one row per epoch: train_loss, val_loss, val_cosine, seconds.
    """
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"training needs images in both the train and val splits (got "
                        f"{len(x_train)} and {len(x_val)}); use a larger dataset or --val-fraction > 0.")
    torch.manual_seed(config.seed)
    x_train, y_train, x_val, y_val = (torch.as_tensor(a, dtype=torch.float32)
                                      for a in (x_train, y_train, x_val, y_val))
    model = Mapper(x_train.shape[1], y_train.shape[1], config.hidden_size, config.depth, config.dropout)
    model.fit_to_data(x_train, y_train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    shuffler = torch.Generator().manual_seed(config.seed)
    best_state, best_cosine, best_epoch, rows = None, -np.inf, 0, []
    with progress_bar(config.max_epochs, "epoch", enabled=progress, description="train") as bar:
        for epoch in range(1, config.max_epochs + 1):
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(x_train), generator=shuffler)
            total = 0.0
            for begin in range(0, len(order), config.batch_size):
                index = order[begin:begin + config.batch_size]
                loss = cosine_loss(model(x_train[index]), y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            val_loss = cosine_loss(model.predict(x_val), y_val).item()
            rows.append({"epoch": epoch, "train_loss": total / len(x_train), "val_loss": val_loss,
                         "val_cosine": 1.0 - val_loss, "seconds": time.perf_counter() - start})
            if 1.0 - val_loss > best_cosine:
                best_cosine, best_epoch = 1.0 - val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.update(1)
            bar.set_postfix(val_cos=f"{1.0 - val_loss:.4f}", best=best_epoch)
            if epoch - best_epoch >= config.patience:
                break
    model.load_state_dict(best_state)
    history = pd.DataFrame(rows)
    history["best"] = history["epoch"] == best_epoch
    return model.eval(), history
