"""What the project reads back is what it wrote, and every failure is one message.

Models record what they were made from and refuse an encoder that is not theirs; cache
entries and checkpoints carry checksums; settings are checked before anything is written;
a diverging training stops with the setting to change; a full disk, a damaged JSON or CSV
record and the other misadventures of a hostile trial are messages that name the file and
the command that makes it anew, never a traceback."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from img2prompt.cli import main
from img2prompt.errors import Img2PromptError, RunError
from img2prompt.run import Run
from img2prompt.storage import ownership
from img2prompt.storage.checkpoints import load_tensors, save_tensors

from .test_nothing_lost import hold_lock, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    return run


def an_image(trained_run):
    return str(next((trained_run["data"] / "images").iterdir()))


def edit_config(run, **settings):
    saved = json.loads((run / "config.json").read_text())
    saved["config"].update(settings)
    (run / "config.json").write_text(json.dumps(saved))


# --- models know what they were made from -------------------------------------------------------

def test_predict_refuses_a_model_with_another_image_encoder(trained_run, run_copy, capsys):
    """EfficientNet-Lite0 and Lite2 share their width (1280): only the provenance tells them apart."""
    edit_config(run_copy, image_encoder="efficientnet-lite2")
    assert main(["predict", "--run", str(run_copy), an_image(trained_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "best_model.safetensors: was not made for this run's settings" in err
    assert "made with efficientnet-lite0" in err and "this run has efficientnet-lite2" in err
    assert "Traceback" not in err


def test_a_model_copied_from_a_run_of_another_text_encoder_is_refused(trained_run, run_copy, tiny_bert):
    edit_config(run_copy, text_encoder="bert", text_model=str(tiny_bert))
    with pytest.raises(RunError, match="text encoder: made with minilm .* but this run has bert"):
        Run.open(run_copy).mapper()
    with pytest.raises(RunError, match="prompt_bank.safetensors: was not made"):
        Run.open(run_copy).prompt_bank()


def test_a_model_saved_before_provenance_is_used_with_a_notice(trained_run, run_copy, capsys):
    path = run_copy / "best_model.safetensors"
    tensors, metadata = load_tensors(path, "mapper", "")
    save_tensors(path, tensors, {"hparams": metadata["hparams"]})  # as older versions saved it
    assert main(["predict", "--run", str(run_copy), an_image(trained_run), "--quiet"]) == 0
    assert "saved by an older img2prompt without a record" in capsys.readouterr().err


def test_the_same_weights_elsewhere_or_touched_give_the_same_cache_key(tmp_path):
    from img2prompt.encoders import image
    from img2prompt.encoders.text import text_encoder
    encoder = image.image_encoder("efficientnet-lite0")
    before = encoder.fingerprint()
    copy = tmp_path / "weights.pth"
    shutil.copy(encoder._weights_file(), copy)
    os.utime(copy, (1, 1))
    assert image._file_identity(copy) == before["weights"]
    minilm = text_encoder("minilm")
    moved = tmp_path / "minilm"
    shutil.copytree(minilm.path, moved)
    assert text_encoder("other", str(moved), "mean").fingerprint()["weights"] == minilm.fingerprint()["weights"]


# --- checksums ------------------------------------------------------------------------------------

def test_a_damaged_cache_entry_is_named_and_extracted_again(small_dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["embed", "--data", str(small_dataset), "--cache-dir", str(cache), "--quiet"]
    assert main(args) == 0
    entry = max((cache / "embeddings").glob("image-*.safetensors"), key=lambda p: p.stat().st_size)
    size = entry.stat().st_size
    with open(entry, "r+b") as handle:  # 0xFF bytes over the data: NaN features
        handle.seek(size // 2)
        handle.write(b"\xff" * min(1 << 20, size - size // 2))
    capsys.readouterr()
    assert main(args) == 0
    assert f"{entry}: cache entry not usable" in capsys.readouterr().err
    assert main(args) == 0 and "not usable" not in capsys.readouterr().err  # rebuilt


def test_a_damaged_model_or_training_state_is_named_with_the_command_that_remakes_it(run_copy, tmp_path):
    from img2prompt.models import training
    model = run_copy / "best_model.safetensors"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # one byte of the weights
    model.write_bytes(bytes(data))
    with pytest.raises(RunError, match="best_model.safetensors: damaged.*img2prompt train --force"):
        Run.open(run_copy).mapper()
    state = tmp_path / "training_state.pt"
    training.save_training_state(state, {"epoch": 3, "weights": torch.ones(4)})
    assert training.load_training_state(state)["epoch"] == 3
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(RunError, match="damaged training state.*without --resume"):
        training.load_training_state(state)


@pytest.mark.parametrize("name, content, command", [
    ("metrics.json", "{not json", "img2prompt evaluate"),
    ("metrics.json", '{"methods": 3}', "img2prompt evaluate"),
    ("history.csv", 'epoch,val_cosine\n1,"unclosed\n', "img2prompt train"),
    ("test_results.csv", "", "img2prompt evaluate"),
])
def test_a_damaged_record_is_named_with_the_command_that_remakes_it(name, content, command, run_copy):
    (run_copy / name).write_text(content)
    run = Run.open(run_copy)
    read = {"metrics.json": run.metrics, "history.csv": run.history, "test_results.csv": run.results}[name]
    with pytest.raises(RunError, match=f"{name}: .*{command}"):
        read()


def test_non_finite_embeddings_are_refused(small_dataset, tmp_path, monkeypatch):
    from img2prompt.data.dataset import load_dataset
    from img2prompt.encoders.embeddings import image_embeddings
    from img2prompt.encoders.image import ImageEncoder, image_encoder
    from img2prompt.errors import DataError
    real = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(DataError, match="not finite numbers"):
        image_embeddings(load_dataset(small_dataset), image_encoder("efficientnet-lite0"), progress=False)


# --- training that diverges, settings out of range --------------------------------------------------

def test_a_diverging_training_stops_with_the_setting_to_change(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(trained_run["data"]), "--out", str(run), "--learning-rate", "1e6",
                 "--max-epochs", "30", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the mapper's training diverged in epoch" in err and "Lower --learning-rate (now 1e+06)" in err
    assert "Traceback" not in err
    assert main(["predict", "--run", str(run), an_image(trained_run), "--quiet"]) == 2
    assert "its train stage failed: the mapper's training diverged" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--learning-rate", "nan", "learning_rate (--learning-rate) must be a finite number above 0 (got nan)"),
    ("--learning-rate", "inf", "must be a finite number above 0 (got inf)"),
    ("--learning-rate", "-1", "must be a finite number above 0 (got -1.0)"),
    ("--dropout", "nan", "dropout (--dropout) must be a finite number at least 0 and below 1 (got nan)"),
    ("--weight-decay", "nan", "weight_decay (--weight-decay) must be a finite number at least 0"),
    ("--seed", "-1", "seed (--seed) must be an integer at least 0"),
    ("--val-fraction", "0.9", "val_fraction + test_fraction must be below 1"),
])
def test_settings_are_checked_before_anything_is_written(option, value, message, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(trained_run["data"]), "--out", str(run), option, value, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_a_bad_value_in_config_json_names_the_file(trained_run, run_copy, capsys):
    edit_config(run_copy, dropout=float("nan"))
    assert main(["predict", "--run", str(run_copy), an_image(trained_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run_copy / 'config.json'}: dropout (--dropout) must be" in err and "Correct the value" in err


# --- one boundary for errors ----------------------------------------------------------------------------

def test_a_full_disk_while_saving_a_model_is_a_message_and_replaces_nothing(run_copy, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from img2prompt.models.mapper import Mapper, save_mapper

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    before = snapshot(run_copy)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(Img2PromptError, match="best_model.safetensors: could not be written: the disk is full "
                                              r"\(it needed about .* MB.*Nothing was replaced"):
        save_mapper(Mapper(8, 4), run_copy / "best_model.safetensors")
    assert snapshot(run_copy) == before


def small_filesystem(folder, size, command):
    """``command`` (a list) run with a tmpfs of ``size`` mounted on ``folder``, in a user and
    mount namespace of its own (no root needed); skipped where the system allows none."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {folder}"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no small filesystem can be made here (unshare/mount: {probe.stderr.strip()[:120]})")
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           str(folder), *command], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("where", ["cache", "run"])
def test_a_full_disk_under_the_cache_or_the_run_is_a_message(where, small_dataset, tmp_path, cache_dir):
    full = tmp_path / "full"
    cache, run = (full, tmp_path / "run") if where == "cache" else (tmp_path / "cache", full / "run")
    if where == "run":  # embeddings cached on a roomy disk first: only the run's files meet the full one
        assert main(["embed", "--data", str(small_dataset), "--cache-dir", str(cache), "--quiet"]) == 0
    done = small_filesystem(full, "400k", [sys.executable, "-m", "img2prompt", "train", "--data", str(small_dataset),
                                           "--out", str(run), "--cache-dir", str(cache), "--max-epochs", "2",
                                           "--quiet"])
    assert done.returncode == 2, done.stderr
    assert "could not be written: the disk is full" in done.stderr and "Traceback" not in done.stderr


