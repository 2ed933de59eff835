"""Scale benchmark: seconds per 1,000 images and peak memory of every stage, as the number of
generated images grows.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 2000,20000,100000] [--top 20000]
                                               [--epochs 2] [--work DIR]

For each size N a generated dataset of N images is made, then each stage of the study runs
in a fresh process (so that its peak RSS, the kernel's VmHWM, is its own): generate, load
(read prompts.csv, list and check the images, split), embed (the run created, the dataset
loaded again, image features as the study reads them: pooled vector, 3x3 grid of the
middle and last maps and colour histograms; text embeddings), embed-ray (the same with
``--engine ray`` on a local Ray instance started in the stage, into a cache of its own),
train (the mapper, ``--epochs`` epochs: per epoch), evaluate (mapper, retrieval, kNN, mean
prompt, bootstrap intervals), decoder (``--epochs`` epochs of the tiny decoder with its
validation prompts: per epoch). A stage's seconds are timed inside its process, after the
imports; load and evaluate, a tenth of a second at 2,000 images, where milliseconds of noise
move the ratio, after a warm-up pass as the mean of three or more passes filling 10 s (the
same span at every size; the peak RSS is the first pass's). The table gives seconds per
1,000 images (per epoch for the training stages), the ratio to the smallest size, and the
peak RSS; a second table the peak's growth from the
smallest size against the embeddings' (the cache entries an extraction writes, the arrays
another stage reads). The evaluation searches as the study does by default (``--search
auto``: exactly up to 20,000 bank rows, approximately beyond).

Targets: at 100,000 images each stage within 1.3x of its seconds per 1,000 at
2,000, and peak RSS growing by no more than 1.5x the embeddings themselves; Ray-local
extraction at >= 0.8 of the in-process throughput (printed with and without the start of
the local instance, which a running cluster does not pay). ``--top``
leaves out the sizes above it when time is short, ``--ray-top`` runs embed-ray only up to
its size (on 2 cores: 2,000 and 20,000 images with every stage about 25 minutes; 2,000,
20,000 and 100,000 with ``--ray-top 20000`` about 100 minutes).

Then a projection, not a measurement: the hours each stage would take on 2 million images
on 1, 8 and 64 devices like the one the benchmark ran on (``device`` in the output: a GPU
when the machine has one, else this machine's CPU). A stage costs its seconds per image at
the largest size measured, times 2 million; the evaluation, whose kNN and retrieval compare
each test image with the whole bank (exact search) or with about √N of its rows (approximate),
is fitted as a·N + b·N² or a·N + b·N^1.5 (as the largest size searched) through the two
largest sizes. Each is divided by the devices: extraction
splits its images (Ray actors), the training stages their batches (torchrun), evaluation
its test images; reading the CSV and listing the images stays on one machine. Perfect
scaling is assumed: communication, the cluster's start and stragglers are not in it.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One stage in a child process: prints {"seconds": ..., "peak_mb": ...} on its last line.
CHILD = r'''
import json, re, sys, time
stage, data, run_dir, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from img2prompt.config import StudyConfig
from img2prompt.run import Run
config = StudyConfig(data_dir=data, run_dir=run_dir, cache_dir=run_dir + "-cache", max_epochs=epochs,
                     patience=epochs, decoder_epochs=epochs, decoder_patience=epochs, bootstrap=1000)


def peak_mb():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


REPEAT_SECONDS = 10  # the span a short stage's passes fill


def timed(work, repeated=False):
    # (seconds, peak MB): one pass; or for a short stage (``repeated``) a warm-up pass, then
    # the mean of 3 or more passes filling REPEAT_SECONDS. The same span at every size: the
    # machine's background load then weighs alike on passes of 0.08 s and of 5 s (the fastest
    # of 20 short passes against the fastest of 3 long ones favoured the small size). The
    # peak is the first pass's.
    def one_pass():
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    seconds, peak = [one_pass()], peak_mb()
    if repeated:
        seconds = []  # the first pass was the warm-up
        while len(seconds) < 3 or sum(seconds) < REPEAT_SECONDS:
            seconds.append(one_pass())
    return sum(seconds) / len(seconds), peak


started, search = 0.0, None  # a local Ray instance's start (embed-ray); the evaluation's search
if stage == "generate":
    from img2prompt.data.synth import SynthParams, generate_dataset
    seconds, peak = timed(lambda: generate_dataset(data, SynthParams(n=int(sys.argv[5]))))
elif stage == "load":
    from img2prompt.data.dataset import grouped_split, load_dataset
    seconds, peak = timed(lambda: grouped_split(load_dataset(data).prompts), repeated=True)
elif stage == "embed":
    seconds, peak = timed(lambda: Run.create(config).data(progress=False))
elif stage == "embed-ray":  # the same on a local Ray instance, timed with the instance's start
    import dataclasses
    from img2prompt.encoders.ray_engine import RayEngine

    def extract():
        global started
        start, engine = time.perf_counter(), RayEngine()
        engine.connect()
        started = time.perf_counter() - start
        Run.create(dataclasses.replace(config, run_dir=run_dir + "-ray", cache_dir=run_dir + "-ray-cache",
                                       engine="ray")).data(progress=False)
        engine.close()
    seconds, peak = timed(extract)
else:
    run = Run.open(run_dir)
    run.data(progress=False)  # the dataset and its embeddings (from the cache): not this stage

    def evaluate():
        global search
        search = run.evaluate(progress=False).method("knn")["search"]["search"]  # exact or approximate
    work = {"train": lambda: run.train(progress=False), "evaluate": evaluate,
            "decoder": lambda: run.train_decoder(progress=False)}[stage]
    seconds, peak = timed(work, repeated=stage == "evaluate")
held = 0  # the embeddings the stage made (its cache entries) or held (the arrays it read)
if stage.startswith("embed"):
    from pathlib import Path
    cache = Path(run_dir + ("-ray-cache" if stage == "embed-ray" else "-cache"))
    held = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
elif stage in ("train", "evaluate", "decoder"):
    data = run.data(progress=False)  # what the stage read (kept by the run: not read again)
    arrays = [data.image_emb, data.target_emb, data.metric_emb]
    arrays += [data.decoder_emb] if "decoder_emb" in vars(data) else []  # read only by the stages that use it
    held = sum({id(a): a.nbytes for a in arrays}.values())
print(json.dumps({"seconds": seconds, "peak_mb": peak, "start_s": started, "embeddings_mb": held / 2**20,
                  "search": search}))
'''

STAGES = ("generate", "load", "embed", "embed-ray", "train", "evaluate", "decoder")
PER_EPOCH = ("train", "decoder")


def run_stage(stage, data, run_dir, epochs, n):
    result = subprocess.run([sys.executable, "-c", CHILD, stage, str(data), str(run_dir), str(epochs), str(n)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = re.findall(r"^\{.*\}$", result.stdout, re.M)
    if result.returncode or not lines:
        sys.exit(f"stage {stage} at {n} images failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000,100000")
    parser.add_argument("--top", type=int, default=None, help="leave out the sizes above this")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the training stages")
    parser.add_argument("--stages", default=",".join(STAGES), help="the stages to run (generate, load and "
                        "embed make what the others read)")
    parser.add_argument("--ray-top", type=int, default=None, help="run embed-ray only up to this size "
                        "(it takes as long as embed: leave out the largest size in one run of every stage)")
    parser.add_argument("--work", default=None, help="folder for the datasets, runs and caches "
                        "(a new temporary one by default, removed at the end)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if args.top is None or int(s) <= args.top]
    stages = [s for s in STAGES if s in args.stages.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    try:
        for n in sizes:
            data, run_dir = work / f"synth-{n}", work / f"run-{n}"
            for stage in stages:
                if stage == "embed-ray" and args.ray_top is not None and n > args.ray_top:
                    continue
                result = run_stage(stage, data, run_dir, args.epochs, n)
                per = 1000 / n / (args.epochs if stage in PER_EPOCH else 1)
                rows.append({"images": n, "stage": stage, "s_per_1000": result["seconds"] * per,
                             "peak_mb": result["peak_mb"], "seconds": result["seconds"],
                             "start_s": result["start_s"], "embeddings_mb": result["embeddings_mb"],
                             "search": result["search"]})
                print(f"{n:>7} {stage:<9} {rows[-1]['s_per_1000']:8.2f} s/1000 images"
                      f"{' per epoch' if stage in PER_EPOCH else ''}   peak {result['peak_mb']:7.0f} MB",
                      flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, sizes, stages, args.epochs)
    if len(sizes) >= 2:
        print_projection(rows, sizes, stages, args.epochs)


def measured(rows, n, stage):
    """The row of ``stage`` at ``n`` images, or None where it did not run (embed-ray above ``--ray-top``)."""
    return next((r for r in rows if r["images"] == n and r["stage"] == stage), None)


def print_table(rows, sizes, stages, epochs):
    smallest = {r["stage"]: r["s_per_1000"] for r in rows if r["images"] == sizes[0]}
    print(f"\n| stage | {' | '.join(f'{n:,} images: s/1000 (ratio), peak MB' for n in sizes)} |")
    print("|---|" + "---|" * len(sizes))
    for stage in stages:
        cells = []
        for n in sizes:
            row = measured(rows, n, stage)
            if row is None:
                cells.append("not run")
                continue
            ratio = row["s_per_1000"] / smallest[stage] if smallest[stage] else float("nan")
            cells.append(f"{row['s_per_1000']:.2f} ({ratio:.2f}×), {row['peak_mb']:.0f}")
        name = f"{stage} (per epoch, {epochs} epochs)" if stage in PER_EPOCH else stage
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\nMemory: the peak's growth from {sizes[0]:,} images against the embeddings' growth (the cache "
          "entries an extraction writes, the arrays another stage reads; target: at most 1.5x)")
    print(f"\n| stage | {' | '.join(f'{n:,} images: growth of the peak, of the embeddings (MB), ratio' for n in sizes[1:])} |")
    print("|---|" + "---|" * (len(sizes) - 1))
    for stage in (s for s in stages if s not in ("generate", "load")):
        first, *others = (measured(rows, n, stage) for n in sizes)
        cells = [f"{r['peak_mb'] - first['peak_mb']:+.0f}, {r['embeddings_mb'] - first['embeddings_mb']:+.0f}, "
                 f"{(r['peak_mb'] - first['peak_mb']) / max(r['embeddings_mb'] - first['embeddings_mb'], 1e-9):.2f}×"
                 if r and first else "not run" for r in others]
        print(f"| {stage} | {' | '.join(cells)} |")
    ray_sizes = [n for n in sizes if measured(rows, n, "embed") and measured(rows, n, "embed-ray")]
    if ray_sizes:
        print("\nRay-local extraction (embed-ray) against in-process (embed), throughput ratio: "
              + "; ".join(f"{n:,} images {ray_ratio(rows, n, False):.2f} (without the instance's start "
                          f"{ray_ratio(rows, n, True):.2f})" for n in ray_sizes))


PROJECTED_IMAGES = 2_000_000
DEVICES = (1, 8, 64)
SPLIT_ACROSS_DEVICES = ("embed", "embed-ray", "train", "evaluate", "decoder")
NOT_IN_A_STUDY = ("generate",)  # a real dataset is downloaded or imported, not generated


def fitted_seconds(points, n, power):
    """Seconds at ``n`` images from two measured (images, seconds): a·N + b·N^power, b ≥ 0."""
    (n1, t1), (n2, t2) = points
    b = max(0.0, (t2 / n2 - t1 / n1) / (n2 ** (power - 1) - n1 ** (power - 1)))  # the growth of the cost per image
    a = t2 / n2 - b * n2 ** (power - 1)
    if a < 0:  # all of the cost grows with N
        a, b = 0.0, t2 / n2 ** power
    return a * n + b * n ** power


def search_power(rows, n):
    """How the evaluation's cost grows with N at ``n`` images: each test image against every
    training image and prompt (exact search, N²), or against √N of them (approximate, N^1.5)."""
    return 1.5 if measured(rows, n, "evaluate")["search"] == "approximate" else 2


def print_projection(rows, sizes, stages, epochs):
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\nProjected (not measured) hours for {PROJECTED_IMAGES:,} images on devices like this one "
          f"({device}), from the {sizes[-2]:,}- and {sizes[-1]:,}-image measurements:")
    print(f"\n| stage | {' | '.join(f'{d} device(s)' for d in DEVICES)} |")
    print("|---|" + "---|" * len(DEVICES))
    for stage in stages:
        if stage in NOT_IN_A_STUDY or not all(measured(rows, n, stage) for n in sizes[-2:]):
            continue
        points = [(n, measured(rows, n, stage)["seconds"]
                   / (epochs if stage in PER_EPOCH else 1)) for n in sizes[-2:]]
        seconds = (fitted_seconds(points, PROJECTED_IMAGES, search_power(rows, sizes[-1])) if stage == "evaluate"
                   else points[-1][1] / points[-1][0] * PROJECTED_IMAGES)
        hours = [seconds / (d if stage in SPLIT_ACROSS_DEVICES else 1) / 3600 for d in DEVICES]
        name = f"{stage} (per epoch)" if stage in PER_EPOCH else stage
        print(f"| {name} | {' | '.join(f'{h:,.2f}' for h in hours)} |")


def ray_ratio(rows, n, without_start):
    """Ray's images/s over the in-process images/s at ``n`` images (the same work: the run,
    the image features and the prompt embeddings)."""
    local, ray = measured(rows, n, "embed"), measured(rows, n, "embed-ray")
    return local["seconds"] / (ray["seconds"] - (ray["start_s"] if without_start else 0))


if __name__ == "__main__":
    main()
