import json
import shutil
import subprocess
from pathlib import Path

import pytest

from img2prompt.config import StudyConfig, git_state, package_versions
from img2prompt.errors import RunError
from img2prompt.storage.files import atomic_path, write_json


def test_config_round_trip_with_provenance(tmp_path):
    config = StudyConfig(data_dir="d", run_dir=str(tmp_path), hidden_size=64, seed=5)
    config.save(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["hidden_size"] == 64
    assert saved["versions"]["torch"] == package_versions()["torch"] is not None
    assert set(saved["git"]) == {"commit", "dirty"}
    assert StudyConfig.load(tmp_path) == config


def test_config_from_a_newer_version_keeps_known_fields(tmp_path):
    write_json(tmp_path / "config.json", {"config": {"seed": 3, "some_future_option": 1}})
    assert StudyConfig.load(tmp_path).seed == 3


def test_missing_config_is_a_run_error(tmp_path):
    with pytest.raises(RunError, match="img2prompt train"):
        StudyConfig.load(tmp_path)


def test_git_state_of_this_checkout():
    if shutil.which("git") is None:
        pytest.skip("git is not installed on this machine")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip(f"this checkout is not a git repository git can read ({head.stderr.strip()})")
    state = git_state()
    assert state["commit"] == head.stdout.strip() and isinstance(state["dirty"], bool)


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
