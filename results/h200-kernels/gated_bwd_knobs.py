"""The gated chunk-parallel backward's launch settings, one variant a process (an illegal memory
access poisons its CUDA context): for each, the forward + backward's output and gradients
against the sequential walk's at B=1, 32 heads, T=8K, F=Dv (relative max error, bf16 inputs),
then the kernel time of a forward + backward at T=32K (``benchmarks/kernel_breakdown.py``'s
profiler timing), the sub-chunk and state-product kernels' shares apart.

    python results/h200-kernels/gated_bwd_knobs.py                  # the variants below
    python results/h200-kernels/gated_bwd_knobs.py 128 2 1 64 128 4  # one: F, warps, stages, BK, BV, warps

A variant is (F, the sub-chunk kernel's warps, its stages, and the state products' BK, BV and
warps: ``chunk.SUB_WARPS[F]``, ``chunk.SUB_STAGES``, ``chunk.INTER_BLOCKS``)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = [
    (128, 8, 3, 32, 32, 4), (128, 4, 3, 32, 32, 4), (128, 4, 3, 32, 64, 4), (128, 2, 3, 32, 64, 4),
    (128, 1, 3, 64, 64, 4), (128, 2, 1, 64, 64, 4), (128, 2, 2, 64, 64, 4), (128, 2, 3, 64, 64, 4),
    (128, 2, 3, 128, 64, 4), (128, 2, 3, 64, 128, 4), (128, 4, 3, 64, 64, 8), (128, 4, 3, 32, 64, 8),
    (64, 4, 3, 64, 64, 4), (64, 2, 3, 64, 64, 4), (256, 8, 3, 64, 64, 4), (256, 4, 3, 64, 64, 4),
]


def one(D, sub_warps, stages, BK, BV, warps):
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import attention as bench
    import kernel_breakdown as kb

    import linearize.kernels.gated.chunk as ch

    ch.SUB_WARPS = {**ch.SUB_WARPS, D: sub_warps}
    ch.SUB_STAGES, ch.INTER_BLOCKS = stages, (BK, BV, warps)
    torch.manual_seed(0)
    B, H, T = 1, 32, 8192
    q, k, v = (torch.rand(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, T, D, device="cuda")) / 16
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    res = {}
    for parallel in (True, False):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
        y, _ = ch.triton_chunk_gated_attention(*xs, parallel=parallel)
        y.backward(do)
        res[parallel] = [y.float()] + [x.grad.float() for x in xs]
    errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(res[True], res[False])]
    finite = all(torch.isfinite(a).all().item() for a in res[True])
    del res
    torch.cuda.empty_cache()
    t = kb.run_one(bench.ours_gated_backend(64), 1, 32768, D, "fwd+bwd", 5)
    print(json.dumps(dict(
        F=D, sub_warps=sub_warps, stages=stages, inter=(BK, BV, warps), finite=finite,
        rel_vs_walk=dict(zip(("y", "dq", "dk", "dv", "dg"), (f"{e:.1e}" for e in errs))),
        total_ms=round(sum(t.values()), 3), sub_ms=round(t.get("_bwd_sub_kernel", 0), 3),
        inter_ms=round(t.get("_bwd_inter_kernel", 0), 3),
    )), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 7:
        one(*map(int, sys.argv[1:]))
    else:
        for variant in VARIANTS:
            r = subprocess.run([sys.executable, __file__, *map(str, variant)], capture_output=True, text=True, timeout=300)
            line = [x for x in r.stdout.splitlines() if x.startswith("{")]
            print(line[-1] if line else f"{variant}: failed (exit {r.returncode}) {r.stderr.strip()[-300:]}", flush=True)
