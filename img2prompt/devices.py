"""Where the work runs: ``--device auto|cpu|cuda|mps`` (config field ``device``).

``auto`` takes a CUDA GPU, then Apple's MPS, then the CPU (or the device the environment
variable ``IMG2PROMPT_AUTO_DEVICE`` names: the tests pin the CPU with it, so that a GPU
machine runs them as this one does). On CUDA the image encoder's forward pass, the
training steps and generation run under bf16 autocast, float32 matrix products may use
TF32, cuDNN picks its fastest kernels, and batches are copied from pinned memory without
blocking; the weights stay float32 and every result comes back as float32 on the CPU. On
the CPU nothing changes: the same operations in the same order, so results are identical
to a run without this module. The CPU is the tested default; ``BF16_ON_CPU`` (a test
setting, not a user option) sends the CPU through the bf16 path CUDA takes.
"""

import contextlib
import os

import torch

from img2prompt.config import FIELDS
from img2prompt.errors import RunError

DEVICES = FIELDS["device"].metadata["choices"]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


AUTO_VARIABLE = "IMG2PROMPT_AUTO_DEVICE"
BF16_ON_CPU = False  # tests: the CPU takes CUDA's bf16 autocast path


def resolve_device(name="auto") -> torch.device:
    """The torch device for a ``--device`` value; RunError when it is not on this machine."""
    if name == "auto" and os.environ.get(AUTO_VARIABLE):
        name = os.environ[AUTO_VARIABLE]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device cuda: torch sees no CUDA GPU here (torch {torch.__version__}, "
                       f"built for CUDA {torch.version.cuda or 'none'}). Use --device auto or cpu.")
    if name == "mps" and not _mps_available():
        raise RunError("--device mps: Apple's Metal backend is not available here. Use --device auto or cpu.")
    if name not in DEVICES:
        raise RunError(f"--device must be one of {', '.join(DEVICES)} (got '{name}').")
    device = torch.device(name)
    prepare_device(device)
    return device


def precision(device: torch.device) -> str:
    """The precision of the forward passes on ``device``: part of the embedding cache key,
    so features computed in bf16 never pass for float32 ones."""
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and BF16_ON_CPU) else "fp32"


def autocast(device: torch.device):
    """bf16 autocast on CUDA (and on the CPU under ``BF16_ON_CPU``); nothing elsewhere."""
    if precision(device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_device(device: torch.device):
    """On CUDA: TF32 for float32 matrix products and cuDNN's kernel search (the CPU path
    stays as it is); once per process."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders should pin their batches (only worth it for a GPU)."""
    return device.type == "cuda"



def per_device(setting, device: torch.device, on_cpu, on_gpu):
    """A setting whose 0 (or -1) means "what suits the device": ``on_gpu`` for a GPU (a GPU
    waits on CPU-sized batches), ``on_cpu`` elsewhere; any other value as it is."""
    if setting > 0:
        return setting
    return on_gpu if device.type == "cuda" else on_cpu


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity where the platform tells it (Linux), else
    all of the machine's (macOS and Windows have no ``os.sched_getaffinity``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
