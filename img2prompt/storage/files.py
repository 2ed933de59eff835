"""Atomic file writes: write a temporary file beside the target, fsync it, then ``os.replace``.

An interrupted run or a power cut therefore never leaves a half-written (or empty) file
under the final name. Each write is first recorded in the manifest of the project folder
that holds it (``ownership``), so that clearing the folder later removes exactly what the
project wrote.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from img2prompt.errors import RunError, StorageError
from img2prompt.storage.ownership import FILE_MODE, record_write

CSV_CHUNK = 1000  # rows formatted at once when writing a CSV (pandas' default grows with the columns)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success move it onto ``path``.
    An OSError while writing (a full disk) is a StorageError naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(path, error) from None
    record_write(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise storage_error(path, error) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)  # outputs get the usual mode
        fsync_file(tmp)  # the bytes reach the disk before the name does
        os.replace(tmp, path)
    except OSError as error:
        raise storage_error(path, error, os.path.getsize(tmp) if os.path.exists(tmp) else None) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def storage_error(path, error, needed=None) -> StorageError:
    """The error for ``path`` that could not be written: which file, why (a full disk: how
    much it needed and how much is free), and that the file as it was stays."""
    path = Path(path)
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
    if full:
        try:
            free = f", {shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free there"
        except OSError:
            free = ""
        size = f" (it needed about {needed / 1e6:,.1f} MB{free})" if needed else f" ({free[2:]})" if free else ""
        why = f"the disk is full{size}"
    else:
        why = getattr(error, "strerror", None) or str(error)
    return StorageError(f"{path}: could not be written: {why}. Nothing was replaced: the file stays as it "
                        "was before this command, if it existed. Free some space or choose another folder, "
                        "then run this again.")



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


_digests = {}  # (real path, size, modification time) -> sha256 of the file's bytes


def content_digest(path) -> str:
    """sha256 of a file's bytes: what identifies weights wherever they are installed (a cache
    key or a model's provenance must not change with the folder or the modification time).
    Hashed once per process while the file stays the same."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        with open(path, "rb") as handle:
            _digests[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _digests[key]


def read_json(path, fix):
    """The JSON object in ``path``; RunError naming the file and ``fix`` (the command that
    makes it anew) when it is missing, unreadable or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: not found. {fix}") from None
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        raise RunError(f"{path}: unreadable ({type(error).__name__}: {error}). {fix}") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: does not hold a JSON object. {fix}")
    return value


def read_csv(path, fix, columns=(), **options):
    """The table in ``path`` (pandas ``read_csv`` with ``options``); RunError naming the file
    and ``fix`` when it is missing, unreadable or lacks one of ``columns``."""
    import pandas as pd
    path = Path(path)
    try:
        frame = pd.read_csv(path, **options)
    except FileNotFoundError:
        raise RunError(f"{path}: not found. {fix}") from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise RunError(f"{path}: unreadable ({type(error).__name__}: {str(error).strip()}). {fix}") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise RunError(f"{path}: has no column {', '.join(missing)}. {fix}")
    return frame
