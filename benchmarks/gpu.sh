#!/usr/bin/env bash
# The kernels on one GPU, in one go: every kernel test compiled (the slow and GPU-marked real-shape
# ones included: each Triton kernel against its fp32 PyTorch reference; and the CUDA-graph decode
# path's tests), then the attention-op and model-level benchmarks (the student decoding through
# generate()'s forward loop, model-KERNELS.json, and through the CUDA-graph static decoder,
# model-KERNELS-static.json). Logs, a JUnit file and the benchmarks' JSON go to OUT.
#
#   OUT=runs/gpu bash benchmarks/gpu.sh                  # everything
#   STEPS="tests attention" OUT=runs/gpu bash benchmarks/gpu.sh
#
# Settings (environment): OUT (runs/gpu), STEPS ("tests attention model"), WORKERS (pytest-xdist
# processes for the tests, default 8; 0 runs them in one process), ATTENTION_ARGS (extra arguments
# of benchmarks/attention.py), MODEL_ARGS (of benchmarks/model.py, e.g. "--config DIR/config.json"
# for random weights of a model's shape), PYTHON (python3).
set -uo pipefail
: "${OUT:=runs/gpu}" "${STEPS:=tests attention model}" "${WORKERS:=8}" "${PYTHON:=python3}"
: "${ATTENTION_ARGS:=}" "${MODEL_ARGS:=}"
export PYTHONUNBUFFERED=1
# fla's kernels tune themselves at each new shape (about 46 s a shape forward and 2 minutes forward +
# backward on an H200): with this Triton keeps the timings in its cache dir (TRITON_CACHE_DIR,
# ~/.triton/cache by default), so a later run given the same dir picks fla's configurations without
# timing them again (Triton skips the cache for configurations that carry a pre-hook)
export TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}"
mkdir -p "$OUT"
step() { [[ " $STEPS " == *" $1 "* ]]; }
status=0
if step tests; then
  xdist=(); [ "$WORKERS" != 0 ] && xdist=(-n "$WORKERS")
  "$PYTHON" -m pytest tests/kernels tests/test_generation.py -m "gpu or not gpu" -q -rf -p no:cacheprovider "${xdist[@]}" \
    --junitxml "$OUT/kernel-tests.xml" 2>&1 | tee "$OUT/kernel-tests.log" || status=1
fi
if step attention; then
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/attention.py --out "$OUT/attention.json" $ATTENTION_ARGS 2>&1 | tee "$OUT/attention.log" || status=1
fi
if step model; then
  for kernels in reference triton; do
    # shellcheck disable=SC2086
    LINEARIZE_KERNELS=$kernels "$PYTHON" benchmarks/model.py --out "$OUT/model-$kernels.json" $MODEL_ARGS 2>&1 \
      | tee "$OUT/model-$kernels.log" || status=1
    # shellcheck disable=SC2086
    LINEARIZE_KERNELS=$kernels "$PYTHON" benchmarks/model.py --decode-path static --out "$OUT/model-$kernels-static.json" \
      $MODEL_ARGS 2>&1 | tee "$OUT/model-$kernels-static.log" || status=1
  done
fi
exit $status
