import numpy as np
import pytest
import torch

from img2prompt.config import StudyConfig
from img2prompt.errors import DataError, RunError
from img2prompt.evaluation.scores import cosine_rows
from img2prompt.models.mapper import Mapper, load_mapper, save_mapper
from img2prompt.models.training import train_mapper


def toy_problem(n=300, seed=0):
    """Targets are a fixed nonlinear function of the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20)).astype(np.float32)
    w = rng.normal(size=(20, 8)).astype(np.float32)
    return x, np.tanh(x @ w) + 0.5


def config(**changes):
    return StudyConfig(**{"hidden_size": 64, "depth": 2, "max_epochs": 60, "patience": 60, "batch_size": 32,
                          **changes})


def test_training_learns_and_beats_the_mean():
    x, y = toy_problem()
    model, history = train_mapper(x[:200], y[:200], x[200:], y[200:], config(), progress=False)
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    predicted = model.predict(x[200:]).numpy()
    mean_baseline = cosine_rows(y[:200].mean(axis=0), y[200:]).mean()
    assert cosine_rows(predicted, y[200:]).mean() > mean_baseline + 0.05
    assert history["best"].sum() == 1


def test_untrained_mapper_is_the_mean_prompt_baseline():
    x, y = toy_problem()
    model = Mapper(20, 8, hidden_size=16, depth=1)
    model.fit_to_data(torch.as_tensor(x), torch.as_tensor(y))
    predicted = model.predict(x).numpy()
    assert cosine_rows(predicted, y.mean(axis=0)).mean() > 0.99


def test_same_seed_same_model_other_seed_other_model():
    x, y = toy_problem()
    args = (x[:200], y[:200], x[200:], y[200:])
    a, _ = train_mapper(*args, config(max_epochs=5, seed=1), progress=False)
    b, _ = train_mapper(*args, config(max_epochs=5, seed=1), progress=False)
    c, _ = train_mapper(*args, config(max_epochs=5, seed=2), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_early_stopping_keeps_the_best_epoch():
    x, y = toy_problem(n=80)
    _, history = train_mapper(x[:40], y[:40], x[40:], y[40:], config(max_epochs=400, patience=5,
                                                                     hidden_size=256), progress=False)
    best = history[history["best"]]["epoch"].iloc[0]
    assert len(history) == best + 5 < 400
    assert history["val_cosine"].max() == history[history["best"]]["val_cosine"].iloc[0]


def test_empty_validation_split_is_refused():
    x, y = toy_problem(n=10)
    with pytest.raises(DataError, match="val"):
        train_mapper(x, y, x[:0], y[:0], config(), progress=False)


def test_save_and_load_round_trip(tmp_path):
    model = Mapper(20, 8, hidden_size=16, depth=3, dropout=0.2)
    x, y = toy_problem()
    model.fit_to_data(torch.as_tensor(x), torch.as_tensor(y))
    save_mapper(model, tmp_path / "m.safetensors")
    loaded = load_mapper(tmp_path / "m.safetensors")
    assert loaded.hparams == model.hparams
    assert torch.equal(loaded.predict(x), model.predict(x))
    with pytest.raises(RunError, match="img2prompt train"):
        load_mapper(tmp_path / "missing.safetensors")


def test_feature_constant_in_training_does_not_blow_up_predictions():
    x, y = toy_problem()
    x[:, 0] = 0.0  # a dead channel in every training image ...
    model = Mapper(20, 8, hidden_size=16, depth=1)
    model.fit_to_data(torch.as_tensor(x), torch.as_tensor(y))
    firing = x[:5].copy()
    firing[:, 0] = 3.0  # ... that fires on new images
    change = (model.predict(firing) - model.predict(x[:5])).norm(dim=1)
    assert change.max() < 0.5 * model.predict(x[:5]).norm(dim=1).min()
