"""Attention speed on one GPU: our Triton linear attention and sliding-window + linear hybrid
against softmax attention (SDPA's flash and cuDNN backends) and fla's chunk_linear_attn, and our
gated (decayed) linear attention against fla's chunk_gla, all measured in the same run.

    python benchmarks/attention.py --out runs/bench/attention.json      # full grid, a few minutes
    python benchmarks/attention.py --quick                              # a small subset, < 1 min

Grid: batch 1 and 8, 32 heads, head size 64 and 128 (the linear attention's feature size equals
the head size), T = 2K ... 64K, bf16, causal; forward ("fwd") and forward + backward ("fwd+bwd",
the gradient of ``(out * do).sum()``). Times are medians of ``triton.testing.do_bench`` in ms.
Each backend runs in its own try/except: one that fails or runs out of memory is reported as
such and the rest go on.

Backends:

* ``sdpa_flash`` / ``sdpa_cudnn``: ``F.scaled_dot_product_attention(is_causal=True)`` under
  ``torch.nn.attention.sdpa_kernel`` (FlashAttention-2 / cuDNN); the softmax baseline is the
  faster of the two;
* ``fla``: ``fla.ops.linear_attn.chunk_linear_attn(normalize=True)``, inputs ``[B, T, H, D]``,
  when fla can be imported;
* ``ours``: ``linearize.kernels.linear.chunk_linear_attention`` (``[B, H, T, D]``), one column
  per ``--chunk`` size;
* ``ours_par``: ours, 64 tokens a chunk, with the two-pass forward (``parallel=True``: each
  chunk's starting state, then all chunks' outputs at once; the backward is the same);
  ``lp_x_floor`` its time over the floor, ``lp_vs_l`` ours' best sequential time over it,
  ``lp_vs_sdpa`` and ``lp_vs_fla`` the softmax baseline's and fla's;
* ``ours+hh``: the fused Hedgehog feature maps (``linearize.kernels.feature_map``, ``D/2`` per
  softmax, so ``D`` features) on raw q and k, then ours; ``torch_hh+ours``: the same maps in
  plain PyTorch (``HedgehogFeatureMap``) then ours. (Not with ``--quick``.)
* ``fused_hh`` / ``fused_np``: the same attention with the Hedgehog / NP-Map maps computed
  inside the attention kernels (``linearize.kernels.linear.fused``, raw q and k in, the maps
  recomputed in the backward). ``fus_x_lin``, ``hh_x_lin``, ``thh_x_lin`` are ``fused_hh``'s,
  ``ours+hh``'s and ``torch_hh+ours``'s times over ours (attention alone, the best chunk size),
  ``np_x_lin`` ``fused_np``'s. (``--no-fused`` leaves the fused ones out.)
* ``ours_gated``: ``linearize.kernels.gated.chunk.triton_chunk_gated_attention`` (normalised
  linear attention with a per-channel decay, LAWCAT's; ``[B, H, T, D]``), 64 tokens a step (its
  default), log decays ``g = logsigmoid(N(0, 1)) / 16`` in bf16, the same for fla;
  ``ours_gated_c16``: the same kernels 16 tokens a step (``chunk_size=16``); ``g64_vs_16`` is
  the 16-token time over the 64-token one. Both take the default, chunk-parallel forward (each
  chunk's starting state, then all chunks' outputs at once, as fla's ``chunk_gla`` does);
  ``ours_gated_walk``: the sequential walk instead (``parallel=False``; the backward is the
  same), ``g_vs_walk`` its time over the default's;
* ``fla_gla``: ``fla.ops.gla.chunk_gla`` on the same math: fla computes the unnormalised
  ``o_t = q_t^T S_t``, so it gets ``v`` with a ones column appended (``D + 1`` value columns, which
  fla tiles like any other) and ``scale=1``, and the division ``o[..., :D] / o[..., D:]`` and the
  concatenation run in PyTorch inside the timed function; inputs ``[B, T, H, D]``. On Hopper with
  Triton 3.4-3.7 fla may refuse its gated backward (a known miscompile); the row then says so.
  (``--no-gated`` leaves both out.)
* ``hybrid``: ``linearize.kernels.hybrid.chunk.triton_chunk_hybrid_attention``, LoLCATs'
  sliding window (``--window``, default 64) plus linear attention under one normaliser, with
  ``--sinks`` attention sinks (default 4): q, k for the softmax terms and separate features
  fq, fk (``D`` of them) for the linear ones. fla has no exact equivalent (its linear
  attention has no softmax window sharing the normaliser), so its plain ``chunk_linear_attn``
  is the nearest baseline: ``hyb_vs_fla`` compares with it, ``hyb_vs_sdpa`` with the softmax
  baseline, ``hyb_x_lin`` is the hybrid's time over our plain linear attention's.
  (``--no-hybrid`` leaves it out.)

The memory floor of a pass is the time to move its tensors once at the GPU's peak HBM bandwidth
(3.35e12 B/s on an H100 SXM, HBM3; 4.8e12 B/s on an H200, HBM3e; ``--hbm-tbps`` for another GPU):
q, k, v, o for the forward; those plus do, dq, dk, dv for forward + backward (for the gated
kernel also g, and dg; for the hybrid also fq, fk, and dfq, dfk). ``ours_TB/s`` is that byte
count over our (linear) measured time; ``g_x_floor`` and ``hyb_x_floor`` are the gated kernel's and
the hybrid kernel's times over their floors.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HBM_BYTES_PER_S = 3.35e12  # set from the GPU in main()
PEAK_HBM_TBPS = {"H100": 3.35, "H200": 4.8, "B200": 8.0, "A100": 2.0}
HEADS = 32


def do_bench(fn, quick):
    import triton.testing

    kwargs = dict(warmup=10, rep=30) if quick else dict(warmup=25, rep=100)
    try:
        return float(triton.testing.do_bench(fn, return_mode="median", **kwargs))
    except TypeError:  # older triton: quantiles instead of return_mode
        return float(triton.testing.do_bench(fn, quantiles=[0.5], **kwargs)[0])


def floor_ms(B, T, D, mode, gated=False, hybrid=False):
    tensors = (4 if mode == "fwd" else 8) + (gated and (1 if mode == "fwd" else 2))
    tensors += hybrid and (2 if mode == "fwd" else 4)  # fq, fk (and their gradients)
    return tensors * B * HEADS * T * D * 2 / HBM_BYTES_PER_S * 1e3


# ----------------------------------------------------------------------------- backends


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def make(q, k, v):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return run, (q, k, v)

    return make


def fla_backend():
    from fla.ops.linear_attn import chunk_linear_attn

    extra = {}
    params = inspect.signature(chunk_linear_attn).parameters
    if "head_first" in params:  # older fla: say the layout explicitly
        extra["head_first"] = False

    def make(q, k, v):
        qt, kt, vt = (x.transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad) for x in (q, k, v))

        def run():
            o, _ = chunk_linear_attn(qt, kt, vt, normalize=True, **extra)
            return o

        return run, (qt, kt, vt)

    return make


def ours_backend(chunk, parallel=None):
    from linearize.kernels.linear import chunk_linear_attention

    def make(q, k, v):
        def run():
            y, _ = chunk_linear_attention(q, k, v, chunk_size=chunk, parallel=parallel)
            return y

        return run, (q, k, v)

    return make


def hedgehog_backend(fused):
    from linearize.feature_maps import HedgehogFeatureMap
    from linearize.kernels.feature_map import hedgehog_feature_map
    from linearize.kernels.linear import chunk_linear_attention

    def make(q, k, v):
        D = q.shape[-1]
        maps = [HedgehogFeatureMap(HEADS, D, D // 2).to(q.device) for _ in range(2)]
        with torch.no_grad():
            for m in maps:
                m.weight.normal_(0, D**-0.5)
        xq, xk = (torch.randn_like(q).requires_grad_(q.requires_grad) for _ in range(2))

        def run():
            if fused:
                fq, fk = hedgehog_feature_map(xq, maps[0].weight, q.dtype), hedgehog_feature_map(xk, maps[1].weight, q.dtype)
            else:
                fq, fk = maps[0](xq).to(q.dtype), maps[1](xk).to(q.dtype)
            y, _ = chunk_linear_attention(fq, fk, v, chunk_size=64)
            return y

        return run, (xq, xk, v, maps[0].weight, maps[1].weight)

    return make


def fused_maps_backend(kind):
    from linearize.feature_maps import HedgehogFeatureMap, NPMapFeatureMap
    from linearize.kernels.linear.fused import fused_map_linear_attention

    def make(q, k, v):
        D = q.shape[-1]
        cls = HedgehogFeatureMap if kind == "hedgehog" else NPMapFeatureMap
        maps = [cls(HEADS, D, D // 2).to(q.device) for _ in range(2)]
        with torch.no_grad():
            for m in maps:
                m.weight.normal_(0, D**-0.5)
        params = [p for m in maps for p in m.parameters()]
        for p in params:
            p.requires_grad_(q.requires_grad)
        xq, xk = (torch.randn_like(q).requires_grad_(q.requires_grad) for _ in range(2))
        extra = dict(query_reflection=maps[0].reflection, key_reflection=maps[1].reflection) if kind == "npmap" else {}

        def run():
            y, _ = fused_map_linear_attention(xq, xk, v, kind, maps[0].weight, maps[1].weight, **extra,
                                              output_dtype=q.dtype)
            return y

        return run, (xq, xk, v, *params)

    return make


def _log_decays(q):
    """LAWCAT-like log decays ``logsigmoid(N(0, 1)) / 16`` shaped like ``q``, in its dtype."""
    g = F.logsigmoid(torch.randn(q.shape, device=q.device)) / 16
    return g.to(q.dtype).requires_grad_(q.requires_grad)


def ours_gated_backend(chunk=64, parallel=None):
    from linearize.kernels.gated.chunk import triton_chunk_gated_attention

    def make(q, k, v):
        g = _log_decays(q)

        def run():
            y, _ = triton_chunk_gated_attention(q, k, v, g, chunk_size=chunk, parallel=parallel)
            return y

        return run, (q, k, v, g)

    return make


def fla_gla_backend():
    from fla.ops.gla import chunk_gla

    extra = {}
    if "head_first" in inspect.signature(chunk_gla).parameters:  # older fla: say the layout explicitly
        extra["head_first"] = False

    def make(q, k, v):
        g = _log_decays(q)
        qt, kt, vt, gt = (x.transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad) for x in (q, k, v, g))
        ones = vt.new_ones(*vt.shape[:-1], 1)

        def run():  # the ones column carries the normaliser, as in ours
            out = chunk_gla(qt, kt, torch.cat([vt, ones], -1), gt, scale=1.0, **extra)
            o = out[0] if isinstance(out, tuple) else out  # (o, final_state) in current fla
            return o[..., :-1] / o[..., -1:]

        return run, (qt, kt, vt, gt)

    return make


def hybrid_backend(window, sinks):
    from linearize.kernels.hybrid.chunk import MAX_COMPILED_HEAD, triton_chunk_hybrid_attention

    def make(q, k, v):
        if q.shape[-1] > MAX_COMPILED_HEAD:  # an illegal memory access here would end the whole run
            raise RuntimeError(f"heads of {q.shape[-1]}: the compiled hybrid kernels take heads up to "
                               f"{MAX_COMPILED_HEAD} (larger ones fault on sm_90 with Triton 3.6)")
        fq, fk = (torch.rand_like(q).requires_grad_(q.requires_grad) for _ in range(2))
        gamma = torch.full((q.shape[1],), 0.1, device=q.device, requires_grad=q.requires_grad)
        scale = q.shape[-1] ** -0.5

        def run():
            y, _ = triton_chunk_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, sinks=sinks,
                                                 output_state=False)
            return y

        return run, (q, k, v, fq, fk, gamma)

    return make


def available_backends(args):
    """``{name: factory}``, plus ``{name: reason}`` for those that cannot run here."""
    backends, missing = {}, {}
    for name in ("sdpa_flash", "sdpa_cudnn"):
        try:
            backends[name] = sdpa_backend(name)
        except Exception as e:  # noqa: BLE001 - any failure only removes this baseline
            missing[name] = repr(e)
    if not args.no_fla:
        try:
            backends["fla"] = fla_backend()
        except Exception as e:  # noqa: BLE001
            missing["fla"] = repr(e)
    for c in args.chunk:
        try:
            backends[f"ours_c{c}"] = ours_backend(c)
        except Exception as e:  # noqa: BLE001
            missing[f"ours_c{c}"] = repr(e)
    if not args.no_two_pass:
        try:  # the two-pass forward, 64 tokens a chunk
            backends["ours_par"] = ours_backend(64, parallel=True)
        except Exception as e:  # noqa: BLE001
            missing["ours_par"] = repr(e)
    if not args.no_gated:
        for name, factory in (("ours_gated", ours_gated_backend),
                              ("ours_gated_walk", lambda: ours_gated_backend(parallel=False)),
                              ("ours_gated_c16", lambda: ours_gated_backend(16)),
                              ("fla_gla", fla_gla_backend)):
            if name == "fla_gla" and args.no_fla:
                continue
            try:
                backends[name] = factory()
            except Exception as e:  # noqa: BLE001
                missing[name] = repr(e)
    if not args.no_hybrid:
        try:
            backends["hybrid"] = hybrid_backend(args.window, args.sinks)
        except Exception as e:  # noqa: BLE001
            missing["hybrid"] = repr(e)
    if not args.no_fused:
        for name, kind in (("fused_hh", "hedgehog"), ("fused_np", "npmap")):
            try:
                backends[name] = fused_maps_backend(kind)
            except Exception as e:  # noqa: BLE001
                missing[name] = repr(e)
    if not args.quick:
        for name, fused in (("ours+hh", True), ("torch_hh+ours", False)):
            try:
                backends[name] = hedgehog_backend(fused)
            except Exception as e:  # noqa: BLE001
                missing[name] = repr(e)
    return backends, missing


# ----------------------------------------------------------------------------- measuring


def measure(make, q, k, v, mode, quick):
    """Median ms of one backend, or a short string saying why not."""
    try:
        run, leaves = make(q, k, v)
        if mode == "fwd":
            with torch.no_grad():
                run()
                return do_bench(run, quick)
        out = run()
        do = torch.randn_like(out)

        def step():
            for x in leaves:
                x.grad = None
            run().backward(do)

        step()
        return do_bench(step, quick)
    except torch.cuda.OutOfMemoryError:
        return "oom"
    except Exception as e:  # noqa: BLE001 - report and go on
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def fits(B, T, D, mode):
    """Whether the largest backend's tensors (about 20 [B, H, T, D] bf16 tensors for fwd+bwd, 10
    for fwd, counting fp32 copies, the hybrid's features and fla's per-chunk states) fit in free
    memory."""
    free, _ = torch.cuda.mem_get_info()
    need = (10 if mode == "fwd" else 20) * B * HEADS * T * D * 2
    return need < 0.9 * free


def grid(args):
    if args.quick:
        return [(1, 128, T) for T in (2048, 8192)]
    return [(B, D, T) for B in args.batch for D in args.head_dim for T in args.lengths]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="batch 1, head size 128, T = 2K and 8K only")
    parser.add_argument("--chunk", type=int, nargs="+", default=None, help="our chunk sizes (default: 64; full: 32 64)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head sizes (default: 64 128)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536],
                        help="sequence lengths (default: 2K ... 64K)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--no-fla", action="store_true", help="leave fla out")
    parser.add_argument("--no-gated", action="store_true",
                        help="leave the gated kernels (ours and fla's chunk_gla) out")
    parser.add_argument("--no-hybrid", action="store_true", help="leave the sliding-window + linear hybrid out")
    parser.add_argument("--no-two-pass", action="store_true",
                        help="leave the linear kernels' opt-in two-pass forward out (ours_par)")
    parser.add_argument("--no-fused", action="store_true",
                        help="leave the fused feature-map attention (fused_hh, fused_np) out")
    parser.add_argument("--hbm-tbps", type=float, help="peak HBM bandwidth in TB/s (default: from the GPU's name)")
    parser.add_argument("--window", type=int, default=64, help="the hybrid's softmax window (default 64)")
    parser.add_argument("--sinks", type=int, default=4, help="the hybrid's attention sinks (default 4)")
    args = parser.parse_args(argv)
    if args.chunk is None:
        args.chunk = [64] if args.quick else [32, 64]
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    global HBM_BYTES_PER_S
    name = torch.cuda.get_device_name()
    tbps = args.hbm_tbps or next((v for k, v in PEAK_HBM_TBPS.items() if k in name), None)
    if tbps is None:
        sys.exit(f"no peak HBM bandwidth known for {name!r}: pass --hbm-tbps")
    HBM_BYTES_PER_S = tbps * 1e12
    backends, missing = available_backends(args)
    env = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=_version("triton"),
        fla=_version("fla") or _version("flash-linear-attention"),
        python=platform.python_version(),
        heads=HEADS,
        dtype="bfloat16",
        hbm_bytes_per_s=HBM_BYTES_PER_S,
        hybrid_window=None if args.no_hybrid else args.window,
        hybrid_sinks=None if args.no_hybrid else args.sinks,
        missing_backends=missing,
    )
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items() if k != "missing_backends"))
    for name, why in missing.items():
        print(f"# {name}: unavailable ({why})")
    records = []
    started = time.time()
    for mode in args.modes:
        for B, D, T in grid(args):
            if not fits(B, T, D, mode):
                records.append(dict(mode=mode, B=B, D=D, T=T, skipped="does not fit in GPU memory"))
                continue
            q, k, v = (torch.rand(B, HEADS, T, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
            if mode == "fwd+bwd":
                for x in (q, k, v):
                    x.requires_grad_()
            rec = dict(mode=mode, B=B, D=D, T=T, floor_ms=floor_ms(B, T, D, mode),
                       gated_floor_ms=floor_ms(B, T, D, mode, gated=True),
                       hybrid_floor_ms=floor_ms(B, T, D, mode, hybrid=True), ms={})
            rec["wall_s"] = {}
            for name, make in backends.items():
                t0 = time.time()
                rec["ms"][name] = measure(make, q, k, v, mode, args.quick)
                # compiling and autotuning show here (the first shape of a kernel, or every new shape)
                rec["wall_s"][name] = round(time.time() - t0, 2)
                ms = rec["ms"][name]
                print(f"#   {mode} B={B} D={D} T={T} {name}: {ms if isinstance(ms, str) else f'{ms:.3f} ms'}, "
                      f"{rec['wall_s'][name]:.1f} s wall", file=sys.stderr, flush=True)
            del q, k, v
            _ratios(rec, args.chunk)
            records.append(rec)
            print(_row(rec, list(backends), header=len(records) == 1), flush=True)
            if args.out:  # after every row, so that an interrupted run keeps what it measured
                write(args.out, dict(env=env, results=records))
    print(f"# {time.time() - started:.0f} s")
    print()
    print(table(records, list(backends)))
    if args.out:
        write(args.out, dict(env=env, results=records))
        print(f"# wrote {args.out}")


def write(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(path)


def _version(module):
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def _ms(x):
    return x if isinstance(x, float) else None


def _ratios(rec, chunks):
    """Speed-ups of our best chunk size over the softmax baseline and fla, and bandwidth; the same
    for the gated kernel against fla's chunk_gla, and for the hybrid against SDPA and fla's plain
    linear attention (its nearest equivalent); the feature maps' cost over ours alone."""
    ms = rec["ms"]
    ours = [t for c in chunks if (t := _ms(ms.get(f"ours_c{c}"))) is not None]
    softmax = [t for n in ("sdpa_flash", "sdpa_cudnn") if (t := _ms(ms.get(n))) is not None]
    fla = _ms(ms.get("fla"))
    if ours:
        best = min(ours)
        rec["ours_ms"] = best
        rec["ours_TBps"] = rec["floor_ms"] * HBM_BYTES_PER_S / 1e12 / best
        rec["ours_vs_floor"] = best / rec["floor_ms"]
        if softmax:
            rec["speedup_vs_sdpa"] = min(softmax) / best
        if fla is not None:
            rec["speedup_vs_fla"] = fla / best
    par = _ms(ms.get("ours_par"))
    if par is not None:
        rec["par_vs_floor"] = par / rec["floor_ms"]
        if ours:
            rec["par_speedup_vs_seq"] = min(ours) / par
        if softmax:
            rec["par_speedup_vs_sdpa"] = min(softmax) / par
        if fla is not None:
            rec["par_speedup_vs_fla"] = fla / par
    gated, fla_gla = _ms(ms.get("ours_gated")), _ms(ms.get("fla_gla"))
    gated16 = _ms(ms.get("ours_gated_c16"))
    gated_walk = _ms(ms.get("ours_gated_walk"))
    if gated_walk is not None and gated is not None:
        rec["gated_speedup_vs_walk"] = gated_walk / gated
    if gated is not None:
        rec["gated_vs_floor"] = gated / rec["gated_floor_ms"]
        if gated16 is not None:
            rec["gated_c64_speedup_vs_c16"] = gated16 / gated
        if softmax:
            rec["gated_speedup_vs_sdpa"] = min(softmax) / gated
        if fla_gla is not None:
            rec["gated_speedup_vs_fla_gla"] = fla_gla / gated
    hybrid = _ms(ms.get("hybrid"))
    if hybrid is not None:
        rec["hybrid_vs_floor"] = hybrid / rec["hybrid_floor_ms"]
        if softmax:
            rec["hybrid_speedup_vs_sdpa"] = min(softmax) / hybrid
        if fla is not None:
            rec["hybrid_speedup_vs_fla"] = fla / hybrid
        if ours:
            rec["hybrid_over_linear"] = hybrid / min(ours)
    if ours:  # the feature maps' cost: each way of computing them, over the attention alone
        for name, key in (("fused_hh", "fused_over_linear"), ("ours+hh", "hh_over_linear"),
                          ("torch_hh+ours", "torch_hh_over_linear"), ("fused_np", "npmap_over_linear")):
            t = _ms(ms.get(name))
            if t is not None:
                rec[key] = t / min(ours)


