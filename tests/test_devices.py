"""--device auto|cpu|cuda|mps: the CPU path unchanged, clear errors for a missing device,
bf16 features kept apart in the cache, and the same results on a GPU where one exists."""

import numpy as np
import pytest
import torch

from img2prompt.cli import main
from img2prompt.config import StudyConfig
from img2prompt.data.dataset import load_dataset
from img2prompt.devices import autocast, precision, resolve_device
from img2prompt.encoders.embeddings import extract_image_embeddings
from img2prompt.encoders.image import image_encoder
from img2prompt.errors import RunError
from img2prompt.models import training
from img2prompt.run import Run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_auto_picks_an_available_device_and_cpu_is_always_there(monkeypatch):
    assert resolve_device("auto").type == "cpu"  # the tests pin it (conftest)
    monkeypatch.delenv("IMG2PROMPT_AUTO_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert precision(torch.device("cpu")) == "fp32" and precision(torch.device("cuda")) == "bf16"
    with autocast(torch.device("cpu")):  # nothing changes on the CPU
        assert torch.ones(2).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_missing_gpu_is_one_clear_message(small_dataset, tmp_path, capsys):
    with pytest.raises(RunError, match="--device cuda: torch sees no CUDA GPU"):
        resolve_device("cuda")
    assert main(["train", "--data", str(small_dataset), "--out", str(tmp_path / "run"), "--device", "cuda",
                 "--quiet"]) == 2
    assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(RunError, match="device \\(--device\\) must be one of"):
        StudyConfig(device="tpu").validate()


def test_bf16_features_never_share_a_cache_entry_with_float32_ones():
    encoder = image_encoder("efficientnet-lite0")
    cpu_key = encoder.fingerprint()
    assert "precision" not in cpu_key  # float32 keys are the keys of before: caches stay valid
    encoder.device = torch.device("cuda")  # the key only; nothing runs
    assert encoder.fingerprint()["precision"] == "bf16" and encoder.fingerprint() != cpu_key


def test_a_run_trained_anywhere_opens_on_this_machine(trained_run, tmp_path):
    import json
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run["run"], run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    saved["config"]["device"] = "cuda"  # as if trained on a GPU
    (run_dir / "config.json").write_text(json.dumps(saved))
    run = Run.open(run_dir)
    assert run.config.device == "auto" and run.device == resolve_device("auto")
    assert Run.open(run_dir, "cpu").device == torch.device("cpu")


@needs_cuda
def test_cuda_gives_the_cpu_results_within_bf16_precision(small_dataset):
    dataset = load_dataset(small_dataset)
    paths = dataset.paths[:16]
    cpu = extract_image_embeddings(paths, image_encoder("efficientnet-lite0", device="cpu"), progress=False)
    gpu = extract_image_embeddings(paths, image_encoder("efficientnet-lite0", device="cuda"), progress=False)
    cosine = np.sum(cpu * gpu, axis=1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cosine.min() > 0.99
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 16)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(16, 8)).astype(np.float32))
    config = StudyConfig(hidden_size=32, depth=1, max_epochs=10, patience=50, batch_size=16)
    _, on_cpu = training.train_mapper(x[:60], y[:60], x[60:], y[60:], config, progress=False)
    model, on_gpu = training.train_mapper(x[:60], y[:60], x[60:], y[60:], config, progress=False,
                                          device=torch.device("cuda"))
    assert next(model.parameters()).device.type == "cpu"  # models come back to the CPU
    assert abs(on_cpu["val_cosine"].max() - on_gpu["val_cosine"].max()) < 0.02


def test_extraction_works_where_the_platform_has_no_cpu_affinity(small_dataset, tmp_path, monkeypatch):
    """macOS and Windows have no os.sched_getaffinity: the worker count comes from cpu_count."""
    import os

    from img2prompt.cli import main
    from img2prompt.encoders.embeddings import decode_workers
    monkeypatch.delattr(os, "sched_getaffinity")
    assert decode_workers(-1) == min(4, max(0, os.cpu_count() - 2))
    assert main(["embed", "--data", str(small_dataset), "--cache-dir", str(tmp_path / "cache"), "--embed-batch-size", "4",
                 "--quiet"]) == 0


def test_the_package_imports_where_fcntl_does_not_exist():
    """Windows has no fcntl: the locks take msvcrt's there, and importing must not fail."""
    import subprocess
    import sys
    code = 'import sys; sys.modules["fcntl"] = None; import img2prompt, img2prompt.run, img2prompt.cli'
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
