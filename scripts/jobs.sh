# Shell helpers the run scripts share (sourced, not run): commands under a DEADLINE, and a pool of
# at most JOBS background commands on the one device.
#   bounded CMD...   run CMD; with DEADLINE (seconds since the epoch) set, SIGINT at the deadline
#                    (a conversion checkpoints, an evaluation keeps the models it finished)
#   job LOG CMD...   JOBS <= 1: bounded CMD now; otherwise bounded CMD in the background, its output
#                    in LOG, once fewer than JOBS run
#   finish           wait for every job; non-zero if any failed
bounded() {
  if [ -z "${DEADLINE:-}" ]; then "$@"; return; fi
  local left=$((DEADLINE - $(date +%s))); [ "$left" -gt 0 ] || { echo "past the deadline: $*" >&2; return 124; }
  timeout --signal=INT --kill-after=30 "$left" "$@"; }
pids=()
job() { local log=$1; shift
  if [ "${JOBS:-1}" -le 1 ]; then bounded "$@"; return; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
  echo "started: $* (log: $log)"; bounded "$@" > "$log" 2>&1 & pids+=($!); }
finish() { local failed=0 p; for p in "${pids[@]}"; do wait "$p" || failed=1; done; pids=(); return $failed; }
