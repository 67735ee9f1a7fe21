#!/usr/bin/env bash
# Grounding screen (docs/grounding.md): the `smol` preset trained on the shapes data (relational
# family included) once per position mechanism, each scored on the `shapes` bench (500 test images,
# 3,831 questions in 10 categories), one after the other.
#
#   scripts/grounding_screen.sh [OUT] [NAME ...]     (default OUT: runs/grounding; NAMEs: base slots coords)
#
# Environment: N_TRAIN (training images; default 1000). Each run's times are printed and its
# results are in OUT/NAME/eval (results.json, report.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/grounding}
shift || true
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(base slots coords)
N_TRAIN=${N_TRAIN:-1000}
V=.venv/bin/vitune
D="$OUT/data-$N_TRAIN"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
declare -A MECHANISM=([base]="" [slots]="model.connector.slot_embedding=true" [coords]="model.connector.coords=true"
                      [both]="model.connector.slot_embedding=true model.connector.coords=true"
                      [fine]="model.vision.feature_map=stride16+last model.vision.width=1728")
$V convert smollm2
[ -f "$D/meta.json" ] || $V data shapes --out "$D" --n-train "$N_TRAIN"
for name in "${NAMES[@]}"; do
  [ -v "MECHANISM[$name]" ] || { echo "unknown mechanism $name; known: ${!MECHANISM[*]}" >&2; exit 2; }
  start=$(date +%s)
  # shellcheck disable=SC2086
  $V train --preset smol --data align="$D/align.json" --data instruct="$D/instruct.json" --out "$OUT/$name" \
    --overwrite ${MECHANISM[$name]}
  trained=$(date +%s)
  $V eval --model "$OUT/$name/model" --bench shapes --out "$OUT/$name/eval" --overwrite --precision bf16
  echo "$name: training $((trained - start)) s, eval $(($(date +%s) - trained)) s"
done
