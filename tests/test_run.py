"""One Run owns the run folder: stages, validated settings, typed metrics; inference that
stands alone; every default declared once; the folder's file names known in one place."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from img2prompt import Predictor, Run, StudyConfig
from img2prompt.config import FIELDS
from img2prompt.data.synth import SynthParams
from img2prompt.errors import RunError
from img2prompt.evaluation import analysis
from img2prompt.evaluation.scores import Metrics
from img2prompt.models.decoder import DecodeOptions, build_decoder
from img2prompt.models.mapper import Mapper
from img2prompt.reports.notebooks import declared_parameters, find_notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_ONLY = {"quick", "force", "resume", "color_by", "n_examples", "compare_inputs", "images", "show_images",  # how to run, not what
                 "header_sample", "scatter_points", "compare_images"}  # how much of a large dataset a figure shows


def test_importing_the_predictor_loads_no_pandas_training_plotting_or_notebook_code():
    probe = ("import sys, img2prompt.predict; "
             "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('pandas', 'matplotlib', 'seaborn', 'papermill', 'nbconvert') or m in ('img2prompt.models.training', "
             "'img2prompt.reports.plots', 'img2prompt.reports.notebooks', 'img2prompt.evaluation.analysis'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_predictor_takes_paths_pil_images_and_arrays(trained_run):
    path = sorted((trained_run["data"] / "images").iterdir())[0]
    image = Image.open(path)
    predictor = Predictor(trained_run["run"])
    by_path, by_pil, by_array = (predictor.predict(x)[0] for x in (path, image, np.asarray(image)))
    assert by_path["prompt"] == by_pil["prompt"] == by_array["prompt"]
    assert by_path["similarity"] == pytest.approx(by_pil["similarity"], abs=1e-4)
    batch = predictor.predict([image, np.asarray(image), str(path)], top_k=3, batch_size=2)
    assert [r["image"] for r in batch] == ["#0", "#1", str(path)]
    assert all(len(r["nearest"]) == 3 and -1 <= r["similarity"] <= 1 for r in batch)
    with pytest.raises(Exception, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), np.float32))


def test_settings_change_only_checked_and_saved_with_the_run(trained_run, tmp_path):
    import shutil
    shutil.copytree(trained_run["run"], tmp_path / "run")
    run = Run.open(tmp_path / "run")
    run.update(bootstrap=50, bank="all")
    assert StudyConfig.load(tmp_path / "run").bootstrap == 50 and Run.open(tmp_path / "run").config.bank == "all"
    for bad, message in (({"bootstap": 5}, "unknown setting"), ({"bank": "some"}, "bank \\(--bank\\) must be one of"),
                         ({"hidden_size": "big"}, "hidden_size \\(--hidden-size\\) must be an integer"),
                         ({"max_epochs": 0}, "max_epochs \\(--max-epochs\\) must be an integer at least 1"),
                         ({"decoder_prefix_dropout": 1.0}, "decoder_prefix_dropout .* must be a finite number at least 0 "
                                                           "and below 1"),
                         ({"top_p": 1.5}, "--top-p")):
        with pytest.raises(RunError, match=message):
            run.update(**bad)
    assert StudyConfig.load(tmp_path / "run").bank == "all"  # a refused change saved nothing


def test_metrics_are_typed_and_rendered_once(trained_run):
    metrics = Run.open(trained_run["run"]).metrics()
    assert isinstance(metrics, Metrics) and metrics.n_test > 0
    table = metrics.table()
    assert list(table.index) == list(metrics.methods)
    assert table.loc["mapper", "mean cosine"] == metrics.method("mapper")["mean_cosine"]
    comparison = metrics.comparison("mapper_minus_mean_prompt")
    assert comparison.methods == ("mapper", "mean_prompt")
    assert comparison.verdict().startswith("`mapper` beats `mean_prompt` by +")
    assert "mapper − knn" in metrics.comparison_table().index
    assert f"{metrics.method('knn')['mean_cosine']:.4f}" in metrics.text()


def test_run_folder_file_names_appear_only_in_the_run_module():
    import img2prompt.run as run_module
    names = [value for key, value in vars(run_module).items() if key.endswith("_FILE") and isinstance(value, str)]
    names += [*run_module.SUMMARIES.values(), *run_module.FIGURES.values()]
    owned_elsewhere = ("config.json", "rejects.csv", run_module.MANIFEST_FILE)  # config, data, storage
    names = [n for n in names if n not in owned_elsewhere]
    offenders = []
    for path in [*(ROOT / "img2prompt").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]:
        if path.name == "run.py":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names if name in text]
    assert not offenders


def test_no_notebook_loads_patches_or_saves_the_configuration():
    for path in find_notebooks(ROOT / "notebooks"):
        code = "".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                       if cell["cell_type"] == "code")
        for pattern in (r"StudyConfig\.load", r"\.save\(", r"dataclasses\.replace", r"write_json", r"(?<![\w.])open\("):
            assert not re.search(pattern, code), f"{path.name}: {pattern}"


def test_every_default_is_declared_once_in_the_config():
    defaults = {name: spec.default for name, spec in FIELDS.items()}
    for path in find_notebooks(ROOT / "notebooks"):
        for name, value in declared_parameters(path).items():
            assert name in defaults or name in NOTEBOOK_ONLY, f"{path.name}: {name} is not a setting"
            if name in defaults:
                assert value == defaults[name], f"{path.name}: {name} = {value!r}"
    assert SynthParams() == SynthParams(defaults["n_images"], defaults["image_size"], defaults["seed"])
    options = DecodeOptions()
    assert options == StudyConfig().decode_options()
    mapper = Mapper(8, 4)
    assert mapper.hparams == {"in_dim": 8, "out_dim": 4, "hidden_size": defaults["hidden_size"],
                              "depth": defaults["depth"], "dropout": defaults["dropout"]}
    decoder = build_decoder("tiny", 8, ["a red circle"])
    assert (decoder.spec["dropout"], decoder.spec["width"], decoder.spec["prefix_length"]) == \
        (defaults["decoder_dropout"], defaults["decoder_width"], defaults["prefix_length"])
    from img2prompt.cli import build_parser
    synth = build_parser().parse_args(["data", "synth", "--out", "x"])
    assert (synth.n, synth.size, synth.seed) == (defaults["n_images"], defaults["image_size"], defaults["seed"])
    assert StudyConfig().data_dir == ""  # the generated default data, not a folder nothing creates
    assert StudyConfig().generated_data_dir() == "data/synth-2000-256-seed0"


def test_the_linear_probe_and_unseen_pair_groups():
    from img2prompt.data.dataset import ImageDataset
    from img2prompt.data.study import StudyData
    rng = np.random.default_rng(0)
    prompts = [f"prompt {i % 40}" for i in range(120)]
    target = rng.normal(size=(40, 6))[[i % 40 for i in range(120)]]
    image = target @ rng.normal(size=(6, 10))  # an exact linear relation
    splits = np.array(["train" if i % 40 < 30 else "test" for i in range(120)], dtype=object)
    dataset = ImageDataset(Path("."), [str(i) for i in range(120)], prompts, [f"{i}.png" for i in range(120)])
    probe = analysis.linear_probe(StudyData(dataset, splits, image, target, target), preview=5)
    assert probe["test_cosine"] > 0.99 and probe["own_prompt_best"] == 5 and len(set(probe["prompts"])) == 5
    train = pd.DataFrame({f: ["a"] * 3 for f in analysis.FAMILIES})
    test = pd.DataFrame({f: ["a", "b", "a"] for f in analysis.FAMILIES})
    test.loc[2, "shape"] = "z"
    groups = analysis.unseen_pair_groups(train, test)
    assert list(groups) == ["0", "3+", "3+"]


def test_progress_bars_show_in_notebooks_and_stay_quiet_in_logs(monkeypatch):
    from img2prompt import progress
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.delenv(progress.QUIET_VARIABLE, raising=False)
    bar = progress.progress_bar(10, "img")
    assert type(bar).__module__ == "tqdm.notebook"
    bar.close()
    monkeypatch.setenv(progress.QUIET_VARIABLE, "0")  # as in the kernels of a report
    assert progress.progress_bar(10, "img").disable
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    monkeypatch.delenv(progress.QUIET_VARIABLE)
    assert progress.progress_bar(10, "img").disable  # pytest's stderr is not a terminal


def test_resume_from_a_notebook_is_the_run_method_the_cli_calls(small_dataset, tmp_path, monkeypatch, cache_dir):
    """Notebook 03 with resume = True calls run.train(resume=True): an interrupted training
    continues to the same model as an uninterrupted one."""
    from img2prompt.models import mapper as mapper_module
    from img2prompt.models import training
    monkeypatch.setattr(training, "CHECKPOINT_SECONDS", 0)
    config = StudyConfig(data_dir=str(small_dataset), run_dir=str(tmp_path / "a"), cache_dir=str(cache_dir),
                         max_epochs=6, patience=50)
    Run.create(config).train()
    expected = Run.open(tmp_path / "a").history()

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mapper_module, "save_mapper", killed)
    run = Run.create(dataclasses.replace(config, run_dir=str(tmp_path / "b")))
    with pytest.raises(KeyboardInterrupt):
        run.train()
    monkeypatch.undo()
    Run.open(tmp_path / "b").train(resume=True)
    columns = ["epoch", "train_loss", "val_loss", "best"]
    pd.testing.assert_frame_equal(Run.open(tmp_path / "b").history()[columns], expected[columns])
