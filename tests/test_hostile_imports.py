"""Hostile imports and archives: every bad source is a recorded skip (``--on-error skip``)
or one clear message (``fail``), in bounded memory, never a traceback, a silent loss or a
file read from outside the source."""

import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageFile

from img2prompt.cli import main
from img2prompt.data.dataset import load_dataset, validate_dataset
from img2prompt.errors import DataError

from .test_download import publish, server  # the loopback server fixture
from .test_imports import diffusiondb_part, png, png_bytes

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT_MB = 500


def import_cli(src, out, *options):
    return main(["data", "import", str(src), "--out", str(out), *options])


def rejects(out) -> str:
    return (Path(out) / "rejects.csv").read_text()


def peak_rss_mb_of_import(src, out, *options):
    """``data import`` in a fresh process; (exit status, its peak RSS in MB, stderr). The peak
    is the kernel's VmHWM: getrusage would report the forking parent's peak (Linux keeps
    ru_maxrss across exec), and pytest with torch loaded is larger than the limit."""
    script = ("import re, sys; from img2prompt.cli import main; rc = main(sys.argv[1:]); "
              "status = open('/proc/self/status').read(); "
              "print(int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) // 1024); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", script, "data", "import", str(src), "--out",
                             str(out), *options], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return result.returncode, int(result.stdout.strip().splitlines()[-1]), result.stderr