def _cell(x, width=10):
    if isinstance(x, float):
        s = f"{x:.3f}" if x < 100 else f"{x:.1f}"
    elif x is None:
        s = "-"
    else:
        s = "oom" if x == "oom" else "err"
    return s.rjust(width)


COLUMNS = [("ours_TBps", "ours_TB/s"), ("ours_vs_floor", "x_floor"), ("speedup_vs_sdpa", "vs_sdpa"),
           ("speedup_vs_fla", "vs_fla"), ("par_vs_floor", "lp_x_floor"), ("par_speedup_vs_seq", "lp_vs_l"),
           ("par_speedup_vs_sdpa", "lp_vs_sdpa"), ("par_speedup_vs_fla", "lp_vs_fla"), ("gated_vs_floor", "g_x_floor"), ("gated_speedup_vs_sdpa", "g_vs_sdpa"),
           ("gated_speedup_vs_fla_gla", "g_vs_fla"), ("gated_c64_speedup_vs_c16", "g64_vs_16"),
           ("gated_speedup_vs_walk", "g_vs_walk"),
           ("hybrid_vs_floor", "hyb_x_floor"),
           ("hybrid_speedup_vs_sdpa", "hyb_vs_sdpa"), ("hybrid_speedup_vs_fla", "hyb_vs_fla"),
           ("hybrid_over_linear", "hyb_x_lin"), ("fused_over_linear", "fus_x_lin"),
           ("hh_over_linear", "hh_x_lin"), ("torch_hh_over_linear", "thh_x_lin"), ("npmap_over_linear", "np_x_lin")]


