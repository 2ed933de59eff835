"""The decoder that sees where: the encoder's feature map over a grid, beside the pooled vector."""

import json

import numpy as np
import pytest
import torch

from img2prompt.cli import main
from img2prompt.encoders.embeddings import EmbeddingCache, image_embeddings
from img2prompt.encoders.image import image_encoder
from img2prompt.data.dataset import load_dataset
from img2prompt.errors import RunError
from img2prompt.predict import Predictor
from img2prompt.run import Run
from tests.test_decoder import decoder_run  # noqa: F401 - the fixture


def test_the_grid_follows_the_pooled_vector_it_leaves_unchanged(small_dataset):
    encoder = image_encoder("efficientnet-lite0")
    batch = torch.stack([encoder.preprocess(p) for p in _images(small_dataset, 3)])
    pooled, with_grid = encoder.forward(batch), encoder.forward(batch, grid=3)
    assert with_grid.shape == (3, encoder.grid_dim(3)) == (3, 1280 * 10)
    assert torch.equal(with_grid[:, :1280], pooled)
    # the cells are the last feature map's averages over a 3 x 3 grid, channel-major
    with torch.inference_mode():
        feature_map = encoder._feature_map(encoder.model, encoder._on_device(batch))
    assert feature_map.shape[1:] == (1280, 7, 7)
    cells = with_grid[:, 1280:].view(3, 1280, 3, 3)
    assert torch.allclose(cells[:, :, 0, 0], feature_map[:, :, :3, :3].mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(cells[:, :, 2, 1], feature_map[:, :, 4:, 2:5].mean(dim=(2, 3)), atol=1e-5)
    assert cells.std(dim=(2, 3)).mean() > 0.01  # where differs from cell to cell


def test_grid_features_have_their_own_cache_entry_and_pooled_keys_stay_as_before(small_dataset, tmp_path):
    dataset, encoder = load_dataset(small_dataset), image_encoder("efficientnet-lite0")
    cache = EmbeddingCache(tmp_path / "cache")
    pooled, info = image_embeddings(dataset, encoder, cache, progress=False)
    grid, grid_info = image_embeddings(dataset, encoder, cache, progress=False, grid=2)
    assert info["cache_file"] != grid_info["cache_file"]
    old_key = {"kind": "image", "images": dataset.images_fingerprint(), "encoder": encoder.fingerprint()}
    assert info["cache_file"] == str(cache.path("image", old_key))  # caches made before grids stay valid
    assert grid.shape == (len(dataset), 1280 * 5) and np.array_equal(grid[:, :1280], pooled)
    again, again_info = image_embeddings(dataset, encoder, cache, progress=False, grid=2)
    assert again_info["cached"] and np.array_equal(again, grid)


def test_an_encoder_without_a_feature_map_says_to_use_the_pooled_vector():
    encoder = image_encoder("efficientnet-lite0")
    encoder._feature_map = super(type(encoder), encoder)._feature_map  # as a ViT-like model
    with pytest.raises(RunError, match="--decoder-grid 0"):
        encoder.forward(torch.zeros(1, 3, 224, 224, dtype=torch.uint8), grid=3)


def test_the_predictor_reads_what_the_decoder_was_trained_on(decoder_run):  # noqa: F811
    run = Run.open(decoder_run["run"])
    assert run.config.decoder_grid == 3 and run.decoder().spec["grid"] == 3
    test = run.data().part("test")
    greedy = run.config.decode_options("greedy")
    paths = run.image_paths(test["images"][:4])
    predicted = Predictor(run, "decoder", greedy).predict(paths)
    assert [p["prompt"] for p in predicted] == run.decoder().generate(test["decoder_emb"][:4], greedy)


def test_the_pooled_and_the_grid_decoder_are_compared(decoder_run, tmp_path):  # noqa: F811
    run = Run.open(decoder_run["run"])
    before = (decoder_run["run"] / "decoder.safetensors").read_bytes()
    table = run.compare_decoder_inputs()
    assert list(table.index) == ["pooled", "grid 3x3 + pooled"]
    assert table.loc["pooled", "input width"] == 1280 and table.loc["grid 3x3 + pooled", "input width"] == 12800
    assert {"test cosine (greedy)", "exact prompts", "val cosine", "epochs", "seconds", "color",
            "position"} <= set(table.columns)
    assert table["test cosine (greedy)"].between(0, 1).all()
    assert (decoder_run["run"] / "decoder.safetensors").read_bytes() == before  # nothing saved


def test_the_decoder_grid_is_a_checked_option(decoder_run, capsys):  # noqa: F811
    assert main(["train-decoder", "--run", str(decoder_run["run"]), "--decoder-grid", "-1", "--quiet"]) == 2
    assert "decoder_grid must be at least 0" in capsys.readouterr().err
    config = json.loads((decoder_run["run"] / "config.json").read_text())["config"]
    assert config["decoder_grid"] == 3


def _images(dataset_dir, count):
    from PIL import Image
    return [Image.open(p).convert("RGB") for p in sorted((dataset_dir / "images").glob("*.png"))[:count]]
