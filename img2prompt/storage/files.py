"""Atomic file writes: write a temporary file beside the target, fsync it, then ``os.replace``.

An interrupted run or a power cut therefore never leaves a half-written (or empty) file
under the final name. Each write is first recorded in the manifest of the project folder
that holds it (``ownership``), so that clearing the folder later removes exactly what the
project wrote.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path

from img2prompt.storage.ownership import FILE_MODE, record_write


CSV_CHUNK = 1000  # rows formatted at once when writing a CSV (pandas' default grows with the columns)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record_write(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)  # outputs get the usual mode
        fsync_file(tmp)  # the bytes reach the disk before the name does
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path, frame):
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, chunksize=CSV_CHUNK)
