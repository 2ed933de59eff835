"""The notebooks: committed clean, run by papermill with quick parameters, checked by nbval,
and judged by what they write into the run folder and reports/."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from img2prompt.cli import main
from img2prompt.errors import RunError
from img2prompt.reports.notebooks import find_notebooks, run_notebooks

from .conftest import shared_set

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = find_notebooks(ROOT / "notebooks")
N_IMAGES = 150


def quick_parameters(root, cache_dir, **extra):
    return {"n_images": str(N_IMAGES), "image_size": "96", "synth_root": str(root / "data"),
            "run_dir": str(root / "run"), "cache_dir": str(cache_dir), "quick": "true", **extra}


@pytest.fixture(scope="module")
def executed(tmp_path_factory, cache_dir):
    """All notebooks run once, by ./run_all.sh as a user runs it, with quick parameters and
    the reports in a temp folder (the study's are in its subfolder ``run``)."""
    root = tmp_path_factory.mktemp("notebooks")
    parameters = quick_parameters(root, cache_dir)
    options = [item for name, value in parameters.items() for item in ("-p", name, value)]
    result = subprocess.run(["./run_all.sh", *options, "--reports", str(root / "reports")], cwd=ROOT,
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "IMG2PROMPT_PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    return {"result": result, "parameters": parameters, "root": root, "run": root / "run",
            "reports": root / "reports" / "run", "base": root / "reports"}


@pytest.fixture(scope="module")
def real_study(executed, cache_dir, tmp_path_factory):
    """The COCO sample (photos, no attributes.csv) through the notebooks up to the analysis of
    errors: a second study, its reports beside the first's."""
    data = shared_set("coco-ccby-sample")
    notebooks = tmp_path_factory.mktemp("real-notebooks")
    for notebook in NOTEBOOKS[:5]:
        shutil.copy(notebook, notebooks)
    parameters = {"data_dir": str(data), "run_dir": str(executed["root"] / "real"), "cache_dir": str(cache_dir),
                  "quick": "true"}
    run_notebooks(notebooks, executed["base"], parameters, cwd=ROOT, log=lambda _: None)
    return {"run": executed["root"] / "real", "reports": executed["base"] / "real"}


def read_json(path):
    return json.loads(Path(path).read_text())


def test_notebooks_are_numbered_and_committed_without_outputs():
    assert [nb.name[:3] for nb in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_", "07_"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        assert notebook.metadata.kernelspec.name == "python3", path.name
        assert notebook.cells[0].cell_type == "markdown", f"{path.name} opens with what it answers"
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell"
        assert all(not cell.outputs and cell.execution_count is None for cell in code), path.name


def test_unknown_or_mistyped_parameters_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(RunError, match=r"unknown parameter\(s\) hiden_size.*hidden_size"):
        run_notebooks(ROOT / "notebooks", tmp_path, {"hiden_size": "512"})
    with pytest.raises(RunError, match=r"n_images: 'many' is not a int .*01_data_exploration"):
        run_notebooks(ROOT / "notebooks", tmp_path, {"n_images": "many"})
    assert not list(tmp_path.iterdir())


def test_01_starts_the_run_with_config_split_and_summary(executed):
    summary = read_json(executed["run"] / "data_summary.json")
    assert summary["images"] == N_IMAGES and summary["generated"] is True
    assert sum(summary["split"].values()) == N_IMAGES and min(summary["split"].values()) > 0
    assert 0 < summary["distinct_prompts"] <= N_IMAGES
    assert summary["image_sizes"] == {"96×96": summary["headers_read"]}  # the headers sampled
    splits = pd.read_csv(executed["run"] / "splits.csv")
    assert splits["split"].value_counts().to_dict() == summary["split"]
    config = read_json(executed["run"] / "config.json")
    assert config["config"]["data_dir"] == summary["data_dir"]
    assert Path(summary["data_dir"], "attributes.csv").is_file()


def test_02_records_encoders_throughput_and_a_linear_probe(executed):
    summary = read_json(executed["run"] / "embedding_summary.json")
    assert (summary["images"], summary["image_dim"], summary["text_dim"]) == (N_IMAGES, 1280, 384)
    assert summary["throughput_images_per_s"] > 1
    assert 0.3 < summary["linear_probe_test_cosine"] < 1
    assert read_json(executed["run"] / "config.json")["config"]["cache_dir"] == executed["parameters"]["cache_dir"]


def test_figures_and_tables_show_a_sample_of_a_large_dataset(executed):
    # quick: 50 headers and 60 points of the 150 images; at scale header_sample and scatter_points
    assert read_json(executed["run"] / "data_summary.json")["headers_read"] == 50
    assert read_json(executed["run"] / "embedding_summary.json")["projection_points"] == 60


def test_03_trains_within_the_quick_budget(executed):
    summary = read_json(executed["run"] / "training_summary.json")
    history = pd.read_csv(executed["run"] / "history.csv")
    assert summary["epochs"] == len(history) <= 15
    assert 1 <= summary["best_epoch"] <= summary["epochs"]
    assert summary["val_cosine"] == pytest.approx(history["val_cosine"].max())
    assert summary["hyperparameters"]["hidden_size"] == 1024 and summary["n_parameters"] > 1_000_000
    assert (executed["run"] / "best_model.safetensors").is_file()


def test_04_scores_every_method_and_the_mapper_beats_the_constant(executed):
    metrics = read_json(executed["run"] / "metrics.json")
    results = pd.read_csv(executed["run"] / "test_results.csv")
    n_test = read_json(executed["run"] / "data_summary.json")["split"]["test"]
    assert metrics["n_test"] == len(results) == n_test
    for method in ("mapper", "retrieval", "knn", "mean_prompt"):
        m = metrics["methods"][method]
        assert 0 < m["ci95"][0] <= m["mean_cosine"] <= m["ci95"][1] < 1, method
        assert results[f"cosine_{method}"].mean() == pytest.approx(m["mean_cosine"])
    assert metrics["methods"]["mapper"]["mean_cosine"] > metrics["methods"]["mean_prompt"]["mean_cosine"]


def test_05_analyses_attributes_and_unseen_combinations(executed):
    summary = read_json(executed["run"] / "error_analysis.json")
    results = pd.read_csv(executed["run"] / "test_results.csv")
    assert summary["n_test"] == len(results)
    accuracy = summary["attribute_accuracy"]["retrieval"]
    assert set(accuracy) == {"count", "size", "color", "shape", "position", "second_object",
                             "background", "style"}
    assert all(0 <= value <= 1 for value in accuracy.values())
    assert sum(group["count"] for group in summary["cosine_by_unseen_pairs"].values()) == len(results)
    assert summary["best"][0]["cosine_mapper"] == pytest.approx(results["cosine_mapper"].max())
    assert summary["best"][0]["cosine_mapper"] >= summary["worst"][-1]["cosine_mapper"]


def test_06_trains_the_decoder_and_adds_it_to_the_evaluation(executed):
    run = executed["run"]
    summary = read_json(run / "generation_summary.json")
    metrics = read_json(run / "metrics.json")
    assert summary["decoder"]["epochs"] <= 3 and (run / "decoder.safetensors").is_file()
    decoder = metrics["methods"]["decoder"]
    assert 0 < decoder["mean_cosine"] < 1 and 0 < decoder["distinct_prompts"] <= 1
    assert set(summary["strategies"]) == {"greedy", "beam", "sample"}
    assert all(s["prompts/s"] > 0 for s in summary["strategies"].values())
    results = pd.read_csv(run / "test_results.csv", keep_default_na=False)
    assert results["cosine_decoder"].mean() == pytest.approx(decoder["mean_cosine"])
    assert "<td>decoder</td>" in (executed["reports"] / "index.html").read_text()


def test_reports_are_self_contained_and_linked(executed):
    reports = executed["reports"]
    index = (reports / "index.html").read_text()
    links = re.findall(r'href="([^"]+)"', index)
    assert sorted(links) == sorted([nb.name for nb in NOTEBOOKS] + [nb.stem + ".html" for nb in NOTEBOOKS])
    assert all((reports / link).is_file() for link in links)
    mapper = read_json(executed["run"] / "metrics.json")["methods"]["mapper"]["mean_cosine"]
    assert re.search(rf"<th>mapper</th>\s*<td>{mapper:.4f}</td>", index)
    for notebook in NOTEBOOKS:
        page = (reports / f"{notebook.stem}.html").read_text()
        assert "data:image/png;base64," in page, notebook.name  # figures embedded
        assert "<script src=" not in page and "cdnjs" not in page, notebook.name
        assert "Conclusions" in page and "Traceback" not in page, notebook.name


@pytest.mark.slow  # the notebooks again: `./run_tests.sh -m slow`
def test_executed_notebooks_pass_nbval(executed):
    """nbval runs each executed notebook again (its injected quick parameters included) and
    compares the outputs of the cells marked NBVAL_CHECK_OUTPUT."""
    notebooks = [str(executed["reports"] / nb.name) for nb in NOTEBOOKS]
    result = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider",
                             "-q", *notebooks], capture_output=True, text=True, cwd=executed["root"],
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    cells = sum(cell.cell_type == "code" for path in notebooks
                for cell in nbformat.read(path, as_version=4).cells)
    assert f"{cells} passed" in result.stdout  # one nbval item per code cell, none skipped


def _notebook(path, *sources):
    cells = [nbformat.v4.new_code_cell(source) for source in sources]
    cells[0].metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(notebook, path)


def test_a_failing_notebook_stops_the_run_and_is_named(tmp_path, capsys):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_fine.ipynb", "x = 1", "print(x)")
    _notebook(folder / "02_broken.ipynb", "limit = 3", "y = 2", "raise ValueError(f'limit {limit} too low')")
    _notebook(folder / "03_never.ipynb", "z = 0", "open('ran', 'w').close()")
    reports = tmp_path / "reports"
    code = main(["report", "--notebooks", str(folder), "--reports", str(reports), "-p", "limit", "5"])
    message = capsys.readouterr().err
    assert code == 2
    assert "02_broken.ipynb failed in cell 3" in message and "ValueError: limit 5 too low" in message
    assert (reports / "run" / "02_broken.html").is_file()  # the failure can be read in its report
    assert not (reports / "run" / "03_never.ipynb").exists() and not (tmp_path / "ran").exists()
    assert not (reports / "run" / "index.html").exists()


def test_run_all_quick_end_to_end(executed):
    result = executed["result"]
    assert re.search(r"^mapper\s+0\.\d{4}", result.stdout, re.M)
    for notebook in NOTEBOOKS:
        assert (executed["reports"] / f"{notebook.stem}.html").stat().st_size > 10_000
    assert (executed["run"] / "metrics.json").is_file()
    # progress while the notebooks run: their stage lines reach the terminal
    assert "image embeddings (efficientnet-lite0" in result.stderr and re.search(r"mapper: \d+/\d+ epoch", result.stderr)


def test_run_all_uses_the_given_interpreter_and_never_builds_a_venv(tmp_path):
    """The tests run ./run_all.sh in their own environment: it must not (re)build .venv, which
    needs the network when the install stamp differs."""
    shutil.copy(ROOT / "run_all.sh", tmp_path)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "called"}\n')
    fake.chmod(0o755)
    result = subprocess.run(["./run_all.sh", "-p", "quick", "true"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "IMG2PROMPT_PYTHON": str(fake)})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "called").read_text().split() == ["-m", "img2prompt", "report", "-p", "quick", "true"]
    assert not (tmp_path / ".venv").exists()


