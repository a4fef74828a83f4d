"""The hybrid kernels with heads of 128 compiled with other backward blocks and warps, each
variant in a process of its own: every output's and gradient's relative error against the fp32
reference (the GPU test's check, B=2, 8 heads, T=2048, F=128, 4 sinks, left padding, bf16).
``python results/h200-kernels/hybrid_heads_128.py``."""

import json
import subprocess
import sys

VARIANTS = [(None, None, 8), (32, 32, 8), (64, 64, 8), (32, 16, 8), (16, 16, 8), (64, 32, 4)]  # (BKF, BV, warps)

CHILD = r'''
import json, sys, torch
sys.path.insert(0, "."); sys.path.insert(0, "tests/kernels"); sys.path.insert(0, "tests")
from linearize.kernels.hybrid import chunk
import test_triton_hybrid as th
bkf, bv, w, window = (None if a == "None" else int(a) for a in sys.argv[1:5])
if bkf is not None:
    chunk._bwd_blocks = lambda *a: (bkf, bv)
if w != 8:
    orig = chunk._bwd_kernel
    class Warps:
        def __getitem__(self, grid):
            launch = orig[grid]
            return lambda *a, **k: launch(*a, **dict(k, num_warps=w))
    chunk._bwd_kernel = Warps()
errs = {}
orig_errors = None
try:
    th.check_bf16_against_reference(2, 8, 2048, 128, 128, window, 4, "cuda")
    print("RESULT " + json.dumps("pass"))
except AssertionError as e:
    print("RESULT " + json.dumps(str(e).splitlines()[0][:400]))
'''

for window in (64, 16):
    for variant in VARIANTS:
        r = subprocess.run([sys.executable, "-c", CHILD, *map(str, variant), str(window)], capture_output=True, text=True,
                           timeout=300)
        line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        print(f"window={window} BKF={variant[0]} BV={variant[1]} warps={variant[2]}: {res}", flush=True)
