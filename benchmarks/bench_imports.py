"""Import benchmark: hostile archives in bounded memory, archive indexes in linear time.

    .venv/bin/python benchmarks/bench_imports.py [--entries 20000,50000,200000]

1. A DiffusionDB part archive holding one good PNG and a member of 1 GiB of zeros (4.6 MB
   compressed) is imported with ``--on-error skip`` in a fresh process; its peak RSS (the
   kernel's VmHWM for that process) against the 500 MB target, and the same for a CSV
   import beside a 1 GiB sparse "image" file.
2. Part archives whose JSON table lists N entries (one good PNG; the others 1-byte members
   with an empty prompt, matched to their member and rejected before any copy): seconds
   of ``data import`` for each N, and seconds per 1,000 entries, which stay flat when the
   member lookup is linear (target: 200,000 entries in under 10 s).
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

MEMORY_TARGET_MB = 500
INDEX_TARGET_S = 10.0


def import_in_fresh_process(src, out):
    """(exit status, peak RSS in MB, seconds) of ``img2prompt data import SRC --out OUT``."""
    script = ("import re, sys; from img2prompt.cli import main; rc = main(sys.argv[1:]); "
              "status = open('/proc/self/status').read(); "
              "print(int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) // 1024); sys.exit(rc)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, "data", "import", str(src), "--out",
                             str(out), "--on-error", "skip"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = re.findall(r"^(\d+)$", result.stdout, re.M)
    if not peak:
        sys.exit(f"the import failed: {result.stderr[-2000:]}")
    return result.returncode, int(peak[-1]), seconds


def bomb_archive(folder: Path) -> Path:
    path = folder / "part-000001.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bundle:
        good = folder / "good.png"
        Image.new("RGB", (32, 32), (200, 30, 30)).save(good)
        bundle.write(good, "good.png")
        with bundle.open("bomb.png", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(1024):
                member.write(block)
        bundle.writestr("part-000001.json", json.dumps({"good.png": {"p": "a red square"},
                                                        "bomb.png": {"p": "zeros"}}))
    return path


def sparse_csv(folder: Path) -> Path:
    (folder / "images").mkdir()
    Image.new("RGB", (32, 32), (30, 30, 200)).save(folder / "images" / "fine.png")
    with open(folder / "images" / "huge.png", "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(1 << 30)
    (folder / "list.csv").write_text("imgId,prompt\nfine,a blue square\nhuge,a huge file\n")
    return folder / "list.csv"


def index_archive(folder: Path, entries: int) -> Path:
    """``entries`` members and table rows: one good PNG, the rest rejected before any copy."""
    path = folder / f"part-{entries:06d}.zip"
    good = folder / "good.png"
    Image.new("RGB", (32, 32), (20, 160, 20)).save(good)
    table = {f"{index}.png": {"p": ""} for index in range(1, entries)}
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.write(good, "0.png")
        for index in range(1, entries):
            bundle.writestr(f"{index}.png", b"x")
        bundle.writestr(f"part-{entries:06d}.json", json.dumps({"0.png": {"p": "a green square"}, **table}))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="20000,50000,200000",
                        help="archive sizes to index, comma-separated (default: %(default)s)")
    sizes = [int(n) for n in parser.parse_args().entries.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("measure | result | target")
        print("---|---|---")
        for name, make in (("1 GiB zip member (zip bomb)", bomb_archive), ("1 GiB sparse image file (CSV)", sparse_csv)):
            folder = tmp / name.split()[3]
            folder.mkdir()
            status, peak, _ = import_in_fresh_process(make(folder), folder / "out")
            skipped = (folder / "out" / "rejects.csv").is_file()
            print(f"{name}: peak RSS of the import, skipped={skipped}, exit {status} | {peak} MB | "
                  f"< {MEMORY_TARGET_MB} MB")
        rows = []
        for entries in sizes:
            archive = index_archive(tmp, entries)
            status, peak, seconds = import_in_fresh_process(archive, tmp / f"out-{entries}")
            rows.append((entries, seconds))
            target = f"< {INDEX_TARGET_S:.0f} s" if entries == 200_000 else ""
            print(f"index of {entries:,} entries: `data import`, exit {status} | "
                  f"{seconds:.2f} s ({1000 * seconds / entries:.3f} s per 1,000 entries; peak "
                  f"{peak} MB) | {target}")
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            ratio = (last[1] / last[0]) / (first[1] / first[0])
            print(f"seconds per entry, {last[0]:,} against {first[0]:,} entries | {ratio:.2f} | "
                  "about 1 (linear)")


if __name__ == "__main__":
    main()
