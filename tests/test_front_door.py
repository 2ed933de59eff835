"""A newcomer's first steps: a message naming ./run_all.sh before any run exists, one
command for a file or a folder of images (the run's best method, a CSV, caption files),
a dataset too small to study stopped with the minimum, the familiarity of the test
images, and the documentation that leads from the README."""

import csv
import re
import shutil
from pathlib import Path

from img2prompt.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_before_any_run_predict_names_the_command_that_makes_one(small_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/default yet
    image = next((small_dataset / "images").iterdir())
    assert main(["predict", str(image), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "runs/default: no run here yet" in err and "./run_all.sh (about 12 minutes" in err


def test_predict_reads_a_folder_and_writes_a_table_and_captions(trained_run, tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "more").mkdir(parents=True)
    images = sorted((trained_run["data"] / "images").iterdir())[:4]
    for image in images[:3]:
        shutil.copy(image, folder)
    shutil.copy(images[3], folder / "more")
    (folder / images[0].with_suffix(".txt").name).write_text("my own caption")
    table = tmp_path / "predictions.csv"
    args = ["predict", str(folder), "--run", str(trained_run["run"]), "--out", str(table), "--captions", "--quiet"]
    assert main(args) == 0
    assert "kept 1 existing one(s)" in capsys.readouterr().err
    rows = list(csv.DictReader(table.open()))
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images[:3]]  # the subfolder needs --recursive
    assert set(rows[0]) == {"image", "prompt", "method", "familiarity", "unfamiliar", "top_k"}
    assert rows[0]["method"] == "retrieval" and rows[0]["top_k"].count(" | ") == 4
    assert (folder / images[0].with_suffix(".txt").name).read_text() == "my own caption"  # never overwritten
    assert (folder / images[1].with_suffix(".txt").name).read_text().strip() == rows[1]["prompt"]
    assert main([*args, "--recursive", "--overwrite-captions"]) == 0
    assert len(list(csv.DictReader(table.open()))) == 4
    assert (folder / images[0].with_suffix(".txt").name).read_text().strip() != "my own caption"


def test_a_dataset_too_small_to_study_stops_with_the_minimum(tmp_path, capsys):
    from PIL import Image
    data = tmp_path / "seven"
    (data / "images").mkdir(parents=True)
    for i in range(7):
        Image.new("RGB", (32, 32), (30 * i, 80, 120)).save(data / "images" / f"p{i}.png")
    (data / "prompts.csv").write_text("imgId,prompt\n" + "".join(f"p{i},photo number {i}\n" for i in range(7)))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "too few images to study: 7 give 5 train, 1 val, 1 test" in err and "at least 10 train" in err
    assert not (tmp_path / "run").exists()  # nothing written
    # the notebooks, as ./run_all.sh runs them: the same message from notebook 01, no traceback
    assert main(["report", "-p", "data_dir", str(data), "-p", "run_dir", str(tmp_path / "k7"),
                 "--reports", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err
    assert "01_data_exploration.ipynb failed" in err and "too few images to study" in err
    assert "Traceback" not in err


def test_the_test_images_are_familiar(trained_run):
    """The threshold is set on the validation images; the test images did not set it."""
    import json
    familiarity = json.loads((trained_run["run"] / "metrics.json").read_text())["familiarity"]
    assert familiarity["flag_below"] == 1 and familiarity["test_flagged"] <= 0.05


# --- the documentation ------------------------------------------------------------------------------

DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_is_the_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220
    first = "\n".join(lines[:60])
    assert "./run_all.sh" in first and "./run_tests.sh" in first


def test_every_relative_link_resolves_and_nothing_speaks_of_history():
    assert len(DOCS) >= 5 and (ROOT / "docs" / "parameters.md") in DOCS
    for page in [ROOT / "README.md", *DOCS]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
        assert not re.search(r"\bissue \d+", text, re.I), page.name
        hashes = [word for word in re.findall(r"(?<![-\w./])[0-9a-f]{7,40}(?![\w./-])", text)
                  if re.search(r"[a-f]", word) and re.search(r"\d", word)]  # a commit's, not a number
        assert not hashes, (page.name, hashes)


def test_the_parameter_reference_is_generated_from_the_code():
    from img2prompt.reports.reference import parameter_reference
    assert (ROOT / "docs" / "parameters.md").read_text().strip() == parameter_reference().strip(), (
        "docs/parameters.md is stale: .venv/bin/python -m img2prompt.reports.reference > docs/parameters.md")
