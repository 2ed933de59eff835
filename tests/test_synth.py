import hashlib

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from img2prompt.data.dataset import load_dataset
from img2prompt.data.synth import (
    BACKGROUNDS,
    COLORS,
    FAMILIES,
    SceneSpec,
    SynthParams,
    generate_dataset,
    render,
)
from img2prompt.errors import DataError

SIZE = 192


def spec(**changes):
    base = dict(count="two", size="large", color="red", shape="square", position="on the left",
                background="navy blue", style="flat vector art")
    return SceneSpec(**{**base, **changes})


def color_mask(image, color, tolerance=40):
    pixels = np.asarray(image, dtype=np.int32)
    return np.abs(pixels - np.array(COLORS[color])).max(axis=2) < tolerance


def components(mask):
    return ndimage.label(mask)[1]


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_and_other_seed_other_files(tmp_path):
    a = generate_dataset(tmp_path / "a", SynthParams(n=60, size=64, seed=1))
    b = generate_dataset(tmp_path / "b", SynthParams(n=60, size=64, seed=1), workers=1)
    c = generate_dataset(tmp_path / "c", SynthParams(n=60, size=64, seed=2))
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_writes_a_valid_dataset_with_attribute_table(tmp_path):
    root = generate_dataset(tmp_path / "d", SynthParams(n=40, size=64, seed=0))
    dataset = load_dataset(root)
    assert len(dataset) == 40
    attributes = pd.read_csv(root / "attributes.csv")
    assert list(attributes.columns) == ["imgId", *FAMILIES] and len(FAMILIES) >= 6
    assert list(attributes["imgId"]) == dataset.ids
    # every attribute value is written in its prompt
    for prompt, row in zip(dataset.prompts, attributes.itertuples()):
        assert row.color in prompt and row.background in prompt and row.style in prompt
        assert row.position in prompt and row.size in prompt


def test_rerun_keeps_same_dataset_and_refuses_other_parameters(tmp_path):
    root = generate_dataset(tmp_path / "d", SynthParams(n=10, size=64))
    stamp = (root / "prompts.csv").stat().st_mtime_ns
    generate_dataset(root, SynthParams(n=10, size=64))
    assert (root / "prompts.csv").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other parameters"):
        generate_dataset(root, SynthParams(n=11, size=64))
    generate_dataset(root, SynthParams(n=11, size=64), force=True)
    assert len(load_dataset(root)) == 11


@pytest.mark.parametrize("count", ["a", "two", "three"])
def test_count_colour_and_background_are_drawn(count):
    image = render(spec(count=count, shape="circle"), SIZE, seed=0)
    assert components(color_mask(image, "red")) == {"a": 1, "two": 2, "three": 3}[count]
    corner = np.asarray(image)[2, 2]
    assert np.abs(corner.astype(int) - BACKGROUNDS["navy blue"]).max() < 3


@pytest.mark.parametrize("position, axis, low_half", [
    ("on the left", 1, True), ("on the right", 1, False), ("at the top", 0, True), ("at the bottom", 0, False),
])
def test_position_is_drawn(position, axis, low_half):
    mask = color_mask(render(spec(position=position), SIZE, seed=1), "red")
    centre = np.argwhere(mask)[:, axis].mean() / SIZE
    assert (centre < 0.4) if low_half else (centre > 0.6)


def test_size_and_second_object_are_drawn():
    small = color_mask(render(spec(size="small"), SIZE, seed=2), "red").sum()
    large = color_mask(render(spec(size="large"), SIZE, seed=2), "red").sum()
    assert large > 2.5 * small
    both = render(spec(second_size="small", second_color="yellow", second_shape="star"), SIZE, seed=2)
    yellow = np.argwhere(color_mask(both, "yellow"))
    assert components(color_mask(both, "yellow")) == 1 and yellow[:, 1].mean() / SIZE > 0.6


def test_shapes_differ_in_area():
    areas = {shape: color_mask(render(spec(count="a", shape=shape), SIZE, seed=3), "red").sum()
             for shape in ("circle", "square", "triangle", "star", "ring", "hexagon")}
    assert areas["ring"] < 0.8 * areas["circle"]
    assert areas["triangle"] < 0.8 * areas["square"] and areas["star"] < 0.8 * areas["circle"]
    assert areas["square"] < areas["hexagon"] < areas["circle"]


def test_styles_leave_their_marks():
    def grey(style):
        return np.asarray(render(spec(style=style), SIZE, seed=4).convert("L"), dtype=float)

    flat, grain, blur, pixel = (grey(s) for s in ("flat vector art", "film grain photo",
                                                 "blurry photo", "pixel art"))
    background = (slice(0, 20), slice(SIZE - 40, SIZE - 2))  # top right corner: no object there
    assert grain[background].std() > 10 > flat[background].std()
    edge = lambda a: np.abs(np.diff(a, axis=1)).max()
    assert edge(blur) < 0.5 * edge(flat)
    blocks = pixel.reshape(SIZE // 8, 8, SIZE // 8, 8)
    assert np.allclose(blocks, blocks[:, :1, :, :1])  # constant 8×8 cells
    outline = color_mask(render(spec(style="outline sketch"), SIZE, seed=4), "red").sum()
    filled = color_mask(render(spec(), SIZE, seed=4), "red").sum()
    assert outline < 0.5 * filled
    pastel = np.asarray(render(spec(style="pastel illustration"), SIZE, seed=4), dtype=float)
    assert pastel.mean() > np.asarray(render(spec(), SIZE, seed=4), dtype=float).mean() + 40
