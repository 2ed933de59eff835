"""Nothing lost through links: a link inside a folder the project made is never written,
truncated or deleted through, while a folder reached through a linked parent still works.

Each destructive path is tried on a folder the user owns, compared byte for byte after."""

import os
import shutil

import pytest

from img2prompt.cli import main
from img2prompt.errors import Img2PromptError
from img2prompt.storage import ownership
from img2prompt.storage.files import write_text

from .test_nothing_lost import snapshot


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    return run


def users_folder(root):
    root.mkdir(parents=True)
    (root / "loss_curve.png").write_bytes(b"the user's own picture")
    (root / "notes.txt").write_text("the user's notes")
    return root


def test_train_force_never_deletes_through_a_linked_figures_folder(trained_run, run_copy, tmp_path, capsys):
    mine = users_folder(tmp_path / "my-figures")
    before = snapshot(mine)
    shutil.rmtree(run_copy / "figures")
    os.symlink(mine, run_copy / "figures")
    assert main(["train", "--data", str(trained_run["data"]), "--out", str(run_copy), "--force",
                 "--max-epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run_copy / 'figures'}: is a link" in err and "Traceback" not in err
    assert snapshot(mine) == before
    assert (run_copy / "best_model.safetensors").is_file()  # nothing of the run was deleted either


def test_a_recorded_file_replaced_by_a_link_is_neither_deleted_nor_written_through(run_copy, tmp_path):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    (run_copy / "metrics.json").unlink()
    os.symlink(mine / "notes.txt", run_copy / "metrics.json")
    folder = ownership.find_owned(run_copy)
    with pytest.raises(Img2PromptError, match="metrics.json: is a link"):
        folder.clear()
    with pytest.raises(Img2PromptError, match="is a link"):
        folder.remove(run_copy / "metrics.json")
    with pytest.raises(Img2PromptError, match="is a link"):
        write_text(run_copy / "metrics.json", "{}")
    assert snapshot(mine) == before


def test_a_linked_lock_file_or_manifest_is_never_truncated_or_appended_to(run_copy, tmp_path):
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    lock_file = run_copy / ownership.LOCK_FILE
    lock_file.unlink(missing_ok=True)
    os.symlink(mine / "notes.txt", lock_file)
    with pytest.raises(Img2PromptError, match="lock file is a link"):
        with ownership.find_owned(run_copy).lock():
            pass
    lock_file.unlink()
    manifest = run_copy / ownership.MANIFEST_FILE
    manifest.unlink()
    os.symlink(mine / "notes.txt", manifest)
    with pytest.raises(Img2PromptError, match="is a link, not the manifest"):
        ownership.find_owned(run_copy)
    assert snapshot(mine) == before


def test_a_run_reached_through_a_linked_parent_still_clears_its_own_files(trained_run, tmp_path):
    real = tmp_path / "disk" / "runs"
    real.mkdir(parents=True)
    os.symlink(real, tmp_path / "runs")  # runs/ on another disk, as users link big folders
    run = tmp_path / "runs" / "mine"
    args = ["train", "--data", str(trained_run["data"]), "--out", str(run), "--max-epochs", "2", "--quiet"]
    assert main(args) == 0
    (run / "my-notes.txt").write_text("keep me")
    assert main([*args, "--force"]) == 0
    assert (real / "mine" / "my-notes.txt").read_text() == "keep me"
    assert (real / "mine" / "figures" / "loss_curve.png").is_file()
