"""The Hedgehog feature map, fused in Triton (forward and backward).

    z = x W_h                                   x: [T, D] of head h, W_h: [D, F]
    phi(x) = [softmax(z), softmax(-z)]          over the F features: [T, 2F]

The oracle is :class:`linearize.feature_maps.HedgehogFeatureMap`. One kernel computes ``z`` and
both softmaxes and writes ``phi`` once; ``z`` never goes through memory. The backward
recomputes ``z`` from ``x`` and ``W`` (cheaper than storing ``phi``) and, with
``p = softmax(z)``, ``q = softmax(-z)`` and ``g = [g_p, g_q]`` the gradient of ``phi``:

    dz = p * (g_p - sum(g_p * p)) - q * (g_q - sum(g_q * q))
    dx = dz W_h^T,     dW_h = sum over batch and tokens of x^T dz

Each backward program takes a range of tokens of one (batch, head) and keeps its share of
``dW_h`` in registers; the shares are summed afterwards in PyTorch. ``W_h^T`` and ``x^T`` are
loaded transposed (no ``tl.trans``; see ``linearize/kernels/linear/chunk.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.chunk import _DOT_DTYPES, _dot_config, _dot_split, compute_dtype, interpreting

MAX_DIM = 256


@triton.jit
def _softmaxes(x, w, o_f, F, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """``softmax(x w)`` and ``softmax(-x w)`` over the valid features ``o_f < F``."""
    z = _dot_split(x, w, DT, PREC, EMULATE, False, True)  # [BT, BF]; x exact, w split
    valid = (o_f < F)[None, :]
    zp = tl.where(valid, z, float("-inf"))
    zn = tl.where(valid, -z, float("-inf"))
    ep = tl.exp(zp - tl.max(zp, 1)[:, None])
    en = tl.exp(zn - tl.max(zn, 1)[:, None])
    return ep / tl.sum(ep, 1)[:, None], en / tl.sum(en, 1)[:, None]


@triton.jit
def _fwd_kernel(
    x, w, out, H, T, D, F,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(T / BT, B * H)``."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    m_t = o_t < T
    b_x = tl.load(x + i_bh * T * D + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None] & (o_d < D)[None, :], other=0.0)
    b_w = tl.load(w + i_h * D * F + o_d[:, None] * F + o_f[None, :], mask=(o_d < D)[:, None] & (o_f < F)[None, :], other=0.0)
    p, q = _softmaxes(b_x, b_w, o_f, F, DT, PREC, EMULATE)
    p_out = out + i_bh * T * 2 * F + o_t[:, None] * (2 * F) + o_f[None, :]
    m_out = m_t[:, None] & (o_f < F)[None, :]
    tl.store(p_out, p.to(out.dtype.element_ty), mask=m_out)
    tl.store(p_out + F, q.to(out.dtype.element_ty), mask=m_out)


@triton.jit
def _bwd_kernel(
    x, w, dout, dx, dw_part, H, T, D, F, BLOCKS_PER_PROGRAM,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(NS, B * H)``: program ``i_s`` takes token blocks ``[i_s * BLOCKS_PER_PROGRAM, ...)``
    and writes its share of ``dW_h`` to ``dw_part[i_s, b, h]``."""
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    m_d = o_d < D
    m_f = o_f < F
    b_w = tl.load(w + i_h * D * F + o_d[:, None] * F + o_f[None, :], mask=m_d[:, None] & m_f[None, :], other=0.0)
    b_wT = tl.load(w + i_h * D * F + o_f[:, None] + o_d[None, :] * F, mask=m_f[:, None] & m_d[None, :], other=0.0)
    dW = tl.zeros([BD, BF], dtype=tl.float32)
    for i in range(0, BLOCKS_PER_PROGRAM):
        o_t = (i_s * BLOCKS_PER_PROGRAM + i) * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_td = m_t[:, None] & m_d[None, :]
        b_x = tl.load(x + i_bh * T * D + o_t[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        b_xT = tl.load(x + i_bh * T * D + o_t[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        p, q = _softmaxes(b_x, b_w, o_f, F, DT, PREC, EMULATE)
        p_g = dout + i_bh * T * 2 * F + o_t[:, None] * (2 * F) + o_f[None, :]
        m_g = m_t[:, None] & m_f[None, :]
        g_p = tl.load(p_g, mask=m_g, other=0.0).to(tl.float32)
        g_q = tl.load(p_g + F, mask=m_g, other=0.0).to(tl.float32)
        dz = p * (g_p - tl.sum(g_p * p, 1)[:, None]) - q * (g_q - tl.sum(g_q * q, 1)[:, None])  # [BT, BF]
        b_dx = _dot_split(dz, b_wT, DT, PREC, EMULATE, True, True)  # [BT, BD]
        tl.store(dx + i_bh * T * D + o_t[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m_td)
        dW += _dot_split(b_xT, dz, DT, PREC, EMULATE, False, True)
    tl.store(dw_part + (i_s * tl.num_programs(1) + i_bh) * D * F + o_d[:, None] * F + o_f[None, :], dW,
             mask=m_d[:, None] & m_f[None, :])


def _blocks(D, F, dtype):
    """``(BT forward, BT backward, BD, BF, backward warps)``: token blocks small enough for the
    tiles to stay in registers (checked by compiling for sm_90); fp32 products need smaller ones."""
    BD, BF = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(F))
    if dtype == torch.float32:
        return 16, 16, BD, BF, 8
    return 64, 32, BD, BF, (4 if BD * BF <= 128 * 64 else 8)


def _fwd_warps(BD, BF, dtype):
    # fp32: ptxas (Triton 3.6) spills heavily at some tile/warp pairs; these were checked not to
    return (4 if BF >= 128 else 8) if dtype == torch.float32 else 4


def hedgehog_fwd(x, w, out_dtype):
    B, H, T, D = x.shape
    F = w.shape[-1]
    dtype = compute_dtype(x, w)
    DT, PREC, EMULATE = _dot_config(dtype)
    out = torch.empty(B, H, T, 2 * F, device=x.device, dtype=out_dtype)
    BT, _, BD, BF, _ = _blocks(D, F, dtype)
    _fwd_kernel[(triton.cdiv(T, BT), B * H)](
        x, w, out, H, T, D, F, BT=BT, BD=BD, BF=BF, DT=DT, PREC=PREC, EMULATE=EMULATE,
        num_warps=_fwd_warps(BD, BF, dtype),
    )
    return out


def hedgehog_bwd(x, w, dout):
    B, H, T, D = x.shape
    F = w.shape[-1]
    dtype = compute_dtype(x, w)
    DT, PREC, EMULATE = _dot_config(dtype)
    _, BT, BD, BF, num_warps = _blocks(D, F, dtype)
    n_blocks = triton.cdiv(T, BT)
    # enough programs to fill the GPU, each with a run of token blocks to amortise its dW
    if x.is_cuda and not interpreting():
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 2
    NS = max(1, min(n_blocks, triton.cdiv(target, B * H)))
    per = triton.cdiv(n_blocks, NS)
    NS = triton.cdiv(n_blocks, per)
    dx = torch.empty_like(x)
    dw_part = torch.empty(NS, B, H, D, F, device=x.device, dtype=torch.float32)
    _bwd_kernel[(NS, B * H)](
        x, w, dout, dx, dw_part, H, T, D, F, per,
        BT=BT, BD=BD, BF=BF, DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=num_warps,
    )
    return dx, dw_part.sum((0, 1)).to(w.dtype)


class HedgehogFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, out_dtype):
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w)
        return hedgehog_fwd(x, w, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        x, w = ctx.saved_tensors
        dx, dw = hedgehog_bwd(x, w, dout.contiguous())
        return dx, dw, None


def hedgehog_feature_map(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[softmax(x W_h), softmax(-x W_h)]`` per head, fused.

    Args:
        x: ``[B, H, T, D]`` queries or keys (fp32, bf16 or fp16).
        weight: ``[H, D, F]``, one map per head (``HedgehogFeatureMap.weight``).
        out_dtype: dtype of the features; default the promoted dtype of ``x`` and ``weight``
            (fp32 for bf16 ``x`` and an fp32 map, as the PyTorch module gives).

    Returns:
        ``phi [B, H, T, 2F]``: the softmax over ``z = x W_h`` in the first ``F`` features, over
        ``-z`` in the last ``F``. Differentiable in ``x`` and ``weight``. With bf16 ``x`` the
        products run on bf16 tensor cores with the fp32 operands (``weight``, ``dz``) split into
        two bf16 halves, to about 2^-16 relative; with fp32 (or fp16) inputs they are fp32. The
        softmaxes are fp32. ``D, F <= 256``.

    Example::

        fmap = HedgehogFeatureMap(num_heads=8, head_dim=64).cuda()
        phi = hedgehog_feature_map(q, fmap.weight)       # == fmap(q)
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, T, D]; got {tuple(x.shape)}")
    B, H, T, D = x.shape
    if weight.dim() != 3 or weight.shape[:2] != (H, D):
        raise ValueError(f"weight must be [H, D, F] = [{H}, {D}, F]; got {tuple(weight.shape)}")
    F = weight.shape[-1]
    if D > MAX_DIM or F > MAX_DIM:
        raise ValueError(f"head size and feature size must be at most {MAX_DIM}; got D={D}, F={F}")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in _DOT_DTYPES:
            raise ValueError(f"{name} must be fp32, bf16 or fp16; got {t.dtype}")
    out_dtype = out_dtype or torch.promote_types(x.dtype, weight.dtype)
    if T == 0:
        return x.new_zeros(B, H, 0, 2 * F, dtype=out_dtype)
    return HedgehogFunction.apply(x, weight, out_dtype)
