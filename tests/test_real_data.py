"""Predicting on real images nobody on this project made (../shared/data, when present)."""

import json

from img2prompt.cli import main
from img2prompt.data.dataset import load_dataset

from .conftest import shared_set


def test_predict_on_real_images(trained_run, capsys):
    paths = []
    for name in ("diffusiondb-sample", "coco-ccby-sample"):
        paths += load_dataset(shared_set(name)).paths[:4]
    assert main(["predict", "--run", str(trained_run["run"]), *map(str, paths), "--json", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, paths))
    assert all(r["prompt"] and -1 <= r["similarity"] <= 1 for r in results)
    # the run knows generated shapes only: these photographs and Stable Diffusion images are guesses
    assert all(r["unfamiliar"] for r in results)


def test_real_sets_load_and_validate():
    for name in ("diffusiondb-sample", "coco-ccby-sample"):
        dataset = load_dataset(shared_set(name))
        assert len(dataset) >= 8 and all(p.strip() for p in dataset.prompts)
