"""Registers and spills of the fused feature-map attention kernels compiled for sm_90a (Hopper),
on a machine without a GPU: Triton compiles for a target given by hand, and the log of
its ``ptxas -v`` says what each kernel uses.

    python benchmarks/fused_registers.py                     # D=64, Fh=64 (128 features), Dv=64, bf16
    python benchmarks/fused_registers.py --D 128 --FH 64 --DV 128 --dtype fp32

Prints, per kernel (the forward, the backward, and each of the backward's three kinds of
program compiled alone), the configuration the launchers pick, the registers a thread uses
(255 at most) and, in bytes a thread, its stack frame and the spill stores and loads (static
counts of the instructions' bytes, not of how often they run). Must run without
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from sm90 import compile_sm90  # noqa: E402  (benchmarks/sm90.py)
from triton.compiler import ASTSource  # noqa: E402

from linearize.kernels.linear import fused  # noqa: E402
from linearize.kernels.linear.chunk import _dot_config  # noqa: E402


# The backward's three kinds of program, each alone in a kernel (same arguments as _bwd_kernel).
@triton.jit
def _dq_only(
    q, k, v, wq, wk, km, y, den, dy, s0, z0, ds_final, dz_final, dq, dk, dv, dwq, dwk, ds0, dz0,
    T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_DINIT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    fused._bwd_dq(
        tl.program_id(1).to(tl.int64), q, k, v, wq, wk, km, y, den, dy, s0, z0, dq, dwq, T, H, D, FH, DV,
        C, BD, BF, BDV, NORM, HAS_MASK, HAS_INIT, DT, PREC, EMULATE,
    )


@triton.jit
def _dk_only(
    q, k, v, wq, wk, km, y, den, dy, s0, z0, ds_final, dz_final, dq, dk, dv, dwq, dwk, ds0, dz0,
    T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_DINIT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    fused._bwd_dk(
        tl.program_id(1).to(tl.int64), q, k, v, wq, wk, km, y, den, dy, ds_final, dz_final, dk, dwk, dz0,
        T, H, D, FH, DV, C, BD, BF, BDV, NORM, HAS_MASK, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE,
    )


@triton.jit
def _dv_only(
    q, k, v, wq, wk, km, y, den, dy, s0, z0, ds_final, dz_final, dq, dk, dv, dwq, dwk, ds0, dz0,
    T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_DINIT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    fused._bwd_dv(
        tl.program_id(0), tl.program_id(1).to(tl.int64), q, k, wq, wk, km, den, dy, ds_final, dv, ds0,
        T, H, D, FH, DV, C, BD, BF, BV, NORM, HAS_MASK, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE,
    )


INTS = ("T", "H", "D", "FH", "DV")


def _pointer_types(names, dtype):
    """Pointer element types: the inputs, their gradients and the maps' weight halves in
    ``dtype``, everything else fp32 (``y``: fp32 is what the students ask for)."""
    low = {"q", "k", "v", "dq", "dk", "dv", "wq", "wk"}
    return {n: ("*i8" if n == "km" else f"*{dtype}" if n in low else "*fp32") for n in names}


def compile_kernel(fn, constexprs, ints, dtype, num_warps, absent=(), num_stages=2, keep=None):
    """Compile ``fn`` for sm_90a; ``absent``: pointer arguments passed as None."""
    names = fn.arg_names
    pointers = [n for n in names if n not in constexprs and n not in INTS]
    sig = _pointer_types(pointers, dtype)
    sig.update({n: "i32" for n in INTS})
    consts = dict(constexprs)
    for n in absent:
        sig[n] = "constexpr"
        consts[n] = None
    for n in constexprs:
        sig[n] = "constexpr"
    signature = {n: sig[n] for n in names}
    # what a launch would specialise: 16-byte aligned pointers, ints divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if (signature[n].startswith("*") and n not in absent) or (n in ints and ints[n] % 16 == 0)}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    report, asm = compile_sm90(src, num_warps, num_stages)
    if keep is not None:  # a dict: gets the compiled kernel's IRs
        keep.update(asm)
    return report["regs"], report["stack"], report["spill_st"], report["spill_ld"]


def _say(regs, frame, stores, loads):
    return f"{regs} registers, {frame} B stack frame, {stores} B spill stores, {loads} B spill loads"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--D", type=int, default=64, help="head size")
    parser.add_argument("--FH", type=int, default=64, help="features per softmax (the map gives 2 FH)")
    parser.add_argument("--DV", type=int, default=64, help="value size")
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16, help="B * H (the launchers size BV by it)")
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU (H100 SXM: 132)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--chunk", type=int, default=64, help="chunk_size asked for")
    parser.add_argument("--map", choices=list(fused.MAP_KINDS), default="hedgehog")
    parser.add_argument("--no-init", action="store_true", help="no initial state / final-state gradient")
    args = parser.parse_args(argv)
    fused._sms = lambda: args.sms  # the launchers' view of the GPU (there is none here)
    tdtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    DT, PREC, EMULATE = _dot_config(tdtype)
    ints = dict(T=args.T, H=8, D=args.D, FH=args.FH, DV=args.DV)
    init = not args.no_init
    norm = args.map == "npmap"
    print(f"# sm_90a, triton {triton.__version__}, {args.map}, D={args.D} Fh={args.FH} Dv={args.DV} {args.dtype}, "
          f"chunk_size={args.chunk}, state in/out: {init}")

    C, BD, BF, BV, warps, stages = fused._fwd_config(args.D, args.FH, args.DV, args.chunk, args.heads, tdtype)
    consts = dict(C=C, BD=BD, BF=BF, BV=BV, NORM=norm, HAS_MASK=True, HAS_INIT=init, STORE_FINAL=init,
                  STORE_Y32=args.dtype != "fp32", DT=DT, PREC=PREC, EMULATE=EMULATE)
    absent = () if init else ("s0", "z0", "s_out", "z_out")
    figures = compile_kernel(fused._fwd_kernel, consts, ints, args.dtype, warps, absent, stages)
    print(f"forward      C={C} BD={BD} BF={BF} BV={BV} warps={warps} stages={stages}: " + _say(*figures))

    C, BD, BF, BV, BDV, warps, stages = fused._bwd_config(args.D, args.FH, args.DV, args.chunk, args.heads, tdtype)
    consts = dict(C=C, BD=BD, BF=BF, BV=BV, BDV=BDV, NORM=norm, HAS_MASK=True, HAS_INIT=init, HAS_DFINAL=init,
                  STORE_DINIT=init, DT=DT, PREC=PREC, EMULATE=EMULATE)
    absent = () if init else ("s0", "z0", "ds_final", "dz_final", "ds0", "dz0")
    for name, fn in (("backward", fused._bwd_kernel), ("  dq program", _dq_only), ("  dk program", _dk_only),
                     ("  dv program", _dv_only)):
        figures = compile_kernel(fn, consts, ints, args.dtype, warps, absent, stages)
        print(f"{name:12} C={C} BD={BD} BF={BF} BV={BV} BDV={BDV} warps={warps} stages={stages}: " + _say(*figures))


if __name__ == "__main__":
    main()
