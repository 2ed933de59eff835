"""Embedding extraction on a Ray cluster (``embed --engine ray``), with Ray Data.

The pipeline: the image paths become a Ray dataset, decoded and preprocessed in CPU tasks,
encoded in a pool of actors (one per GPU where the cluster has GPUs, else one per machine
using its cores), and streamed back to this process in order. ``embeddings`` saves the rows
in the same shards and cache entry as the in-process path, so either engine resumes the
other's extraction; their features agree within float tolerance (same preprocessing, same
weights: the encoder travels to the actors with its weights loaded, so the machines need
the project installed but not the weights' files).

Without an address a local Ray instance is started on this machine's cores and stopped
afterwards; with one (``--ray-address``, e.g. ``auto`` on a cluster node) the cluster is used.
"""

import functools
import logging
import math
import os
import platform

import numpy as np
import torch
from PIL import Image

from img2prompt.data.images import open_image
from img2prompt.devices import resolve_device, usable_cpus
from img2prompt.encoders.allocator import keep_freed_memory
from img2prompt.encoders.embeddings import unreadable_found
from img2prompt.errors import DataError, RunError
from img2prompt.progress import progress_bar

DECODE_CPUS = 0.25  # a decoding task is light (a few ms per image): the cores go to the encoder
# Ray runs an actor's calls on a thread of its own, and glibc gives such a thread a malloc
# arena of its own, whose large blocks ``keep_freed_memory`` cannot keep: measured here, the
# forward pass ran at 53 images/s instead of 88. One arena for the process keeps them.
ACTOR_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "1"}}
BLANK = Image.new("RGB", (64, 64))  # stands in for an unreadable image (its error goes along)
NOT_ON_NODE = "not-on-node:"  # an error of a machine that lacks the dataset: stops the extraction


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise RunError(f"--engine ray needs Ray ({error}): pip install 'img2prompt[scale]' (./run_all.sh's "
                       ".venv has it), or use --engine local.") from None
    return ray


class RayEngine:
    """Extracts features on Ray: at ``address``, or on a local instance started for the job."""

    def __init__(self, address=""):
        self.address = address or ""
        self._started = False

    def connect(self):
        ray = _ray()
        if ray.is_initialized():
            return ray
        options = dict(log_to_driver=False, logging_level=logging.WARNING)
        try:
            if self.address:
                ray.init(address=self.address, **options)
            else:
                ray.init(num_cpus=usable_cpus(), include_dashboard=False, **options)
                self._started = True
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RunError(f"--ray-address {self.address}: no Ray cluster could be reached ({error}). "
                           "Start one ('ray start --head' on its first machine) and pass its address, "
                           "or leave --ray-address empty to run on a local instance.") from None
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices; failures raise
        return ray

    def close(self):
        """Stop the local instance this engine started (a cluster at an address stays)."""
        if self._started:
            _ray().shutdown()
            self._started = False

    def prepare(self, encoder, requested_device="auto"):
        """The copy of ``encoder`` that the actors will run, on the device they will have:
        its fingerprint keys the cache (bf16 on GPUs), its weights travel loaded."""
        if requested_device == "mps":
            raise RunError("--engine ray runs on CPUs and CUDA GPUs; use --device auto or cpu, or "
                           "--engine local for Apple's MPS.")
        if not self.address:  # a local instance has this machine's devices
            device = resolve_device(requested_device)
        else:
            gpus = self.connect().cluster_resources().get("GPU", 0)
            if requested_device == "cuda" and not gpus:
                raise RunError(f"--device cuda: the Ray cluster at {self.address} has no GPU. "
                               "Use --device auto or cpu.")
            device = torch.device("cuda" if gpus and requested_device != "cpu" else "cpu")
        return encoder.for_device(device)

    def feature_batches(self, paths, encoder, batch_size, progress, max_pixels, grid, colors, grid_map,
                        unreadable=None):
        """(indices, float32 features) of the images at ``paths``, in order; a bad image is a
        DataError naming it, or with ``unreadable`` (a dict) recorded there and left out.
        ``encoder`` comes from ``prepare``."""
        ray = self.connect()
        try:
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # shards are saved as rows complete
            context.enable_progress_bars = False
            items = [{"index": i, "path": str(p)} for i, p in enumerate(paths)]
            data = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
            data = data.map_batches(functools.partial(_decode, preprocess=encoder.preprocessor(),
                                                      max_pixels=max_pixels),
                                    batch_size=batch_size, num_cpus=DECODE_CPUS)
            actors, threads = self._actors(ray, encoder.device)
            data = data.map_batches(_Encode, fn_constructor_args=(encoder, threads, grid, colors, grid_map),
                                    batch_size=batch_size, zero_copy_batch=False, runtime_env=ACTOR_ENV,
                                    **actors)
            with progress_bar(len(items), "img", enabled=progress, description=f"{encoder.name} on Ray") as bar:
                for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                    missing = [str(e) for e in batch["error"] if str(e).startswith(NOT_ON_NODE)]
                    if missing:  # a node without the data: every image would be "unreadable" there
                        raise RunError(missing[0].removeprefix(NOT_ON_NODE))
                    decoded = batch["error"] == ""
                    unreadable_found({int(i): str(e) for i, e in zip(batch["index"][~decoded],
                                                                     batch["error"][~decoded])}, unreadable)
                    if decoded.any():
                        yield batch["index"][decoded], batch["features"][decoded]
                    bar.update(len(batch["index"]))
        finally:
            self.close()

    @staticmethod
    def _actors(ray, device):
        """(the actor pool's options, torch threads per actor): one actor per GPU; on CPUs one
        per machine, with its cores but a decoding task's share."""
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        if device.type == "cuda":
            count, resources, threads = sum(n.get("GPU", 0) for n in nodes), {"num_gpus": 1, "num_cpus": 1}, 1
        else:
            cpus = max(min(n.get("CPU", 1) for n in nodes) - DECODE_CPUS, DECODE_CPUS)
            count, resources, threads = len(nodes), {"num_cpus": cpus}, math.ceil(cpus)
        return {"compute": ray.data.ActorPoolStrategy(size=max(1, int(count))), **resources}, threads


def _decode(batch, preprocess, max_pixels):
    """A Ray task: decode and preprocess a batch of images; a bad one leaves its message, and
    one this machine cannot see at all says so (``NOT_ON_NODE``)."""
    pixels, errors = [], []
    for path in batch["path"]:
        if not os.path.exists(path):
            pixels.append(preprocess(BLANK))
            errors.append(f"{NOT_ON_NODE}{path}: not found on the Ray node {platform.node()}, which decodes it. "
                          "Every machine of the cluster must see the dataset at the path this one reads it from "
                          "(a shared filesystem), or use --engine local.")
            continue
        try:
            pixels.append(preprocess(open_image(path, max_pixels)))
            errors.append("")
        except DataError as error:
            pixels.append(preprocess(BLANK))
            errors.append(str(error))
    return {"index": batch["index"], "pixels": torch.stack(pixels).numpy(), "error": np.array(errors)}


class _Encode:
    """A Ray actor: the encoder, loaded once, on its device."""

    def __init__(self, encoder, threads, grid, colors, grid_map):
        keep_freed_memory()
        torch.set_num_threads(threads)
        self.encoder, self.grid, self.colors, self.grid_map = encoder.place(), grid, colors, grid_map

    def __call__(self, batch):
        features = self.encoder.forward(torch.from_numpy(batch["pixels"]), self.grid, self.colors, self.grid_map)
        return {"index": batch["index"], "features": features.numpy(), "error": batch["error"]}
