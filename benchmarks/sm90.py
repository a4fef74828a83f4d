"""Compile a Triton kernel for sm_90a (H100, H200) on a machine without a GPU, and read what
its ``ptxas -v`` reports of it: registers a thread, stack frame, spill stores and loads (bytes a
thread, static counts in the code as compiled, not how often they run). Used by
``benchmarks/fused_registers.py`` and ``benchmarks/gated_registers.py``; must run without
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import triton
from triton.backends.compiler import GPUTarget

from linearize.kernels.resources import parse_ptxas_log, ptxas_log


def compile_sm90(src, num_warps: int, num_stages: int = 2) -> tuple[dict, dict]:
    """``(report, asm)`` of ``src`` (a ``triton.compiler.ASTSource``) compiled for sm_90a:
    ``report`` has ``regs``, ``stack``, ``spill_st`` and ``spill_ld``, read from the log of the
    ``ptxas -v`` run Triton itself makes (so with Triton's own ptxas options: these are the
    figures of the cubin a launch would use); ``asm`` the compiled kernel's IRs (``ttir``,
    ``ttgir``, ``ptx``, ...)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    with ptxas_log() as log:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    return parse_ptxas_log(log.getvalue()), compiled.asm
