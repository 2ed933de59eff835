"""The prepared GPU check (benchmarks/gpu_check.sh) runs its every step on the CPU in its
dry-run mode, so that it works the day a GPU machine is lent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # several processes: `./run_tests.sh -m slow`


def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path):
    result = subprocess.run(["benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "IMG2PROMPT_PYTHON": sys.executable})
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert result.returncode == 0, "\n".join(summary) + result.stderr[-2000:]
    steps = [line.split()[1] for line in summary]
    assert steps == ["environment", "device-tests", "study", "bench-training", "process-group", "ray"]
    assert all(line.startswith("PASS") for line in summary[:-1]) and summary[-1].startswith(("PASS", "SKIP"))
    assert "mapper" in (tmp_path / "study.log").read_text() and "images/s" in (tmp_path / "bench-training.log").read_text()
