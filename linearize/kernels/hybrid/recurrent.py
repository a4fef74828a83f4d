"""One decode step of sliding-window + linear attention (with sinks) in Triton, fused.

For one new token per sequence, with the state of :class:`~linearize.kernels.hybrid.HybridState`
(linear ``S, z``; the last ``L <= W`` raw keys/values/features in time order with their mask;
``n`` sink slots):

    the token takes the next free sink slot if it is real and one is free, else joins the window;
    the oldest window entry folds into S, z once the window holds W + 1:  S' = S + fk_0 v_0^T
    a_s = q . k_s * scale over the window and the filled sink slots,  m = max a_s (0 if none)
    y = (fq S' + sum_s gamma exp(a_s - m) v_s) / max(fq z' + sum_s gamma exp(a_s - m), 1e-30)

The oracle is :func:`linearize.kernels.hybrid.hybrid_step`; the new state equals its new state
(the same layout, the window in time order). One program per (sequence, head) reads the state
once and writes the new one (out of place); inference only.

The window stays in time order rather than a ring buffer: every reader of the state (the
chunked forms, the cache's beam reorder and batch select) keeps working unchanged, at the cost
of rewriting the ``W`` rows each step (as much traffic as reading them for the scores). At batch
sizes where the step is not bound by its launch, a ring buffer would save that write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.chunk import TINY, _pow2
from .chunk import MAX_HEAD_DIM, MAX_SINKS, MAX_WINDOW
from .reference import HybridState

_TINY = tl.constexpr(TINY)


@triton.jit
def _step_kernel(
    q, k, v, fq, fk, km, gamma, s, z, kb, vb, fkb, mb, sk, sv, smask,
    y, s_out, z_out, kb_out, vb_out, fkb_out, mb_out, sk_out, sv_out, smask_out,
    H, DK, F, DV, L, NS, scale,
    BK: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, RP: tl.constexpr, NSP: tl.constexpr,
    HAS_ROWS: tl.constexpr, FOLD: tl.constexpr, IN_WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_SINKS: tl.constexpr, SOFTMAX: tl.constexpr,
):
    """Grid ``(B * H,)``. ``L``: rows in the window buffer (``HAS_ROWS``: ``L > 0``); ``FOLD``:
    whether its oldest row (the new token itself when ``L == 0``) leaves for ``S, z``;
    ``IN_WINDOW``: whether the new token stays in the window (``W > 0``)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    o_f = tl.arange(0, BF)
    o_r = tl.arange(0, RP)
    m_k = o_k < DK
    m_f = o_f < F
    b_q = tl.load(q + i_bh * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_bh * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_fq = tl.load(fq + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_fk = tl.load(fk + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    keep = tl.full([], 1, tl.int1)
    if HAS_MASK:
        keep = tl.load(km + i_b) != 0
    if HAS_SINKS:
        o_s = tl.arange(0, NSP)
        m_s = o_s < NS
        filled_before = tl.load(smask + i_b * NS + o_s, mask=m_s, other=0) != 0
        n_filled = tl.sum(filled_before.to(tl.int32), 0)
        is_sink = keep & (n_filled < NS)
        hot = (o_s == n_filled) & is_sink  # the slot this token takes
        filled = filled_before | hot
        p_sk = i_bh * NS * DK + o_s[:, None] * DK + o_k[None, :]
        b_sk = tl.load(sk + p_sk, mask=m_s[:, None] & m_k[None, :], other=0.0)
        b_sk = tl.where(hot[:, None], b_k[None, :], b_sk)  # [NSP, BK]
        tl.store(sk_out + p_sk, b_sk, mask=m_s[:, None] & m_k[None, :])
        if i_h == 0:
            tl.store(smask_out + i_b * NS + o_s, filled.to(tl.int8), mask=m_s)
        keep = keep & (is_sink == 0)
    b_fk = tl.where(keep, b_fk, 0.0)  # a padding or sink token adds nothing to S, z (tl.where: it may be NaN)
    # the window buffer: rows [FOLD, L) stay, the new token comes last
    L2 = L - FOLD + IN_WINDOW  # rows of the new buffer
    in_r = o_r < L
    stay = in_r & (o_r >= FOLD)
    if FOLD:
        first = o_r == 0  # the row that folds into S, z
    else:
        first = o_r < 0
    if HAS_ROWS:
        b_mr = tl.load(mb + i_b * L + o_r, mask=in_r, other=0) != 0
        p_kb = i_bh * L * DK + o_r[:, None] * DK + o_k[None, :]
        p_fkb = i_bh * L * F + o_r[:, None] * F + o_f[None, :]
        b_kb = tl.load(kb + p_kb, mask=in_r[:, None] & m_k[None, :], other=0.0)  # [RP, BK]
        b_fkb = tl.load(fkb + p_fkb, mask=in_r[:, None] & m_f[None, :], other=0.0)  # [RP, BF]
        f_fold = tl.sum(tl.where(first[:, None], b_fkb, 0.0), 0)  # [BF]
        if IN_WINDOW:
            p_kb2 = i_bh * L2 * DK + (o_r - FOLD)[:, None] * DK + o_k[None, :]
            p_fkb2 = i_bh * L2 * F + (o_r - FOLD)[:, None] * F + o_f[None, :]
            tl.store(kb_out + p_kb2, b_kb, mask=stay[:, None] & m_k[None, :])
            tl.store(fkb_out + p_fkb2, b_fkb, mask=stay[:, None] & m_f[None, :])
            if i_h == 0:
                tl.store(mb_out + i_b * L2 + o_r - FOLD, b_mr.to(tl.int8), mask=stay)
    else:
        f_fold = b_fk if FOLD else tl.zeros([BF], dtype=tl.float32)  # no rows: the new token folds (W = 0)
    if IN_WINDOW:
        tl.store(kb_out + i_bh * L2 * DK + (L2 - 1) * DK + o_k, b_k, mask=m_k)
        tl.store(fkb_out + i_bh * L2 * F + (L2 - 1) * F + o_f, b_fk, mask=m_f)
        if i_h == 0:
            tl.store(mb_out + i_b * L2 + L2 - 1, keep.to(tl.int8))
    b_z = tl.load(z + i_bh * F + o_f, mask=m_f, other=0.0) + f_fold
    tl.store(z_out + i_bh * F + o_f, b_z, mask=m_f)
    den = tl.sum(b_fq * b_z, 0)
    # softmax terms: the rows that stay (if real), the new token (if in the window), the sinks
    if SOFTMAX:
        g = tl.load(gamma + i_h).to(tl.float32)
        m = tl.full([], float("-inf"), tl.float32)
        if HAS_ROWS:
            a = tl.where(stay & b_mr, tl.sum(b_kb * b_q[None, :], 1) * scale, float("-inf"))  # [RP]
            m = tl.maximum(m, tl.max(a, 0))
        if IN_WINDOW:
            a_new = tl.where(keep, tl.sum(b_k * b_q, 0) * scale, float("-inf"))
            m = tl.maximum(m, a_new)
        if HAS_SINKS:
            a_s = tl.where(filled, tl.sum(b_sk * b_q[None, :], 1) * scale, float("-inf"))  # [NSP]
            m = tl.maximum(m, tl.max(a_s, 0))
        m = tl.where(m == float("-inf"), 0.0, m)
        if HAS_ROWS:
            e = g * tl.exp(a - m)
            den += tl.sum(e, 0)
        if IN_WINDOW:
            e_new = g * tl.exp(a_new - m)
            den += e_new
        if HAS_SINKS:
            e_s = g * tl.exp(a_s - m)
            den += tl.sum(e_s, 0)
    den = tl.maximum(den, _TINY)
    for i_v in range(0, tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_vk = tl.where(keep, b_v, 0.0)
        if HAS_ROWS:
            p_vb = i_bh * L * DV + o_r[:, None] * DV + o_v[None, :]
            b_vb = tl.load(vb + p_vb, mask=in_r[:, None] & m_v[None, :], other=0.0)  # [RP, BV]
            v_fold = tl.sum(tl.where(first[:, None], b_vb, 0.0), 0)
            if IN_WINDOW:
                tl.store(vb_out + i_bh * L2 * DV + (o_r - FOLD)[:, None] * DV + o_v[None, :], b_vb,
                         mask=stay[:, None] & m_v[None, :])
        else:
            v_fold = b_vk if FOLD else tl.zeros([BV], dtype=tl.float32)
        if IN_WINDOW:
            tl.store(vb_out + i_bh * L2 * DV + (L2 - 1) * DV + o_v, b_vk, mask=m_v)
        p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]
        m_fv = m_f[:, None] & m_v[None, :]
        S = tl.load(s + p_s, mask=m_fv, other=0.0) + f_fold[:, None] * v_fold[None, :]  # [BF, BV]
        tl.store(s_out + p_s, S, mask=m_fv)
        num = tl.sum(b_fq[:, None] * S, 0)
        if SOFTMAX:
            if HAS_ROWS:
                num += tl.sum(e[:, None] * b_vb, 0)
            if IN_WINDOW:
                num += e_new * b_vk
            if HAS_SINKS:
                p_sv = i_bh * NS * DV + o_s[:, None] * DV + o_v[None, :]
                b_sv = tl.load(sv + p_sv, mask=m_s[:, None] & m_v[None, :], other=0.0)
                b_sv = tl.where(hot[:, None], b_v[None, :], b_sv)
                tl.store(sv_out + p_sv, b_sv, mask=m_s[:, None] & m_v[None, :])
                num += tl.sum(e_s[:, None] * b_sv, 0)
        tl.store(y + i_bh * DV + o_v, num / den, mask=m_v)


def triton_hybrid_step(q, k, v, fq, fk, gamma, window, scale, key_mask, state: HybridState):
    """One token of sliding-window + linear attention for every sequence of a batch, in Triton;
    the same arguments and results as :func:`linearize.kernels.hybrid.hybrid_step`.

    Args:
        q, k: ``[B, H, Dk]``; v: ``[B, H, Dv]``; fq, fk: ``[B, H, F]`` (any float dtype; the step
            computes in fp32).
        gamma: ``[H]``; None only with ``window == 0`` and no sink slots.
        window: ``W`` (0 ... 128); scale: the score scale.
        key_mask: ``[B]`` bool (False: padding, which changes nothing but the buffer's mask) or
            None.
        state: the :class:`HybridState` so far (fp32; at most ``W`` window rows; its sink slots
            give the number of sinks).

    Returns:
        ``(y [B, H, Dv] fp32, new HybridState)``. No gradient.
    """
    B, H, DK = q.shape
    DV, F = v.shape[-1], fq.shape[-1]
    L, NS = state.k.shape[2], state.sinks
    if k.shape != (B, H, DK) or v.shape[:2] != (B, H) or fq.shape[:2] != (B, H) or fk.shape != fq.shape:
        raise ValueError(f"q, k must be [B, H, Dk], v [B, H, Dv], fq, fk [B, H, F]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(fq.shape)}, {tuple(fk.shape)}")
    if state.S.shape != (B, H, F, DV) or state.k.shape != (B, H, L, DK) or state.z.shape != (B, H, F):
        raise ValueError(f"the state does not fit these inputs: S {tuple(state.S.shape)} (want [{B}, {H}, {F}, {DV}]), "
                         f"window keys {tuple(state.k.shape)} (want [{B}, {H}, L, {DK}])")
    if not 0 <= window <= MAX_WINDOW or L > window:
        raise ValueError(f"window must be in 0 ... {MAX_WINDOW} and at least the state's {L} window rows; got {window}")
    if NS > MAX_SINKS or max(DK, DV, F) > MAX_HEAD_DIM:
        raise ValueError(f"at most {MAX_SINKS} sinks and {MAX_HEAD_DIM} channels; got {NS}, Dk={DK}, Dv={DV}, F={F}")
    softmax = window > 0 or NS > 0
    if softmax and (gamma is None or gamma.shape != (H,)):
        raise ValueError(f"window > 0 or sink slots need gamma of shape [H] = [{H}]")
    if key_mask is not None and key_mask.shape != (B,):
        raise ValueError(f"key_mask must be [B] = [{B}]; got {tuple(key_mask.shape)}")
    fold = int(L + 1 > window)
    in_window = int(window > 0)
    L2 = L + 1 - fold  # the new token stays unless it folds at once (W = 0)
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    q, k, v, fq, fk = (x.contiguous() for x in (q, k, v, fq, fk))
    S, z = state.S.float().contiguous(), state.z.float().contiguous()
    kb, vb, fkb = (x.float().contiguous() for x in (state.k, state.v, state.fk))
    mb = state.mask.to(torch.int8).contiguous()
    km = None if key_mask is None else key_mask.to(torch.int8).contiguous()
    y = torch.empty(B, H, DV, **f32)
    S2, z2 = torch.empty_like(S), torch.empty_like(z)
    kb2, vb2, fkb2 = (torch.empty(B, H, L2, d, **f32) for d in (DK, DV, F))
    mb2 = torch.empty(B, L2, device=dev, dtype=torch.int8)
    if not L:  # no rows to read (an empty tensor's pointer may be null)
        kb = vb = fkb = mb = None
    if not L2:
        kb2 = vb2 = fkb2 = mb2 = None
    if NS:
        sk, sv = state.sink_k.float().contiguous(), state.sink_v.float().contiguous()
        smask = state.sink_mask.to(torch.int8).contiguous()
        sk2, sv2, smask2 = torch.empty_like(sk), torch.empty_like(sv), torch.empty_like(smask)
    else:
        sk = sv = smask = sk2 = sv2 = smask2 = None
    BF = _pow2(F)
    BV = min(_pow2(DV), max(16, 4096 // BF))
    RP = _pow2(max(L, 1))
    # a program holds the window's keys and features: 8 warps keep a full window of 64 with 128
    # features in registers (compiled for sm_90: 4 warps spill about 600 bytes a thread there)
    num_warps = 8 if RP * (_pow2(DK) + BF) >= 8192 else 4
    _step_kernel[(B * H,)](
        q, k, v, fq, fk, km, None if gamma is None else gamma.float().contiguous(), S, z, kb, vb, fkb, mb,
        sk, sv, smask, y, S2, z2, kb2, vb2, fkb2, mb2, sk2, sv2, smask2,
        H, DK, F, DV, L, NS, float(scale),
        BK=_pow2(DK), BF=BF, BV=BV, RP=RP, NSP=_pow2(NS),
        HAS_ROWS=L > 0, FOLD=fold, IN_WINDOW=in_window, HAS_MASK=km is not None, HAS_SINKS=NS > 0, SOFTMAX=softmax,
        num_warps=num_warps,
    )
    if not L2:  # no window
        kb2, vb2, fkb2 = (torch.zeros(B, H, 0, d, **f32) for d in (DK, DV, F))
        mb2 = torch.zeros(B, 0, device=dev, dtype=torch.int8)
    new = HybridState(
        S=S2, z=z2, k=kb2, v=vb2, fk=fkb2, mask=mb2.bool(),
        sink_k=sk2 if NS else state.sink_k, sink_v=sv2 if NS else state.sink_v,
        sink_mask=smask2.bool() if NS else state.sink_mask,
    )
    return y, new
