"""Decoder training-epoch benchmark: what length-grouped batches, the fused AdamW and the
short image prefix save, measured in one run.

    .venv/bin/python benchmarks/bench_decoder_epochs.py [--data data/synth-2000-256-seed0] [--rounds 3]

On the default generated dataset (made when missing) and its split, times training epochs
(forward, loss, backward, AdamW step) of a fresh default decoder four ways, alternating
within each round: batches in a random order or of prompts of about the same length (the
study's: transformers' length grouping), and AdamW's step taken one tensor at a time
(``foreach``) or fused into one kernel (the study's); and a fifth way, the study's with the
8 prefix vectors the study's decoder read before it read 4 (``--prefix-length``). Prints
the median seconds per epoch of each way, its share in the optimiser's step, the padded
token positions per epoch, and its ratio to random batches with the per-tensor step.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from img2prompt.config import StudyConfig
from img2prompt.data.synth import SynthParams, generate_dataset
from img2prompt.models.decoder import next_token_loss
from img2prompt.models.training import study_decoder
from img2prompt.run import Run

LONGER_PREFIX = 8  # the prefix vectors the study's decoder read before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synth-2000-256-seed0",
                        help="dataset (generated with the default parameters when missing)")
    parser.add_argument("--rounds", type=int, default=3, help="epochs timed per way (the median is printed)")
    args = parser.parse_args()
    generate_dataset(args.data, SynthParams())
    with tempfile.TemporaryDirectory() as run_dir:
        run = Run.create(StudyConfig(data_dir=args.data, run_dir=run_dir))
        data, config = run.data(progress=False), run.config  # split + cached embeddings
    train = data.part("train")
    x = torch.as_tensor(train["decoder_emb"], dtype=torch.float32)
    decoders = {}
    for prefix_length in (config.prefix_length, LONGER_PREFIX):
        decoder = decoders[prefix_length] = study_decoder(data, dataclasses.replace(config, prefix_length=prefix_length))
        decoder.model.fit_to_data(x)
        decoder.model.train()
    sequences, _ = decoders[config.prefix_length].encode_prompts(train["prompts"], config.max_length)  # one vocabulary
    batch, shuffler = config.decoder_batch_size, torch.Generator().manual_seed(config.seed)
    lengths = [len(s) for s in sequences]
    orders = {"random": lambda: torch.randperm(len(x), generator=shuffler).tolist(),
              "by length": lambda: get_length_grouped_indices(lengths, batch, generator=shuffler)}
    ways = [(order, fused, config.prefix_length) for order in orders for fused in (False, True)]
    ways.append(("by length", True, LONGER_PREFIX))
    timed = {}
    for _ in range(args.rounds):
        for order, fused, prefix_length in ways:
            decoder, rows_in_order = decoders[prefix_length], orders[order]
            optimizer = torch.optim.AdamW(decoder.trainable_parameters(), lr=1e-5, fused=fused, foreach=not fused)
            rows, stepping, positions = rows_in_order(), 0.0, 0
            started = time.perf_counter()
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                positions += len(chunk) * max(len(sequences[i]) for i in chunk)
                logits, targets = decoder.logits(x[chunk], [sequences[i] for i in chunk])
                next_token_loss(logits, targets).backward()
                step_started = time.perf_counter()
                optimizer.step()
                optimizer.zero_grad()
                stepping += time.perf_counter() - step_started
            timed.setdefault((order, fused, prefix_length), []).append((time.perf_counter() - started, stepping, positions))
    print(f"decoder training epochs on {len(x)} prompts, batches of {batch}, median of {args.rounds} per way:")
    baseline = statistics.median(t[0] for t in timed["random", False, config.prefix_length])
    for (order, fused, prefix_length), runs in timed.items():
        seconds = statistics.median(t[0] for t in runs)
        way = f"{order} batches, {'fused' if fused else 'per-tensor'} AdamW, prefix {prefix_length}"
        print(f"  {way:<48} {seconds:5.1f} s "
              f"(optimiser {statistics.median(t[1] for t in runs):4.2f} s; {runs[0][2]:,} token positions)   "
              f"ratio {seconds / baseline:.2f}")


if __name__ == "__main__":
    main()
