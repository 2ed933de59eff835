"""Training benchmark: images/s of each way the study can learn, measured in one run.

    .venv/bin/python benchmarks/bench_training.py [--data data/synth-2000-256-seed0]
        [--device auto] [--images 256] [--blocks 2 5 8]

On the default generated dataset (made when missing), with the default encoder
(efficientnet-lite0) and the study's batch sizes, times training steps (forward, loss
1 − cosine, backward, AdamW step) of:

- the head: the mapper on cached embeddings (``--tune head``);
- partial fine-tuning: the top N encoder blocks with the mapper, on the cached output of
  the frozen blocks (``--tune encoder --tune-blocks N``), at the encoder's input size;
- full fine-tuning from pixels at 224 and 160 px, images decoded in the loop: its share
  of decoding and preprocessing is the "data loading" column.

Prints images/s per way and its ratio to full fine-tuning at 224 px, on the chosen device
(the CPU here; a GPU where there is one). Each figure is the median of timed batches after
a warm-up batch.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from torchvision import transforms

from img2prompt.config import StudyConfig
from img2prompt.data.dataset import load_dataset
from img2prompt.data.images import open_image
from img2prompt.data.synth import SynthParams, generate_dataset
from img2prompt.devices import autocast, per_device, resolve_device
from img2prompt.encoders.image import image_encoder
from img2prompt.models.finetune import TunedTop, parameter_groups
from img2prompt.models.mapper import Mapper


def timed(step, batches, warmup=1):
    """Median seconds of ``step(batch)`` over ``batches`` after ``warmup`` of them."""
    times = []
    for number, batch in enumerate(batches):
        started = time.perf_counter()
        step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[warmup:] or times)  # a single batch: the warm-up is all there is


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synth-2000-256-seed0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=256, help="images timed per way")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 5, 8])
    args = parser.parse_args()
    if not Path(args.data).exists():  # the default data, made once
        generate_dataset(args.data, SynthParams())
    config, device = StudyConfig(), resolve_device(args.device)
    paths = load_dataset(args.data).paths[:args.images]
    batch = per_device(config.tune_batch_size, device, 32, 128)
    encoder = image_encoder(config.image_encoder, device=args.device)
    model = encoder.model
    rows = {}

    def train_step(net, optimizer):
        def step(inputs):
            with autocast(device):  # loss 1 − cosine, as the study's
                predicted = net(inputs.to(device)).float()
                loss = 1 - torch.nn.functional.cosine_similarity(predicted, torch.randn_like(predicted)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return step

    # the head on cached embeddings
    mapper = Mapper(encoder.dim, 384).to(device)
    features = torch.randn(len(paths), encoder.dim)
    head_batches = [features[s:s + config.batch_size] for s in range(0, len(features), config.batch_size)] * 4
    seconds = timed(train_step(mapper, torch.optim.AdamW(mapper.parameters())), head_batches)
    rows["head (mapper on cached embeddings)"] = (config.batch_size / seconds, 0.0)

    pixels = torch.stack([encoder.normalize(encoder.preprocess(open_image(p))[None])[0] for p in paths])
    for blocks in args.blocks:
        with torch.inference_mode():
            trunk = torch.cat([encoder.trunk(model, pixels[s:s + batch].to(device), blocks).cpu()
                               for s in range(0, len(pixels), batch)]).half()
        net = TunedTop(encoder, Mapper(encoder.dim, 384), blocks).to(device).train()
        optimizer = torch.optim.AdamW(parameter_groups(net, config))
        seconds = timed(train_step(net, optimizer), [trunk[s:s + batch] for s in range(0, len(trunk), batch)])
        rows[f"top {blocks} blocks (cached trunk)"] = (batch / seconds, 0.0)

    for size in (224, 160):
        resize = transforms.Compose([transforms.Resize(size, antialias=True), transforms.CenterCrop(size),
                                     transforms.PILToTensor()])
        net = TunedTop(encoder, Mapper(encoder.dim, 384), len(encoder.blocks(model))).to(device).train()
        stem = torch.nn.Sequential(model._conv_stem, model._bn0)
        optimizer = torch.optim.AdamW([*parameter_groups(net, config), {"params": stem.parameters()}])
        step = train_step(lambda x, net=net, stem=stem: net(model._swish(stem(x))), optimizer)
        load_times, step_times = [], []
        for begin in range(0, len(paths), batch):
            started = time.perf_counter()
            images = encoder.normalize(torch.stack([resize(open_image(p)) for p in paths[begin:begin + batch]]))
            loaded = time.perf_counter()
            step(images.contiguous(memory_format=torch.channels_last))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            load_times.append(loaded - started)
            step_times.append(time.perf_counter() - loaded)
        load, compute = statistics.median(load_times[1:] or load_times), statistics.median(step_times[1:] or step_times)
        rows[f"full network from pixels, {size} px"] = (batch / (load + compute), load / (load + compute))

    reference = rows["full network from pixels, 224 px"][0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"training images/s of {config.image_encoder} + mapper on {name} ({len(paths)} images, "
          f"batches of {batch}; head: {config.batch_size}):")
    print(f"  {'way':<40} {'images/s':>9} {'data loading':>13} {'× full 224 px':>14}")
    for way, (speed, loading) in rows.items():
        print(f"  {way:<40} {speed:9.1f} {loading:13.0%} {speed / reference:14.1f}")


if __name__ == "__main__":
    main()
