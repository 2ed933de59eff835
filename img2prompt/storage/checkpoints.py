"""Checkpoints: named arrays in a safetensors file with JSON metadata, never pickles.

The one writer and reader of every file of tensors the project stores (the mapper, the
decoder, the prompt bank, embedding cache entries). A file that is missing, corrupt or
of another kind is one message that names it and says how to fix it.
"""

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from img2prompt.errors import RunError
from img2prompt.storage.files import atomic_path

NUMPY_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}  # safetensors' names
SAFETENSORS_TYPES = {np.dtype(numpy_type): name for name, numpy_type in NUMPY_TYPES.items()}
ROWS_PER_READ = 64  # a block of rows read at once when only some columns are wanted
WRITE_BLOCK = 1 << 19  # numbers written at once (2 MB of float32)


def save_tensors(path, tensors: dict, metadata: dict):
    """Write ``tensors`` (all torch tensors, or all numpy arrays or row selections read like
    arrays, as ``search.Rows``) with ``metadata`` (each value stored as JSON), atomically."""
    metadata = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    with atomic_path(path) as tmp:
        if any(type(t).__module__.startswith("torch") for t in tensors.values()):
            from safetensors.torch import save_file
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp),
                      metadata=metadata)
        else:
            _write_arrays(tmp, tensors, metadata)


def _write_arrays(path, arrays: dict, metadata: dict):
    """Write ``arrays`` (each of one or more dimensions) in safetensors' layout (``_read_part``),
    a block of rows at a time: a selection of rows is never copied whole, as safetensors'
    writer, which takes whole arrays, would need."""
    header, offset, rows_per_write = {"__metadata__": metadata}, 0, {}
    for name, array in arrays.items():
        empty = np.asarray(array[:0])  # the dtype and the shape of a row, read from no rows
        stored = SAFETENSORS_TYPES.get(empty.dtype.newbyteorder("="))  # written little-endian
        if stored is None:
            raise ValueError(f"cannot store '{name}' of type {empty.dtype}: float16, 32 or 64 only")
        width = int(np.prod(empty.shape[1:]))  # numbers per row
        rows_per_write[name] = max(1, WRITE_BLOCK // max(1, width))
        size = len(array) * width * empty.dtype.itemsize
        header[name] = {"dtype": stored, "shape": [len(array), *empty.shape[1:]],
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little") + text)
        for name, array in arrays.items():
            step = rows_per_write[name]
            for start in range(0, len(array), step):
                block = np.asarray(array[start:start + step])
                file.write(np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).data)


def load_tensors(path, what, fix, framework="pt", required=(), columns=None, rows=None) -> tuple:
    """(tensors, metadata) of a file written by ``save_tensors``; RunError naming the file
    when it is missing or unreadable, or lacks one of the ``required`` metadata keys.
    ``columns`` (a slice) and ``rows`` (row indices, in the order wanted) read only those
    columns and rows of 2-D tensors, straight from the file (numpy arrays)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no {what}. {fix}")
    try:
        with safe_open(str(path), framework=framework) as handle:
            metadata = _metadata(handle)
            tensors = {name: handle.get_tensor(name) if columns is None and rows is None
                       else _read_part(path, name, columns or slice(None), rows) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:  # ValueError: JSON of the metadata
        raise RunError(f"{path}: not a readable {what} ({type(error).__name__}: {error}). {fix}") from None
    missing = [key for key in required if key not in metadata]
    if missing:
        raise RunError(f"{path}: not an img2prompt {what} (no {', '.join(missing)} in its metadata). {fix}")
    return tensors, metadata


def _metadata(handle) -> dict:
    return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}


def _read_part(path, name, columns, rows=None):
    """``columns`` (a slice) of the rows ``rows`` (indices in the order wanted; None: all) of
    the 2-D tensor ``name``, read a block of rows at a time with plain reads and each row put
    in its place, so that memory holds the result and one block: a memory map (safetensors'
    slices) touches every row, which makes the whole tensor resident, and selecting rows
    after reading would hold two copies. The file layout is safetensors' own: an 8-byte
    little-endian header length, the JSON header, the data."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        spec = json.loads(file.read(size))[name]
        stored, width = spec["shape"]
        place = np.arange(stored) if rows is None else np.full(stored, -1)  # where each stored row goes
        if rows is not None:
            place[np.asarray(rows, dtype=np.int64)] = np.arange(len(rows))
        dtype = np.dtype(NUMPY_TYPES[spec["dtype"]]).newbyteorder("<")
        out = np.empty((stored if rows is None else len(rows), len(range(width)[columns])),
                       dtype=dtype.newbyteorder("="))
        block = np.empty((min(ROWS_PER_READ, stored), width), dtype=dtype)
        file.seek(8 + size + spec["data_offsets"][0])
        for start in range(0, stored, len(block)):
            part = block[:min(len(block), stored - start)]
            if file.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise ValueError(f"the data of '{name}' ends early")
            wanted = place[start:start + len(part)]
            taken = wanted >= 0
            out[wanted[taken]] = part[taken][:, columns]
    return out


def read_header(path) -> tuple:
    """({tensor name: its shape}, metadata) of a safetensors file, from its header only;
    ValueError when it is not one."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = _metadata(handle)
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: {error}") from None
    return shapes, metadata


def foreign(path, what, error, fix) -> RunError:
    """The error for a readable file whose contents do not make the ``what`` it claims."""
    return RunError(f"{path}: does not hold a valid {what} ({type(error).__name__}: {error}). {fix}")