def set_member_header(path, member, flag_bits=None, method=None):
    """Rewrite a member's general-purpose flags or compression method in both of the zip's
    headers (zipfile cannot write encrypted members or unknown methods itself)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = 0
        while (at := data.find(signature, start)) >= 0:
            start = at + 4
            length = struct.unpack_from("<H", data, at + name_at - (4 if signature == b"PK\x03\x04" else 18))[0]
            if bytes(data[at + name_at:at + name_at + length]) != name:
                continue
            if flag_bits is not None:
                struct.pack_into("<H", data, at + flag_at, flag_bits)
            if method is not None:
                struct.pack_into("<H", data, at + flag_at + 2, method)
    path.write_bytes(bytes(data))


def part_with(path, table_bytes, members):
    """A part archive whose JSON table is exactly ``table_bytes``."""
    with zipfile.ZipFile(path, "w") as bundle:
        for name, content in members:
            bundle.writestr(name, content)
        bundle.writestr(f"{path.stem}.json", table_bytes)
    return path


GOOD = ("good.png", "a good picture", png_bytes((10, 120, 30)))


# --- 4. CSV columns that share a name with the output -------------------------------------------

def test_csv_columns_named_imgid_or_prompt_never_override_the_chosen_ones(tmp_path):
    png(tmp_path / "src" / "images" / "k1.png")
    (tmp_path / "src" / "meta.csv").write_text("key,text,imgId,prompt\nk1,the real prompt,other-id,WRONG\n")
    assert import_cli(tmp_path / "src" / "meta.csv", tmp_path / "out", "--id-col", "key",
                      "--prompt-col", "text") == 0
    table = pd.read_csv(tmp_path / "out" / "prompts.csv", dtype=str)
    assert table.loc[0, "prompt"] == "the real prompt" and table.loc[0, "imgId"] == "k1"
    assert table.loc[0, "source_prompt"] == "WRONG" and table.loc[0, "source_imgId"] == "other-id"


# --- 5. size limits, memory bounded ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb_part(tmp_path_factory):
    """part-000001.zip: one good PNG and a member of 1 GiB of zeros (4.6 MB compressed)."""
    path = tmp_path_factory.mktemp("bomb") / "part-000001.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        bundle.writestr(GOOD[0], GOOD[2])
        with bundle.open("bomb.png", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(1024):
                member.write(block)
        bundle.writestr("part-000001.json", json.dumps({
            GOOD[0]: {"p": GOOD[1]}, "bomb.png": {"p": "nothing but zeros"}}))
    return path


def test_a_zip_bomb_member_is_a_recorded_skip_in_bounded_memory(bomb_part, tmp_path):
    status, peak_mb, error = peak_rss_mb_of_import(bomb_part, tmp_path / "out", "--on-error", "skip")
    assert status == 0, error
    assert peak_mb < MEMORY_LIMIT_MB, f"peak RSS {peak_mb} MB"
    assert "bomb.png" in rejects(tmp_path / "out") and "1,073,741,824 bytes" in rejects(tmp_path / "out")
    assert load_dataset(tmp_path / "out").prompts == [GOOD[1]]
    assert import_cli(bomb_part, tmp_path / "fail") == 2


def test_a_member_that_expands_too_far_is_refused_from_the_index(tmp_path, capsys):
    part = tmp_path / "part-000001.zip"
    with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("zeros.png", bytes(100 << 20))  # under the size limit, 1,000:1 and more
        bundle.writestr("part-000001.json", json.dumps({"zeros.png": {"p": "zeros"}}))
    assert import_cli(part, tmp_path / "out") == 2
    assert "(a zip bomb?)" in capsys.readouterr().err


def test_an_oversized_json_table_is_refused_unread(tmp_path, capsys):
    table = json.dumps({GOOD[0]: {"p": GOOD[1]}}).encode() + b" " * (65 << 20)  # 65 MB
    part = part_with(tmp_path / "part-000001.zip", table, [GOOD[::2]])
    assert import_cli(part, tmp_path / "out") == 2
    assert "over the limit" in capsys.readouterr().err


def test_a_huge_sparse_image_file_is_refused_from_its_size(tmp_path):
    src = tmp_path / "src"
    png(src / "images" / "fine.png")
    with open(src / "images" / "huge.png", "wb") as handle:  # 1 GiB, sparse: nothing on disk
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(1 << 30)
    (src / "list.csv").write_text("imgId,prompt\nfine,a fine picture\nhuge,a huge file\n")
    status, peak_mb, error = peak_rss_mb_of_import(src / "list.csv", tmp_path / "out", "--on-error", "skip")
    assert status == 0, error
    assert peak_mb < MEMORY_LIMIT_MB, f"peak RSS {peak_mb} MB"
    assert "1,073,741,824 bytes, over the limit" in rejects(tmp_path / "out")


# --- 6. hostile archives: recorded skips or one message ------------------------------------------------

def encrypted(path):
    part = diffusiondb_part(path, [GOOD, ("secret.png", "locked", png_bytes())])
    set_member_header(part, "secret.png", flag_bits=0x1)
    return part, "secret.png", "encrypted"


def unknown_method(path):
    part = diffusiondb_part(path, [GOOD, ("ppmd.png", "packed oddly", png_bytes())])
    set_member_header(part, "ppmd.png", method=98)  # PPMd: zipfile cannot read it
    return part, "ppmd.png", "compression method 98"


def table_is_a_list(path):
    return part_with(path, json.dumps([{"p": "x"}]).encode(), [GOOD[::2]]), path.name, "holds a list"


def entry_not_an_object(path):
    table = json.dumps({GOOD[0]: {"p": GOOD[1]}, "odd.png": "just a string"}).encode()
    return part_with(path, table, [GOOD[::2], ("odd.png", png_bytes())]), "odd.png", "not an object"


def table_not_utf8(path):
    return part_with(path, '{"good.png": {"p": "caf\xe9"}}'.encode("latin-1"), [GOOD[::2]]), path.name, "not UTF-8"


def prompt_not_text(path):
    table = json.dumps({GOOD[0]: {"p": GOOD[1]}, "num.png": {"p": 42}}).encode()
    return part_with(path, table, [GOOD[::2], ("num.png", png_bytes())]), "num.png", "no prompt text"


def deeply_nested_table(path):
    return part_with(path, b"[" * 100_000, [GOOD[::2]]), path.name, "not valid JSON"


@pytest.mark.parametrize("make", [encrypted, unknown_method, table_is_a_list, entry_not_an_object,
                                  table_not_utf8, prompt_not_text, deeply_nested_table])
def test_a_hostile_archive_is_a_recorded_skip_or_one_message(make, tmp_path, capsys):
    part, culprit, reason = make(tmp_path / "part-000001.zip")
    assert import_cli(part, tmp_path / "fail") == 2  # one message, no traceback
    message = capsys.readouterr().err
    assert culprit in message and reason in message and "Traceback" not in message
    assert import_cli(part, tmp_path / "skip", "--on-error", "skip") in (0, 2)
    assert culprit in rejects(tmp_path / "skip") and reason in rejects(tmp_path / "skip")


def test_a_nul_byte_in_a_path_column_is_a_recorded_skip(tmp_path, capsys):
    png(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "list.csv").write_text("file,caption\na.png,a red square\nb\0.png,bad\n")
    assert import_cli(tmp_path / "src" / "list.csv", tmp_path / "out", "--path-col", "file",
                      "--prompt-col", "caption", "--on-error", "skip") == 0
    assert "NUL" in rejects(tmp_path / "out")
    assert import_cli(tmp_path / "src" / "list.csv", tmp_path / "fail", "--path-col", "file",
                      "--prompt-col", "caption") == 2
    assert "NUL" in capsys.readouterr().err


def test_a_duplicated_image_name_in_the_metadata_is_named(server, tmp_path, capsys):
    publish(server, tmp_path, (1,))
    table = pd.read_parquet(tmp_path / "metadata.parquet")
    pd.concat([table, table.iloc[[1]]]).to_parquet(tmp_path / "metadata.parquet")
    server.files["/metadata.parquet"] = (tmp_path / "metadata.parquet").read_bytes()
    args = ["data", "download", "diffusiondb", "--parts", "1", "--base-url", server.url, "--quiet"]
    assert main([*args, "--out", str(tmp_path / "fail")]) == 2
    assert "p1-1.png" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    assert "appears more than once" in rejects(tmp_path / "skip")
    assert len(load_dataset(tmp_path / "skip")) == 3


def test_a_downloaded_part_with_an_encrypted_member_is_one_message(server, tmp_path, capsys):
    publish(server, tmp_path, (1,))
    part = tmp_path / "part-000001.zip"
    set_member_header(part, "p1-1.png", flag_bits=0x1)
    server.files["/images/part-000001.zip"] = part.read_bytes()
    assert main(["data", "download", "diffusiondb", "--out", str(tmp_path / "ddb"), "--parts", "1",
                 "--base-url", server.url, "--quiet"]) == 2
    assert "p1-1.png' is encrypted" in capsys.readouterr().err


# --- 7. the pixel limit comes before any decoding ------------------------------------------------------

def png_header_only(path, width, height, text):
    """A PNG that declares ``width`` x ``height`` and a prompt, with a token image stream."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"tEXt", b"prompt\0" + text.encode("latin-1")) + chunk(b"IEND", b""))
    return path


