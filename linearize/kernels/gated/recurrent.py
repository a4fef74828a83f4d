"""One decode step of gated normalised linear attention in Triton: state update and output, fused.

    S' = diag(exp(g)) S + fk [v, 1]^T,   o = fq^T S',   y = o[:Dv] / max(o[Dv], 1e-30)

for one token per sequence, on the reference's state layout (``GatedState.S: [B, H, F, Dv + 1]``,
the last column the normaliser). The oracle is :func:`linearize.kernels.gated.gated_step`. A
step reads and writes the state once; it is inference only (no backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.chunk import MAX_FEATURES, MAX_VALUE_DIM, TINY

_TINY = tl.constexpr(TINY)


@triton.jit
def _step_kernel(
    fq, fk, v, g, s, key_mask, y, s_out,
    H, F, DV,
    BF: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Grid ``(B * H,)``: one program updates one head's state, the normaliser column first (the
    output needs it), then ``BV`` value columns at a time. (One program per head rather than per
    block of columns, so that every column is read before it is written even in place.)"""
    i_bh = tl.program_id(0).to(tl.int64)
    o_f = tl.arange(0, BF)
    m_f = o_f < F
    D1 = DV + 1  # the state's row length: Dv values and the normaliser
    b_fq = tl.load(fq + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_fk = tl.load(fk + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_g = tl.load(g + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    if HAS_MASK:  # a padding token leaves the state as it is (tl.where, not a product: it may hold NaN)
        keep = tl.load(key_mask + i_bh // H) != 0
        b_fk = tl.where(keep, b_fk, 0.0)
        b_g = tl.where(keep, b_g, 0.0)
    decay = tl.exp(b_g)  # [BF]
    p_z = s + i_bh * F * D1 + o_f * D1 + DV
    b_z = decay * tl.load(p_z, mask=m_f, other=0.0) + b_fk  # [BF]
    den = tl.maximum(tl.sum(b_fq * b_z, 0), _TINY)
    for i_v in range(0, tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_MASK:
            b_v = tl.where(keep, b_v, 0.0)
        p_s = i_bh * F * D1 + o_f[:, None] * D1 + o_v[None, :]
        m_fv = m_f[:, None] & m_v[None, :]
        S = decay[:, None] * tl.load(s + p_s, mask=m_fv, other=0.0) + b_fk[:, None] * b_v[None, :]  # [BF, BV]
        tl.store(s_out + p_s, S, mask=m_fv)
        tl.store(y + i_bh * DV + o_v, tl.sum(b_fq[:, None] * S, 0) / den, mask=m_v)
    tl.store(s_out + i_bh * F * D1 + o_f * D1 + DV, b_z, mask=m_f)


def triton_gated_step(fq, fk, v, g, S, key_mask=None, inplace=False):
    """One token of gated normalised linear attention for every sequence of a batch.

    Args:
        fq, fk: query and key features of the new token, ``[B, H, F]``.
        v: its value, ``[B, H, Dv]``.
        g: its log decay ``log alpha <= 0``, ``[B, H, F]``.
        S: the state so far, ``[B, H, F, Dv + 1]`` fp32 (``GatedState.S``: ``sum`` of decayed
            ``fk v^T``, and in the last column of decayed ``fk``).
        key_mask: ``[B]`` bool, False where the token is padding: the state is left exactly as it
            is (no decay, nothing added), as in the reference.
        inplace: update ``S`` in place (it must be contiguous) instead of returning a new tensor.

    Returns:
        ``(y [B, H, Dv] fp32, S' [B, H, F, Dv + 1] fp32)``, the new token included in ``S'`` and in
        its own output. No gradient.
    """
    if fq.dim() != 3 or fk.shape != fq.shape or g.shape != fq.shape:
        raise ValueError(
            f"fq, fk and g must all be [B, H, F]; got {tuple(fq.shape)}, {tuple(fk.shape)} and {tuple(g.shape)}"
        )
    B, H, F = fq.shape
    if v.dim() != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"v must be [B, H, Dv] = [{B}, {H}, Dv]; got {tuple(v.shape)}")
    DV = v.shape[-1]
    if S.shape != (B, H, F, DV + 1):
        raise ValueError(f"S must be [B, H, F, Dv + 1] = [{B}, {H}, {F}, {DV + 1}]; got {tuple(S.shape)}")
    if S.dtype != torch.float32:
        raise ValueError(f"the state must be fp32; got {S.dtype}")
    if F > MAX_FEATURES or DV > MAX_VALUE_DIM:
        raise ValueError(f"at most {MAX_FEATURES} features and {MAX_VALUE_DIM} value channels; got F={F}, Dv={DV}")
    if inplace and not S.is_contiguous():
        raise ValueError("inplace=True needs a contiguous S")
    fq, fk, v, g = fq.contiguous(), fk.contiguous(), v.contiguous(), g.contiguous()
    S_in = S.contiguous()
    S_out = S_in if inplace else torch.empty_like(S_in)
    if key_mask is not None:
        if key_mask.shape != (B,):
            raise ValueError(f"key_mask must be [B] = [{B}]; got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(torch.int8).contiguous()
    y = torch.empty(B, H, DV, device=v.device, dtype=torch.float32)
    BF = max(16, triton.next_power_of_2(F))
    BV = min(max(16, triton.next_power_of_2(DV)), max(16, 4096 // BF))
    _step_kernel[(B * H,)](
        fq, fk, v, g, S_in, key_mask, y, S_out, H, F, DV,
        BF=BF, BV=BV, HAS_MASK=key_mask is not None, num_warps=4,
    )
    return y, S_out