def test_the_library_and_notebooks_default_to_offline_hub_access():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    probe = "import img2prompt, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "True", result.stderr
    for path in NOTEBOOKS:  # each notebook imports the library before anything that reaches a hub
        code = "".join(cell.source for cell in nbformat.read(path, as_version=4).cells
                       if cell.cell_type == "code")
        first = code.index("from img2prompt")
        assert all(code.find(hub) < 0 or code.find(hub) > first
                   for hub in ("transformers", "huggingface_hub", "sentence_transformers")), path.name


@pytest.mark.slow  # the notebooks again: `./run_tests.sh -m slow`
def test_real_images_take_the_views_that_apply(real_study):
    assert read_json(real_study["run"] / "data_summary.json")["generated"] is False
    summary = read_json(real_study["run"] / "error_analysis.json")
    assert summary["generated"] is False and "attribute_accuracy" not in summary
    assert "no attribute view" in (real_study["reports"] / "01_data_exploration.html").read_text()


def test_two_studies_keep_both_sets_of_reports(executed, cache_dir, tmp_path):
    """A second study (notebook 01 on the COCO sample) writes its reports beside the first's."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(NOTEBOOKS[0], notebooks)
    run_notebooks(notebooks, executed["base"], {"data_dir": str(shared_set("coco-ccby-sample")),
                                                "run_dir": str(tmp_path / "second"), "quick": "true"},
                  cwd=ROOT, log=lambda _: None)
    studies = (executed["base"] / "index.html").read_text()
    for study, last in (("run", "07_your_images.html"), ("second", "01_data_exploration.html")):
        assert f'href="{study}/index.html"' in studies
        assert (executed["base"] / study / last).is_file()
    assert "decoder" in (executed["reports"] / "index.html").read_text()  # the first study's, intact


def test_07_describes_photos_as_unfamiliar_and_shows_where_each_word_looked(executed, tmp_path):
    import papermill
    out = tmp_path / "07.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "07_your_images.ipynb"), str(out), cwd=str(ROOT),
                               parameters={"images": str(shared_set("coco-ccby-sample")), "run_dir": str(executed["run"]),
                                           "quick": True}, progress_bar=False, kernel_name="python3")
    executed_07 = nbformat.read(out, as_version=4)
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                   for c in executed_07.cells for o in c.get("outputs", []))
    assert "4 of them are unlike the training images" in text  # photographs, against generated shapes
    [attention] = [c for c in executed_07.cells if "cell_attention" in c.source]
    assert any("image/png" in o.get("data", {}) for o in attention.outputs)  # where each word looked
