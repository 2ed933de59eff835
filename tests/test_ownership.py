"""The manifest of what the project wrote in a folder, and its locks."""

import pytest

from img2prompt.storage.files import write_text
from img2prompt.storage.ownership import FolderError, claim, find_owned, lock


def test_clear_removes_only_what_was_recorded(tmp_path):
    folder = claim(tmp_path / "run", "run")
    write_text(tmp_path / "run" / "metrics.json", "{}")
    write_text(tmp_path / "run" / "figures" / "loss.png", "png")
    (tmp_path / "run" / "figures" / "mine.png").write_text("the user's")
    (tmp_path / "run" / "notes.txt").write_text("the user's")
    assert folder.owns(tmp_path / "run" / "figures" / "loss.png")  # recorded through the grandparent
    folder.clear()
    left = sorted(p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*"))
    assert left == [".img2prompt-manifest.jsonl", "figures", "figures/mine.png", "notes.txt"]
    assert not find_owned(tmp_path / "run").files


def test_a_users_file_is_never_overwritten_in_an_owned_folder(tmp_path):
    claim(tmp_path / "run", "run")
    (tmp_path / "run" / "metrics.json").write_text("the user's")
    with pytest.raises(FolderError, match="not written by img2prompt"):
        write_text(tmp_path / "run" / "metrics.json", "{}")
    assert (tmp_path / "run" / "metrics.json").read_text() == "the user's"


def test_folders_not_made_by_the_project_or_of_another_kind_are_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(FolderError, match="did not write"):
        claim(tmp_path / "mine", "run")
    claim(tmp_path / "data", "dataset")
    with pytest.raises(FolderError, match="dataset folder, not a run folder"):
        claim(tmp_path / "data", "run")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FolderError, match="is a file"):
        claim(tmp_path / "a-file", "run")


def test_finished_stages_and_a_line_cut_by_a_crash(tmp_path):
    folder = claim(tmp_path / "run", "run")
    folder.mark_finished("train")
    with open(folder.manifest, "a") as handle:
        handle.write('{"wrote": "half')  # the process died mid-line
    reopened = find_owned(tmp_path / "run")
    assert reopened.is_finished("train") and not reopened.files
    reopened.record(tmp_path / "run" / "b.txt")
    assert find_owned(tmp_path / "run").files == {"b.txt"}  # the next record is not glued to it
    reopened.mark_unfinished("train")
    assert not find_owned(tmp_path / "run").is_finished("train")


def test_a_lock_is_reentrant_in_one_process(tmp_path):
    with lock(tmp_path / "x.lock", "x"):
        with lock(tmp_path / "x.lock", "x"):
            pass
    with lock(tmp_path / "x.lock", "x"):  # released: taken again
        pass
