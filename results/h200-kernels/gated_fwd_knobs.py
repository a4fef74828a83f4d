"""The gated kernels' other launch settings (the intra kernel's warps and stages, the state walks'
warps, the ``dg`` sums' feature blocks), one variant a process (an illegal memory access poisons
its CUDA context). For each: the forward's output and the gradients against those of the
launchers' own settings in the same process (relative max error over the shapes the GPU tests
use), then the kernel time (``benchmarks/kernel_breakdown.py``'s profiler timing) of a forward
and of a forward + backward at B=1, 32 heads, T=32K, F=Dv.

    python results/h200-kernels/gated_fwd_knobs.py
    python results/h200-kernels/gated_fwd_knobs.py '{"F": 128, "INTRA_WARPS": 4}'

A variant sets module attributes of ``linearize.kernels.gated.chunk``; a dict-valued one
(``INTRA_WARPS``, ``SUB_WARPS``) is set for the variant's ``F`` only. (``gated-fwd-knobs.log``
was taken when the forward and backward state walks had a warp setting each, ``STATES_WARPS``
and ``BWD_STATES_WARPS``; both timed the same with 4 warps, and ``STATES_WARPS`` now sets both.)"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = [
    {"F": 128}, {"F": 128, "INTRA_WARPS": 4}, {"F": 128, "INTRA_WARPS": 2}, {"F": 128, "INTRA_WARPS": 1},
    {"F": 128, "INTRA_WARPS": 2, "INTRA_STAGES": 1}, {"F": 128, "INTRA_WARPS": 4, "INTRA_STAGES": 1},
    {"F": 128, "STATES_WARPS": 4}, {"F": 128, "DG_BK": 16},
    {"F": 64}, {"F": 64, "INTRA_WARPS": 2}, {"F": 256}, {"F": 256, "INTRA_WARPS": 4},
]
SHAPES = [(2, 8, 4096, 64, 64), (16, 9, 1024, 128, 64), (1, 32, 8192, 128, 128), (1, 4, 2048, 256, 256)]


def outputs(ch, torch, shape):
    b, h, T, f, dv = shape
    torch.manual_seed(0)
    q, k = (torch.rand(b, h, T, f, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(b, h, T, dv, device="cuda", dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(b, h, T, f, device="cuda")) / 16
    do = torch.randn(b, h, T, dv, device="cuda", dtype=torch.bfloat16)
    xs = [x.requires_grad_(True) for x in (q, k, v, g)]
    y, _ = ch.triton_chunk_gated_attention(*xs)
    y.backward(do)
    return [y.float()] + [x.grad.float() for x in xs]


def one(variant):
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import attention as bench
    import kernel_breakdown as kb

    import linearize.kernels.gated.chunk as ch

    D = variant["F"]
    shapes = [s for s in SHAPES if s[3] <= 128 or D == 256]
    base = {s: outputs(ch, torch, s) for s in shapes}
    for name, value in variant.items():
        if name == "F":
            continue
        old = getattr(ch, name)
        setattr(ch, name, {**old, D: value} if isinstance(old, dict) else value)
    err, finite = 0.0, True
    for s in shapes:
        for a, b in zip(outputs(ch, torch, s), base[s]):
            finite &= bool(torch.isfinite(a).all())
            err = max(err, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    del base
    torch.cuda.empty_cache()
    row = dict(variant=variant, finite=finite, rel_vs_defaults=f"{err:.1e}")
    for mode in ("fwd", "fwd+bwd"):
        t = kb.run_one(bench.ours_gated_backend(64), 1, 32768, D, mode, 5)
        row[mode] = dict(total_ms=round(sum(t.values()), 3),
                         **{k: round(v, 3) for k, v in t.items() if k.startswith("_") and v > 0.2})
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        one(json.loads(sys.argv[1]))
    else:
        for variant in VARIANTS:
            r = subprocess.run([sys.executable, __file__, json.dumps(variant)], capture_output=True, text=True, timeout=300)
            line = [x for x in r.stdout.splitlines() if x.startswith("{")]
            print(line[-1] if line else f"{variant}: failed (exit {r.returncode}) {r.stderr.strip()[-300:]}", flush=True)
