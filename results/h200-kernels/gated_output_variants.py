"""The chunk-parallel gated forward's output pass compiled with other tiles, warps and pipelining
stages, each variant in a process of its own (an illegal memory access poisons its CUDA context):
its ``y`` and ``d`` against the sequential walk's (relative error), at the shapes the GPU tests
use, and the time of the whole forward at B=1, 32 heads, F=Dv=128, T=8K for each variant that is
right. ``python results/h200-kernels/gated_output_variants.py``."""

import json
import subprocess
import sys

VARIANTS = [  # (BK, BV, warps, stages)
    (64, 64, 8, 2), (64, 64, 8, 1), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (128, 16, 8, 2),
    (64, 32, 4, 2), (64, 16, 4, 2), (32, 64, 4, 2),
]
SHAPES = [(2, 8, 4096, 64, 64), (2, 8, 4096, 128, 64), (16, 9, 1024, 128, 64), (1, 32, 8192, 128, 128)]

CHILD = r'''
import json, sys, torch, triton
sys.path.insert(0, ".")
from linearize.kernels.gated import chunk
BK, BV, W, ST = map(int, sys.argv[1:5])
chunk._out_config = lambda F, DV, dtype=None, C=64: (min(BK, triton.next_power_of_2(F)), min(BV, triton.next_power_of_2(DV)), W)
chunk.OUT_STAGES = ST
out = {}
for b, h, T, f, dv in %s:
    torch.manual_seed(0)
    fq, fk = (torch.rand(b, h, T, f, device="cuda").to(torch.bfloat16) for _ in range(2))
    v = torch.randn(b, h, T, dv, device="cuda").to(torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(b, h, T, f, device="cuda")).div(16).to(torch.bfloat16)
    key = f"{b}x{h}x{T} F={f} Dv={dv}"
    try:
        walk = chunk.gated_attention_fwd(fq, fk, v, g, None, None, True, keep_fp32_output=True, parallel=False)
        par = chunk.gated_attention_fwd(fq, fk, v, g, None, None, True, keep_fp32_output=True, parallel=True)
        torch.cuda.synchronize()
        rel = lambda a, r: ((a.float() - r.float()).norm() / r.float().norm()).item()
        row = dict(y32=rel(par[1], walk[1]), d=rel(par[2], walk[2]), S=rel(par[4], walk[4]))
        if T == 8192 and max(row.values()) < 1e-4:
            ms = lambda p: triton.testing.do_bench(lambda: chunk.gated_attention_fwd(fq, fk, v, g, parallel=p), return_mode="median")
            row.update(ms_par=ms(True), ms_walk=ms(False))
        out[key] = row
    except Exception as e:
        out[key] = f"{type(e).__name__}: {str(e)[:100]}"
        break
print("RESULT " + json.dumps(out))
''' % (SHAPES,)

for variant in VARIANTS:
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, variant)], capture_output=True, text=True, timeout=300)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    res = json.loads(line[7:]) if line else (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
    print(f"BK={variant[0]} BV={variant[1]} warps={variant[2]} stages={variant[3]}: {json.dumps(res)}", flush=True)
