"""Hostile input: every bad file or row is a clear error (``--on-error fail``) or a recorded
skip (``--on-error skip`` → rejects.csv), never a silent loss or a crash deep in a library."""

import io

import pandas as pd
import pytest
from PIL import Image, ImageFile

from img2prompt.cli import main
from img2prompt.data.dataset import load_dataset, validate_dataset
from img2prompt.data.images import open_image
from img2prompt.encoders.text import metric_encoder
from img2prompt.errors import DataError


def png_bytes(size=(16, 16), color=(200, 40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


HOSTILE_FILES = {  # imgId -> (file name, bytes)
    "empty": ("empty.png", b""),
    "cut_png": ("cut_png.png", png_bytes((64, 64))[:60]),
    "cut_jpeg": ("cut_jpeg.jpg", jpeg_bytes()[:200]),
    "text": ("text.png", b"this is not an image\n"),
}


@pytest.fixture
def hostile_dataset(tmp_path):
    """Four good images and one row for each kind of bad input."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = ["imgId,prompt,extra"]
    for index in range(4):
        (root / "images" / f"good{index}.png").write_bytes(png_bytes(color=(60 * index, 80, 90)))
        rows.append(f"good{index},a good image number {index},x")
    for img_id, (name, content) in HOSTILE_FILES.items():
        (root / "images" / name).write_bytes(content)
        rows.append(f"{img_id},a prompt,x")
    (root / "secret.png").write_bytes(png_bytes())  # outside images/: must never be read
    rows += ["../secret,an escape attempt,x", "sub/dir,a path,x", "missing,no file for this,x",
             "blank,   ,x", "good0,a duplicate id,x"]
    (root / "images" / "blank.png").write_bytes(png_bytes())
    (root / "images" / "unreferenced.png").write_bytes(png_bytes())
    (root / "prompts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_fail_policy_names_every_problem(hostile_dataset):
    problems = [str(p) for p in validate_dataset(hostile_dataset)]
    text = "\n".join(problems)
    for expected in ("empty.png: unreadable image", "cut_png.png: unreadable image",
                     "cut_jpeg.jpg: unreadable image", "text.png: unreadable image",
                     "imgId '../secret' contains a path separator",
                     "imgId 'sub/dir' contains a path separator", "no image for imgId 'missing'",
                     "empty prompt for imgId 'blank'", "duplicate imgId 'good0'",
                     "warning: " + str(hostile_dataset / "images" / "unreferenced.png")):
        assert expected in text, expected
    with pytest.raises(DataError, match="(?s)problem\\(s\\) in the dataset.*--on-error skip"):
        load_dataset(hostile_dataset)


def test_skip_policy_keeps_the_good_rows_and_records_the_rest(hostile_dataset):
    dataset = load_dataset(hostile_dataset, on_error="skip")
    # a cut PNG whose header reads is kept here: its pixels are first decoded when it is embedded,
    # which leaves it out then (next test)
    assert dataset.ids == ["good0", "good1", "good2", "good3", "cut_png"]
    assert len(dataset.rejects) == 8  # 3 bad files, 2 unsafe ids, missing, blank, duplicate
    assert all(p.severity == "error" for p in dataset.rejects)


def test_ids_with_path_separators_are_never_read(hostile_dataset, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    load_dataset(hostile_dataset, on_error="skip")
    assert not any("secret" in path for path in opened)


def test_cli_skip_writes_rejects_and_a_summary(hostile_dataset, tmp_path, cache_dir, capsys):
    rejects = tmp_path / "rejects.csv"
    code = main(["embed", "--data", str(hostile_dataset), "--on-error", "skip", "--rejects", str(rejects),
                 "--cache-dir", str(cache_dir), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "kept 4 images, skipped 9" in captured.err
    table = pd.read_csv(rejects)
    assert list(table.columns) == ["item", "problem", "fix"] and len(table) == 9
    assert table["problem"].str.contains("not a readable image").sum() == 4  # 3 by the header, 1 decoded
    assert main(["embed", "--data", str(hostile_dataset), "--cache-dir", str(cache_dir), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_truncated_image_that_passes_the_header_check_stops_embedding_with_its_name(tmp_path, cache_dir, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    whole = png_bytes((64, 64))
    (root / "images" / "a.png").write_bytes(png_bytes())
    (root / "images" / "b.png").write_bytes(whole[:len(whole) - 30])  # header intact, data cut
    (root / "prompts.csv").write_text("imgId,prompt\na,one\nb,two\n")
    assert main(["embed", "--data", str(root), "--cache-dir", str(cache_dir), "--quiet"]) == 2
    assert "b.png: not a readable image" in capsys.readouterr().err


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(DataError, match="40x30 = 1,200 pixels is over the limit of 1,000.*--max-pixels"):
        open_image(path, max_pixels=1000)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "big.png").write_bytes(path.read_bytes())
    (root / "prompts.csv").write_text("imgId,prompt\nbig,a large image\n")
    with pytest.raises(DataError, match="over the limit"):
        load_dataset(root, max_pixels=1000)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    red, green, blue = open_image(path).getpixel((8, 8))
    assert red > 200 and blue < 60


def test_csv_with_bom_quoted_newlines_and_extra_columns(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(png_bytes())
    (root / "images" / "b.png").write_bytes(png_bytes())
    text = 'imgId,prompt,seed,notes\na,"first line\nsecond line, with comma",42,x\nb,plain,7,"y"\n'
    (root / "prompts.csv").write_bytes("\ufeff".encode() + text.encode())
    dataset = load_dataset(root)
    assert dataset.ids == ["a", "b"]
    assert dataset.prompts[0] == "first line\nsecond line, with comma"


def test_prompts_over_the_token_limit_are_counted(tmp_path):
    encoder = metric_encoder()
    long_prompt = "a very detailed " * 200
    assert encoder.count_truncated([long_prompt, "a short prompt", long_prompt]) == 2
    assert encoder.encode([long_prompt]).shape == (1, 384)  # truncated, not an error


def test_the_data_notebook_shows_an_image_that_does_not_decode_as_its_reason(tmp_path):
    from img2prompt.reports.plots import image_grid
    (tmp_path / "good.png").write_bytes(png_bytes())
    whole = png_bytes((64, 64))
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) - 30])  # passes the header check of loading
    figure = image_grid([tmp_path / "good.png", tmp_path / "cut.png"], ["one", "two"])
    texts = [text.get_text() for ax in figure.axes for text in ax.texts]
    assert len(texts) == 1 and "unreadable image" in texts[0] and "cut.png" in texts[0]


def test_an_image_found_unreadable_by_a_skip_run_is_named_by_a_fail_run_from_the_cache(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    whole = png_bytes((64, 64))
    (root / "images" / "a.png").write_bytes(png_bytes())
    (root / "images" / "b.png").write_bytes(whole[:len(whole) - 30])
    (root / "prompts.csv").write_text("imgId,prompt\na,one\nb,two\n")
    cache = ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["embed", "--data", str(root), "--on-error", "skip", *cache]) == 0
    assert "kept 1 images, skipped 1" in capsys.readouterr().err
    assert main(["embed", "--data", str(root), *cache]) == 2
    assert "b.png: not a readable image" in capsys.readouterr().err