def test_import_checks_the_pixel_limit_before_decoding(tmp_path, monkeypatch):
    src = tmp_path / "src"
    png_header_only(src / "giant.png", 12000, 12000, "a giant canvas")
    png(src / "small.png", {"prompt": "a small picture"})
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    assert import_cli(src, tmp_path / "out", "--on-error", "skip") == 0
    assert (12000, 12000) not in decoded
    assert "144,000,000 pixels is over the limit" in rejects(tmp_path / "out")
    assert import_cli(src, tmp_path / "tight", "--on-error", "skip", "--max-pixels", "100") == 2
    assert "576 pixels is over the limit of 100" in rejects(tmp_path / "tight")


def test_prompts_after_the_frames_of_an_apng_are_read_without_decoding(tmp_path, monkeypatch):
    from PIL import PngImagePlugin
    src = tmp_path / "src"
    src.mkdir()
    frames = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(5)]
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "an animated square")
    frames[0].save(src / "anim.png", save_all=True, append_images=frames[1:], pnginfo=info)
    frames_read = []
    real_seek = PngImagePlugin.PngImageFile._seek
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_seek",
                        lambda self, frame, *a, **k: frames_read.append(frame) or real_seek(self, frame, *a, **k))
    assert import_cli(src, tmp_path / "out") == 0
    assert set(frames_read) <= {0}  # only the first frame is ever decoded
    assert load_dataset(tmp_path / "out").prompts == ["an animated square"]


# --- 8. one prompt-length policy for import and load ------------------------------------------------------

def test_an_over_long_prompt_is_skipped_on_import_and_on_load(tmp_path, capsys):
    src = tmp_path / "src"
    png(src / "images" / "a.png")
    png(src / "images" / "b.png", color=(1, 2, 3))
    (src / "prompts.csv").write_text(f"imgId,prompt\na,a red square\nb,{'x' * 10_000_000}\n")
    assert import_cli(src / "prompts.csv", tmp_path / "out", "--on-error", "skip") == 0
    assert "over-long prompt" in rejects(tmp_path / "out")
    assert load_dataset(tmp_path / "out").ids == ["a"]  # what import keeps, load accepts
    dataset = load_dataset(src, on_error="skip")  # the loader: one bad row, not a failed dataset
    assert dataset.ids == ["a"] and "over-long prompt" in dataset.rejects[0].what
    with pytest.raises(DataError, match="line 3: over-long prompt"):
        load_dataset(src)
    pngs = tmp_path / "pngs"
    png(pngs / "ok.png", {"prompt": "fine"})
    png(pngs / "long.png", {"prompt": "y" * 1_000_000})
    assert import_cli(pngs, tmp_path / "pngs-out", "--on-error", "skip") == 0
    assert "long.png" in rejects(tmp_path / "pngs-out") and "over the prompt limit" in rejects(tmp_path / "pngs-out")


