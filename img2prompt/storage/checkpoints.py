"""Checkpoints: named arrays in a safetensors file with JSON metadata, never pickles.

The one writer and reader of every file of tensors the project stores (the mapper, the
decoder, the prompt bank, embedding cache entries). A file that is missing, corrupt or
of another kind is one message that names it and says how to fix it.
"""

import json
import zlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from img2prompt.errors import RunError, notice
from img2prompt.storage.files import atomic_path, storage_error

NUMPY_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}  # safetensors' names
SAFETENSORS_TYPES = {np.dtype(numpy_type): name for name, numpy_type in NUMPY_TYPES.items()}
ROWS_PER_READ = 64  # a block of rows read at once when only some columns are wanted
WRITE_BLOCK = 1 << 19  # numbers written at once (2 MB of float32)


CHECKSUMS = "crc32"  # the metadata key of each tensor's checksum


def save_tensors(path, tensors: dict, metadata: dict):
    """Write ``tensors`` (all torch tensors, or all numpy arrays or row selections read like
    arrays, as ``search.Rows``) with ``metadata`` (each value stored as JSON) and a checksum
    of each tensor's data (``load_tensors`` checks it), atomically."""
    torch_tensors = any(type(t).__module__.startswith("torch") for t in tensors.values())
    if torch_tensors:
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    checksums = {name: _checksum(_byte_blocks(t)) for name, t in tensors.items()}
    metadata = {key: json.dumps(value, default=str) for key, value in {**metadata, CHECKSUMS: checksums}.items()}
    with atomic_path(path) as tmp:
        try:
            if torch_tensors:
                from safetensors.torch import save_file
                save_file(tensors, str(tmp), metadata=metadata)
            else:
                _write_arrays(tmp, tensors, metadata)
        except (SafetensorError, OSError) as error:  # safetensors' own error for a full disk
            raise storage_error(path, error, sum(_nbytes(t) for t in tensors.values())) from None


def _byte_blocks(tensor):
    """The tensor's data as stored (little-endian), a block of rows at a time."""
    if type(tensor).__module__.startswith("torch"):
        import torch
        yield tensor.reshape(-1).view(torch.uint8).numpy()
        return
    if isinstance(tensor, np.ndarray):
        tensor = np.atleast_1d(tensor)
    step = max(1, WRITE_BLOCK // max(1, int(np.prod(np.shape(tensor[:1])[1:]))))
    for start in range(0, len(tensor), step):
        block = np.asarray(tensor[start:start + step])
        yield np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))


def _checksum(blocks) -> str:
    crc = 0
    for block in blocks:
        crc = zlib.crc32(memoryview(block).cast("B"), crc)
    return f"{crc:08x}"


def _nbytes(tensor) -> int:
    if type(tensor).__module__.startswith("torch"):
        return tensor.numel() * tensor.element_size()
    return len(tensor) * np.asarray(tensor[:1]).nbytes



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
    """(tensors, metadata) of a file written by ``save_tensors``, each tensor checked against
    its checksum; RunError naming the file when it is missing, unreadable or damaged, or lacks
    one of the ``required`` metadata keys. ``columns`` (a slice) and ``rows`` (row indices,
    in the order wanted) read only those columns and rows of 2-D tensors, straight from the
    file (numpy arrays). A file saved without checksums (by an older img2prompt) is read
    unchecked: ``CHECKSUMS not in metadata`` tells."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no {what}. {fix}")
    try:
        with safe_open(str(path), framework=framework) as handle:
            metadata = _metadata(handle)
            expected = metadata.get(CHECKSUMS, {})
            tensors = {}
            for name in handle.keys():
                if columns is None and rows is None:
                    tensors[name] = handle.get_tensor(name)
                    found = _checksum(_byte_blocks(tensors[name])) if name in expected else None
                else:
                    tensors[name], found = _read_part(path, name, columns or slice(None), rows)
                if name in expected and found != expected[name]:
                    raise RunError(f"{path}: damaged: the data of '{name}' does not match its checksum "
                                   f"(stored {expected[name]}, read {found}). {fix}")
    except (SafetensorError, OSError, ValueError) as error:  # ValueError: JSON of the metadata
        raise RunError(f"{path}: not a readable {what} ({type(error).__name__}: {error}). {fix}") from None
    missing = [key for key in required if key not in metadata]
    if missing:
        raise RunError(f"{path}: not an img2prompt {what} (no {', '.join(missing)} in its metadata). {fix}")
    return tensors, metadata


def _metadata(handle) -> dict:
    return {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}


def _read_part(path, name, columns, rows=None):
    """(``columns`` (a slice) of the rows ``rows`` (indices in the order wanted; None: all) of
    the 2-D tensor ``name``, the checksum of all its data), read a block of rows at a time
    with plain reads and each row put in its place, so that memory holds the result and one
    block: a memory map (safetensors' slices) touches every row, which makes the whole
    tensor resident, and selecting rows after reading would hold two copies. The file layout
    is safetensors' own: an 8-byte little-endian header length, the JSON header, the data."""
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
        crc = 0
        for start in range(0, stored, len(block)):
            part = block[:min(len(block), stored - start)]
            if file.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise ValueError(f"the data of '{name}' ends early")
            crc = zlib.crc32(memoryview(part).cast("B"), crc)
            wanted = place[start:start + len(part)]
            taken = wanted >= 0
            out[wanted[taken]] = part[taken][:, columns]
    return out, f"{crc:08x}"



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


PROVENANCE = "provenance"  # the metadata key of what a model file was made from


def check_provenance(path, metadata, expected: dict, fix):
    """Refuse (RunError naming both sides) a model file made from other encoders or inputs
    than ``expected`` ({part: what the run has now}, as ``Run.provenance`` gives). A file
    saved before models recorded it is used as it is, with a notice."""
    recorded = metadata.get(PROVENANCE)
    if recorded is None:
        notice(f"{path}: saved by an older img2prompt without a record of the encoders it was made from; "
               "used as it is (training the run again records them).")
        return
    expected = json.loads(json.dumps(expected, default=str))  # as stored: tuples become lists
    wrong = [part for part, value in expected.items() if recorded.get(part) != value]
    if wrong:
        sides = "; ".join(f"{part.replace('_', ' ')}: made with {_described(recorded.get(part), expected[part])}, "
                          f"but this run has {_described(expected[part], recorded.get(part))}" for part in wrong)
        raise RunError(f"{path}: was not made for this run's settings ({sides}). {fix}")


def _described(value, other) -> str:
    """``value`` (a part of a provenance) in words, naming what differs from ``other``: a
    weights' hash in short, another short value as it is, a long one (preprocessing) by name."""
    if not isinstance(value, dict):
        return json.dumps(value)
    other = other if isinstance(other, dict) else {}
    shown = []
    for key, item in value.items():
        if key != "name" and item != other.get(key):
            text = item if isinstance(item, str) else json.dumps(item)
            digest = len(text) > 16 and all(c in "0123456789abcdef" for c in text)
            shown.append(f"{key} {text[:12]}…" if digest else f"{key} {text}" if len(text) <= 30 else f"other {key}")
    return " ".join([str(value.get("name", "?")), *(["(" + ", ".join(shown) + ")"] if shown else [])])
