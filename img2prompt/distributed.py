"""Data-parallel training with ``torchrun`` (torch.distributed: gloo on CPUs, NCCL on GPUs).

``torchrun --nproc-per-node N -m img2prompt train …`` starts N processes of the same
command. Process 0, the *main* one, does what one process does alone: it makes the run
folder, extracts the embeddings into the cache and writes every file. The others, the
*followers*, wait for it, read the embeddings from the cache and train beside it: each
batch is split between the processes, each computes the gradient of its share, and the
gradients are summed before every step, so all processes keep the same weights and take the
steps one process would take (up to the order of floating-point sums). The dropout masks of
the mapper and of the decoder (its prefix MLP and tiny LM) are drawn for the whole batch from a
generator every process holds alike, each process keeping its share's rows
(``Mapper.dropout_masks``, ``PromptDecoder.dropout_masks``). Without torchrun everything here
is a no-op.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from img2prompt.errors import RunError

# the followers wait for the main process while it extracts embeddings: allow hours
TIMEOUT = timedelta(hours=12)


def start():
    """Join the process group when torchrun started this process (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is this process's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def share(index):
    """This process's share of a batch (every world_size()-th item, from its rank on)."""
    return index[rank()::world_size()]


def sum_gradients(parameters):
    """Add up the gradients of all processes (one collective for all parameters)."""
    if world_size() == 1:
        return
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        if p.grad is None:  # a process whose share was empty still takes part
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    for p, summed in zip(parameters, flat.split([p.numel() for p in parameters])):
        p.grad.copy_(summed.view_as(p))


def sum_tensor(tensor):
    """Add up ``tensor`` over all processes, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def sum_number(value: float) -> float:
    if world_size() == 1:
        return value
    return float(sum_tensor(torch.tensor([value], dtype=torch.float64)).item())


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
