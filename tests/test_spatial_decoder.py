"""The decoder that sees where and what colour: the feature map over a grid and colour
histograms, beside the pooled vector."""

import json

import numpy as np
import pytest
import torch

from img2prompt.cli import main
from img2prompt.data.dataset import load_dataset
from img2prompt.encoders.colors import color_histograms, histogram_dim
from img2prompt.encoders.embeddings import EmbeddingCache, image_embeddings
from img2prompt.encoders.image import image_encoder
from img2prompt.errors import RunError
from img2prompt.evaluation import analysis
from img2prompt.predict import Predictor
from img2prompt.run import Run
from tests.test_decoder import decoder_run  # the fixture


def test_the_grid_follows_the_pooled_vector_it_leaves_unchanged(small_dataset):
    encoder = image_encoder("efficientnet-lite0")
    batch = torch.stack([encoder.preprocess(p) for p in _images(small_dataset, 3)])
    pooled, with_grid = encoder.forward(batch), encoder.forward(batch, grid=3, grid_map="last")
    assert with_grid.shape == (3, encoder.feature_dim(3, grid_map="last")) == (3, 1280 * 10)
    assert torch.equal(with_grid[:, :1280], pooled)
    # the cells are the last feature map's averages over a 3 x 3 grid, channel-major
    with torch.inference_mode():
        feature_map = encoder.model.extract_features(encoder._model_input(batch))
    assert feature_map.shape[1:] == (1280, 7, 7)
    cells = with_grid[:, 1280:].view(3, 1280, 3, 3)
    assert torch.allclose(cells[:, :, 0, 0], feature_map[:, :, :3, :3].mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(cells[:, :, 2, 1], feature_map[:, :, 4:, 2:5].mean(dim=(2, 3)), atol=1e-5)
    assert cells.std(dim=(2, 3)).mean() > 0.01  # where differs from cell to cell


def test_the_middle_grid_reads_the_last_map_at_stride_16(small_dataset):
    encoder = image_encoder("efficientnet-lite0")
    batch = torch.stack([encoder.preprocess(p) for p in _images(small_dataset, 2)])
    with_grid = encoder.forward(batch, grid=3, grid_map="middle")
    assert with_grid.shape == (2, encoder.feature_dim(3, grid_map="middle")) == (2, 1280 + 112 * 9)
    assert torch.equal(with_grid[:, :1280], encoder.forward(batch))
    with torch.inference_mode():  # the output of the 11th block of 16: the last 5 work at stride 32
        hidden = encoder.model._swish(encoder.model._bn0(encoder.model._conv_stem(encoder._model_input(batch))))
        for block in encoder.model._blocks[:11]:
            hidden = block(hidden)
    assert hidden.shape[1:] == (112, 14, 14)
    cells = with_grid[:, 1280:].view(2, 112, 3, 3)
    # adaptive averaging splits 14 rows into [0, 5), [4, 10), [9, 14)
    assert torch.allclose(cells[:, :, 0, 2], hidden[:, :, :5, 9:].mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(cells[:, :, 1, 1], hidden[:, :, 4:10, 4:10].mean(dim=(2, 3)), atol=1e-5)
    # both maps: each cell holds the middle map's 112 channels, then the last map's 1280
    both = encoder.forward(batch, grid=3, grid_map="both")
    assert both.shape == (2, encoder.feature_dim(3, grid_map="both")) == (2, 1280 + 1392 * 9)
    cells_of_both = both[:, 1280:].view(2, 1392, 3, 3)
    assert torch.equal(cells_of_both[:, :112], cells)
    assert torch.equal(cells_of_both[:, 112:].flatten(1), encoder.forward(batch, grid=3, grid_map="last")[:, 1280:])


def test_grid_features_have_their_own_cache_entry_and_pooled_keys_stay_as_before(small_dataset, tmp_path):
    dataset, encoder = load_dataset(small_dataset), image_encoder("efficientnet-lite0")
    cache = EmbeddingCache(tmp_path / "cache")
    pooled, info = image_embeddings(dataset, encoder, cache, progress=False)
    grid, grid_info = image_embeddings(dataset, encoder, cache, progress=False, grid=2)
    middle, middle_info = image_embeddings(dataset, encoder, cache, progress=False, grid=2, grid_map="middle")
    assert len({info["cache_file"], grid_info["cache_file"], middle_info["cache_file"]}) == 3
    assert middle.shape == (len(dataset), 1280 + 112 * 4) and np.array_equal(middle[:, :1280], pooled)
    old_key = {"kind": "image", "images": dataset.images_fingerprint(), "encoder": encoder.fingerprint()}
    assert info["cache_file"] == str(cache.path("image", old_key))  # caches made before grids stay valid
    assert grid.shape == (len(dataset), 1280 * 5) and np.array_equal(grid[:, :1280], pooled)
    again, again_info = image_embeddings(dataset, encoder, cache, progress=False, grid=2)
    assert again_info["cached"] and np.array_equal(again, grid)


def test_an_encoder_without_a_feature_map_says_to_use_the_pooled_vector():
    encoder = image_encoder("efficientnet-lite0")
    encoder._blocks_above_middle = super(type(encoder), encoder)._blocks_above_middle  # as a ViT-like model
    for grid_map in ("middle", "last"):
        with pytest.raises(RunError, match="--decoder-grid 0"):
            encoder.forward(torch.zeros(1, 3, 224, 224, dtype=torch.uint8), grid=3, grid_map=grid_map)


def test_the_predictor_reads_what_the_decoder_was_trained_on(decoder_run):
    run = Run.open(decoder_run["run"])
    assert run.config.decoder_grid == 3 and run.decoder().spec["grid"] == 3
    assert run.config.decoder_colors == 4 and run.decoder().spec["colors"] == 4
    assert run.config.decoder_map == "both" and run.decoder().spec["grid_map"] == "both"
    test = run.data().part("test")
    greedy = run.config.decode_options("greedy")
    paths = run.image_paths(test["images"][:4])
    predicted = Predictor(run, "decoder", greedy).predict(paths)
    assert [p["prompt"] for p in predicted] == run.decoder().generate(test["decoder_emb"][:4], greedy)


def test_the_pooled_and_the_grid_decoder_are_compared(decoder_run, tmp_path):
    run = Run.open(decoder_run["run"])
    before = (decoder_run["run"] / "decoder.safetensors").read_bytes()
    table = analysis.compare_decoder_inputs(run)
    both = "the pooled vector + a 3x3 grid of the middle and last maps + colour histograms (4 levels)"
    assert list(table.index) == ["the pooled vector", both]
    assert table.loc["the pooled vector", "input width"] == 1280
    assert table.loc[both, "input width"] == 1280 + (112 + 1280) * 9 + 64 * 10
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


def test_the_decoder_grid_is_a_checked_option(decoder_run, capsys):
    assert main(["train-decoder", "--run", str(decoder_run["run"]), "--decoder-grid", "-1", "--quiet"]) == 2
    assert "decoder_grid (--decoder-grid) must be an integer at least 0" in capsys.readouterr().err
    config = json.loads((decoder_run["run"] / "config.json").read_text())["config"]
    assert config["decoder_grid"] == 3


def _images(dataset_dir, count):
    from PIL import Image
    return [Image.open(p).convert("RGB") for p in sorted((dataset_dir / "images").glob("*.png"))[:count]]


def test_with_a_layout_the_prefix_reads_every_cell_and_each_part_has_its_scale(tmp_path):
    from img2prompt.models.decoder import build_decoder, load_decoder, save_decoder
    pooled, cells, grid = 16, 4, 2
    width = pooled + cells * grid * grid + 64 * (1 + grid * grid)
    decoder = build_decoder("tiny", width, ["a red circle"], width=32, layers=1, heads=2, grid=grid,
                            colors=4, grid_map="middle", pooled_dim=pooled)
    model = decoder.model
    assert decoder.spec["layout"] and decoder.spec["pooled_dim"] == pooled and model.cell_dim == cells
    data = torch.randn(50, width)
    data[:, pooled:pooled + 16] *= 10  # cells ten times as spread as the pooled vector
    model.fit_to_data(data)
    assert model.cell_scale.item() == pytest.approx(10 * model.input_scale.item(), rel=0.3)
    moved = data[:2].clone()
    moved[:, pooled + 3] += 5  # one channel of the last cell
    model.eval()
    with torch.inference_mode():
        before, after = model.prefix_embeds(data[:2]), model.prefix_embeds(moved)
    assert not torch.allclose(before[:, :8], after[:, :8])  # the MLP's vectors see the cell
    save_decoder(decoder, tmp_path / "decoder.safetensors")
    loaded = load_decoder(tmp_path / "decoder.safetensors").model
    with torch.inference_mode():
        assert torch.equal(loaded.prefix_embeds(moved), after)
