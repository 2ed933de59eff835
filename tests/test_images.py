import io

import numpy as np
import pytest
from PIL import Image

from img2prompt.data.images import open_image
from img2prompt.errors import DataError


def save(tmp_path, image, name, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "P"])
def test_common_modes_become_rgb(tmp_path, mode):
    image = Image.new("RGB", (20, 10), (200, 30, 40)).convert(mode)
    suffix = "jpg" if mode == "CMYK" else "png"
    result = open_image(save(tmp_path, image, f"x.{suffix}"))
    assert result.mode == "RGB" and result.size == (20, 10)


def test_alpha_is_composited_over_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    result = np.asarray(open_image(save(tmp_path, image, "a.png")))
    assert tuple(result[0, 0]) == (255, 0, 0)
    assert tuple(result[4, 4]) == (255, 255, 255)


def test_la_and_palette_with_transparency(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))
    assert tuple(np.asarray(open_image(save(tmp_path, la, "la.png")))[0, 0]) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1
    assert tuple(np.asarray(open_image(save(tmp_path, palette, "p.png", transparency=1)))[0, 0]) == (255, 255, 255)


def test_16_bit_grey_is_rescaled_not_clipped(tmp_path):
    values = np.full((4, 4), 32768, dtype=np.uint16)  # mid grey in 16 bits
    image = Image.fromarray(values)
    result = np.asarray(open_image(save(tmp_path, image, "g16.png")))
    assert 120 <= result[0, 0, 0] <= 135


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif.tobytes())
    assert open_image(path).size == (10, 30)


@pytest.mark.parametrize("content", [b"", b"this is text, not a picture", None])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a truncated PNG
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
        content = buffer.getvalue()[:60]
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.png"):
        open_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_image(tmp_path / "nope.png")


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    path = save(tmp_path, Image.new("RGB", (100, 100)), "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses over twice this
    with pytest.raises(DataError, match="big.png"):
        open_image(path)
