#!/usr/bin/env bash
# Convert a teacher with several recipes and score the teacher and every student side by side:
# long-context retrieval, perplexity by length, lm-eval zero-shot and few-shot. Reports go under
# $OUT/eval-*/ (report.json, report.md, plots).
#
#   MODEL=smollm2-135m-instruct LINEARIZE_DATA=../shared/data OUT=runs/headline bash scripts/headline.sh
#
# Settings (environment): MODEL, LINEARIZE_DATA (the data folder: recipes' mixes, lm-eval's local
# tasks, WikiText-2, haystacks), OUT, RECIPES ("lolcats hedgehog"), DEVICE (cuda), DTYPE (bfloat16),
# LENGTHS (retrieval lengths), PPL_LENGTHS, LIMIT (lm-eval items a task; empty: all), BATCH (16),
# STEPS ("convert retrieval ppl zeroshot fewshot"). A recipe whose output folder exists is not
# converted again; an interrupted conversion resumes from its checkpoint. An entry of RECIPES may
# carry overrides, NAME@KEY=VALUE[@KEY=VALUE...], converted into $OUT/NAME+VALUE...:
#   RECIPES="hedgehog hedgehog@students.feature_map=npmap lolcats lawcat still"
set -euo pipefail
: "${MODEL:=smollm2-135m-instruct}" "${OUT:=runs/headline}" "${RECIPES:=lolcats hedgehog}"
: "${DEVICE:=cuda}" "${DTYPE:=bfloat16}" "${BATCH:=16}" "${LIMIT:=}"
: "${LENGTHS:=1024,2048,4096,8192,16384,32768}" "${PPL_LENGTHS:=512,2048,8192}"
: "${STEPS:=convert retrieval ppl zeroshot fewshot}"
: "${LINEARIZE_DATA:?set LINEARIZE_DATA to the data folder (alpaca/, haystack/, wikitext-2-raw/, piqa/, arc/, ...)}"
export LINEARIZE_DATA
mkdir -p "$OUT"
folder() { local name=${1%%@*} rest=$1; while [[ $rest == *@* ]]; do rest=${rest#*@}; name+="+$(sed 's/^[^=]*=//; s/@.*//' <<<"$rest")"; done; echo "$OUT/$name"; }
models=("$MODEL")
for r in $RECIPES; do models+=("$(folder "$r")"); done
common=(--device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH")
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
step() { [[ " $STEPS " == *" $1 "* ]]; }

if step convert; then
  for r in $RECIPES; do
    dir=$(folder "$r"); sets=()
    IFS=@ read -ra parts <<<"$r"; for kv in "${parts[@]:1}"; do sets+=(--set "$kv"); done
    [ -d "$dir" ] && { echo "$dir exists: not converted again"; continue; }
    resume=(); [ -d "$dir.checkpoints" ] && resume=(--resume)
    linearize convert "$MODEL" --recipe "${parts[0]}" "${sets[@]}" --out "$dir" --device "$DEVICE" "${resume[@]}"
  done
fi
if step retrieval; then
  linearize eval "${models[@]}" "${common[@]}" --suite passkey --lengths "$LENGTHS" \
    --depths 0,0.25,0.5,0.75,1 --samples 4 --out "$OUT/eval-passkey"
  linearize eval "${models[@]}" "${common[@]}" --suite niah --niah-tasks niah_single_1,niah_single_2 \
    --haystack "$LINEARIZE_DATA/haystack/PaulGrahamEssays_gkamradt49.json" --lengths "$LENGTHS" \
    --depths 0,0.5,1 --samples 2 --out "$OUT/eval-niah"
fi
if step ppl; then
  linearize eval "${models[@]}" "${common[@]}" --suite ppl-by-length \
    --text "$LINEARIZE_DATA/wikitext-2-raw/wiki.test.raw" --lengths "$PPL_LENGTHS" --max-chunks 8 --out "$OUT/eval-wikitext"
fi
if step zeroshot; then
  linearize eval "${models[@]}" "${common[@]}" --suite lm-eval --data-dir "$LINEARIZE_DATA" "${limit[@]}" \
    --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai --out "$OUT/eval-zeroshot"
fi
if step fewshot; then
  for spec in arc_challenge:25 hellaswag:10 winogrande:5; do
    linearize eval "${models[@]}" "${common[@]}" --suite lm-eval --data-dir "$LINEARIZE_DATA" "${limit[@]}" \
      --tasks "${spec%%:*}" --num-fewshot "${spec##*:}" --out "$OUT/eval-${spec%%:*}-${spec##*:}shot"
  done
fi
echo "reports: $OUT/eval-*/report.md"
