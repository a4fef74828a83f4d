#!/usr/bin/env bash
# At equal budgets, does the plan `linearize plan` chooses beat keeping every k-th layer softmax and a
# random choice? For each budget: the plan by each signal of PLANS (the first measures, the others choose
# again from its measurements, --reuse), the every-k-th baseline and one random baseline a seed, the
# baselines with as many softmax layers as the budget allows at the recipe's own settings. Each is converted
# with the recipe, then teacher and students are scored side by side: held-out perplexity and KL to the
# teacher, passkey retrieval by length, the few-shot lm-eval tasks. Reports go under $OUT/<budget>/, and
# STEPS "report" writes $OUT/comparison.md (.json, .png): every method at every budget, and which won.
#
#   LINEARIZE_DATA=../shared/data OUT=runs/plans bash scripts/plan_comparison.sh                # a GPU machine
#   RECIPE=smoke DEVICE=cpu DTYPE=float32 STEPS="plan convert heldout report" SEEDS=0 OUT=runs/plans-cpu \
#     bash scripts/plan_comparison.sh                                                          # the CPU check
#
# Settings (environment): MODEL (smollm2-135m-instruct), RECIPE (lolcats), PLANS (the plans' signals:
# "transfer", the planner's default; "transfer kl" adds the plan by KL to the teacher, which measures more),
# BUDGETS ("softmax-layers=2 softmax-layers=4 kv-memory=100MiB@32768"), CANDIDATES (the settings a memory or prefill budget chooses
# among, "window_size=16,64": windows the Triton kernels take; softmax-layers budgets plan with the recipe's own), SEEDS ("0 1 2"), DEVICE
# (cuda), DTYPE (bfloat16), LENGTHS (passkey, "4096,8192,16384,32768"), LIMIT (lm-eval items a task; empty:
# all), BATCH (16), RETRIEVAL_BATCH (4: passkey prompts a batch), EVAL_KERNELS (LINEARIZE_KERNELS for the
# evaluations only, e.g. "auto" after conversions on the references), EVAL_JOBS (JOBS for the evaluations,
# which need less memory than a conversion), STEPS ("plan convert heldout retrieval
# fewshot report"), SIGNAL_BLOCKS (the plans' --signal-blocks; default: the planner's), SETS (overrides of the
# recipe for the plans and every conversion, e.g. a token budget: "stages.0.tokens=1000000
# stages.1.tokens=500000"), JOBS (1: conversions, then evaluations, that run at a time on the one device; the
# shared data are built once first, with --data-only), DEADLINE (seconds since the epoch: each command gets
# SIGINT then; a conversion checkpoints, and a rerun resumes it), LINEARIZE_DATA (the data folder: the
# recipe's mix, lm-eval's local tasks). A plan or conversion whose folder exists is not made again; an
# interrupted conversion resumes from its checkpoint, an interrupted evaluation from the models it finished.
# $OUT/<budget>/seconds.txt records how long the plan and each conversion took.
set -euo pipefail
: "${MODEL:=smollm2-135m-instruct}" "${RECIPE:=lolcats}" "${OUT:=runs/plans}" "${SEEDS:=0 1 2}" "${PLANS:=transfer}"
: "${BUDGETS:=softmax-layers=2 softmax-layers=4 kv-memory=100MiB@32768}" "${CANDIDATES:=window_size=16,64}"
: "${DEVICE:=cuda}" "${DTYPE:=bfloat16}" "${BATCH:=16}" "${LIMIT:=}" "${LENGTHS:=4096,8192,16384,32768}"
: "${STEPS:=plan convert heldout retrieval fewshot report}" "${JOBS:=1}" "${RETRIEVAL_BATCH:=4}"
[ -n "${LINEARIZE_DATA:-}" ] && export LINEARIZE_DATA
here=$(cd "$(dirname "$0")" && pwd)
step() { [[ " $STEPS " == *" $1 "* ]]; }
common=(--device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH")
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
signal_blocks=(); [ -n "${SIGNAL_BLOCKS:-}" ] && signal_blocks=(--signal-blocks "$SIGNAL_BLOCKS")
sets=(); for kv in ${SETS:-}; do sets+=(--set "$kv"); done
. "$here/jobs.sh"  # bounded, job, finish
budget_dir() { echo "$OUT/$(tr '=@' '-_' <<<"$1")"; }
declare -A measured=()  # candidates -> the plan folder whose measurements later budgets reuse

# 1. the plans, one budget after another: the first signal measures (a later budget with the same candidates
# reuses its measurements), the others choose again from them
read -r -a signals <<<"$PLANS"
# the plan by KL measures both signals, the one by transfer only its own: KL's measures for all
if [[ " $PLANS " == *" kl "* ]]; then signals=(kl $(for x in "${signals[@]}"; do [ "$x" = kl ] || echo "$x"; done)); fi
for budget in $BUDGETS; do
  dir=$(budget_dir "$budget"); mkdir -p "$dir"
  candidates=(); [[ $budget != softmax-layers=* && -n "$CANDIDATES" ]] && candidates=(--candidates $CANDIDATES)
  ckey="options:${candidates[*]:-}"
  if step plan; then
    first=$dir/plan-${signals[0]}
    if [ ! -f "$first/plan.json" ]; then
      began=$SECONDS
      reuse=(); [ -n "${measured[$ckey]:-}" ] && reuse=(--reuse "${measured[$ckey]}")
      bounded linearize plan "$MODEL" --recipe "$RECIPE" "${sets[@]}" --budget "$budget" "${candidates[@]}" \
        "${signal_blocks[@]}" --signal "${signals[0]}" --out "$first" --device "$DEVICE" "${reuse[@]}"
      echo "plan-${signals[0]} $((SECONDS - began))s${reuse:+ (measurements reused)}" >>"$dir/seconds.txt"
    fi
    measured[$ckey]=$first
    for signal in "${signals[@]:1}"; do
      [ -f "$dir/plan-$signal/plan.json" ] || bounded linearize plan "$MODEL" --recipe "$RECIPE" "${sets[@]}" \
        --budget "$budget" "${candidates[@]}" "${signal_blocks[@]}" --signal "$signal" --reuse "$first" \
        --out "$dir/plan-$signal" --device "$DEVICE"
    done
  fi
done

# NAME=WHAT for every model of a budget; WHAT: a recipe file, or the layers to convert with $RECIPE
layers() { python "$here/plan_comparison.py" layers "$@"; }
methods_of() { local dir=$1 first=$1/plan-${signals[0]} signal
  for signal in "${signals[@]}"; do echo "$signal=$(layers "$dir/plan-$signal" plan)"; done
  echo "every=$(layers "$first" every)"
  for s in $SEEDS; do echo "random$s=$(layers "$first" random --seed "$s")"; done; }

# 2. the conversions, JOBS at a time (a method that chose what an earlier one did links to its conversion)
if step convert; then
  todo=()
  for budget in $BUDGETS; do
    dir=$(budget_dir "$budget"); declare -A made=()
    while IFS= read -r m; do
      name=${m%%=*} what=${m#*=} target="$dir/$name"
      key=$what; [[ $what == *.yaml ]] && key=$(python "$here/plan_comparison.py" key "$(dirname "$what")")
      if [ -n "${made[$key]:-}" ]; then
        [ -e "$target" ] || ln -s "$(basename "${made[$key]}")" "$target"
        continue
      fi
      made[$key]=$target
      [ -d "$target" ] || todo+=("$target=$what")
    done < <(methods_of "$dir")
    unset made
  done
  if [ "$JOBS" -gt 1 ] && [ "${#todo[@]}" -gt 1 ]; then  # the shared data, built once for every conversion
    bounded linearize convert "$MODEL" --recipe "$RECIPE" "${sets[@]}" --out "$OUT/data" --device "$DEVICE" --data-only
  fi
  for entry in "${todo[@]}"; do
    target=${entry%%=*} what=${entry#*=}
    resume=(); [ -d "$target.checkpoints" ] && resume=(--resume)
    if [[ $what == *.yaml ]]; then
      args=(--recipe "$what")
    else
      args=(--recipe "$RECIPE" --set "students.layers=$what")
    fi
    # the time of each conversion, recorded when it ends (in the background with JOBS > 1)
    job "$target.log" bash -c 'began=$SECONDS; "${@:3}" && echo "$(basename "$1") $((SECONDS - began))s$2" >>"$(dirname "$1")/seconds.txt"' \
      _ "$target" "${resume:+ (resumed)}" linearize convert "$MODEL" "${args[@]}" "${sets[@]}" --out "$target" --device "$DEVICE" "${resume[@]}"
  done
  finish || echo "plan_comparison: a conversion failed or was cut short (see its log beside it)" >&2
fi

# 3. the evaluations, JOBS at a time
[ -n "${EVAL_KERNELS:-}" ] && export LINEARIZE_KERNELS=$EVAL_KERNELS
[ -n "${EVAL_JOBS:-}" ] && JOBS=$EVAL_JOBS
teacher_scored=
for budget in $BUDGETS; do
  dir=$(budget_dir "$budget")
  [ -f "$dir/plan-${signals[0]}/plan.json" ] || continue
  # the teacher with the first budget's models only, and a link (a method that chose what an earlier one did)
  # not again: the report takes their scores from there
  models=(); named=(); [ -n "$teacher_scored" ] || models=("$MODEL"); teacher_scored=1
  while IFS= read -r m; do
    named+=("${m%%=*}=$dir/${m%%=*}"); [ -L "$dir/${m%%=*}" ] || models+=("$dir/${m%%=*}")
  done < <(methods_of "$dir")
  if step heldout; then
    job "$dir/heldout.log" python "$here/plan_comparison.py" heldout --recipe "$RECIPE" "${sets[@]}" --model "$MODEL" \
      --device "$DEVICE" --dtype "$DTYPE" --out "$dir/heldout.md" "${named[@]}"
  fi
  if step retrieval; then
    job "$dir/eval-passkey.log" linearize eval "${models[@]}" "${common[@]}" --batch-size "$RETRIEVAL_BATCH" --suite passkey \
      --lengths "$LENGTHS" --depths 0,0.25,0.5,0.75,1 --samples 4 --out "$dir/eval-passkey" --resume
  fi
  if step fewshot; then
    for spec in arc_challenge:25 hellaswag:10 winogrande:5; do
      job "$dir/eval-${spec%%:*}-${spec##*:}shot.log" linearize eval "${models[@]}" "${common[@]}" --suite lm-eval \
        --data-dir "$LINEARIZE_DATA" "${limit[@]}" --tasks "${spec%%:*}" --num-fewshot "${spec##*:}" \
        --out "$dir/eval-${spec%%:*}-${spec##*:}shot" --resume
    done
  fi
done
finish || echo "plan_comparison: an evaluation failed or was cut short (see its log under $OUT/<budget>/)" >&2
if step report; then
  python "$here/plan_comparison.py" report "$OUT" $BUDGETS
fi
echo "reports: $OUT/comparison.md, $OUT/*/heldout.md, $OUT/*/eval-*/report.md"
