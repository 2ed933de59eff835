"""Prompt-decoder benchmark: training samples/s and generation prompts/s, measured in one run.

    .venv/bin/python benchmarks/bench_decoder.py [--data data/synth-2000-256-seed0]

On the default generated dataset (made when missing) and its grouped split, with the
default study settings (StudyConfig): trains the default decoder exactly as the study does
(per-epoch validation by generated-prompt cosine and early stopping included) and reports
the wall time and the median training samples/s, then generates prompts for the test
images with greedy decoding, beam search and nucleus sampling and reports prompts/s for
each and their ratios to greedy.
"""

import argparse
import tempfile

from img2prompt.config import StudyConfig
from img2prompt.data.synth import SynthParams, generate_dataset
from img2prompt.evaluation.analysis import compare_strategies
from img2prompt.run import Run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synth-2000-256-seed0",
                        help="dataset (generated with the default parameters when missing)")
    args = parser.parse_args()
    generate_dataset(args.data, SynthParams())
    with tempfile.TemporaryDirectory() as run_dir:
        run = Run.create(StudyConfig(data_dir=args.data, run_dir=run_dir))
        data = run.data(progress=False)  # split + cached embeddings
        summary = run.train_decoder(progress=False)
        decoder, config = run.decoder(), run.config
    test = data.part("test")
    print(f"decoder '{config.decoder}' ({summary['trainable_parameters']:,} parameters) on "
          f"{len(data.part('train')['ids'])} training prompts:")
    print(f"  training: {summary['epochs']} epochs in {summary['seconds']:.0f} s (validation "
          f"included); {summary['train_samples_per_s']:.0f} samples/s (median epoch)")
    speeds = compare_strategies(decoder, test["decoder_emb"], test["metric_emb"], config)["prompts/s"]
    print(f"  generation on {len(test['ids'])} test images (max {config.max_length} tokens):")
    for strategy, speed in speeds.items():
        label = f"beam (width {config.beam_width})" if strategy == "beam" else strategy
        print(f"    {label:<16} {speed:7.1f} prompts/s   ratio to greedy {speed / speeds['greedy']:.2f}")


if __name__ == "__main__":
    main()
