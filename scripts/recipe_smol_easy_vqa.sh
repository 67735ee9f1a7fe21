#!/usr/bin/env bash
# The smol easy-VQA recipe (docs/recipes/smol-easy-vqa.md): EfficientNet-Lite0 -> MLP ->
# SmolLM2-135M-Instruct + LoRA, tuned on easy-VQA, scored on its test split, then a text-only chat
# check that the LM still knows its general knowledge.
#
#   scripts/recipe_smol_easy_vqa.sh [OUT]            (default OUT: runs/smol-easy-vqa)
#
# Environment: MAX_TRAIN / MAX_TEST (images; default: all 4,000 / 1,000), THREADS (torch threads
# for training; default 0 = torch's default), OVERRIDES (extra config overrides, e.g.
# "train.stages.1.steps=2000"). Peak memory of training is /usr/bin/time -v's "Maximum resident
# set size" (the process's ru_maxrss), written to OUT/train_time.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/smol-easy-vqa}
V=.venv/bin/vitune
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

$V convert smollm2                              # GGUF -> cached safetensors, once (~30 s)
if [ ! -f "$OUT/data/meta.json" ]; then
  $V data easy-vqa --out "$OUT/data" ${MAX_TRAIN:+--max-train "$MAX_TRAIN"} ${MAX_TEST:+--max-test "$MAX_TEST"}
fi
if [ ! -f "$OUT/text/text_chat.json" ]; then     # SmolLM2's own answers to built-in prompts
  $V data text-chat --out "$OUT/text"
fi

start=$(date +%s)
# shellcheck disable=SC2086
/usr/bin/time -v -o "$OUT/train_time.txt" $V train --preset smol --out "$OUT/run" --overwrite \
  --data align="$OUT/data/captions.json" --data instruct="$OUT/data/instruct.json" \
  "train.stages.1.mix_data=[$OUT/text/text_chat.json]" "train.threads=${THREADS:-0}" ${OVERRIDES:-}
train_s=$(( $(date +%s) - start ))

start=$(date +%s)
$V eval --task vqa --model "$OUT/run/model" --questions "$OUT/data/test_questions.jsonl" \
  --answers "$OUT/data/test_answers.jsonl" --out "$OUT/eval" --overwrite
eval_s=$(( $(date +%s) - start ))

echo "--- text-only chat check (after tuning)"
$V chat --model "$OUT/run/model" --max-new-tokens 32 "What is the capital of France?" | tee "$OUT/chat_check.txt"

peak_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$OUT/train_time.txt")
echo "--- summary"
echo "train wall time: ${train_s} s   eval wall time: ${eval_s} s   training peak RSS: $((peak_kb / 1024)) MiB"
python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print('test accuracy: %.4f (%g/%d, 95%% CI %.4f-%.4f)' % (m['accuracy'], m['correct'], m['n'], *m['ci95']))" "$OUT/eval/results.json"
grep -q "Paris" "$OUT/chat_check.txt" && echo "text chat: still answers Paris" || echo "text chat: did NOT answer Paris"
