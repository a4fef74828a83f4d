"""The hybrid forward with fp32 features beside bf16 queries, keys and values, as a converted
model calls it (4 x 9 heads, head 64, 128 features, window 64, 4 sinks, 30 tokens of left
padding, no gradients), with the launcher's cast of the features to bf16 on or off.

    python3 results/h200-kernels/hybrid_feature_dtype.py {cast,nocast} T [grad]

One run a process: an illegal memory access leaves the CUDA context unusable."""

import sys

import torch

import linearize.kernels.hybrid.chunk as chunk

mode, T = sys.argv[1], int(sys.argv[2])
grad = len(sys.argv) > 3 and sys.argv[3] == "grad"
if mode == "nocast":
    chunk.features_as_read = lambda fq, fk, dtype: (fq, fk)
torch.manual_seed(0)
b, h, d, f = 4, 9, 64, 128
q, k, v = (torch.randn(b, h, T, d, device="cuda").to(torch.bfloat16) for _ in range(3))
z = torch.randn(2, b, h, T, f // 2, device="cuda") * 2
fq, fk = (torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1) for x in z)
gamma = torch.rand(h, device="cuda") * 0.8 + 0.1
mask = torch.ones(b, T, dtype=torch.bool, device="cuda")
mask[1, :30] = False
with torch.set_grad_enabled(grad):
    leaves = [x.requires_grad_(grad) for x in (q, k, v, fq, fk)]
    y, state = chunk.triton_chunk_hybrid_attention(*leaves, gamma, 64, d**-0.5, mask, None, sinks=4,
                                                   output_dtype=torch.float32)
    if grad:
        (y.sum() + state.S.sum()).backward()
torch.cuda.synchronize()
print(f"{mode} T={T} grad={grad}: ok, |y| {y.norm().item():.4f}, |S| {state.S.norm().item():.4f}")
