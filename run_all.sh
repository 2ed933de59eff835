#!/usr/bin/env bash
# The main job: set up .venv when needed, generate the default dataset, train the mapper,
# evaluate every method and print the metrics.
#
#   ./run_all.sh                                   # default study (2,000 generated images)
#   ./run_all.sh -p image_encoder efficientnet-lite2 -p n_images 5000
#   ./run_all.sh -p data_dir PATH -p run_dir runs/mine     # your own images
#
# Parameters (-p NAME VALUE): data_dir, run_dir, n_images, image_size, and any training
# option of 'img2prompt train' (image_encoder, text_encoder, seed, hidden_size, ...).
set -euo pipefail
cd "$(dirname "$0")"

n_images=2000
image_size=256
seed=0
data_dir=""
run_dir=runs/default
train_options=()
while [ $# -gt 0 ]; do
  case "$1" in
    -p)
      [ $# -ge 3 ] || { echo "error: -p needs a NAME and a VALUE" >&2; exit 2; }
      case "$2" in
        n_images) n_images=$3 ;;
        image_size) image_size=$3 ;;
        data_dir) data_dir=$3 ;;
        run_dir) run_dir=$3 ;;
        seed) seed=$3; train_options+=(--seed "$3") ;;
        *) train_options+=("--${2//_/-}" "$3") ;;
      esac
      shift 3 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (use -p NAME VALUE)" >&2; exit 2 ;;
  esac
done

source scripts/ensure_venv.sh
export HF_HUB_OFFLINE=1
img2prompt() { .venv/bin/python -m img2prompt "$@"; }

if [ -z "$data_dir" ]; then
  data_dir=data/synth-$n_images-$image_size-seed$seed
  img2prompt data synth --out "$data_dir" --n "$n_images" --size "$image_size" --seed "$seed"
fi
img2prompt train --data "$data_dir" --out "$run_dir" --force "${train_options[@]}"
img2prompt evaluate --run "$run_dir"
echo "results: $run_dir/metrics.json, $run_dir/test_results.csv, $run_dir/figures/loss_curve.png"
