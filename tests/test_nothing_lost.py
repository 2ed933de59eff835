"""Nothing lost: the project deletes and overwrites only what it wrote (a manifest in each
folder it makes), refuses folders it did not make, locks what it writes, finishes a stage
only when everything of it is on disk, and names a corrupt file instead of crashing.

Every destructive path is tried on a folder the user owns, and the user's files are
compared byte for byte afterwards."""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from img2prompt.cli import main
from img2prompt.config import StudyConfig
from img2prompt.data.synth import SynthParams, generate_dataset
from img2prompt.evaluation import search
from img2prompt.models import mapper, training
from img2prompt.predict import Predictor
from img2prompt.reports.notebooks import run_notebooks
from img2prompt.storage import files

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder) -> dict:
    """Every file under ``folder`` (hidden ones included, lock files aside: they hold the pid
    of their last holder) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.suffix != ".lock"}


def user_dataset(root, n=3) -> Path:
    """A dataset folder the user made by hand (no manifest)."""
    (root / "images").mkdir(parents=True)
    rows = ["imgId,prompt"]
    for i in range(n):
        Image.new("RGB", (24, 24), (80 * i, 30, 200)).save(root / "images" / f"img{i}.png")
        rows.append(f"img{i},a picture number {i}")
    (root / "prompts.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the trained CLI run, to try destructive commands on."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    return run


def hold_lock(folder_or_file, kind=None):
    """Another process that holds the project's lock on ``folder_or_file`` until killed."""
    script = textwrap.dedent(f"""
        import sys, time
        from img2prompt.storage import ownership
        target = {str(folder_or_file)!r}
        context = (ownership.claim(target, {kind!r}).lock() if {kind!r} else
                   ownership.lock(target, "test"))
        with context:
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    return holder


# --- 1. data import never touches the user's files -------------------------------------------

def test_import_force_into_the_sources_own_folder_deletes_nothing(tmp_path, capsys):
    data = user_dataset(tmp_path / "mydata")
    before = snapshot(data)
    assert main(["data", "import", str(data / "images"), "--out", str(data), "--force"]) == 2
    assert "contain one another" in capsys.readouterr().err
    assert snapshot(data) == before


def test_a_rejected_image_is_never_unlinked_from_the_source(tmp_path):
    """PNGs that carry their prompt, imported into the folder above them: the one over the
    pixel limit is rejected, and must stay where the user put it."""
    from PIL import PngImagePlugin

    from .test_imports import png
    data = tmp_path / "mydata"
    png(data / "images" / "a.png", {"prompt": "a red square"})
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "a very large white field")
    Image.new("1", (8001, 8001)).save(data / "images" / "huge.png", pnginfo=info)  # 64,016,001 pixels
    before = snapshot(data)
    main(["data", "import", str(data / "images"), "--out", str(data), "--on-error", "skip"])
    assert snapshot(data) == before


def test_import_into_a_folder_the_user_filled_is_refused(tmp_path, capsys):
    src = user_dataset(tmp_path / "src")
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    shutil.copy(src / "images" / "img0.png", mine / "images" / "img0.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(mine / "images" / "img0.png")  # the user's own img0
    (mine / "rejects.csv").write_text("my notes\n")
    before = snapshot(mine)
    assert main(["data", "import", str(src), "--out", str(mine), "--force"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert snapshot(mine) == before


def test_an_output_inside_the_source_is_refused_both_ways(tmp_path):
    src = user_dataset(tmp_path / "pngs")
    assert main(["data", "import", str(src / "images"), "--out", str(src / "images" / "out")]) == 2
    assert not (src / "images" / "out").exists()
    out = tmp_path / "imported"
    assert main(["data", "import", str(src), "--out", str(out)]) == 0
    before = snapshot(out)
    assert main(["data", "import", str(out / "images"), "--out", str(out), "--force"]) == 2
    assert snapshot(out) == before  # its images were not deleted to make room for themselves


def test_force_removes_only_what_the_earlier_import_wrote(tmp_path):
    src = user_dataset(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["data", "import", str(src), "--out", str(out)]) == 0
    (out / "my-notes.txt").write_text("keep me")
    Image.new("RGB", (8, 8)).save(out / "images" / "added-by-hand.png")
    (src / "images" / "img2.png").unlink()
    (src / "prompts.csv").write_text("imgId,prompt\nimg0,a picture number 0\nimg1,a picture\n")
    assert main(["data", "import", str(src), "--out", str(out), "--force"]) == 0
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert (out / "images" / "added-by-hand.png").is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["added-by-hand.png", "img0.png", "img1.png"]


# --- 2. train, the notebooks and report delete only their own files ------------------------------

def test_train_into_a_users_folder_deletes_nothing_even_when_the_data_is_bad(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    for name in ("config.json", "metrics.json", "splits.csv", "figures/plot.png", "history.csv"):
        (mine / name).write_text(f"the user's {name}")
    before = snapshot(mine)
    assert main(["train", "--data", str(tmp_path / "no-such-data"), "--out", str(mine), "--quiet"]) == 2
    assert main(["train", "--data", str(user_dataset(tmp_path / "d")), "--out", str(mine), "--quiet"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert snapshot(mine) == before


def test_a_failed_train_deletes_nothing_of_a_previous_run(trained_run, run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    assert main(["train", "--data", str(tmp_path / "no-such-data"), "--out", str(run_copy), "--force",
                 "--quiet"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert snapshot(run_copy) == before


def test_the_notebooks_do_not_wipe_a_finished_cli_run(trained_run, run_copy, tmp_path, cache_dir):
    before = snapshot(run_copy)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(ROOT / "notebooks" / "01_data_exploration.ipynb", notebooks)
    given = {"data_dir": str(trained_run["data"]), "run_dir": str(run_copy), "quick": "true"}
    with pytest.raises(Exception, match="already holds a trained model"):
        run_notebooks(notebooks, tmp_path / "reports", given, cwd=ROOT, log=lambda _: None)
    assert snapshot(run_copy) == before
    run_notebooks(notebooks, tmp_path / "reports", {**given, "force": "true"}, cwd=ROOT, log=lambda _: None)
    assert not (run_copy / "best_model.safetensors").exists()  # started anew, as asked
    # a study the notebooks made is theirs to rerun, with no flag
    run_notebooks(notebooks, tmp_path / "reports", given, cwd=ROOT, log=lambda _: None)


def test_report_never_deletes_the_notebooks_or_a_users_files(tmp_path):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    before = snapshot(notebooks)
    with pytest.raises(Exception, match="did not write"):
        run_notebooks(notebooks, notebooks, {}, log=lambda _: None)
    assert snapshot(notebooks) == before
    mine = tmp_path / "my-reports"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    (mine / "01_notes.md").write_text("my notes")
    with pytest.raises(Exception, match="did not write"):
        run_notebooks(notebooks, mine, {}, log=lambda _: None)
    assert snapshot(mine) == {"index.html": hashlib.sha256(b"my page").hexdigest(),
                              "01_notes.md": hashlib.sha256(b"my notes").hexdigest()}


def test_synth_force_never_empties_a_users_folder(tmp_path):
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "synth_000000.png").write_bytes(b"the user's file")
    before = snapshot(mine)
    assert main(["data", "synth", "--out", str(mine), "--n", "4", "--size", "32", "--force"]) == 2
    assert snapshot(mine) == before


# --- 3. embed writes its rejects into the cache, not the working folder ---------------------------

def test_embed_rejects_go_to_the_cache_not_the_current_folder(small_dataset, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    with open(data / "prompts.csv", "a") as handle:
        handle.write("ghost,an image that is not there\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["embed", "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
                 "--on-error", "skip", "--quiet"]) == 0
    assert list(work.iterdir()) == []
    [rejects] = (tmp_path / "cache" / "rejects").glob("*.csv")
    assert "ghost" in rejects.read_text() and str(rejects) in capsys.readouterr().err


def test_an_older_cache_is_adopted_and_a_users_folder_refused(tmp_path):
    from safetensors.numpy import save_file

    from img2prompt.encoders.embeddings import EmbeddingCache
    from img2prompt.errors import Img2PromptError
    older = tmp_path / "older" / "embeddings"  # made before caches had a manifest
    older.mkdir(parents=True)
    entry = older / f"text-{'a' * 32}.safetensors"
    save_file({"embeddings": np.ones((1, 2), np.float32)}, str(entry))
    EmbeddingCache(tmp_path / "older").save("text", {"k": 1}, np.ones((1, 2)))
    assert entry.is_file() and len(list(older.glob("*.safetensors"))) == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(Img2PromptError, match="did not write"):
        EmbeddingCache(mine).save("text", {"k": 1}, np.ones((1, 2)))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# --- 13. a second writer is told who holds the folder ------------------------------------------------

def test_a_second_train_into_a_run_in_use_is_refused(trained_run, run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    holder = hold_lock(run_copy, "run")
    try:
        assert main(["train", "--data", str(trained_run["data"]), "--out", str(run_copy), "--force",
                     "--quiet"]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
        assert main(["evaluate", "--run", str(run_copy), "--quiet"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(run_copy) == before


def test_two_downloads_never_append_to_one_partial_file(tmp_path):
    from img2prompt.data.download import download_file
    from img2prompt.errors import Img2PromptError
    dest = tmp_path / "downloads" / "part-000001.zip"
    dest.parent.mkdir()
    holder = hold_lock(dest.parent / f".{dest.name}.lock")
    try:
        with pytest.raises(Img2PromptError, match=f"in use by process {holder.pid}"):
            download_file("http://127.0.0.1:9/never-fetched", dest, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (dest.parent / "part-000001.zip.partial").exists()


# --- 14. a run is finished only when its last record says so -------------------------------------------

def test_a_kill_between_model_and_bank_leaves_a_run_that_resume_completes(small_dataset, tmp_path,
                                                                          monkeypatch, cache_dir):
    run = tmp_path / "run"
    args = ["train", "--data", str(small_dataset), "--out", str(run), "--cache-dir", str(cache_dir),
            "--max-epochs", "3", "--quiet"]

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "save_tensors", killed)  # the prompt bank, saved after the model
    assert main(args) == 130  # interrupted
    assert (run / "best_model.safetensors").is_file() and not (run / "prompt_bank.safetensors").exists()
    with pytest.raises(Exception, match="did not finish"):
        Predictor(run)
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    image = next((small_dataset / "images").iterdir())
    assert Predictor(run).predict([image])[0]["prompt"]


def test_the_training_state_outlives_a_kill_while_the_model_is_saved(small_dataset, tmp_path,
                                                                     monkeypatch, cache_dir):
    run = tmp_path / "run"
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mapper, "save_mapper", killed)
    assert main(["train", "--data", str(small_dataset), "--out", str(run), "--cache-dir", str(cache_dir),
                 "--max-epochs", "3", "--quiet"]) == 130
    assert (run / "training_state.pt").is_file()  # --resume can still continue from it


def test_a_training_state_is_refused_on_other_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    config = StudyConfig(hidden_size=16, depth=1, max_epochs=4, patience=50, batch_size=8)
    state = tmp_path / "training_state.pt"
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0)
    training.train_mapper(x[:30], y[:30], x[30:], y[30:], config, progress=False, state_path=state)
    assert state.is_file()
    changed = x.copy()
    changed[0] += 1.0
    with pytest.raises(Exception, match="other data or settings"):
        training.train_mapper(changed[:30], y[:30], changed[30:], y[30:], config, progress=False,
                              state_path=state, resume=True)


def test_an_unfinished_extraction_appends_shards_instead_of_rewriting(small_dataset, tmp_path,
                                                                      monkeypatch):
    from img2prompt.data.dataset import load_dataset
    from img2prompt.encoders import embeddings
    from img2prompt.encoders.image import image_encoder
    from img2prompt.storage import checkpoints
    monkeypatch.setattr(embeddings, "RESUME_CHUNK", 8)
    written, real_write = [], checkpoints._write_arrays

    def spy(path, arrays, metadata):
        written.append(len(arrays["embeddings"]))
        return real_write(path, arrays, metadata)

    monkeypatch.setattr(checkpoints, "_write_arrays", spy)
    dataset = load_dataset(small_dataset)  # 24 images: 2 saved chunks, then the whole entry
    embeddings.image_embeddings(dataset, image_encoder("efficientnet-lite0"),
                                embeddings.EmbeddingCache(tmp_path), batch_size=4, progress=False)
    assert written == [8, 8, 24]


# --- 15. a corrupt or foreign file is named, never a traceback -----------------------------------------

@pytest.mark.parametrize("name, content", [
    ("best_model.safetensors", b"garbage"),
    ("best_model.safetensors", "foreign"),
    ("prompt_bank.safetensors", b"\x00" * 64),
    ("prompt_bank.safetensors", "foreign"),
    ("config.json", b"{not json"),
    ("config.json", b'["a list"]'),
])
def test_a_corrupt_or_foreign_run_file_is_named(name, content, trained_run, run_copy, tmp_path, capsys):
    if content == "foreign":  # a valid safetensors file of something else
        from safetensors.numpy import save_file
        save_file({"weight": np.ones((2, 2), np.float32)}, str(run_copy / name))
    else:
        (run_copy / name).write_bytes(content)
    image = next((trained_run["data"] / "images").iterdir())
    assert main(["predict", "--run", str(run_copy), str(image), "--quiet"]) == 2
    assert str(run_copy / name) in capsys.readouterr().err


def test_a_corrupt_decoder_is_named(trained_run, tmp_path, capsys):
    from img2prompt.errors import RunError
    from img2prompt.models.decoder import load_decoder
    path = tmp_path / "decoder.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(RunError, match="decoder.safetensors: not a readable trained decoder"):
        load_decoder(path)
    import torch
    from safetensors.torch import save_file
    save_file({"x": torch.ones(2)}, str(path), metadata={"spec": '{"format": 2, "decoder": "tiny"}'})
    with pytest.raises(RunError, match="decoder.safetensors: does not hold a valid decoder"):
        load_decoder(path)


# --- 16. durable, atomic writes ---------------------------------------------------------------------------

def test_outputs_reach_the_disk_before_their_name(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    files.write_text(tmp_path / "metrics.json", "{}")
    assert events[-2:] == ["fsync", "replace"]


def test_synth_never_leaves_a_half_written_image(tmp_path, monkeypatch):
    real_save, calls = Image.Image.save, []

    def power_cut_on_third(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            Path(fp).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", power_cut_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "d", SynthParams(n=6, size=32, seed=0), workers=1)
    monkeypatch.undo()
    for path in (tmp_path / "d" / "images").glob("*.png"):
        Image.open(path).load()  # every file under its final name is whole
    assert not (tmp_path / "d" / "prompts.csv").exists()
    generate_dataset(tmp_path / "d", SynthParams(n=6, size=32, seed=0), workers=1)  # ours: redone
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 6
