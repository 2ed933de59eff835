"""Where the work runs: ``--device auto|cpu|cuda|mps`` (config field ``device``).

``auto`` takes a CUDA GPU, then Apple's MPS, then the CPU. On CUDA the image encoder's
forward pass and the training steps run under bf16 autocast, and batches are copied from
pinned memory without blocking; the weights stay float32 and every result comes back as
float32 on the CPU. On the CPU nothing changes: the same operations in the same order, so
results are identical to a run without this module. The CPU is the tested default.
"""

import contextlib
import os

import torch

from img2prompt.config import FIELDS
from img2prompt.errors import RunError

DEVICES = FIELDS["device"].metadata["choices"]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name="auto") -> torch.device:
    """The torch device for a ``--device`` value; RunError when it is not on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device cuda: torch sees no CUDA GPU here (torch {torch.__version__}, "
                       f"built for CUDA {torch.version.cuda or 'none'}). Use --device auto or cpu.")
    if name == "mps" and not _mps_available():
        raise RunError("--device mps: Apple's Metal backend is not available here. Use --device auto or cpu.")
    if name not in DEVICES:
        raise RunError(f"--device must be one of {', '.join(DEVICES)} (got '{name}').")
    return torch.device(name)


def precision(device: torch.device) -> str:
    """The precision of the forward passes on ``device``: part of the embedding cache key,
    so features computed in bf16 never pass for float32 ones."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders should pin their batches (only worth it for a GPU)."""
    return device.type == "cuda"



def usable_cpus() -> int:
    """The CPUs this process may use: its affinity where the platform tells it (Linux), else
    all of the machine's (macOS and Windows have no ``os.sched_getaffinity``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
