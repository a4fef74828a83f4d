"""What the Triton kernels need of a GPU, found without one: every kernel a launcher starts is
compiled ahead of time for a chosen target (sm_90 by default: the H100 and H200), and the
compiled kernel's shared memory, registers and stack (spills) are read off.

A launch that asks for more shared memory than a block may have fails only when it starts
(``OutOfResources: out of resource: shared memory``), so on a machine without the GPU nothing
else would notice it. Here the launcher runs on CPU tensors with Triton's launch replaced by a
recorder; each recorded launch is compiled with the signature, constants and 16-byte alignment
hints a real launch would give it (Triton's own specialisation of each argument: a 16-byte aligned
tensor, an integer that is a multiple of 16, an integer 1 made a constant), so the shared memory is what the GPU
would be asked for (checked against an H200: 303,104 bytes predicted and refused there).

    from linearize.kernels.hybrid import chunk
    for r in launches(chunk.hybrid_attention_fwd, *args): print(r)

Registers, stack frame and spills a thread come from the ``ptxas -v`` log Triton writes when it
assembles the kernel (``benchmarks/sm90.py`` reads hand-built kernels' the same way).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass

import torch

#: shared memory a block may have on sm_90 (H100, H200): 227 KiB
SM90_SHARED_LIMIT = 232448

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class KernelResources:
    name: str
    shared: int  # bytes of shared memory a block asks for
    num_warps: int
    num_stages: int
    registers: int | None = None  # a thread's (None: not read)
    stack_bytes: int | None = None  # a thread's stack frame, where spilled registers go
    spill_bytes: int | None = None  # spill stores a thread (static, in the code as compiled)

    def __str__(self) -> str:
        regs = "" if self.registers is None else f", {self.registers} registers, {self.stack_bytes} bytes of stack, {self.spill_bytes} of spill stores"
        return f"{self.name}: {self.shared} bytes shared, {self.num_warps} warps, {self.num_stages} stages{regs}"


def record_launches(launcher, *args, **kwargs) -> list[tuple]:
    """Run ``launcher(*args, **kwargs)`` with every Triton launch recorded instead of started:
    ``[(jit_function, args, kwargs), ...]``. The launcher's own results are discarded (its
    outputs are never written)."""
    from triton.runtime.jit import JITFunction

    recorded = []
    original = JITFunction.run

    def record(self, *a, grid, warmup, **kw):
        recorded.append((self, a, kw))

    JITFunction.run = record
    try:
        launcher(*args, **kwargs)
    finally:
        JITFunction.run = original
    return recorded


def compile_launch(fn, args, kwargs, capability: int = 90, registers: bool = False):
    """Compile one recorded launch for ``cuda`` at ``capability``; returns ``(compiled,
    KernelResources)``."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if name not in bound:
            raise TypeError(f"{fn.__name__}: no value for {name}")
        v = bound[name]
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", v
            continue
        # the type and hints Triton's JIT gives this argument at a launch (a tensor's by its address)
        kind, hint = native_specialize_impl(BaseBackend, v, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = hint
        elif isinstance(hint, str) and hint:
            attrs[(i,)] = BaseBackend.parse_attr(hint)
    src, target = ASTSource(fn, signature, constexprs=constants, attrs=attrs), GPUTarget("cuda", capability, 32)
    with ptxas_log() if registers else contextlib.nullcontext() as buf:
        compiled = triton.compile(src, target=target, options=options)
    meta = compiled.metadata
    res = KernelResources(fn.__name__, int(meta.shared), int(meta.num_warps), int(meta.num_stages))
    if registers:
        log = parse_ptxas_log(buf.getvalue())
        res.registers, res.stack_bytes, res.spill_bytes = log["regs"], log["stack"], log["spill_st"]
    return compiled, res


def launches(launcher, *args, capability: int = 90, registers: bool = False, **kwargs) -> list[KernelResources]:
    """The resources of every kernel ``launcher(*args, **kwargs)`` starts, compiled for
    ``capability`` (give it CPU tensors of the real shapes and dtypes)."""
    return [compile_launch(fn, a, kw, capability, registers)[1] for fn, a, kw in record_launches(launcher, *args, **kwargs)]


def parse_ptxas_log(out: str) -> dict:
    """Registers, stack frame and spill stores and loads (bytes a thread; static counts in the
    code as compiled) from a ``ptxas -v`` log."""
    report = {"regs": int(re.search(r"Used (\d+) registers", out).group(1))}
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    report["spill_st"], report["spill_ld"] = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    m = re.search(r"(\d+) bytes stack frame", out)
    report["stack"] = int(m.group(1)) if m else 0
    return report


@contextlib.contextmanager
def ptxas_log():
    """Compile inside this to have Triton write its own ``ptxas -v`` log (its ptxas, its options:
    the figures of the binary a launch would use) into the yielded buffer; nothing cached is
    taken, since a cached binary would skip ptxas."""
    import triton

    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def hybrid_cases(features: int, window: int, head_dim: int = 64, T: int = 4094, batch: int = 4, heads: int = 9,
                 sinks: int = 4, registers: bool = False, dtype: torch.dtype = torch.bfloat16) -> list[KernelResources]:
    """Every kernel of the hybrid forward (new state and fp32 output kept, as training calls it)
    and backward at a converted SmolLM2's shapes by default: ``dtype`` inputs, a key mask, sink slots."""
    from .hybrid import chunk

    d, b, h = head_dim, batch, heads
    q, k, v = (torch.zeros(b, h, T, d, dtype=dtype) for _ in range(3))
    fq, fk = (torch.zeros(b, h, T, features, dtype=dtype) for _ in range(2))
    mask = torch.ones(b, T, dtype=torch.int8)
    gamma = torch.full((h,), 0.5)
    sk, sv = torch.zeros(b, h, sinks, d, dtype=dtype), torch.zeros(b, h, sinks, d, dtype=dtype)
    sink_from = torch.zeros(b, sinks, dtype=torch.int32)
    common = (q, k, v, fq, fk, mask, gamma, sk, sv, sink_from, None, None, 0, window, d**-0.5)
    out = launches(chunk.hybrid_attention_fwd, *common, output_final_state=True, keep_fp32_output=True,
                   registers=registers)
    y32, den = torch.zeros(b, h, T, d), torch.zeros(b, h, T)
    amax = torch.zeros(b, h, T, dtype=torch.int32)
    out += launches(chunk.hybrid_attention_bwd, *common, y32, den, den, amax, q,
                    dS=torch.zeros(b, h, features, d), dz=torch.zeros(b, h, features), registers=registers)
    return out


def main(argv=None) -> int:
    """``python -m linearize.kernels.resources hybrid --features 64 --window 128``: one JSON line
    per kernel (needs TRITON_INTERPRET unset: the interpreter compiles nothing)."""
    import argparse
    import json
    from dataclasses import asdict

    p = argparse.ArgumentParser(prog="python -m linearize.kernels.resources", description=main.__doc__)
    p.add_argument("kernels", choices=["hybrid"])
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--registers", action="store_true", help="also registers, stack and spill bytes a thread (Triton's ptxas -v log)")
    p.add_argument("--force-stages", type=int, default=None,
                   help="launch every kernel with this many pipelining stages instead of the launchers' choice")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it to read the resources")
    if args.force_stages is not None:
        from .hybrid import chunk

        chunk._stages = lambda *_: args.force_stages
    for r in hybrid_cases(args.features, args.window, args.head_dim, registers=args.registers,
                          dtype=getattr(torch, args.dtype)):
        row = asdict(r)
        row["fits_sm90"] = r.shared <= SM90_SHARED_LIMIT
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
