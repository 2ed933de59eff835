"""The command line end to end on 200 generated images, and its error handling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from img2prompt.cli import main
from img2prompt.config import StudyConfig

PROJECT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    """``python -m img2prompt`` in a subprocess, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "img2prompt", *map(str, args)], capture_output=True,
                          text=True, cwd=PROJECT, env=env, timeout=600)


def test_train_writes_a_complete_run(trained_run):
    run = trained_run["run"]
    for name in ("config.json", "splits.csv", "best_model.safetensors", "prompt_bank.safetensors",
                 "history.csv", "figures/loss_curve.png", "test_results.csv", "metrics.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["versions"]["torch"] and "commit" in saved["git"]
    assert StudyConfig.load(run).image_encoder == "efficientnet-lite0"
    splits = pd.read_csv(run / "splits.csv")
    prompts = pd.read_csv(trained_run["data"] / "prompts.csv").merge(splits, on="imgId")
    assert prompts.groupby("prompt")["split"].nunique().max() == 1
    history = pd.read_csv(run / "history.csv")
    assert history["best"].sum() == 1 and {"train_loss", "val_loss", "val_cosine"} <= set(history.columns)


def test_mapper_beats_the_mean_prompt(trained_run):
    metrics = json.loads((trained_run["run"] / "metrics.json").read_text())
    methods = metrics["methods"]
    assert set(methods) == {"mapper", "retrieval", "knn", "mean_prompt"}
    for summary in methods.values():
        low, high = summary["ci95"]
        assert -1 <= low <= summary["mean_cosine"] <= high <= 1
    assert methods["mapper"]["mean_cosine"] > methods["mean_prompt"]["mean_cosine"]
    assert metrics["comparisons"]["mapper_minus_mean_prompt"]["mean_difference"] > 0
    results = pd.read_csv(trained_run["run"] / "test_results.csv")
    assert len(results) == metrics["n_test"] > 0
    assert {"imgId", "image", "prompt", "predicted_prompt", "cosine_mapper", "cosine_retrieval",
            "cosine_knn", "cosine_mean_prompt"} <= set(results.columns)
    assert results["cosine_mapper"].mean() == pytest.approx(methods["mapper"]["mean_cosine"], abs=1e-6)


def test_split_is_reused_and_a_finished_run_is_kept(trained_run, cache_dir, capsys):
    run = trained_run["run"]
    before = (run / "splits.csv").read_text()
    assert main(["train", "--data", str(trained_run["data"]), "--out", str(run), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run), "--bank", "all", "--quiet", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert (run / "splits.csv").read_text() == before
    assert metrics["bank"] == "all" and metrics["methods"]["retrieval"]["bank_size"] > 0
    main(["evaluate", "--run", str(run), "--quiet"])  # restore the default run's metrics


def test_predict_any_image(trained_run, tmp_path, capsys):
    from img2prompt.data.synth import SceneSpec, render

    spec = SceneSpec("three", "large", "yellow", "circle", "at the top", "black", "flat vector art")
    image = tmp_path / "mine.jpg"
    render(spec, 300, seed=0).convert("CMYK").save(image)  # a JPEG outside any dataset
    first = sorted((trained_run["data"] / "images").iterdir())[0]
    assert main(["predict", "--run", str(trained_run["run"]), str(image), str(first), "--json",
                 "--top-k", "3", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(image), str(first)]
    bank = set(pd.read_csv(trained_run["data"] / "prompts.csv")["prompt"])
    for result in results:  # the trained run has no decoder: retrieval, its best method
        assert result["method"] == "retrieval" and result["prompt"] in bank and len(result["nearest"]) == 3
        similarities = [n["similarity"] for n in result["nearest"]]
        assert similarities == sorted(similarities, reverse=True) and result["similarity"] == similarities[0]
        assert 0 <= result["familiarity"] <= 100


def test_embed_command_fills_the_cache(small_dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["embed", "--data", str(small_dataset), "--cache-dir", str(cache), "--quiet"]) == 0
    assert "(24, 1280)" in capsys.readouterr().out
    assert len(list((cache / "embeddings").glob("image-*.safetensors"))) == 1
    assert not (small_dataset / "splits.csv").exists()


def test_validate_command(small_dataset, tmp_path, capsys):
    assert main(["data", "validate", str(small_dataset)]) == 0
    assert "0 error(s)" in capsys.readouterr().out
    assert main(["data", "validate", str(tmp_path)]) == 1
    assert "prompts.csv: file not found" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--run", "{tmp}/no-run"], "no-run: no run here yet"),
    (["predict", "--run", "{tmp}/no-run", "x.png"], "no-run: no run here yet. Make the default study's with ./run_all.sh"),
    (["train", "--data", "{tmp}/no-data", "--out", "{tmp}/run"], "dataset folder not found"),
    (["train", "--data", "{small}", "--out", "{tmp}/run", "--image-encoder", "vgg99"], "unknown image encoder"),
    (["predict", "--run", "{run}", "{tmp}/missing.png"], "missing.png: image file not found"),
    (["train", "--data", "{small}", "--out", "{tmp}/a-file/run"], "a-file"),
    (["data", "synth", "--out", "{tmp}/d", "--n", "0"], "need n >= 1"),
])
def test_errors_are_messages_not_tracebacks(args, message, tmp_path, small_dataset, trained_run):
    values = {"tmp": tmp_path, "small": small_dataset, "run": trained_run["run"]}
    (tmp_path / "a-file").write_text("a file where a folder is expected")
    result = run_cli(*[a.format(**values) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_help():
    for command in (["--help"], ["data", "synth", "--help"], ["data", "validate", "--help"],
                    ["embed", "--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"]):
        result = run_cli(*command)
        assert result.returncode == 0 and "usage:" in result.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "img2prompt"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "predict" in result.stdout


def test_bert_target_is_scored_in_the_metric_space(small_dataset, tiny_bert, cache_dir, tmp_path, capsys):
    run = tmp_path / "bert-run"
    assert main(["train", "--data", str(small_dataset), "--out", str(run), "--cache-dir", str(cache_dir),
                 "--text-encoder", "bert", "--text-model", str(tiny_bert), "--text-pooling", "mean",
                 "--max-epochs", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    mapper = metrics["methods"]["mapper"]
    assert metrics["text_encoder"] == "bert"
    assert -1 <= mapper["mean_cosine"] <= 1 and -1 <= mapper["native_mean_cosine"] <= 1
    assert "native_cosine_mapper" in pd.read_csv(run / "test_results.csv").columns
    assert main(["predict", "--run", str(run), str(sorted((small_dataset / "images").iterdir())[0]),
                 "--quiet"]) == 0


def test_evaluate_refuses_a_run_without_its_split(trained_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(trained_run["run"], copy)
    (copy / "splits.csv").unlink()
    assert main(["evaluate", "--run", str(copy), "--quiet"]) == 2
    assert "split is lost" in capsys.readouterr().err
