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
# RETRIEVAL_BATCH (4: prompts a batch for passkey and needle retrieval; 16 x 32K tokens at once
# took more than 100 GiB of an H200 for a converted SmolLM2), PREFILL_CHUNK (empty: their prompts are
# prefilled N tokens a forward through the cache, the same answers with activations bounded by N),
# RETRIEVAL ("passkey niah": the retrieval suites the step runs),
# STEPS ("convert retrieval ppl zeroshot fewshot report"). A recipe whose output folder exists is not
# converted again; an interrupted conversion resumes from its checkpoint. An entry of RECIPES may
# carry overrides, NAME@KEY=VALUE[@KEY=VALUE...], converted into $OUT/NAME+VALUE...:
#   RECIPES="hedgehog hedgehog@students.feature_map=npmap lolcats lawcat still"
# JOBS (1): conversions, and evaluation suites, that run at a time on the one device (a small
# teacher leaves most of a large GPU idle); the shared data are built once first (--data-only).
# A run can be split (e.g. across machine time limits): PART names the folder a part's reports go
# to ($OUT/PART/eval-*), MODELS (default: the teacher and every recipe's student) what it scores,
# and STEPS "report" merges every part into $OUT/eval-*/ and $OUT/headline.md (.json, plot).
# SETS: overrides for every recipe, e.g. a token budget: SETS="stages.0.tokens=1500000 stages.1.tokens=1000000".
# DEADLINE (seconds since the epoch): each command gets SIGINT then (a conversion checkpoints and
# a rerun resumes it; an evaluation keeps the models it finished).
set -euo pipefail

: "${MODEL:=smollm2-135m-instruct}" "${OUT:=runs/headline}" "${RECIPES:=lolcats hedgehog}"
: "${DEVICE:=cuda}" "${DTYPE:=bfloat16}" "${BATCH:=16}" "${LIMIT:=}" "${JOBS:=1}" "${PART:=all}" "${RETRIEVAL_BATCH:=4}"
: "${LENGTHS:=1024,2048,4096,8192,16384,32768}" "${PPL_LENGTHS:=512,2048,8192}"
: "${STEPS:=convert retrieval ppl zeroshot fewshot report}" "${RETRIEVAL:=passkey niah}"
: "${LINEARIZE_DATA:?set LINEARIZE_DATA to the data folder (alpaca/, haystack/, wikitext-2-raw/, piqa/, arc/, ...)}"
export LINEARIZE_DATA
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/$PART"
folder() { local name rest=$1; name=$(basename "${1%%@*}" .yaml); while [[ $rest == *@* ]]; do rest=${rest#*@}; name+="+$(sed 's/^[^=]*=//; s/@.*//' <<<"$rest")"; done; echo "$OUT/$name"; }
if [ -n "${MODELS:-}" ]; then read -ra models <<<"$MODELS"; else
  models=("$MODEL"); for r in $RECIPES; do models+=("$(folder "$r")"); done; fi
common=(--device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH")
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
step() { [[ " $STEPS " == *" $1 "* ]]; }
. "$here/jobs.sh"  # bounded, job, finish

if step convert; then
  recipe_args() { local r=$1; sets=(); IFS=@ read -ra parts <<<"$r"; for kv in "${parts[@]:1}" ${SETS:-}; do sets+=(--set "$kv"); done; }
  todo=0; for r in $RECIPES; do [ -d "$(folder "$r")" ] || todo=$((todo + 1)); done
  if [ "$JOBS" -gt 1 ] && [ "$todo" -gt 1 ]; then  # build the shared data once, so that the conversions read it from the cache
    first=${RECIPES%% *}; recipe_args "$first"
    bounded linearize convert "$MODEL" --recipe "${parts[0]}" "${sets[@]}" --out "$(folder "$first")" --device "$DEVICE" --data-only
  fi
  for r in $RECIPES; do
    dir=$(folder "$r"); recipe_args "$r"
    [ -d "$dir" ] && { echo "$dir exists: not converted again"; continue; }
    resume=(); [ -d "$dir.checkpoints" ] && resume=(--resume)
    job "$dir.log" linearize convert "$MODEL" --recipe "${parts[0]}" "${sets[@]}" --out "$dir" --device "$DEVICE" "${resume[@]}"
  done
  finish
fi
ev() { local name=$1; shift; job "$OUT/$PART/eval-$name.log" linearize eval "${models[@]}" "${common[@]}" --out "$OUT/$PART/eval-$name" "$@"; }
if step retrieval; then
  rb=(--batch-size "$RETRIEVAL_BATCH")  # after the common options: it replaces their batch size
  [ -n "${PREFILL_CHUNK:-}" ] && rb+=(--prefill-chunk "$PREFILL_CHUNK")
  [[ " $RETRIEVAL " == *" passkey "* ]] && ev passkey "${rb[@]}" --suite passkey --lengths "$LENGTHS" --depths 0,0.25,0.5,0.75,1 --samples 4
  [[ " $RETRIEVAL " == *" niah "* ]] && ev niah "${rb[@]}" --suite niah --niah-tasks niah_single_1,niah_single_2 \
    --haystack "$LINEARIZE_DATA/haystack/PaulGrahamEssays_gkamradt49.json" --lengths "$LENGTHS" --depths 0,0.5,1 --samples 2
fi
if step ppl; then
  ev wikitext --suite ppl-by-length --text "$LINEARIZE_DATA/wikitext-2-raw/wiki.test.raw" --lengths "$PPL_LENGTHS" --max-chunks 8
fi
if step zeroshot; then
  ev zeroshot --suite lm-eval --data-dir "$LINEARIZE_DATA" "${limit[@]}" \
    --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai
fi
if step fewshot; then
  for spec in arc_challenge:25 hellaswag:10 winogrande:5; do
    ev "${spec%%:*}-${spec##*:}shot" --suite lm-eval --data-dir "$LINEARIZE_DATA" "${limit[@]}" --tasks "${spec%%:*}" --num-fewshot "${spec##*:}"
  done
fi
finish || echo "headline: an evaluation failed or was cut short (see its log under $OUT/$PART/)" >&2
if step report; then
  python3 "$here/headline_report.py" "$OUT"
fi
