#!/usr/bin/env bash
# The main job: set up .venv when needed, then run the numbered notebooks in notebooks/
# with papermill (data exploration, embeddings, training, evaluation, error analysis) and
# write the executed notebooks, one HTML report each and reports/index.html.
#
#   ./run_all.sh                                   # default study (2,000 generated images)
#   ./run_all.sh -p image_encoder efficientnet-lite2 -p n_images 5000
#   ./run_all.sh -p data_dir PATH -p run_dir runs/mine     # your own images
#   ./run_all.sh --reports DIR                     # reports somewhere else than reports/
#
# -p NAME VALUE sets a parameter of the notebooks that declare NAME (see the cell tagged
# 'parameters' at the top of each notebook); a name that no notebook declares is refused.
# IMG2PROMPT_PYTHON=/path/to/python uses that (set up) interpreter instead of .venv.
set -euo pipefail
cd "$(dirname "$0")"

options=()
while [ $# -gt 0 ]; do
  case "$1" in
    -p)
      [ $# -ge 3 ] || { echo "error: -p needs a NAME and a VALUE" >&2; exit 2; }
      options+=(-p "$2" "$3"); shift 3 ;;
    --reports)
      [ $# -ge 2 ] || { echo "error: --reports needs a folder" >&2; exit 2; }
      options+=(--reports "$2"); shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (use -p NAME VALUE or --reports DIR)" >&2; exit 2 ;;
  esac
done

if [ -n "${IMG2PROMPT_PYTHON:-}" ]; then
  python=$IMG2PROMPT_PYTHON  # an environment someone already set up (the tests' own)
else
  source scripts/ensure_venv.sh
  python=.venv/bin/python
fi
export HF_HUB_OFFLINE=1
exec "$python" -m img2prompt report "${options[@]}"
