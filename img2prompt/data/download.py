"""Downloading DiffusionDB (the original's ``download_data`` step), safely.

DiffusionDB 2M publishes ``images/part-NNNNNN.zip`` (1,000 PNGs + ``part-NNNNNN.json`` with
prompt, seed, steps, cfg, sampler each) and ``metadata.parquet`` (one row per image, with
NSFW scores). Files download into ``OUT/downloads/`` as ``NAME.partial`` and only take their
final name once whole: their size matches what the server announced and an archive passes
its CRC check. An interrupted download resumes with an HTTP range request; a connection cut
mid-file is retried from where it stopped; a partial file is locked while it grows, so two
downloads never append to one file. Then the archives are imported into ``OUT``
(``importers``) and the metadata's extra fields are joined as columns. ``OUT/downloads`` is
kept when ``--force`` imports anew.
"""

import os
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path

import pandas as pd

from img2prompt.data.archives import check_archive
from img2prompt.data.importers import DatasetWriter, import_diffusiondb_archives
from img2prompt.errors import DataError, shown
from img2prompt.progress import progress_bar
from img2prompt.storage.files import fsync_file
from img2prompt.storage.ownership import lock, record_write

DOWNLOADS_DIR = "downloads"

DIFFUSIONDB_URL = "https://huggingface.co/datasets/poloclub/diffusiondb/resolve/main"
METADATA_FILE = "metadata.parquet"
METADATA_COLUMNS = ("width", "height", "timestamp", "image_nsfw", "prompt_nsfw")
LAST_PART = 2000
CHUNK = 1 << 16
RETRIES = 5


def parse_parts(text: str) -> list:
    """"1-5" or "1,3,8-9" -> part numbers (DiffusionDB 2M has parts 1 to 2000)."""
    parts = set()
    try:
        for piece in str(text).split(","):
            low, _, high = piece.strip().partition("-")
            parts.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise DataError(f"--parts '{text}': use numbers and ranges such as 1-5 or 1,3,8-9.") from None
    if not parts or min(parts) < 1 or max(parts) > LAST_PART:
        raise DataError(f"--parts '{text}': DiffusionDB's parts are numbered 1 to {LAST_PART}.")
    return sorted(parts)


def _request(url, start):
    request = urllib.request.Request(url, headers={"User-Agent": "img2prompt"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(request, timeout=60)


def _expected_total(response, start):
    """The full file size the response announces (None when it does not say)."""
    content_range = response.headers.get("Content-Range")  # "bytes 100-999/1000"
    if response.status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download_file(url, dest, progress=True, check=None) -> Path:
    """Fetch ``url`` to ``dest`` through ``dest.partial``, resuming and retrying; ``check``
    (a function of the finished partial file) may refuse it. Returns ``dest``."""
    dest = Path(dest)
    if dest.is_file():
        return dest  # only whole, checked files ever get this name
    partial = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with lock(dest.with_name(f".{dest.name}.lock"), f"the download of {partial}"):
        record_write(partial)
        record_write(dest)
        return _download(url, dest, partial, progress, check)


def _download(url, dest, partial, progress, check):
    for attempt in range(1, RETRIES + 1):
        start = partial.stat().st_size if partial.exists() else 0
        try:
            with _request(url, start) as response:
                if start and response.status != 206:
                    start = 0  # the server ignored the range: start over
                total = _expected_total(response, start)
                with open(partial, "ab" if start else "wb") as out, \
                        progress_bar(total, "B", progress, dest.name) as bar:
                    bar.update(start)
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            size = partial.stat().st_size
            if total is not None and size != total:
                raise HTTPException(f"got {size} of {total} bytes")
            break
        except urllib.error.HTTPError as error:
            if error.code == 416 and partial.exists():  # the partial file is already whole
                break
            raise DataError(f"{url}: HTTP {error.code} {error.reason}. Check --parts, or point "
                            "--base-url at a mirror that has the file.") from None
        except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as error:
            if attempt == RETRIES:
                raise DataError(f"{url}: download failed after {RETRIES} attempts ({error}); "
                                f"run the command again to resume from {partial}.") from None
            time.sleep(min(2 ** attempt * 0.1, 5))
    if check:
        try:
            check(partial)
        except DataError:
            partial.unlink(missing_ok=True)  # never resume onto a corrupt file
            raise
    fsync_file(partial)  # whole on disk before it takes the name that says so
    os.replace(partial, dest)
    return dest


def checked_archive(path):
    """A downloaded part must be whole: every member within the limits, CRC checked."""
    try:
        check_archive(path)
    except DataError as error:
        raise DataError(f"{error} A corrupt archive: the download was deleted; run again to "
                        "download it anew.") from None


def download_diffusiondb(out, parts="1", base_url=DIFFUSIONDB_URL, drop_nsfw=None,
                         on_error="fail", force=False, progress=True, log=print) -> dict:
    """Download DiffusionDB parts and metadata into ``out`` as a dataset folder.

    ``drop_nsfw``: drop the images whose ``image_nsfw`` or ``prompt_nsfw`` score in the
    metadata is at least this value (None keeps every image)."""
    out, base_url = Path(out), base_url.rstrip("/")
    downloads = out / DOWNLOADS_DIR
    numbers = parse_parts(parts)
    # claims OUT and refuses an existing dataset before any download
    with DatasetWriter(out, on_error, force, keep=(f"{DOWNLOADS_DIR}/",)) as writer:
        metadata_path = download_file(f"{base_url}/{METADATA_FILE}", downloads / METADATA_FILE, progress)
        archives = []
        for number in numbers:
            name = f"part-{number:06d}.zip"
            archives.append(download_file(f"{base_url}/images/{name}", downloads / name, progress,
                                          check=checked_archive))
            log(f"{name}: downloaded and checked")
        import_diffusiondb_archives(archives, writer)
        dropped = _join_metadata(writer, metadata_path, drop_nsfw)
        summary = writer.finish()
    return {**summary, "dropped_nsfw": dropped}


def _join_metadata(writer, metadata_path, drop_nsfw) -> int:
    """Add the metadata's columns to the imported rows; drop (and delete) NSFW-flagged images."""
    try:
        metadata = pd.read_parquet(metadata_path)
        names = metadata["image_name"].astype(str)
    except Exception as error:  # pyarrow raises many types for bad files
        raise DataError(f"{metadata_path}: unreadable metadata table ({type(error).__name__}: "
                        f"{error}); delete it and run again.") from None
    repeated = names.duplicated()
    for name in names[repeated].unique():
        writer.reject(f"{metadata_path}: image_name {shown(name)}", "appears more than once in the "
                      "metadata table; its first row is used.", "")
    metadata = metadata[~repeated].set_index(names[~repeated])
    table = pd.DataFrame(writer.rows)
    if table.empty:
        return 0
    file_names = table["imgId"] + ".png"
    for column in METADATA_COLUMNS:
        if column in metadata.columns:
            values = file_names.map(metadata[column]).astype(object)
            table[column] = values.where(file_names.isin(metadata.index), "")
    writer.rows = table.to_dict("records")
    if drop_nsfw is None:
        return 0
    scores = [pd.to_numeric(table.get(c, pd.Series(dtype=float)), errors="coerce")
              for c in ("image_nsfw", "prompt_nsfw")]
    flagged = table.loc[(scores[0] >= drop_nsfw) | (scores[1] >= drop_nsfw), "imgId"]
    writer.drop(flagged)
    return len(flagged)
