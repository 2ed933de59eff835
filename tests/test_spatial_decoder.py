"""The decoder that sees where and what colour: the feature map over a grid and colour
histograms, beside the pooled vector."""

import json

import numpy as np
import pytest
import torch

from img2prompt.cli import main
from img2prompt.encoders.colors import color_histograms, histogram_dim
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
    assert with_grid.shape == (3, encoder.feature_dim(3)) == (3, 1280 * 10)
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
    assert run.config.decoder_colors == 4 and run.decoder().spec["colors"] == 4
    test = run.data().part("test")
    greedy = run.config.decode_options("greedy")
    paths = run.image_paths(test["images"][:4])
    predicted = Predictor(run, "decoder", greedy).predict(paths)
    assert [p["prompt"] for p in predicted] == run.decoder().generate(test["decoder_emb"][:4], greedy)


def test_the_pooled_and_the_grid_decoder_are_compared(decoder_run, tmp_path):  # noqa: F811
    run = Run.open(decoder_run["run"])
    before = (decoder_run["run"] / "decoder.safetensors").read_bytes()
    table = run.compare_decoder_inputs()
    both = "the pooled vector + a 3x3 grid + colour histograms (4 levels)"
    assert list(table.index) == ["the pooled vector", both]
    assert table.loc["the pooled vector", "input width"] == 1280
    assert table.loc[both, "input width"] == 1280 * 10 + 64 * 10
    assert {"test cosine (greedy)", "exact prompts", "val cosine", "epochs", "seconds", "color",
            "position"} <= set(table.columns)
    assert table["test cosine (greedy)"].between(0, 1).all()
    assert (decoder_run["run"] / "decoder.safetensors").read_bytes() == before  # nothing saved


def test_colour_histograms_count_each_colour_where_it_is():
    pixels = torch.zeros(2, 3, 6, 6, dtype=torch.uint8)
    pixels[0, 0] = 255  # image 0: all red
    pixels[1, :, :3, :3] = 255  # image 1: black, white top-left quarter
    shares = color_histograms(pixels, bins=4, grid=2) ** 2  # square roots of shares
    assert shares.shape == (2, histogram_dim(4, 2)) == (2, 64 * 5)
    red, white, black = (3 * 4 + 0) * 4 + 0, 63, 0
    assert shares[0, red] == 1 and shares[0, :64].sum() == 1
    assert shares[1, white] == pytest.approx(0.25) and shares[1, black] == pytest.approx(0.75)
    cells = shares[1, 64:].view(4, 64)  # top-left, top-right, bottom-left, bottom-right
    assert cells[0, white] == 1 and cells[1:, black].tolist() == [1, 1, 1]


def test_the_decoder_reads_colours_from_pixels_only_where_there_are_pixels(small_dataset):
    encoder = image_encoder("efficientnet-lite0")
    batch = torch.stack([encoder.preprocess(p) for p in _images(small_dataset, 2)])
    features = encoder.forward(batch, grid=3, colors=4)
    assert features.shape == (2, encoder.feature_dim(3, 4))
    assert torch.equal(features[:, -640:], color_histograms(batch, 4, 3))
    with pytest.raises(RunError, match="--decoder-colors 0"):
        encoder.forward(encoder.normalize(batch), colors=4)  # float input, as HF processors give


def test_the_decoder_grid_is_a_checked_option(decoder_run, capsys):  # noqa: F811
    assert main(["train-decoder", "--run", str(decoder_run["run"]), "--decoder-grid", "-1", "--quiet"]) == 2
    assert "decoder_grid must be at least 0" in capsys.readouterr().err
    config = json.loads((decoder_run["run"] / "config.json").read_text())["config"]
    assert config["decoder_grid"] == 3


def _images(dataset_dir, count):
    from PIL import Image
    return [Image.open(p).convert("RGB") for p in sorted((dataset_dir / "images").glob("*.png"))[:count]]
