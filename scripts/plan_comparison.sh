#!/usr/bin/env bash
# At equal budgets, does the plan `linearize plan` chooses beat keeping every k-th layer softmax and a
# random choice? For each budget: a plan by the KL signal (this measures), a plan by the attention-transfer
# signal (the same measurements, --reuse), the every-k-th baseline and one random baseline a seed, the
# baselines with as many softmax layers as the budget allows at the recipe's own settings. Each is converted
# with the recipe, then teacher and students are scored side by side: held-out perplexity and KL to the
# teacher, passkey retrieval by length, the few-shot lm-eval tasks. Reports go under $OUT/<budget>/.
#
#   LINEARIZE_DATA=../shared/data OUT=runs/plans bash scripts/plan_comparison.sh                # a GPU machine
#   RECIPE=smoke DEVICE=cpu DTYPE=float32 STEPS="plan convert heldout" SEEDS=0 OUT=runs/plans-cpu \
#     bash scripts/plan_comparison.sh                                                          # the CPU check
#
# Settings (environment): MODEL (smollm2-135m-instruct), RECIPE (lolcats), BUDGETS ("softmax-layers=2
# softmax-layers=4 kv-memory=100MiB@32768"), CANDIDATES (the settings a memory or prefill budget chooses
# among, "window_size=16,64,256"; softmax-layers budgets plan with the recipe's own), SEEDS ("0 1 2"), DEVICE
# (cuda), DTYPE (bfloat16), LENGTHS (passkey, "4096,8192,16384,32768"), LIMIT (lm-eval items a task; empty:
# all), BATCH (16), STEPS ("plan convert heldout retrieval fewshot"), SIGNAL_BLOCKS (the plans' --signal-blocks;
# default: the planner's), LINEARIZE_DATA (the data folder: the
# recipe's mix, lm-eval's local tasks). A conversion whose folder exists is not made again; an interrupted
# one resumes from its checkpoint. $OUT/<budget>/seconds.txt records how long the plan and each conversion took.
set -euo pipefail
: "${MODEL:=smollm2-135m-instruct}" "${RECIPE:=lolcats}" "${OUT:=runs/plans}" "${SEEDS:=0 1 2}"
: "${BUDGETS:=softmax-layers=2 softmax-layers=4 kv-memory=100MiB@32768}" "${CANDIDATES:=window_size=16,64,256}"
: "${DEVICE:=cuda}" "${DTYPE:=bfloat16}" "${BATCH:=16}" "${LIMIT:=}" "${LENGTHS:=4096,8192,16384,32768}"
: "${STEPS:=plan convert heldout retrieval fewshot}"
[ -n "${LINEARIZE_DATA:-}" ] && export LINEARIZE_DATA
here=$(cd "$(dirname "$0")" && pwd)
step() { [[ " $STEPS " == *" $1 "* ]]; }
common=(--device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH")
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
signal_blocks=(); [ -n "${SIGNAL_BLOCKS:-}" ] && signal_blocks=(--signal-blocks "$SIGNAL_BLOCKS")
declare -A measured=()  # candidates -> the plan folder whose measurements later budgets reuse

for budget in $BUDGETS; do
  dir="$OUT/$(tr '=@' '-_' <<<"$budget")"
  mkdir -p "$dir"
  candidates=(); [[ $budget != softmax-layers=* && -n "$CANDIDATES" ]] && candidates=(--candidates $CANDIDATES)
  ckey="options:${candidates[*]:-}"
  if step plan; then
    if [ ! -d "$dir/plan-kl" ]; then
      began=$SECONDS
      reuse=(); [ -n "${measured[$ckey]:-}" ] && reuse=(--reuse "${measured[$ckey]}")
      linearize plan "$MODEL" --recipe "$RECIPE" --budget "$budget" "${candidates[@]}" "${signal_blocks[@]}" \
        --signal kl --out "$dir/plan-kl" --device "$DEVICE" "${reuse[@]}"
      echo "plan-kl $((SECONDS - began))s${reuse:+ (measurements reused)}" >>"$dir/seconds.txt"
    fi
    measured[$ckey]=$dir/plan-kl
    [ -d "$dir/plan-transfer" ] || linearize plan "$MODEL" --recipe "$RECIPE" --budget "$budget" "${candidates[@]}" \
      "${signal_blocks[@]}" --signal transfer --reuse "$dir/plan-kl" --out "$dir/plan-transfer" --device "$DEVICE"
  fi
  # NAME=WHAT for every model of this budget; WHAT: a recipe file, or the layers to convert with $RECIPE
  layers() { python "$here/plan_comparison.py" layers "$@"; }
  methods=("kl=$(layers "$dir/plan-kl" plan)" "transfer=$(layers "$dir/plan-transfer" plan)"
           "every=$(layers "$dir/plan-kl" every)")
  for s in $SEEDS; do methods+=("random$s=$(layers "$dir/plan-kl" random --seed "$s")"); done
  models=("$MODEL"); named=(); declare -A made=()
  for m in "${methods[@]}"; do
    name=${m%%=*} what=${m#*=} target="$dir/$name"
    models+=("$target"); named+=("$name=$target")
    if [ -n "${made[$what]:-}" ]; then  # the same choice as an earlier method: the same conversion
      [ -e "$target" ] || ln -s "$(basename "${made[$what]}")" "$target"
      continue
    fi
    made[$what]=$target
    if step convert && [ ! -d "$target" ]; then
      resume=(); [ -d "$target.checkpoints" ] && resume=(--resume)
      began=$SECONDS
      if [[ $what == *.yaml ]]; then
        linearize convert "$MODEL" --recipe "$what" --out "$target" --device "$DEVICE" "${resume[@]}"
      else
        linearize convert "$MODEL" --recipe "$RECIPE" --set "students.layers=$what" --out "$target" --device "$DEVICE" "${resume[@]}"
      fi
      echo "$name $((SECONDS - began))s${resume:+ (resumed)}" >>"$dir/seconds.txt"
    fi
  done
  if step heldout; then
    python "$here/plan_comparison.py" heldout --recipe "$RECIPE" --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
      --out "$dir/heldout.md" "${named[@]}"
  fi
  if step retrieval; then
    linearize eval "${models[@]}" "${common[@]}" --suite passkey --lengths "$LENGTHS" \
      --depths 0,0.25,0.5,0.75,1 --samples 4 --out "$dir/eval-passkey"
  fi
  if step fewshot; then
    for spec in arc_challenge:25 hellaswag:10 winogrande:5; do
      linearize eval "${models[@]}" "${common[@]}" --suite lm-eval --data-dir "$LINEARIZE_DATA" "${limit[@]}" \
        --tasks "${spec%%:*}" --num-fewshot "${spec##*:}" --out "$dir/eval-${spec%%:*}-${spec##*:}shot"
    done
  fi
done
echo "reports: $OUT/*/heldout.md, $OUT/*/eval-*/report.md"
