"""Registers and spills of the gated Triton kernels compiled for sm_90a (H100/H200), without a GPU.

    python benchmarks/gated_registers.py                      # F = 128, Dv = 64 and 128, bf16
    python benchmarks/gated_registers.py --F 128 --Dv 128 --chunk 16 64 --BV 16 32 64 --dtype fp32

The checkout's ``linearize`` is the one compiled (the script puts the repository first on the
path). Each kernel is compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with the
tile sizes its launcher would pick (or those given; without a GPU the launchers assume enough
multiprocessors, so ``BV`` is not shrunk for few heads), ``ptxas -v`` reports on it
(``benchmarks/sm90.py``), and that report is printed: registers a thread,
spill stores and loads (bytes a thread, in the code as compiled, not per step) and the stack
frame. The backward's three kinds of program (``dfq``, ``dfk``, ``dv``) are compiled alone as
well as fused: the fused kernel takes the registers of its largest kind, and its spill count
is that of all three paths. Inputs have every option on (initial and final state, ``dg``).
This says whether a kernel's tiles stay in registers; it measures no speed. The arguments are
compiled without the alignment and divisibility hints a launch gives them, so a kernel can show
more spills here than a real launch compiles to (``linearize.kernels.resources.launches`` records
the launchers' own launches and compiles them with those hints: at F = Dv = 128 the chunk-parallel
backward's sub-chunk kernel spills 1,410 bytes a thread there against 2,380 here, its state
products 372 against 4,536).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sm90 import compile_sm90  # noqa: E402  (benchmarks/sm90.py)

FP32_POINTERS = {"A", "c", "h", "hz", "den", "y32", "s0", "z0", "s_out", "z_out", "dgq", "dgk", "ds0", "dz0", "ds_final",
                 "dz_final", "dg_last", "dd", "dh", "dhz", "dqi", "dki", "dvs"}
INTS = {"T", "TP", "F", "DV", "i_k", "i_v", "i_bh"}


def _signature(fn, consts, dtype, y_fp32=False):
    sig = {}
    for name in inspect.signature(fn.fn if hasattr(fn, "fn") else fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name in ("LIMIT", "CHUNK_LIMIT"):
            sig[name] = "fp32"
        elif name in FP32_POINTERS or (name == "y" and y_fp32):
            sig[name] = "*fp32"
        else:
            sig[name] = f"*{dtype}"
    return sig


def compile_report(fn, consts, dtype="bf16", num_warps=4, y_fp32=False, num_stages=2) -> dict:
    src = ASTSource(fn, signature=_signature(fn, consts, dtype, y_fp32), constexprs=consts)
    return compile_sm90(src, num_warps, num_stages)[0]


def _wrappers(mod):
    """One kernel per kind of backward program (the fused kernel branches on the program id)."""

    @triton.jit
    def dq_only(fq, fk, v, g, y, den, dy, s0, z0, dfq, dgq, T, F, DV, C: tl.constexpr, SC: tl.constexpr,
                BK: tl.constexpr, BDV: tl.constexpr, HAS_INIT: tl.constexpr, STORE_DG: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
        mod._bwd_dq(tl.program_id(0), tl.program_id(1).to(tl.int64), fq, fk, v, g, y, den, dy, s0, z0, dfq, dgq,
                    T, F, DV, C, SC, BK, BDV, HAS_INIT, STORE_DG, DT, PREC, EMULATE)

    @triton.jit
    def dk_only(fq, fk, v, g, y, den, dy, ds_final, dz_final, dfk, dgk, dz0, T, F, DV, C: tl.constexpr,
                SC: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, HAS_DFINAL: tl.constexpr,
                STORE_DINIT: tl.constexpr, STORE_DG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                EMULATE: tl.constexpr):
        mod._bwd_dk(tl.program_id(0), tl.program_id(1).to(tl.int64), fq, fk, v, g, y, den, dy, ds_final, dz_final,
                    dfk, dgk, dz0, T, F, DV, C, SC, BK, BDV, HAS_DFINAL, STORE_DINIT, STORE_DG, DT, PREC, EMULATE)

    @triton.jit
    def dv_only(fq, fk, g, A, den, dy, ds_final, dv, ds0, T, F, DV, C: tl.constexpr, SC: tl.constexpr,
                BF: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
        mod._bwd_dv(tl.program_id(0), tl.program_id(1).to(tl.int64), fq, fk, g, A, den, dy, ds_final, dv, ds0,
                    T, F, DV, C, SC, BF, BV, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE)

    return dq_only, dk_only, dv_only


def report(mod, F, DV, C, BV=None, heads=32, dtype="bf16"):
    """Rows ``(kernel, tiles, report)`` for ``dtype`` inputs, every option on (initial and final
    state, ``dg``), the tile sizes of the launchers (without a GPU: for as many multiprocessors as
    programs) unless ``BV`` is given."""
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    DT = {"DT": tl.bfloat16 if dtype == "bf16" else tl.float32, "PREC": "tf32" if dtype == "bf16" else "ieee",
          "EMULATE": False}
    BF, BV0, _ = mod._fwd_config(F, DV, heads, torch_dtype, C=C)
    BV = BV or BV0
    fwd_warps = mod._fwd_warps(BF, BV, C, torch_dtype)
    _, BK, _, BDV = mod._bwd_config(F, DV, heads, torch_dtype, C=C)
    SC = mod.SUB_CHUNK
    rows = []
    rows.append(("cumsum", f"BF={BF}", compile_report(mod._cumsum_kernel, dict(SC=SC, NS=C // SC, BF=BF), dtype)))
    intra = dict(C=C, SC=SC, BF=BF, BK=min(BF, mod.INTRA_BK), **DT)
    rows.append(("intra", f"BF={BF} w={mod.INTRA_WARPS[BF]}",
                 compile_report(mod._intra_kernel, intra, dtype, num_warps=mod.INTRA_WARPS[BF], num_stages=mod.INTRA_STAGES)))
    fwd = dict(C=C, SC=SC, BF=BF, BV=BV, HAS_INIT=True, STORE_FINAL=True, STORE_Y32=True, **DT)
    rows.append(("fwd", f"BV={BV} w={fwd_warps}", compile_report(mod._fwd_kernel, fwd, dtype, num_warps=fwd_warps)))
    BKs, BVs = mod._par_config(F, DV, heads, torch_dtype, C=C)
    states = dict(C=C, SC=SC, BK=BKs, BV=BVs, HAS_INIT=True, STORE_FINAL=True, **DT)
    rows.append(("par states", f"BK={BKs} BV={BVs}", compile_report(mod._par_states_kernel, states, dtype,
                                                                    num_warps=mod._states_warps(BKs, BVs))))
    BKo, BVo, out_warps = mod._out_config(F, DV, torch_dtype, C=C)
    out = dict(C=C, SC=SC, BK=BKo, BV=BVo, NK=triton.cdiv(F, BKo), STORE_Y32=True, **DT)
    rows.append(("par output", f"BK={BKo} BV={BVo}", compile_report(mod._par_output_kernel, out, dtype,
                                                                    num_warps=out_warps)))
    # the chunk-parallel backward (the default): the adjoint walk, the states' products, the sub-chunk programs
    adj = dict(C=C, SC=SC, BK=BKs, BV=BVs, HAS_DFINAL=True, STORE_DINIT=True, **DT)
    rows.append(("par bwd states", f"BK={BKs} BV={BVs}", compile_report(
        mod._par_bwd_states_kernel, adj, dtype, num_warps=mod._states_warps(BKs, BVs))))
    BKi, BVi, inter_warps = mod._inter_config(F, DV, torch_dtype)
    inter = dict(C=C, SC=SC, BK=BKi, BV=BVi, NK=triton.cdiv(F, BKi), ND=triton.cdiv(DV, BVi), **DT)
    rows.append(("par bwd inter", f"BK={BKi} BV={BVi}", compile_report(mod._bwd_inter_kernel, inter, dtype,
                                                                       num_warps=inter_warps)))
    BKc, BVc, chunk_warps = mod.CHUNK_BLOCKS
    BVc = min(BDV, BVc)
    chunk = dict(C=C, SC=SC, BF=BF, BK=BKc, BV=BVc, NK=triton.cdiv(F, BKc), ND=triton.cdiv(DV, BVc), STORE_DG=True,
                 **DT)
    rows.append(("par bwd chunk", f"BK={BKc} BV={BVc}", compile_report(mod._bwd_chunk_kernel, chunk, dtype,
                                                                       num_warps=chunk_warps)))
    sub = dict(C=C, SC=SC, BF=BF, BDV=BDV, STORE_DG=True, **DT)
    rows.append(("par bwd sub", f"w={mod.SUB_WARPS[BF]}", compile_report(
        mod._bwd_sub_kernel, sub, dtype, num_warps=mod.SUB_WARPS[BF], num_stages=mod.SUB_STAGES)))
    # the walking backward (parallel=False)
    NK = triton.cdiv(F, BK)
    bwd = dict(C=C, SC=SC, BF=BF, BK=BK, BV=BV, BDV=BDV, NK=NK, HAS_INIT=True, HAS_DFINAL=True, STORE_DINIT=True,
               STORE_DG=True, **DT)
    fused = compile_report(mod._bwd_kernel, bwd, dtype, num_warps=8, y_fp32=True)
    rows.append(("bwd (fused)", f"BK={BK} BV={BV}", fused))
    dq, dk, dv = _wrappers(mod)
    common = dict(C=C, SC=SC, BDV=BDV, BK=BK, STORE_DG=True, **DT)
    rows.append(("  dfq", f"BK={BK}", compile_report(dq, dict(common, HAS_INIT=True), dtype, num_warps=8, y_fp32=True)))
    rows.append(("  dfk", f"BK={BK}", compile_report(dk, dict(common, HAS_DFINAL=True, STORE_DINIT=True), dtype,
                                                      num_warps=8, y_fp32=True)))
    rows.append(("  dv", f"BV={BV}", compile_report(dv, dict(C=C, SC=SC, BF=BF, BV=BV, HAS_DFINAL=True,
                                                             STORE_DINIT=True, **DT), dtype, num_warps=8)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--F", type=int, nargs="+", default=[128])
    parser.add_argument("--Dv", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--chunk", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--BV", type=int, nargs="+", default=[None], help="value block (default: the launcher's)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the inputs' dtype")
    parser.add_argument("--module", default="linearize.kernels.gated.chunk", help="the module holding the kernels")
    args = parser.parse_args()
    mod = importlib.import_module(args.module)
    print(f"triton {triton.__version__}, sm_90a, {args.dtype} inputs; regs a thread, spills in bytes a thread")
    print(f"{'F':>4}{'Dv':>5}{'C':>4}  {'kernel':14}{'tiles':16}{'regs':>5}{'spill st':>10}{'spill ld':>10}"
          f"{'stack':>7}")
    for F in args.F:
        for DV in args.Dv:
            for C in args.chunk:
                for BV in args.BV:
                    for name, tiles, r in report(mod, F, DV, C, BV, dtype=args.dtype):
                        print(f"{F:>4}{DV:>5}{C:>4}  {name:14}{tiles:16}{r['regs']:>5}{r['spill_st']:>10}"
                              f"{r['spill_ld']:>10}{r['stack']:>7}")


if __name__ == "__main__":
    main()
