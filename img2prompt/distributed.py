"""Data-parallel training with ``torchrun`` and torch's ``DistributedDataParallel``.

``torchrun --nproc-per-node N -m img2prompt train …`` starts N processes of the same
command. Process 0, the *main* one, does what one process does alone: it makes the run
folder, extracts the embeddings into the cache and writes every file. The others, the
*followers*, wait for it (``main_first``), read the embeddings from the cache and train
beside it: each batch is shared out between the processes, ``wrap`` puts the model in
``DistributedDataParallel``, which averages the gradients, and each process draws its own
dropout. Decisions that must agree (the validation, early stopping, the kept epoch) are
taken by the main process and sent to the others (``from_main``), so no process can stop
at another epoch than the rest. Without torchrun everything here is a no-op.

One process group serves both devices (``cpu:gloo,cuda:nccl``): every tensor a collective
touches lives on the training device.
"""

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from img2prompt.config import StudyConfig
from img2prompt.errors import RunError


def start(timeout_minutes=StudyConfig.process_timeout, device="auto"):
    """Join the process group when torchrun started this process. A process waits for the
    others at most ``timeout_minutes`` (the followers wait while the main one extracts the
    embeddings). Training on CUDA (``device``, a ``--device`` value), each process takes the
    GPU of its local rank and the group gets NCCL for GPU tensors beside gloo for CPU ones;
    on the CPU, gloo alone."""
    if not dist.is_torchelastic_launched() or dist.is_initialized():
        return
    from img2prompt.devices import resolve_device
    backend = "gloo"
    if resolve_device(device).type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise RunError(f"torchrun started more processes on this machine than it has GPUs ({gpus}): pass "
                           f"--nproc-per-node {gpus} or fewer, or --device cpu.")
        torch.cuda.set_device(local_rank)  # "cuda" is this process's GPU
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def stop():
    """Leave the process group (at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(timeout_minutes=StudyConfig.process_timeout, device="auto"):
    """The process group for the time of a command (``start``, then ``stop``); yields whether
    this is the main process."""
    start(timeout_minutes, device)
    try:
        yield is_main()
    finally:
        stop()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def share(batch):
    """This process's share of a batch (every world_size()-th item, from its rank on)."""
    return batch[rank()::world_size()]


def wrap(model, device):
    """``model`` in DistributedDataParallel under torchrun (it averages the gradients of the
    processes' shares in backward), else ``model`` itself."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                   broadcast_buffers=False)  # frozen statistics (BatchNorm) stay as they are


def sum_over_processes(tensor):
    """``tensor`` (on the training device) added up over all processes, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def from_main(work):
    """``work()`` done by the main process alone, its result given to every process."""
    if world_size() == 1:
        return work()
    box = [work() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(work):
    """Run ``work()`` in the main process, then let the followers go on; they get None, or a
    RunError when the main process failed (its own message says why), never a hang."""
    if world_size() == 1:
        return work()
    if is_main():
        try:
            result = work()
        except BaseException:
            _tell(False)
            raise
        _tell(True)
        return result
    if not _tell(None):
        raise RunError("the main process (rank 0) stopped; its message above says why.")
    return None


def _tell(ok):
    """Broadcast the main process's outcome; every process returns it."""
    box = [ok]
    dist.broadcast_object_list(box, src=0)
    return box[0]