def _row(rec, names, header=False):
    head = f"{'mode':8}{'B':>3}{'D':>5}{'T':>7}{'floor':>9}" + "".join(n.rjust(14) for n in names)
    head += "".join(label.rjust(11) for _, label in COLUMNS)
    if "skipped" in rec:
        line = f"{rec['mode']:8}{rec['B']:>3}{rec['D']:>5}{rec['T']:>7}   ({rec['skipped']})"
    else:
        line = f"{rec['mode']:8}{rec['B']:>3}{rec['D']:>5}{rec['T']:>7}{rec['floor_ms']:>9.3f}"
        line += "".join(_cell(rec["ms"].get(n), 14) for n in names)
        line += "".join(_cell(rec.get(key), 11) for key, _ in COLUMNS)
    return (head + "\n" + line) if header else line


def table(records, names):
    """All rows under one header; times in ms, ratios > 1 mean ours is faster."""
    lines = [_row(records[0], names, header=True)] if records else []
    lines += [_row(r, names) for r in records[1:]]
    errors = [(r["mode"], r["B"], r["D"], r["T"], n, t) for r in records for n, t in r.get("ms", {}).items()
              if isinstance(t, str) and t != "oom"]
    for mode, B, D, T, n, t in errors:
        lines.append(f"# {n} at {mode} B={B} D={D} T={T}: {t}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
