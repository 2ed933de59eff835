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


def save_tensors(path, tensors: dict, metadata: dict):
    """Write ``tensors`` (all torch tensors or all numpy arrays) with ``metadata`` (each
    value stored as JSON), atomically."""
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file
        tensors = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    else:
        from safetensors.torch import save_file
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v, default=str) for k, v in metadata.items()})


def load_tensors(path, what, fix, framework="pt", required=(), columns=None) -> tuple:
    """(tensors, metadata) of a file written by ``save_tensors``; RunError naming the file
    when it is missing or unreadable, or lacks one of the ``required`` metadata keys.
    ``columns`` (a slice) reads only those columns of 2-D tensors, straight from the file."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no {what}. {fix}")
    try:
        with safe_open(str(path), framework=framework) as handle:
            metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
            tensors = {name: handle.get_tensor(name) if columns is None else handle.get_slice(name)[:, columns]
                       for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:  # ValueError: JSON of the metadata
        raise RunError(f"{path}: not a readable {what} ({type(error).__name__}: {error}). {fix}") from None
    missing = [key for key in required if key not in metadata]
    if missing:
        raise RunError(f"{path}: not an img2prompt {what} (no {', '.join(missing)} in its metadata). {fix}")
    return tensors, metadata


def foreign(path, what, error, fix) -> RunError:
    """The error for a readable file whose contents do not make the ``what`` it claims."""
    return RunError(f"{path}: does not hold a valid {what} ({type(error).__name__}: {error}). {fix}")