# --- messages that send the user the right way -------------------------------------------------------------

def test_a_damaged_manifest_is_not_called_missing(trained_run, run_copy, capsys):
    (run_copy / ownership.MANIFEST_FILE).write_bytes(b"\x00garbage\n" * 20)
    assert main(["predict", "--run", str(run_copy), an_image(trained_run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds no readable record" in err and "has no" not in err


def test_predict_on_an_unreadable_image_says_nothing_of_prompts_csv(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", "--run", str(trained_run["run"]), str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a readable image" in err and "prompts.csv" not in err


def test_predict_while_another_process_retrains_says_to_wait(trained_run, run_copy, capsys):
    Run.open(run_copy).folder.mark_unfinished("train")  # as a retraining does first
    holder = hold_lock(run_copy, "run")
    try:
        assert main(["predict", "--run", str(run_copy), an_image(trained_run), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"being run by process {holder.pid}" in err and "--resume" not in err
    finally:
        holder.kill()
        holder.wait()


def test_a_run_folder_that_cannot_be_used_is_refused_before_data_is_made(tmp_path):
    """As ``./run_all.sh -p run_dir /`` does: the default data is generated only for a run folder
    the study may use."""
    from img2prompt.config import StudyConfig
    started = time.perf_counter()
    with pytest.raises(Img2PromptError, match="/: this folder holds files that img2prompt did not write"):
        Run.create(StudyConfig(run_dir="/", synth_root=str(tmp_path / "data"), n_images=3000), origin="notebooks")
    assert time.perf_counter() - started < 5 and not (tmp_path / "data").exists()


def test_papermill_called_directly_refuses_an_unknown_parameter(tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError
    with pytest.raises(PapermillExecutionError) as raised:
        papermill.execute_notebook(os.path.join(ROOT, "notebooks", "04_evaluation.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"run_dri": "runs/elsewhere"}, cwd=ROOT, progress_bar=False,
                                   kernel_name="python3", log_output=False)
    assert raised.value.ename == "RunError" and "unknown parameter(s) run_dri" in raised.value.evalue
    executed = json.loads((tmp_path / "out.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert len(errors) == 1 and "Traceback" not in "".join(errors[0]["traceback"])  # the message alone
