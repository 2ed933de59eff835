"""Data-parallel training under torchrun: two processes on this machine's CPUs (gloo) train
the mapper as one process does, and a failing main process stops its followers."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from img2prompt.cli import main
from img2prompt.models.mapper import load_mapper


def torchrun(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "img2prompt", "--", *args],  # "--": torchrun would read "--run" as its "--run-path"
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_and_two_processes(trained_run, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # the default dropout: every process draws the whole batch's masks alike and keeps its rows
    options = ["--data", str(trained_run["data"]), "--cache-dir", str(cache_dir),
               "--max-epochs", "12", "--batch-size", "32", "--quiet"]
    assert main(["train", "--out", str(root / "one"), *options]) == 0
    result = torchrun("train", "--out", str(root / "two"), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("one", "two"):
        assert main(["evaluate", "--run", str(root / run), "--quiet"]) == 0
    return root / "one", root / "two", result


def test_two_processes_train_the_mapper_one_process_trains(one_and_two_processes):
    one, two, _ = one_and_two_processes
    histories = [pd.read_csv(run / "history.csv") for run in (one, two)]
    assert len(histories[0]) == len(histories[1]) == 12
    np.testing.assert_allclose(histories[0]["val_cosine"], histories[1]["val_cosine"], atol=1e-5)
    np.testing.assert_allclose(histories[0]["train_loss"], histories[1]["train_loss"], atol=1e-5)
    weights = [load_mapper(run / "best_model.safetensors").state_dict() for run in (one, two)]
    for name, tensor in weights[0].items():
        np.testing.assert_allclose(tensor.numpy(), weights[1][name].numpy(), atol=1e-4, err_msg=name)
    metrics = [json.loads((run / "metrics.json").read_text())["methods"] for run in (one, two)]
    for method in ("mapper", "retrieval"):
        assert abs(metrics[0][method]["mean_cosine"] - metrics[1][method]["mean_cosine"]) < 2e-3


def test_only_the_main_process_writes_and_reports(one_and_two_processes):
    _, two, result = one_and_two_processes
    assert result.stdout.count("trained ") == 1  # one summary line, from the main process
    assert not list(two.glob("*.tmp*")) and (two / "best_model.safetensors").is_file()


def test_a_failing_main_process_stops_its_followers(tmp_path):
    result = torchrun("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quiet",
                      timeout=120)
    assert result.returncode != 0
    assert "dataset folder not found" in result.stderr
    assert "the main process (rank 0) stopped" in result.stderr


def test_two_processes_train_the_decoder_one_process_trains(one_and_two_processes):
    from img2prompt.models.decoder import load_decoder
    one, two, _ = one_and_two_processes
    # the default dropout: the masks drawn for the whole batch alike in every process (as the mapper's)
    options = ["--decoder-epochs", "3", "--decoder-width", "64", "--decoder-layers", "1",
               "--decoder-batch-size", "16", "--quiet"]
    assert main(["train-decoder", "--run", str(one), *options]) == 0
    result = torchrun("train-decoder", "--run", str(two), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained the tiny decoder") == 1
    histories = [pd.read_csv(run / "decoder_history.csv") for run in (one, two)]
    for column in ("train_loss", "val_loss", "val_cosine"):
        np.testing.assert_allclose(histories[0][column], histories[1][column], atol=1e-4, err_msg=column)
    weights = [load_decoder(run / "decoder.safetensors").model.state_dict() for run in (one, two)]
    for name, tensor in weights[0].items():
        np.testing.assert_allclose(tensor.numpy(), weights[1][name].numpy(), atol=1e-4, err_msg=name)


def test_two_processes_fine_tune_the_encoder_as_one_process(trained_run, cache_dir, tmp_path):
    from img2prompt.storage.checkpoints import load_tensors
    options = ["--data", str(trained_run["data"]), "--cache-dir", str(cache_dir), "--max-epochs", "6",
               "--batch-size", "32", "--tune", "encoder", "--tune-blocks", "2", "--tune-epochs", "3",
               "--tune-batch-size", "16", "--tune-patience", "3", "--quiet"]
    assert main(["train", "--out", str(tmp_path / "one"), *options]) == 0
    result = torchrun("train", "--out", str(tmp_path / "two"), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    histories = [pd.read_csv(tmp_path / run / "tune_history.csv") for run in ("one", "two")]
    assert len(histories[0]) == len(histories[1]) == 4  # epoch 0 (the frozen start) and three more
    for column in ("train_loss", "val_cosine"):
        np.testing.assert_allclose(histories[0][column], histories[1][column], atol=1e-5, err_msg=column)
    tuned = [load_tensors(tmp_path / run / "encoder.safetensors", "tuned", "")[0] for run in ("one", "two")]
    assert tuned[0].keys() == tuned[1].keys()
    for name, tensor in tuned[0].items():
        np.testing.assert_allclose(tensor.numpy(), tuned[1][name].numpy(), atol=1e-4, err_msg=name)
