"""Embedding extraction benchmark: throughput, cache, memory. Prints ratios measured in one run.

    .venv/bin/python benchmarks/bench_embedding.py [--small 2000] [--large 8000]

1. end-to-end extraction images/s (decoding + forward, model loading included) on the
   small set, against the encoder's forward pass alone on pre-decoded tensors, measured
   in the same process (target: ratio >= 0.8); once with the default number of decoding
   workers for this machine and once with one DataLoader worker;
2. a cached rerun of the embedding step against the first run (target: <= 0.05), and the
   share of the rerun spent checking the cache entries' checksums (target: <= 5%);
3. peak memory (RSS) while embedding the small and the large set, each in a fresh process:
   it must not grow by more than 1.5x the embedding arrays themselves, image and text
   (images stream).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from img2prompt.data.dataset import load_dataset
from img2prompt.data.images import open_image
from img2prompt.data.synth import SynthParams, generate_dataset
from img2prompt.encoders.embeddings import (
    EmbeddingCache,
    decode_workers,
    extract_image_embeddings,
    image_embeddings,
    text_embeddings,
)
from img2prompt.encoders.image import image_encoder
from img2prompt.encoders.text import metric_encoder


def embedding_step(data_dir, cache_dir, encoder_name, batch_size, workers):
    """What `img2prompt embed` does: load and fingerprint the data, image and prompt embeddings."""
    start = time.perf_counter()
    dataset = load_dataset(data_dir)
    cache = EmbeddingCache(cache_dir)
    images, info = image_embeddings(dataset, image_encoder(encoder_name), cache, batch_size, workers,
                                    progress=False)
    texts = text_embeddings(dataset.prompts, metric_encoder(), cache, progress=False)
    return time.perf_counter() - start, info, images.nbytes + texts.nbytes


def child(args):
    """Run in a fresh process: first run (cold cache), then a cached rerun; report peak memory."""
    with tempfile.TemporaryDirectory() as cache_dir:
        first, info, array_bytes = embedding_step(args.child, cache_dir, args.encoder, args.batch_size, args.workers)
        rerun, rerun_info, _ = embedding_step(args.child, cache_dir, args.encoder, args.batch_size, args.workers)
        checking = checksum_seconds(cache_dir)
    assert rerun_info["cached"] and not info["cached"]
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    # measured after the peaks: its pre-decoded tensors would count as embedding memory
    forward = forward_only(args.child, args.encoder, args.batch_size, args.forward_images)
    encoder = image_encoder(args.encoder)
    paths = load_dataset(args.child).paths
    start = time.perf_counter()
    extract_image_embeddings(paths, encoder, args.batch_size, num_workers=1, progress=False)
    one_worker = len(paths) / (time.perf_counter() - start)
    print(json.dumps({"forward_images_per_s": forward, "first_s": first, "rerun_s": rerun, "checksum_s": checking,
                      "images_per_s": info["images_per_s"], "one_worker_images_per_s": one_worker,
                      "array_bytes": array_bytes, **peaks}))


def checksum_seconds(cache_dir):
    """Seconds spent computing the checksums of every tensor in the cache entries, as a
    cached rerun does when it reads them (the tensors already in memory)."""
    from safetensors.numpy import load_file

    from img2prompt.storage.checkpoints import _byte_blocks, _checksum
    tensors = [t for f in Path(cache_dir).rglob("*.safetensors") for t in load_file(str(f)).values()]
    start = time.perf_counter()
    for tensor in tensors:
        _checksum(_byte_blocks(tensor))
    return time.perf_counter() - start


def forward_only(data_dir, encoder_name, batch_size, n_images):
    """Images/s of the encoder's forward pass alone, on tensors decoded beforehand."""
    encoder = image_encoder(encoder_name)
    paths = load_dataset(data_dir).paths[:n_images]
    tensors = torch.stack([encoder.preprocess(open_image(p)) for p in paths])
    encoder.forward(tensors[:batch_size])  # warm-up
    start = time.perf_counter()
    for begin in range(0, len(tensors), batch_size):
        encoder.forward(tensors[begin:begin + batch_size])
    return len(tensors) / (time.perf_counter() - start)


def measure_in_child(data_dir, args):
    command = [sys.executable, __file__, "--child", str(data_dir), "--encoder", args.encoder,
               "--forward-images", str(args.forward_images),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=2000, help="images in the small set")
    parser.add_argument("--large", type=int, default=8000, help="images in the large set")
    parser.add_argument("--forward-images", type=int, default=512, help="images for forward-only timing")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1, help="decoding workers (-1: the default)")
    parser.add_argument("--workdir", default=".cache/benchmark", help="where the generated sets are kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir)
    sets = {n: generate_dataset(work / f"synth-{n}", SynthParams(n=n, seed=1)) for n in (args.small, args.large)}
    print(f"encoder {args.encoder}, batch {args.batch_size}, {decode_workers(args.workers)} decoding "
          f"worker(s), {torch.get_num_threads()} torch threads")
    small = measure_in_child(sets[args.small], args)
    large = measure_in_child(sets[args.large], args)

    print(f"\n1. throughput on {args.small} images")
    forward = small["forward_images_per_s"]
    print(f"   forward only (pre-decoded tensors): {forward:7.1f} images/s")
    print(f"   end-to-end extraction:              {small['images_per_s']:7.1f} images/s "
          f"({decode_workers(args.workers)} decoding workers; model loading and first batch included)")
    print(f"   ratio end-to-end / forward-only:    {small['images_per_s'] / forward:7.3f}   (target >= 0.8)")
    print(f"   with 1 DataLoader worker:           {small['one_worker_images_per_s']:7.1f} images/s, ratio "
          f"{small['one_worker_images_per_s'] / forward:.3f} (model already loaded)")
    print(f"\n2. cache on {args.small} images (data check + image and prompt embeddings, in-process)")
    print(f"   first run {small['first_s']:.2f} s, cached rerun {small['rerun_s']:.2f} s, "
          f"ratio {small['rerun_s'] / small['first_s']:.4f}   (target <= 0.05)")
    print(f"   checking the entries' checksums: {small['checksum_s']:.3f} s, "
          f"{100 * small['checksum_s'] / small['rerun_s']:.1f}% of the cached rerun   (target <= 5%)")
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    array_growth = (large["array_bytes"] - small["array_bytes"]) / 2**20
    print("\n3. peak memory while embedding (fresh process each)")
    for n, result in ((args.small, small), (args.large, large)):
        print(f"   {n:>6} images: main process {result['peak_rss_mb']:7.1f} MB, child processes "
              f"{result['worker_peak_rss_mb']:7.1f} MB, embedding arrays {result['array_bytes'] / 2**20:6.1f} MB")
    print(f"   growth {args.small} -> {args.large}: {growth:+.1f} MB for {array_growth:.1f} MB more embeddings; "
          f"ratio large/small {large['peak_rss_mb'] / small['peak_rss_mb']:.3f}")
    print(f"   memory growth / embedding growth: {growth / array_growth:.2f}   (target <= 1.5)")


if __name__ == "__main__":
    main()
