"""The linear kernels' chunk-parallel backward (``PARALLEL_BACKWARD``) compiled: the bf16 GPU
test's check against the fp32 reference at three shapes, then forward + backward times at B=1,
32 heads, F = Dv = 128 with the walking backward and with the chunk-parallel one (``do_bench``
medians). ``python results/h200-kernels/linear_parallel_backward.py``."""

import sys

import torch
import triton.testing

sys.path[:0] = [".", "tests/kernels", "tests"]
import linearize.kernels.linear.chunk as lchunk  # noqa: E402
import test_triton_linear as tl_tests  # noqa: E402

lchunk.PARALLEL_BACKWARD = True
for b, h, T, f, dv in [(2, 8, 4096, 128, 64), (16, 9, 1024, 128, 64), (1, 32, 8192, 128, 128)]:
    err = tl_tests.check_bf16_against_reference(b, h, T, f, dv, "cuda")
    print(f"check {b}x{h}x{T} F={f} Dv={dv}: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()), flush=True)

for T in (8192, 32768):
    q, k, v = (torch.rand(1, 32, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
    row = {}
    for name, par in (("walk", False), ("parallel", True)):
        lchunk.PARALLEL_BACKWARD = par

        def step():
            for x in (q, k, v):
                x.grad = None
            lchunk.chunk_linear_attention(q, k, v)[0].backward(do)

        row[name] = triton.testing.do_bench(step, warmup=5, rep=30, return_mode="median")
    print(f"fwd+bwd B=1 H=32 D=128 T={T}: walk {row['walk']:.3f} ms, chunk-parallel backward {row['parallel']:.3f} ms "
          f"({row['walk'] / row['parallel']:.2f}x)", flush=True)
