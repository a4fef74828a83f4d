"""Where the chunk-parallel backward's ``dfq``, ``dfk`` and ``dv`` differ from the walk's, chunk by
chunk, with bf16 inputs (values offset by 3, LAWCAT-like decays, every chunk factored), B=2, 3
heads, F=12, Dv=20, at lengths that end inside a chunk (70: T not a multiple of 16; 80: a multiple
of 16) and one that does not (128): relative error of each 64-token chunk's rows."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels")]
import test_triton_gated as t  # noqa: E402

for T in (70, 80, 128):
    out = t.run_both(T, seed=37, dtype=torch.bfloat16, init=True, offset=3.0, b=2, chunk=64,
                     impls=("parallel", "sequential"))
    row = []
    for name in ("dfq", "dfk", "dv"):
        i = t.NAMES.index(name)
        a, b = out["parallel"][i].float(), out["sequential"][i].float()
        per = [f"{float((a[..., s:s + 64, :] - b[..., s:s + 64, :]).norm() / b[..., s:s + 64, :].norm()):.1e}"
               for s in range(0, T, 64)]
        row.append(f"{name} {'/'.join(per)}")
    print(f"T={T}: " + "  ".join(row), flush=True)
