"""Imports: prompts inside PNG files (DiffusionDB, AUTOMATIC1111), DiffusionDB part archives,
CSVs with other column names, and the shared real sets through import and predict."""

import io
import json
import zipfile

import pandas as pd
import pytest
from PIL import Image, PngImagePlugin

from img2prompt.cli import main
from img2prompt.data.dataset import load_dataset
from img2prompt.data.importers import a1111_fields, import_dataset
from img2prompt.errors import DataError
from img2prompt.predict import Predictor

from .conftest import shared_set

A1111 = ("a cat astronaut, highly detailed\nNegative prompt: blurry, ugly\n"
         "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: abc")


def png(path, text=None, color=(200, 30, 30)):
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), color).save(path, pnginfo=info)
    return path


def png_bytes(color=(10, 200, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a1111_parameters_are_split_into_prompt_and_settings():
    fields = a1111_fields(A1111)
    assert fields == {"prompt": "a cat astronaut, highly detailed", "negative_prompt": "blurry, ugly",
                      "step": "20", "sampler": "Euler a", "cfg": "7", "seed": "1234", "size": "512x512"}
    assert a1111_fields("just a prompt\nSteps: 30, Seed: 9")["prompt"] == "just a prompt"
    assert a1111_fields("only the prompt") == {"prompt": "only the prompt"}


def test_png_text_chunks_import(tmp_path):
    src = tmp_path / "pngs"
    png(src / "ddb.png", {"prompt": "a castle in the clouds ", "seed": "42"})
    png(src / "webui image.png", {"parameters": A1111})
    png(src / "bare.png")
    with pytest.raises(DataError, match="bare.png: no prompt in the file.*--on-error skip"):
        import_dataset(src, tmp_path / "fail")
    summary = import_dataset(src, tmp_path / "out", on_error="skip")
    assert (summary["kept"], summary["skipped"]) == (2, 1)
    dataset = load_dataset(tmp_path / "out")
    assert sorted(dataset.prompts) == ["a castle in the clouds", "a cat astronaut, highly detailed"]
    table = pd.read_csv(tmp_path / "out" / "prompts.csv", dtype=str, keep_default_na=False)
    assert "webui_image" in set(table["imgId"])  # unsafe characters replaced
    assert set(table.loc[table["imgId"] == "ddb", "seed"]) == {"42"}
    assert set(table.loc[table["imgId"] == "webui_image", "negative_prompt"]) == {"blurry, ugly"}
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert rejects["item"].str.endswith("bare.png").all()
    with pytest.raises(DataError, match="already holds a dataset.*--force"):
        import_dataset(src, tmp_path / "out", on_error="skip")
    assert import_dataset(src, tmp_path / "out", on_error="skip", force=True)["kept"] == 2


def diffusiondb_part(path, entries, extra_members=()):
    """A part archive in DiffusionDB's layout: PNGs + part-NNNNNN.json (p, se, st, c, sa)."""
    with zipfile.ZipFile(path, "w") as bundle:
        table = {}
        for name, prompt, content in entries:
            if content is not None:
                bundle.writestr(name, content)
            table[name] = {"p": prompt, "se": 7, "st": 50, "c": 7.5, "sa": "k_lms"}
        for name, content in extra_members:
            bundle.writestr(name, content)
        bundle.writestr(f"{path.stem}.json", json.dumps(table))
    return path


def test_diffusiondb_archives_import(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    diffusiondb_part(parts / "part-000001.zip", [
        ("a1.png", "a red fox, oil painting", png_bytes()),
        ("a2.png", "a blue whale", png_bytes((0, 0, 200))),
        ("gone.png", "listed but absent", None),
        ("../evil.png", "zip slip", png_bytes()),
    ])
    (parts / "part-000002.zip").write_bytes(b"PK\x03\x04 truncated")
    summary = import_dataset(parts, tmp_path / "out", on_error="skip")
    assert (summary["kept"], summary["skipped"]) == (2, 3)
    table = pd.read_csv(tmp_path / "out" / "prompts.csv")
    assert list(table.columns) == ["imgId", "prompt", "seed", "step", "cfg", "sampler", "part"]
    assert table["part"].unique().tolist() == ["part-000001"] and table["cfg"].tolist() == [7.5, 7.5]
    problems = " ".join(pd.read_csv(tmp_path / "out" / "rejects.csv")["problem"])
    assert "not in the archive" in problems and "path in it" in problems
    assert "not a readable DiffusionDB part archive" in problems
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "evil.png").exists()


def test_csv_with_other_column_names(tmp_path):
    src = tmp_path / "src"
    png(src / "pics" / "one.png")
    png(src / "pics" / "two.png", color=(0, 90, 0))
    png(tmp_path / "outside.png")
    (src / "captions.csv").write_text("file,caption,author\npics/one.png,a red square,me\n"
                                      "pics/two.png,a green square,you\n../outside.png,escape,x\n")
    summary = import_dataset(src / "captions.csv", tmp_path / "out", on_error="skip",
                             prompt_col="caption", path_col="file")
    assert (summary["kept"], summary["skipped"]) == (2, 1)
    table = pd.read_csv(tmp_path / "out" / "prompts.csv")
    assert table["prompt"].tolist() == ["a red square", "a green square"]
    assert table["author"].tolist() == ["me", "you"]  # extra columns kept
    assert "leaves the CSV's folder" in pd.read_csv(tmp_path / "out" / "rejects.csv")["problem"][0]
    with pytest.raises(DataError, match="no column\\(s\\) text.*--prompt-col"):
        import_dataset(src / "captions.csv", tmp_path / "out2", prompt_col="text", path_col="file")


def test_cli_import_by_id_column(tmp_path, capsys):
    png(tmp_path / "images" / "x1.png")
    (tmp_path / "meta.csv").write_text("key,text\nx1,a red square\nx2,missing image\n")
    assert main(["data", "import", str(tmp_path / "meta.csv"), "--out", str(tmp_path / "out"),
                 "--id-col", "key", "--prompt-col", "text", "--on-error", "skip"]) == 0
    assert "kept 1 images, skipped 1" in capsys.readouterr().out
    assert main(["data", "import", str(tmp_path / "meta.csv"), "--out", str(tmp_path / "out2"),
                 "--id-col", "key", "--prompt-col", "text"]) == 2
    assert "no image for id 'x2'" in capsys.readouterr().err


@pytest.mark.parametrize("name, source, expected", [
    ("diffusiondb-sample", "images", 6),           # six PNGs carry their prompt inside
    ("coco-ccby-sample", "prompts.csv", 51),       # JPEG photos with a CSV
])
def test_shared_real_sets_import_and_predict(name, source, expected, tmp_path, trained_run):
    summary = import_dataset(shared_set(name) / source, tmp_path / name, on_error="skip")
    assert summary["kept"] == expected
    dataset = load_dataset(tmp_path / name)
    results = Predictor(trained_run["run"]).predict(dataset.paths[:3])
    assert [r["image"] for r in results] == [str(p) for p in dataset.paths[:3]]
    assert all(r["prompt"] and -1 <= r["similarity"] <= 1 for r in results)