# --- 9. the archive's member list is read once ------------------------------------------------------------

def test_the_member_list_is_read_once_per_archive(tmp_path, monkeypatch):
    entries = [(f"{i}.png", f"picture {i}", png_bytes((i, 0, 0))) for i in range(30)]
    part = diffusiondb_part(tmp_path / "part-000001.zip", entries)
    calls = []
    for method in ("namelist", "infolist"):
        real = getattr(zipfile.ZipFile, method)
        monkeypatch.setattr(zipfile.ZipFile, method,
                            lambda self, real=real, method=method: calls.append(method) or real(self))
    assert import_cli(part, tmp_path / "out") == 0
    assert len(calls) <= 2, calls  # not once per entry: that made 40,000 entries take 41 s


# --- 10. links out of the dataset, FIFOs -----------------------------------------------------------------

def test_links_out_of_the_dataset_and_fifos_are_refused_by_the_loader(tmp_path):
    root = tmp_path / "data"
    png(root / "images" / "good.png")
    png(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "images" / "escape.png")
    os.mkfifo(root / "images" / "pipe.png")
    png(root / "inside.png")
    os.symlink(root / "inside.png", root / "images" / "linked.png")  # stays inside: fine
    (root / "prompts.csv").write_text("imgId,prompt\ngood,a\nescape,b\npipe,c\nlinked,d\n")
    problems = "\n".join(str(p) for p in validate_dataset(root))
    assert "escape.png: is a link to" in problems and "outside" in problems
    assert "pipe.png: is not a regular file" in problems
    dataset = load_dataset(root, on_error="skip")
    assert sorted(dataset.ids) == ["good", "linked"] and len(dataset.rejects) == 2


def test_links_out_of_the_source_and_fifos_are_recorded_skips_on_import(tmp_path):
    src = tmp_path / "src"
    png(src / "good.png", {"prompt": "a good one"})
    png(tmp_path / "secret.png", {"prompt": "a private picture"})
    os.symlink(tmp_path / "secret.png", src / "escape.png")
    os.mkfifo(src / "pipe.png")
    assert import_cli(src, tmp_path / "out", "--on-error", "skip") == 0
    assert load_dataset(tmp_path / "out").prompts == ["a good one"]
    listed = rejects(tmp_path / "out")
    assert "escape.png" in listed and "outside" in listed and "pipe.png" in listed


# --- 11. a dataset folder is imported through its CSV -------------------------------------------------------

def test_a_dataset_folder_imports_through_its_prompts_csv(tmp_path):
    src = tmp_path / "dataset"
    png(src / "images" / "a.png")
    png(src / "images" / "b.png", color=(0, 0, 200))
    (src / "prompts.csv").write_text("imgId,prompt,seed\na,a red square,1\nb,a blue square,2\n")
    assert import_cli(src, tmp_path / "copy") == 0
    dataset = load_dataset(tmp_path / "copy")
    assert sorted(dataset.prompts) == ["a blue square", "a red square"]


# --- 12. ids: escaped in messages, NUL named, portability warned ----------------------------------------------

def test_ids_are_escaped_named_and_checked_for_portability(tmp_path, capsys):
    root = tmp_path / "data"
    for index, name in enumerate(("A", "a", "CON", "plain")):
        png(root / "images" / f"{name}.png", color=(index * 40, 0, 0))
    (root / "prompts.csv").write_text("imgId,prompt\nA,x\na,y\nCON,z\nplain,w\n"
                                      "\x1b[2J\x1b[31mred,evil\nnul\0id,n\n", encoding="utf-8")
    assert main(["data", "validate", str(root)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "'\\x1b[2J\\x1b[31mred'" in out
    assert "contains a NUL character" in out and "path separator" not in out
    assert "differs from 'A' (line 2) only in letter case" in out
    assert "'CON' is a device name on Windows" in out


def test_imported_ids_are_unique_whatever_the_case_and_never_device_names(tmp_path):
    src = tmp_path / "src"
    png(src / "Cat.png", {"prompt": "one"})
    png(src / "sub" / "cat.png", {"prompt": "two"})
    png(src / "CON.png", {"prompt": "three"})
    assert import_cli(src, tmp_path / "out") == 0
    ids = load_dataset(tmp_path / "out").ids
    assert len({i.casefold() for i in ids}) == 3 and "CON_" in ids
