"""One decode step of normalised linear attention in Triton: state update and output, fused.

    S' = S + fk v^T,   z' = z + fk,   y = fq . S' / max(fq . z', 1e-30)

for one token per sequence. The oracle is :func:`linearize.kernels.hybrid.hybrid_step` with
``window=0``. A step reads and writes the state once; it is inference only (no backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import MAX_FEATURES, MAX_VALUE_DIM, TINY

_TINY = tl.constexpr(TINY)


@triton.jit
def _step_kernel(
    fq, fk, v, s, z, key_mask, y, s_out, z_out,
    H, F, DV,
    BF: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Grid ``(B * H,)``: one program updates one head's state, ``BV`` value columns at a time.
    (One program per head rather than per block of columns, so that ``z`` is read before it is
    written even when the update is in place.)"""
    i_bh = tl.program_id(0).to(tl.int64)
    o_f = tl.arange(0, BF)
    m_f = o_f < F
    b_fq = tl.load(fq + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_fk = tl.load(fk + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    if HAS_MASK:  # a padding token leaves the state as it is (tl.where, not a product: it may hold NaN)
        keep = tl.load(key_mask + i_bh // H) != 0
        b_fk = tl.where(keep, b_fk, 0.0)
    b_z = tl.load(z + i_bh * F + o_f, mask=m_f, other=0.0) + b_fk  # [BF]
    den = tl.maximum(tl.sum(b_fq * b_z, 0), _TINY)
    for i_v in range(0, tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_MASK:
            b_v = tl.where(keep, b_v, 0.0)
        p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]
        m_fv = m_f[:, None] & m_v[None, :]
        S = tl.load(s + p_s, mask=m_fv, other=0.0) + b_fk[:, None] * b_v[None, :]  # [BF, BV]
        tl.store(s_out + p_s, S, mask=m_fv)
        tl.store(y + i_bh * DV + o_v, tl.sum(b_fq[:, None] * S, 0) / den, mask=m_v)
    tl.store(z_out + i_bh * F + o_f, b_z, mask=m_f)


def linear_step(fq, fk, v, S, z, key_mask=None, inplace=False):
    """One token of normalised linear attention for every sequence of a batch.

    Args:
        fq, fk: query and key features of the new token, ``[B, H, F]``.
        v: its value, ``[B, H, Dv]``.
        S: state ``sum fk v^T`` so far, ``[B, H, F, Dv]`` fp32.
        z: normaliser ``sum fk`` so far, ``[B, H, F]`` fp32.
        key_mask: ``[B]`` bool, False where the token is padding (the state is left as it is).
        inplace: update ``S`` and ``z`` in place (they must be contiguous) instead of returning
            new tensors.

    Returns:
        ``(y [B, H, Dv] fp32, S' [B, H, F, Dv] fp32, z' [B, H, F] fp32)``, the new token included
        in ``S'``, ``z'`` and in its own output. No gradient.
    """
    B, H, F = fq.shape
    DV = v.shape[-1]
    if fk.shape != (B, H, F) or v.shape != (B, H, DV):
        raise ValueError(f"fq, fk must be [B, H, F] and v [B, H, Dv]; got {tuple(fq.shape)}, {tuple(fk.shape)}, {tuple(v.shape)}")
    if S.shape != (B, H, F, DV) or z.shape != (B, H, F):
        raise ValueError(f"S must be [{B}, {H}, {F}, {DV}] and z [{B}, {H}, {F}]; got {tuple(S.shape)}, {tuple(z.shape)}")
    if S.dtype != torch.float32 or z.dtype != torch.float32:
        raise ValueError(f"the state must be fp32; got S {S.dtype}, z {z.dtype}")
    if F > MAX_FEATURES or DV > MAX_VALUE_DIM:
        raise ValueError(f"at most {MAX_FEATURES} features and {MAX_VALUE_DIM} value channels; got F={F}, Dv={DV}")
    if inplace and not (S.is_contiguous() and z.is_contiguous()):
        raise ValueError("inplace=True needs contiguous S and z")
    fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
    S_in, z_in = S.contiguous(), z.contiguous()
    S_out, z_out = (S_in, z_in) if inplace else (torch.empty_like(S_in), torch.empty_like(z_in))
    if key_mask is not None:
        if key_mask.shape != (B,):
            raise ValueError(f"key_mask must be [B] = [{B}]; got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(torch.int8).contiguous()
    y = torch.empty(B, H, DV, device=v.device, dtype=torch.float32)
    BF = max(16, triton.next_power_of_2(F))
    BV = min(max(16, triton.next_power_of_2(DV)), max(16, 4096 // BF))
    _step_kernel[(B * H,)](
        fq, fk, v, S_in, z_in, key_mask, y, S_out, z_out, H, F, DV,
        BF=BF, BV=BV, HAS_MASK=key_mask is not None, num_warps=4,
    )
    return y, S_out, z_out
