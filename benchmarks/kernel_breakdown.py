"""Where an attention call's GPU time goes: each CUDA kernel it launches, timed by the profiler.

    python benchmarks/kernel_breakdown.py                          # B=1, 32 heads, D=128, 8K and 32K
    python benchmarks/kernel_breakdown.py --batch 8 --lengths 8192 --modes fwd fwd+bwd --out b.json

For every backend (our linear, gated and hybrid kernels, fla's ``chunk_linear_attn`` and
``chunk_gla`` when fla imports) and shape, the call is run ``--repeats`` times under
``torch.profiler`` after a warm-up, and the CUDA kernels' device time is summed by kernel name
and divided by the repeats: a table of ms a call per kernel, the total and each kernel's share.
The totals include no launch gaps (``benchmarks/attention.py`` measures wall time); what this
says is which launch to work on. Inputs are those of ``benchmarks/attention.py`` (bf16, log
decays ``logsigmoid(N(0, 1)) / 16``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention as bench  # noqa: E402  (benchmarks/attention.py: the same backends)

HEADS = bench.HEADS


def backends(no_fla: bool):
    out = {
        "ours_linear": bench.ours_backend(64),
        "ours_gated": bench.ours_gated_backend(64),
        "ours_gated_c16": bench.ours_gated_backend(16),
        "ours_gated_walk": bench.ours_gated_backend(64, parallel=False),
        "hybrid": bench.hybrid_backend(64, 4),
    }
    if not no_fla:
        try:
            out["fla"] = bench.fla_backend()
            out["fla_gla"] = bench.fla_gla_backend()
        except Exception as e:  # noqa: BLE001 - fla is only a baseline
            print(f"fla not available: {e!r}")
    return out


def kernel_times(step, repeats: int) -> dict[str, float]:
    """``{kernel name: ms a call}`` of the CUDA kernels ``step`` launches."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name[:80]] += ev.device_time / 1e3 / repeats  # us -> ms
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def run_one(make, B, T, D, mode, repeats):
    q, k, v = (torch.rand(B, HEADS, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if mode != "fwd":
        for x in (q, k, v):
            x.requires_grad_(True)
    run, leaves = make(q, k, v)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                run()
    else:
        do = torch.randn_like(run())

        def step():
            for x in leaves:
                x.grad = None
            run().backward(do)
    return kernel_times(step, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--head-dim", type=int, nargs="+", default=[128])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--modes", nargs="+", default=["fwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--backends", nargs="+", help="a subset of the backends, by name")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    all_backends = backends(args.no_fla)
    chosen = {n: f for n, f in all_backends.items() if not args.backends or n in args.backends}
    for B in args.batch:
        for D in args.head_dim:
            for T in args.lengths:
                for mode in args.modes:
                    for name, make in chosen.items():
                        if mode == "fwd+bwd" and name == "fla_gla":
                            continue  # fla refuses its gated backward on Hopper with Triton 3.4-3.7
                        try:
                            times = run_one(make, B, T, D, mode, args.repeats)
                            torch.cuda.empty_cache()
                        except Exception as e:  # noqa: BLE001 - report and go on
                            print(f"B={B} D={D} T={T} {mode} {name}: {type(e).__name__}: {str(e)[:160]}")
                            if "illegal memory access" in str(e) or isinstance(e, getattr(torch, "AcceleratorError", ())):
                                # the CUDA context is lost: nothing after this can run in this process
                                print("stopping: a kernel faulted, and this process's CUDA context is lost")
                                return finish(args, rows)
                            continue
                        total = sum(times.values())
                        print(f"\nB={B} D={D} T={T} {mode} {name}: {total:.3f} ms of kernels a call")
                        print("| kernel | ms | share |\n|---|---|---|")
                        for kname, ms in times.items():
                            if ms >= 0.005 * total:
                                print(f"| `{kname}` | {ms:.3f} | {ms / total:.0%} |")
                        rows.append(dict(B=B, D=D, T=T, mode=mode, backend=name, total_ms=total, kernels=times))
                        sys.stdout.flush()
    finish(args, rows)


def finish(args, rows):
    """Write what was measured (``--out``), written whole or not at all."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        try:
            device = torch.cuda.get_device_name()
        except Exception:  # noqa: BLE001 - a lost context may refuse even this
            device = "unknown (the CUDA context was lost)"
        tmp.write_text(json.dumps(dict(device=device, rows=rows), indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
