"""Stopped by Ctrl-C (SIGINT) or by a scheduler (SIGTERM) in each long stage, a command
leaves a state that continues to the same result; two processes that need the same cache
entry compute it once.

Each command runs in a process of its own, as a user's would, and is signalled once it is
inside the stage (a shard of the extraction saved, the training state saved, the decoder's
stage begun)."""

import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from img2prompt.cli import main
from img2prompt.storage.ownership import MANIFEST_FILE, lock_holder

ROOT = Path(__file__).resolve().parents[1]
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


def command(args, setup=""):
    """A process running ``img2prompt ARGS`` after ``setup`` (Python run first in it)."""
    code = textwrap.dedent(setup) + f"\nfrom img2prompt.cli import main\nraise SystemExit(main({args!r}))\n"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def signalled(process, ready, sig):
    """Send ``sig`` to ``process`` once ``ready()``; its exit status and stderr."""
    deadline = time.monotonic() + 300
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the command ended before it could be interrupted: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def tensors(path):
    return load_file(str(path))


@pytest.mark.parametrize("sig", SIGNALS)
def test_an_extraction_stopped_by_a_signal_resumes_to_the_same_embeddings(sig, small_dataset, tmp_path):
    cache = tmp_path / "cache"
    args = ["embed", "--data", str(small_dataset), "--cache-dir", str(cache), "--embed-batch-size", "4", "--quiet"]
    slow_chunks = """
        import time
        from img2prompt.encoders import embeddings
        embeddings.RESUME_CHUNK = 8
        real = embeddings.feature_batches
        def slow(*args, **kwargs):
            for batch in real(*args, **kwargs):
                time.sleep(0.3)
                yield batch
        embeddings.feature_batches = slow
    """
    status, err = signalled(command(args, slow_chunks), lambda: any(cache.glob("embeddings/*.part-*")), sig)
    assert status == EXIT[sig] and "Traceback" not in err, err
    assert not any(cache.rglob("*.tmp"))  # nothing half-written left behind
    resumed = command([*args, "--resume"], "from img2prompt.encoders import embeddings\nembeddings.RESUME_CHUNK = 8")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1]
    [entry] = [p for p in cache.glob("embeddings/image-*.safetensors") if ".part-" not in p.name]
    whole = tmp_path / "whole"
    assert main(["embed", "--data", str(small_dataset), "--cache-dir", str(whole), "--embed-batch-size", "4",
                 "--quiet"]) == 0
    np.testing.assert_allclose(tensors(entry)["embeddings"], tensors(whole / "embeddings" / entry.name)["embeddings"],
                               atol=1e-5)


@pytest.fixture(scope="module")
def embedded(small_dataset, tmp_path_factory):
    cache = tmp_path_factory.mktemp("interrupted-cache")
    assert main(["embed", "--data", str(small_dataset), "--cache-dir", str(cache), "--quiet"]) == 0
    return cache


@pytest.fixture(scope="module")
def trained_whole(small_dataset, embedded, tmp_path_factory):
    """The run the interrupted ones must end as: trained (mapper, then decoder) without a stop."""
    run = tmp_path_factory.mktemp("whole") / "run"
    assert main(train_args(small_dataset, run, embedded)) == 0
    assert main(decoder_args(run)) == 0
    return run


def train_args(data, run, cache):
    return ["train", "--data", str(data), "--out", str(run), "--cache-dir", str(cache), "--max-epochs", "60",
            "--patience", "100", "--hidden-size", "64", "--quiet"]


def decoder_args(run):
    return ["train-decoder", "--run", str(run), "--decoder-epochs", "3", "--decoder-width", "64",
            "--decoder-layers", "1", "--quiet"]


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_training_stopped_by_a_signal_resumes_to_the_same_model(sig, small_dataset, embedded, trained_whole, tmp_path):
    run = tmp_path / "run"
    args = train_args(small_dataset, run, embedded)
    slow_epochs = """
        import time
        from img2prompt.models import training
        training.CHECKPOINT_SECONDS = 0
        real = training.mapper_cosines
        training.mapper_cosines = lambda *args, **kwargs: time.sleep(0.05) or real(*args, **kwargs)
    """
    status, err = signalled(command(args, slow_epochs), lambda: (run / "training_state.pt").is_file(), sig)
    assert status == EXIT[sig] and "Traceback" not in err, err
    assert main(["train", "--data", str(small_dataset), "--out", str(run), "--resume", "--quiet"]) == 0
    for name in ("best_model.safetensors", "prompt_bank.safetensors"):
        got, expected = tensors(run / name), tensors(trained_whole / name)
        assert all(np.array_equal(got[key], expected[key]) for key in expected), name


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_decoder_training_stopped_by_a_signal_trains_again_to_the_same_decoder(sig, trained_whole, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_whole, run)
    manifest = run / MANIFEST_FILE
    started = manifest.read_text()

    def in_the_stage():
        return '"unfinished": "decoder"' in manifest.read_text()[len(started):]

    slow_epochs = """
        import time
        from img2prompt.models import training
        real = training.decoder_loss
        training.decoder_loss = lambda *args, **kwargs: time.sleep(0.5) or real(*args, **kwargs)
    """
    status, err = signalled(command(decoder_args(run) + ["--force"], slow_epochs), in_the_stage, sig)
    assert status == EXIT[sig] and "Traceback" not in err, err
    assert main(decoder_args(run)) == 0  # unfinished: no --force needed
    got, expected = tensors(run / "decoder.safetensors"), tensors(trained_whole / "decoder.safetensors")
    assert all(np.array_equal(got[key], expected[key]) for key in expected)


def test_a_second_process_waits_for_the_cache_entry_the_first_computes(small_dataset, tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    args = ["embed", "--data", str(small_dataset), "--cache-dir", str(cache), "--quiet"]
    held_until_go = f"""
        import time
        from pathlib import Path
        from img2prompt.encoders import embeddings
        real = embeddings.feature_batches
        def held(*args, **kwargs):
            while not Path({str(go)!r}).exists():
                time.sleep(0.05)
            yield from real(*args, **kwargs)
        embeddings.feature_batches = held
    """
    first = command(args, held_until_go)
    deadline = time.monotonic() + 120
    while not any(lock_holder(path) == str(first.pid) for path in cache.glob("embeddings/.image-*.lock")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1]
        time.sleep(0.02)
    second = command(args)
    release = threading.Timer(120, go.touch)  # should the second never wait: no test hangs
    release.start()
    told = ""
    for line in second.stderr:  # until it says it waits for the first
        told += line
        if "waiting for it to finish" in line:
            break
    go.touch()
    release.cancel()
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    assert f"is in use by process {first.pid}: waiting for it to finish" in told
    assert len(list(cache.glob("embeddings/image-*.safetensors"))) == 1  # computed once, then read
