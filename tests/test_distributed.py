"""Data-parallel training under torchrun: two processes on this machine's CPUs (gloo) train
the mapper, the decoder and the fine-tuning as one process does (DistributedDataParallel,
each process its own dropout), decisions are the main process's, and a failing main process
stops its followers. The CUDA path's process group is checked with CUDA mocked."""

import subprocess
import sys
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from img2prompt import distributed
from img2prompt.cli import main
from img2prompt.errors import RunError

pytestmark = pytest.mark.slow  # several processes: `./run_tests.sh -m slow`


def torchrun(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "img2prompt", "--", *args],  # "--": torchrun would read "--run" as its "--run-path"
                          capture_output=True, text=True, timeout=timeout)


def history(run, name="history.csv"):
    return pd.read_csv(run / name)


DECODER = ["--decoder-epochs", "3", "--decoder-width", "64", "--decoder-layers", "1", "--decoder-batch-size", "16",
           "--quiet"]


@pytest.fixture(scope="module")
def without_dropout(trained_run, cache_dir, tmp_path_factory):
    """One process and two, the mapper then the decoder, dropout off: the same computation,
    the batch's rows shared out."""
    root = tmp_path_factory.mktemp("ddp")
    options = ["--data", str(trained_run["data"]), "--cache-dir", str(cache_dir), "--max-epochs", "12",
               "--batch-size", "32", "--dropout", "0", "--quiet"]
    decoder = [*DECODER, "--decoder-dropout", "0", "--decoder-prefix-dropout", "0"]
    assert main(["train", "--out", str(root / "one"), *options]) == 0
    assert main(["train-decoder", "--run", str(root / "one"), *decoder]) == 0
    trained = torchrun("train", "--out", str(root / "two"), *options)
    assert trained.returncode == 0, trained.stderr[-3000:]
    decoded = torchrun("train-decoder", "--run", str(root / "two"), *decoder)
    assert decoded.returncode == 0, decoded.stderr[-3000:]
    return root / "one", root / "two", trained, decoded


def test_two_processes_train_the_mapper_one_process_trains(without_dropout):
    one, two, _, _ = without_dropout
    histories = [history(run) for run in (one, two)]
    assert len(histories[0]) == len(histories[1]) == 12
    np.testing.assert_allclose(histories[0]["val_cosine"], histories[1]["val_cosine"], atol=1e-4)
    np.testing.assert_allclose(histories[0]["train_loss"], histories[1]["train_loss"], atol=1e-4)


def test_two_processes_train_the_decoder_one_process_trains(without_dropout):
    one, two, _, decoded = without_dropout
    assert decoded.stdout.count("trained the tiny decoder") == 1  # the main process reports
    histories = [history(run, "decoder_history.csv") for run in (one, two)]
    for column in ("train_loss", "val_loss", "val_cosine"):
        np.testing.assert_allclose(histories[0][column], histories[1][column], atol=1e-4, err_msg=column)


def test_only_the_main_process_writes_and_reports(without_dropout):
    _, two, trained, _ = without_dropout
    assert trained.stdout.count("trained ") == 1  # one summary line, from the main process
    assert not list(two.glob("*.tmp*")) and (two / "best_model.safetensors").is_file()


def test_with_dropout_two_processes_land_within_the_spread_of_seeds(trained_run, cache_dir, tmp_path):
    """Each process draws its own dropout: two processes are another draw, within what three
    seeds of one process give."""
    options = ["--data", str(trained_run["data"]), "--cache-dir", str(cache_dir), "--max-epochs", "12",
               "--batch-size", "32", "--quiet"]
    seeds = []
    for seed in (0, 1, 2):
        assert main(["train", "--out", str(tmp_path / f"seed{seed}"), *options, "--seed", str(seed)]) == 0
        seeds.append(history(tmp_path / f"seed{seed}")["val_cosine"].max())
    result = torchrun("train", "--out", str(tmp_path / "two"), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    two = history(tmp_path / "two")["val_cosine"].max()
    spread = max(seeds) - min(seeds)
    assert min(seeds) - spread <= two <= max(seeds) + spread, (seeds, two)


def test_two_processes_fine_tune_the_encoder_as_one_process(trained_run, cache_dir, tmp_path):
    options = ["--data", str(trained_run["data"]), "--cache-dir", str(cache_dir), "--max-epochs", "4",
               "--batch-size", "32", "--dropout", "0", "--tune", "encoder", "--tune-blocks", "1", "--tune-epochs",
               "2", "--tune-batch-size", "16", "--quiet"]
    assert main(["train", "--out", str(tmp_path / "one"), *options]) == 0
    result = torchrun("train", "--out", str(tmp_path / "two"), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    histories = [history(tmp_path / run, "tune_history.csv") for run in ("one", "two")]
    assert len(histories[0]) == len(histories[1]) == 3  # epoch 0 (the frozen start) and two more
    np.testing.assert_allclose(histories[0]["val_cosine"], histories[1]["val_cosine"], atol=1e-4)


def test_a_failing_main_process_stops_its_followers(tmp_path):
    result = torchrun("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quiet",
                      timeout=120)
    assert result.returncode != 0
    assert "dataset folder not found" in result.stderr
    assert "the main process (rank 0) stopped" in result.stderr


def test_on_a_gpu_machine_the_process_group_has_a_backend_for_cpu_tensors_too(monkeypatch):
    """NCCL alone has no backend for CPU tensors: the one process group serves both."""
    started = {}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # as torchrun sets it
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: started.setdefault("device", index))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, timeout: started.update(backend=backend, timeout=timeout))
    distributed.start(timeout_minutes=30, device="cuda")
    assert started == {"device": 1, "backend": "cpu:gloo,cuda:nccl", "timeout": timedelta(minutes=30)}
    started.clear()
    distributed.start(device="cpu")  # the tests pin the CPU: gloo, and no GPU taken
    assert started["backend"] == "gloo" and "device" not in started
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # two processes, one GPU
    with pytest.raises(RunError, match="more processes on this machine than it has GPUs"):
        distributed.start(device="cuda")


def test_the_numbers_training_adds_up_over_processes_live_on_the_training_device(monkeypatch):
    from img2prompt.config import StudyConfig
    from img2prompt.models import training
    seen = []
    monkeypatch.setattr(distributed, "sum_over_processes", lambda tensor: seen.append(tensor) or tensor)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    device = torch.device("cpu")
    training.train_mapper(x[:30], y[:30], x[30:], y[30:], StudyConfig(hidden_size=8, max_epochs=3, patience=5),
                          progress=False, device=device)
    assert len(seen) == 3 and all(isinstance(t, torch.Tensor) and t.device == device and t.dtype == torch.float32
                                  for t in seen)  # one read per epoch, none per step
