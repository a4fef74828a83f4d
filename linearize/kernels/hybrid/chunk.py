"""Chunked sliding-window + linear attention under one normaliser, with attention sinks, in
Triton: forward and backward.

For query ``t`` (key positions ``s``; ``ok_s``: key ``s`` is real and not a sink):

    a_ts = q_t . k_s * scale,   window: t - W < s <= t,   linear: s <= t - W     (both with ok_s)
    m_t  = max(a_ts over the window and the visible sinks)   (0 when there is none)
    w_ts = gamma * exp(a_ts - m_t) (window, sinks)           fq_t . fk_s (linear)
    y_t  = (fq_t S0 + sum_s w_ts v_s) / max(fq_t z0 + sum_s w_ts, 1e-30)

LoLCATs' Eq. 7 (arXiv 2410.10254) with StreamingLLM's sinks; the oracle is
:func:`linearize.kernels.hybrid.chunk_hybrid_attention` (same arguments and state).

How the work is split. Chunks of ``C >= W`` tokens (a power of two), so query chunk ``c`` finds
its whole window in chunks ``c - 1`` and ``c``; every key of chunks ``<= c - 2`` is a linear
term and lives in the running state ``S = sum fk v^T``, ``z = sum fk`` (plus ``S0, z0``).

* Forward, grid ``(Dv / BV, B * H)``: one program walks the chunks of a head in order with
  ``S, z`` in fp32 registers. Per chunk: ``q k^T`` against the previous and the current chunk
  (window scores), ``q sinks^T``, the row max ``m`` over both and the sinks, ``fq fk^T`` (the
  newest linear terms), one weight matrix per key chunk (softmax or linear terms by position),
  ``y = (fq S + P_prev v_prev + P_cur v_cur + E_sink v_sink) / den``, then the previous chunk
  is folded into ``S, z``. Program 0 of a head also stores ``den``, ``m`` and the position of
  the maximum (``amax``) for the backward. Keys at positions ``>= L - W`` are never folded, so
  after the loop (plus the last chunk's older keys) ``S, z`` are exactly the new state's.
* Backward, one launch, grid ``(2 + 2 * NK + NV, B * H)``, five kinds of program. With
  ``dn_t = dy_t / den_t``, ``dd_t = -(dy_t . y_t) / den_t`` and ``dw_ts = dn_t . v_s + dd_t``
  (the gradient of weight ``w_ts``):

      softmax term:  da_ts = w_ts dw_ts + dm_t [s = amax_t],   dm_t = -sum_{softmax s} w_ts dw_ts
      dq_t  = scale sum_s da_ts k_s       dk_s = scale sum_t da_ts q_t
      dgamma = sum_{softmax} exp(a_ts - m_t) dw_ts
      linear term:   dfq_t = sum_s dw_ts fk_s + S_t dn_t + z_t dd_t,  dfk_s = sum_t dw_ts fq_t + dS_s v_s + dz_s
      dv_s  = sum_t w_ts dn_t + dS_s^T fk_s,      dS_s = sum_{t in chunks >= c(s) + 2} fq_t dn_t^T (+ dS_final)

  ``dq`` (and ``dgamma``): one program a head, chunks in order; ``dk`` (and the sink slots'
  gradients): one program a head, chunks in order, tiles with keys as rows, each chunk's
  ``dk`` finished by the next step (a carried ``[C, Dk]`` accumulator); ``dfq``: ``NK`` blocks of
  features, in order, with ``S^T``; ``dfk`` (and ``dz0``): ``NK`` blocks, in reverse, with
  ``dS^T, dz``; ``dv`` (and ``dS0``): ``NV`` blocks of value columns, in reverse, with ``dS``.
  Every program recomputes the few ``[C, C]`` tiles it needs (as a flash-attention backward
  does); ``m`` comes from the forward, and ``dm_t`` is recomputed by each program that needs it
  from its own tiles (the ``dq`` and the ``dk`` program), so no program waits for another.

The gradient through ``m_t``. The reference does not detach ``m_t`` (softmax terms are
``exp(a - m)``, linear ones are not, so ``m`` does not cancel): ``dm_t`` above goes to the score
that attains the maximum. With ties PyTorch's ``amax`` splits it evenly among them; here all of
it goes to one of them (a sink before a window key, then the earliest window key): the same
subgradient wherever the maximum is unique, which is what the tests use (continuous random
inputs). The position is the forward's (``amax``), so the backward never compares floats.

Precision: state and accumulation in fp32. fp32 (or fp16) inputs: every product in fp32
(``input_precision="ieee"``). bf16 inputs: bf16 tensor-core products, with fp32 operands split
into bf16 ``hi + lo`` halves where the product's result cancels later, as in
:mod:`linearize.kernels.linear.chunk`: the weights ``P`` in ``P v`` (the normaliser is their
sum in fp32), the state in ``fq S``, ``dn`` in ``dw = dn v^T + dd``, ``S^T`` and ``dS^T`` in
``dfq``/``dfk``, and ``da`` in ``dq = da k`` (its rows sum to zero over the window and the
sinks, so a common offset of the keys cancels). ``q k^T``, ``fq fk^T``, ``dk``, ``dv`` and the
sink slots' gradients take plain 16-bit operands, as a flash-attention backward does.

Speed (measured on an H200: results/h200-kernels/; 9.56 ms forward at B=1, 32 heads, T=64K,
head size 64, 28x its HBM floor). The forward is a sequential walk over ``T / C``
chunks per program, with ``B * H * Dv / BV`` programs (72 at B=2, H=9, Dv=64); each step is
about 15 small tensor-core products plus the exponentials, on about 1 KB of bf16 inputs a token
(the previous chunk is read again, from L2). So it should be bound by the latency of that walk
and the few programs, not by HBM bandwidth; the backward likewise, by its ``dq`` and ``dk``
programs (two score tiles, two ``dw`` tiles and the sinks a step). Compiled for sm_90a (Triton
3.9, ptxas 13.4, at C=64, Dk=Dv=64, F=128) every kind runs at 255 registers and spills: about
1 KB a thread (static) in the forward, about 1 KB in each of the ``dq`` and ``dk`` programs,
0.1-0.6 KB in the others (the linear kernels: 0.15 KB). On the H200 (Triton 3.6) those spills
ran out of local memory with 32 or more value columns a program (see ``_fwd_blocks``).

Triton 3.4-3.7 miscompiles, on Hopper, ``tl.trans`` of a ``tl.dot`` result cast to bf16/fp16 and
fed to another ``tl.dot``. Nothing here calls ``tl.trans``: the ``dk``, ``dfk`` and ``dv``
programs compute their tiles with keys as rows (``k q^T``, ``v dn^T``, ``fk fq^T``) from
operands loaded transposed from memory, and ``k^T``, ``fk^T``, ``v^T``, ``dy^T``, ``y^T``,
``q^T``, ``fq^T``, the sink slots and the states are loaded in the layout each product needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.chunk import (
    _DOT_DTYPES,
    TINY,
    _dot,
    _dot_config,
    _dot_split,
    _inverse_den,
    _pow2,
    _sms,
    compute_dtype,
)
from .reference import HybridState, _check_sinks, _sink_slots

_TINY = tl.constexpr(TINY)
NO_MAX = 2**30  # the amax code of a query with no softmax term; also "never visible" for a sink slot
_NO_MAX = tl.constexpr(NO_MAX)
MAX_WINDOW = 128
# the largest head (q, k, v columns) the dispatcher sends to the compiled kernels: heads of 128
# (128 features, windows 16 and 64, B=2, 8 heads, T=2048) fault on an H200 with Triton 3.6, an
# illegal memory access or a gradient 0.16 from the reference
# (test_gpu_chunk_heads_of_128_bf16); under the interpreter they are right
MAX_COMPILED_HEAD = 64
MAX_SINKS = 64
MAX_HEAD_DIM = 256
CHUNK_SIZES = (16, 32, 64, 128)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    q, k, v, fq, fk, km, gamma, sk, sv, sfrom, s0, z0,
    y, y32, den, mx, amx, s_out, z_out,
    T, P, L, H, DK, F, DV, NS, W, fold_end, scale,
    C: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, NSP: tl.constexpr,
    HAS_WIN: tl.constexpr, PREV_WIN: tl.constexpr, CUR_LIN: tl.constexpr, HAS_SINKS: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    STORE_Y32: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(cdiv(DV, BV), B * H)``. Queries ``[0, T)`` sit at key positions ``P + t`` of the
    ``L = P + T`` keys (the first ``P`` are a carried window)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < DK
    m_f = o_f < F
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    q += i_bh * T * DK
    fq += i_bh * T * F
    k += i_bh * L * DK
    fk += i_bh * L * F
    v += i_bh * L * DV
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]  # [BF, BV]
    # z is column 0 of a [BF, 16] matrix, so that fq . z and its update are matrix products
    first = tl.arange(0, 16)[None, :] == 0
    if HAS_INIT:
        S = tl.load(s0 + p_s, mask=m_fv, other=0.0).to(tl.float32)
        z = tl.load(z0 + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        Z = tl.where(first, z[:, None], 0.0)
    else:
        S = tl.zeros([BF, BV], dtype=tl.float32)
        Z = tl.zeros([BF, 16], dtype=tl.float32)
    ones = tl.where(first, 1.0, 0.0) + tl.zeros([C, 16], dtype=tl.float32)
    g = 0.0
    if SOFTMAX:
        g = tl.load(gamma + i_h).to(tl.float32)
    if HAS_SINKS:
        o_s = tl.arange(0, NSP)
        m_s = o_s < NS
        b_skT = tl.load(sk + i_bh * NS * DK + o_s[None, :] * DK + o_k[:, None], mask=m_k[:, None] & m_s[None, :],
                        other=0.0)  # [BK, NSP], loaded transposed
        b_sv = tl.load(sv + i_bh * NS * DV + o_s[:, None] * DV + o_v[None, :], mask=m_s[:, None] & m_v[None, :],
                       other=0.0)  # [NSP, BV]
        s_from = tl.load(sfrom + i_b * NS + o_s, mask=m_s, other=_NO_MAX)  # [NSP]: first position that sees it
    ii = o_c[:, None]  # query offset in the chunk
    jj = o_c[None, :]  # key offset in its chunk
    for i_t in range(0, tl.cdiv(L, C)):
        t = i_t * C + o_c  # key positions of this chunk, and the positions of its queries
        tp = t - C  # key positions of the previous chunk
        tq = t - P  # query index
        m_q = (tq >= 0) & (tq < T)
        ok_c = t < L
        ok_p = tp >= 0
        if HAS_MASK:
            ok_c = ok_c & (tl.load(km + i_b * L + t, mask=ok_c, other=0) != 0)
            ok_p = ok_p & (tl.load(km + i_b * L + tp, mask=ok_p, other=0) != 0)
        b_fq = tl.load(fq + tq[:, None] * F + o_f[None, :], mask=m_q[:, None] & m_f[None, :], other=0.0)  # [C, BF]
        b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=ok_c[:, None] & m_v[None, :], other=0.0)  # [C, BV]
        b_vp = tl.load(v + tp[:, None] * DV + o_v[None, :], mask=ok_p[:, None] & m_v[None, :], other=0.0)
        b_fkpT = tl.load(fk + tp[None, :] * F + o_f[:, None], mask=m_f[:, None] & ok_p[None, :], other=0.0)  # [BF, C]
        # the state: every key of chunks <= i_t - 2
        o = _dot_split(b_fq, S, DT, PREC, EMULATE, False, True)  # [C, BV]
        d = tl.sum(_dot_split(b_fq, Z, DT, PREC, EMULATE, False, True), 1)  # [C]
        # linear terms of the previous chunk (and of this one, when the window is shorter than a chunk)
        Pp = tl.where((jj <= ii + C - W) & ok_p[None, :], _dot(b_fq, b_fkpT, DT, PREC, EMULATE), 0.0)  # [C, C]
        if CUR_LIN:
            b_fkT = tl.load(fk + t[None, :] * F + o_f[:, None], mask=m_f[:, None] & ok_c[None, :], other=0.0)
            Pc = tl.where((jj <= ii - W) & ok_c[None, :], _dot(b_fq, b_fkT, DT, PREC, EMULATE), 0.0)
        else:
            Pc = tl.zeros([C, C], dtype=tl.float32)
        if SOFTMAX:
            b_q = tl.load(q + tq[:, None] * DK + o_k[None, :], mask=m_q[:, None] & m_k[None, :], other=0.0)  # [C, BK]
            m = tl.full([C], float("-inf"), tl.float32)
            if HAS_WIN:
                b_kT = tl.load(k + t[None, :] * DK + o_k[:, None], mask=m_k[:, None] & ok_c[None, :], other=0.0)
                A = _dot(b_q, b_kT, DT, PREC, EMULATE) * scale
                A = tl.where((jj <= ii) & (jj > ii - W) & ok_c[None, :], A, float("-inf"))
                m = tl.maximum(m, tl.max(A, 1))
                if PREV_WIN:
                    b_kpT = tl.load(k + tp[None, :] * DK + o_k[:, None], mask=m_k[:, None] & ok_p[None, :], other=0.0)
                    Ap = _dot(b_q, b_kpT, DT, PREC, EMULATE) * scale
                    Ap = tl.where((jj > ii + C - W) & ok_p[None, :], Ap, float("-inf"))
                    m = tl.maximum(m, tl.max(Ap, 1))
            if HAS_SINKS:
                As = _dot(b_q, b_skT, DT, PREC, EMULATE) * scale  # [C, NSP]
                As = tl.where(s_from[None, :] <= t[:, None], As, float("-inf"))
                m = tl.maximum(m, tl.max(As, 1))
            m = tl.where(m == float("-inf"), 0.0, m)
            # where the maximum is: a sink (code s - NSP < 0) before a window key (its position)
            code = tl.full([C], _NO_MAX, tl.int32)
            if HAS_SINKS:
                code = tl.minimum(code, tl.min(tl.where(As == m[:, None], o_s[None, :] - NSP, _NO_MAX), 1))
                Es = g * tl.exp(As - m[:, None])
                o += _dot_split(Es, b_sv, DT, PREC, EMULATE, True, False)
                d += tl.sum(Es, 1)
            if HAS_WIN:
                code = tl.minimum(code, tl.min(tl.where(A == m[:, None], t[None, :], _NO_MAX), 1))
                Pc += g * tl.exp(A - m[:, None])
                if PREV_WIN:
                    code = tl.minimum(code, tl.min(tl.where(Ap == m[:, None], tp[None, :], _NO_MAX), 1))
                    Pp += g * tl.exp(Ap - m[:, None])
            if i_v == 0:
                tl.store(mx + i_bh * T + tq, m, mask=m_q)
                tl.store(amx + i_bh * T + tq, code, mask=m_q)
        d += tl.sum(Pc, 1) + tl.sum(Pp, 1)
        o += _dot_split(Pc, b_v, DT, PREC, EMULATE, True, False) + _dot_split(Pp, b_vp, DT, PREC, EMULATE, True, False)
        o = o / tl.maximum(d, _TINY)[:, None]
        p_y = i_bh * T * DV + tq[:, None] * DV + o_v[None, :]
        tl.store(y + p_y, o.to(y.dtype.element_ty), mask=m_q[:, None] & m_v[None, :])
        if STORE_Y32:  # the backward's copy of y, in fp32
            tl.store(y32 + p_y, o, mask=m_q[:, None] & m_v[None, :])
        if i_v == 0:
            tl.store(den + i_bh * T + tq, d, mask=m_q)
        # the previous chunk leaves every later chunk's window: fold it (keys past L - W never)
        b_fkpT = tl.where((tp < fold_end)[None, :], b_fkpT, 0.0)
        S += _dot(b_fkpT, b_vp, DT, PREC, EMULATE)
        Z += _dot(b_fkpT, ones, DT, PREC, EMULATE)
    if STORE_FINAL:  # the last chunk's keys that are no longer in the window
        t = (tl.cdiv(L, C) - 1) * C + o_c
        ok = (t < fold_end) & (t < L)
        if HAS_MASK:
            ok = ok & (tl.load(km + i_b * L + t, mask=ok, other=0) != 0)
        b_fkT = tl.load(fk + t[None, :] * F + o_f[:, None], mask=m_f[:, None] & ok[None, :], other=0.0)
        b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=ok[:, None] & m_v[None, :], other=0.0)
        S += _dot(b_fkT, b_v, DT, PREC, EMULATE)
        Z += _dot(b_fkT, ones, DT, PREC, EMULATE)
        tl.store(s_out + p_s, S, mask=m_fv)
        if i_v == 0:
            tl.store(z_out + i_bh * F + o_f, tl.sum(Z, 1), mask=m_f)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _key_ok(km, i_b, L, t, HAS_MASK: tl.constexpr):
    """Whether key positions ``t`` exist and are real, non-sink tokens."""
    ok = (t >= 0) & (t < L)
    if HAS_MASK:
        ok = ok & (tl.load(km + i_b * L + t, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _bwd_dq(
    i_bh, i_b, i_h, q, k, v, km, gamma, sk, sv, sfrom, y, den, mx, amx, dy, dq, dgamma,
    T, P, L, DK, DV, NS, W, scale,
    C: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, NSP: tl.constexpr,
    HAS_WIN: tl.constexpr, PREV_WIN: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MASK: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dq`` and this head's share of ``dgamma``, chunks in order (tiles: queries as rows)."""
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_d = tl.arange(0, BDV)
    m_k = o_k < DK
    m_d = o_d < DV
    g = tl.load(gamma + i_h).to(tl.float32)
    if HAS_SINKS:
        o_s = tl.arange(0, NSP)
        m_s = o_s < NS
        p_sk = sk + i_bh * NS * DK
        b_skT = tl.load(p_sk + o_s[None, :] * DK + o_k[:, None], mask=m_k[:, None] & m_s[None, :], other=0.0)
        b_sk = tl.load(p_sk + o_s[:, None] * DK + o_k[None, :], mask=m_s[:, None] & m_k[None, :], other=0.0)
        b_svT = tl.load(sv + i_bh * NS * DV + o_s[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_s[None, :],
                        other=0.0)
        s_from = tl.load(sfrom + i_b * NS + o_s, mask=m_s, other=_NO_MAX)
    ii = o_c[:, None]
    jj = o_c[None, :]
    dg = tl.zeros([C], dtype=tl.float32)
    k += i_bh * L * DK
    v += i_bh * L * DV
    for i_t in range(0, tl.cdiv(L, C)):
        t = i_t * C + o_c
        tp = t - C
        tq = t - P
        m_q = (tq >= 0) & (tq < T)
        m_qd = m_q[:, None] & m_d[None, :]
        inv = _inverse_den(den, i_bh, tq, m_q, T)
        b_dy = tl.load(dy + i_bh * T * DV + tq[:, None] * DV + o_d[None, :], mask=m_qd, other=0.0).to(tl.float32)
        b_y = tl.load(y + i_bh * T * DV + tq[:, None] * DV + o_d[None, :], mask=m_qd, other=0.0)
        b_dn = b_dy * inv[:, None]  # [C, BDV]
        b_dd = -tl.sum(b_dy * b_y, 1) * inv  # [C]
        m = tl.load(mx + i_bh * T + tq, mask=m_q, other=0.0)
        code = tl.load(amx + i_bh * T + tq, mask=m_q, other=_NO_MAX)
        b_q = tl.load(q + i_bh * T * DK + tq[:, None] * DK + o_k[None, :], mask=m_q[:, None] & m_k[None, :], other=0.0)
        rs = tl.zeros([C], dtype=tl.float32)  # sum of exp(a - m) dw over the softmax terms
        if HAS_WIN:
            ok_c = _key_ok(km, i_b, L, t, HAS_MASK)
            b_kT = tl.load(k + t[None, :] * DK + o_k[:, None], mask=m_k[:, None] & ok_c[None, :], other=0.0)
            b_vT = tl.load(v + t[None, :] * DV + o_d[:, None], mask=m_d[:, None] & ok_c[None, :], other=0.0)
            A = tl.where((jj <= ii) & (jj > ii - W) & ok_c[None, :], _dot(b_q, b_kT, DT, PREC, EMULATE) * scale,
                         float("-inf"))
            ew = tl.exp(A - m[:, None]) * (_dot_split(b_dn, b_vT, DT, PREC, EMULATE, True, False) + b_dd[:, None])
            rs += tl.sum(ew, 1)
            if PREV_WIN:
                ok_p = _key_ok(km, i_b, L, tp, HAS_MASK)
                b_kpT = tl.load(k + tp[None, :] * DK + o_k[:, None], mask=m_k[:, None] & ok_p[None, :], other=0.0)
                b_vpT = tl.load(v + tp[None, :] * DV + o_d[:, None], mask=m_d[:, None] & ok_p[None, :], other=0.0)
                Ap = tl.where((jj > ii + C - W) & ok_p[None, :], _dot(b_q, b_kpT, DT, PREC, EMULATE) * scale,
                              float("-inf"))
                dwp = _dot_split(b_dn, b_vpT, DT, PREC, EMULATE, True, False) + b_dd[:, None]
                ewp = tl.exp(Ap - m[:, None]) * dwp
                rs += tl.sum(ewp, 1)
        if HAS_SINKS:
            As = tl.where(s_from[None, :] <= t[:, None], _dot(b_q, b_skT, DT, PREC, EMULATE) * scale, float("-inf"))
            ews = tl.exp(As - m[:, None]) * (_dot_split(b_dn, b_svT, DT, PREC, EMULATE, True, False) + b_dd[:, None])
            rs += tl.sum(ews, 1)
        dg += rs
        dm = -g * rs  # the gradient of m_t, given to the score at amax_t
        acc = tl.zeros([C, BK], dtype=tl.float32)
        if HAS_WIN:
            b_k = tl.load(k + t[:, None] * DK + o_k[None, :], mask=ok_c[:, None] & m_k[None, :], other=0.0)
            da = g * ew + tl.where(code[:, None] == t[None, :], dm[:, None], 0.0)
            acc += _dot_split(da, b_k, DT, PREC, EMULATE, True, False)
            if PREV_WIN:
                b_kp = tl.load(k + tp[:, None] * DK + o_k[None, :], mask=ok_p[:, None] & m_k[None, :], other=0.0)
                dap = g * ewp + tl.where(code[:, None] == tp[None, :], dm[:, None], 0.0)
                acc += _dot_split(dap, b_kp, DT, PREC, EMULATE, True, False)
        if HAS_SINKS:
            das = g * ews + tl.where(code[:, None] == (o_s - NSP)[None, :], dm[:, None], 0.0)
            acc += _dot_split(das, b_sk, DT, PREC, EMULATE, True, False)
        p_dq = dq + i_bh * T * DK + tq[:, None] * DK + o_k[None, :]
        tl.store(p_dq, (acc * scale).to(dq.dtype.element_ty), mask=m_q[:, None] & m_k[None, :])
    tl.store(dgamma + i_bh, tl.sum(dg, 0))


@triton.jit
def _bwd_dk(
    i_bh, i_b, i_h, q, k, v, km, gamma, sk, sv, sfrom, y, den, mx, amx, dy, dk, dsk, dsv,
    T, P, L, DK, DV, NS, W, scale,
    C: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, NSP: tl.constexpr,
    HAS_WIN: tl.constexpr, PREV_WIN: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_MASK: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dk`` and the sink slots' gradients, chunks in order; tiles with keys as rows and queries
    as columns (``k q^T``, ``v dn^T``), so that ``dk = da^T q`` needs no transpose."""
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_d = tl.arange(0, BDV)
    m_k = o_k < DK
    m_d = o_d < DV
    g = tl.load(gamma + i_h).to(tl.float32)
    if HAS_SINKS:
        o_s = tl.arange(0, NSP)
        m_s = o_s < NS
        b_sk = tl.load(sk + i_bh * NS * DK + o_s[:, None] * DK + o_k[None, :], mask=m_s[:, None] & m_k[None, :],
                       other=0.0)
        b_sv = tl.load(sv + i_bh * NS * DV + o_s[:, None] * DV + o_d[None, :], mask=m_s[:, None] & m_d[None, :],
                       other=0.0)
        s_from = tl.load(sfrom + i_b * NS + o_s, mask=m_s, other=_NO_MAX)
        dsk_acc = tl.zeros([NSP, BK], dtype=tl.float32)
        dsv_acc = tl.zeros([NSP, BDV], dtype=tl.float32)
    jj = o_c[:, None]  # key offset (rows)
    ii = o_c[None, :]  # query offset (columns)
    carry = tl.zeros([C, BK], dtype=tl.float32)  # dk of this chunk's keys from its own queries
    k += i_bh * L * DK
    v += i_bh * L * DV
    for i_t in range(0, tl.cdiv(L, C)):
        t = i_t * C + o_c
        tp = t - C
        tq = t - P
        m_q = (tq >= 0) & (tq < T)
        inv = _inverse_den(den, i_bh, tq, m_q, T)
        m_dq = m_d[:, None] & m_q[None, :]
        b_dyT = tl.load(dy + i_bh * T * DV + tq[None, :] * DV + o_d[:, None], mask=m_dq, other=0.0).to(tl.float32)
        b_yT = tl.load(y + i_bh * T * DV + tq[None, :] * DV + o_d[:, None], mask=m_dq, other=0.0)
        b_dnT = b_dyT * inv[None, :]  # [BDV, C]
        b_dd = -tl.sum(b_dyT * b_yT, 0) * inv  # [C]
        m = tl.load(mx + i_bh * T + tq, mask=m_q, other=0.0)
        code = tl.load(amx + i_bh * T + tq, mask=m_q, other=_NO_MAX)
        b_qT = tl.load(q + i_bh * T * DK + tq[None, :] * DK + o_k[:, None], mask=m_k[:, None] & m_q[None, :], other=0.0)
        b_q = tl.load(q + i_bh * T * DK + tq[:, None] * DK + o_k[None, :], mask=m_q[:, None] & m_k[None, :], other=0.0)
        cs = tl.zeros([C], dtype=tl.float32)  # per query: sum of exp(a - m) dw over the softmax terms
        if HAS_WIN:
            ok_c = _key_ok(km, i_b, L, t, HAS_MASK)
            b_k = tl.load(k + t[:, None] * DK + o_k[None, :], mask=ok_c[:, None] & m_k[None, :], other=0.0)
            b_v = tl.load(v + t[:, None] * DV + o_d[None, :], mask=ok_c[:, None] & m_d[None, :], other=0.0)
            A = tl.where((jj <= ii) & (jj > ii - W) & ok_c[:, None], _dot(b_k, b_qT, DT, PREC, EMULATE) * scale,
                         float("-inf"))
            ew = tl.exp(A - m[None, :]) * (_dot_split(b_v, b_dnT, DT, PREC, EMULATE, False, True) + b_dd[None, :])
            cs += tl.sum(ew, 0)
            if PREV_WIN:
                ok_p = _key_ok(km, i_b, L, tp, HAS_MASK)
                b_kp = tl.load(k + tp[:, None] * DK + o_k[None, :], mask=ok_p[:, None] & m_k[None, :], other=0.0)
                b_vp = tl.load(v + tp[:, None] * DV + o_d[None, :], mask=ok_p[:, None] & m_d[None, :], other=0.0)
                Ap = tl.where((jj > ii + C - W) & ok_p[:, None], _dot(b_kp, b_qT, DT, PREC, EMULATE) * scale,
                              float("-inf"))
                dwp = _dot_split(b_vp, b_dnT, DT, PREC, EMULATE, False, True) + b_dd[None, :]
                ewp = tl.exp(Ap - m[None, :]) * dwp
                cs += tl.sum(ewp, 0)
        if HAS_SINKS:
            As = tl.where(s_from[:, None] <= t[None, :], _dot(b_sk, b_qT, DT, PREC, EMULATE) * scale, float("-inf"))
            es = tl.exp(As - m[None, :])  # [NSP, C]
            ews = es * (_dot_split(b_sv, b_dnT, DT, PREC, EMULATE, False, True) + b_dd[None, :])
            cs += tl.sum(ews, 0)
        dm = -g * cs
        dkp = carry
        carry = tl.zeros([C, BK], dtype=tl.float32)
        if HAS_WIN:
            da = g * ew + tl.where(t[:, None] == code[None, :], dm[None, :], 0.0)
            carry = _dot(da, b_q, DT, PREC, EMULATE)
            if PREV_WIN:
                dap = g * ewp + tl.where(tp[:, None] == code[None, :], dm[None, :], 0.0)
                dkp += _dot(dap, b_q, DT, PREC, EMULATE)
        if HAS_SINKS:
            das = g * ews + tl.where((o_s - NSP)[:, None] == code[None, :], dm[None, :], 0.0)
            dsk_acc += _dot(das, b_q, DT, PREC, EMULATE)
            b_dy = tl.load(dy + i_bh * T * DV + tq[:, None] * DV + o_d[None, :], mask=m_q[:, None] & m_d[None, :],
                           other=0.0).to(tl.float32)
            dsv_acc += _dot(g * es, b_dy * inv[:, None], DT, PREC, EMULATE)
        # the previous chunk's keys have now seen every query whose window holds them
        p_dk = dk + i_bh * L * DK + tp[:, None] * DK + o_k[None, :]
        tl.store(p_dk, (dkp * scale).to(dk.dtype.element_ty), mask=(tp >= 0)[:, None] & m_k[None, :])
    t = (tl.cdiv(L, C) - 1) * C + o_c
    tl.store(dk + i_bh * L * DK + t[:, None] * DK + o_k[None, :], (carry * scale).to(dk.dtype.element_ty),
             mask=(t < L)[:, None] & m_k[None, :])
    if HAS_SINKS:
        tl.store(dsk + i_bh * NS * DK + o_s[:, None] * DK + o_k[None, :], dsk_acc * scale,
                 mask=m_s[:, None] & m_k[None, :])
        tl.store(dsv + i_bh * NS * DV + o_s[:, None] * DV + o_d[None, :], dsv_acc, mask=m_s[:, None] & m_d[None, :])


@triton.jit
def _bwd_dfq(
    i_kf, i_bh, i_b, fk, v, km, y, den, dy, s0, z0, dfq,
    T, P, L, F, DV, W,
    C: tl.constexpr, BKF: tl.constexpr, BDV: tl.constexpr,
    CUR_LIN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfq`` for features ``[i_kf * BKF, (i_kf + 1) * BKF)``, chunks in order, with ``S^T``."""
    o_c = tl.arange(0, C)
    o_f = i_kf * BKF + tl.arange(0, BKF)
    o_d = tl.arange(0, BDV)
    m_f = o_f < F
    m_d = o_d < DV
    if HAS_INIT:  # S^T restricted to this block of features, loaded transposed
        ST = tl.load(s0 + i_bh * F * DV + o_f[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_f[None, :], other=0.0)
        z = tl.load(z0 + i_bh * F + o_f, mask=m_f, other=0.0)
    else:
        ST = tl.zeros([BDV, BKF], dtype=tl.float32)
        z = tl.zeros([BKF], dtype=tl.float32)
    ii = o_c[:, None]
    jj = o_c[None, :]
    fk += i_bh * L * F
    v += i_bh * L * DV
    for i_t in range(0, tl.cdiv(L, C)):
        t = i_t * C + o_c
        tp = t - C
        tq = t - P
        m_q = (tq >= 0) & (tq < T)
        m_qd = m_q[:, None] & m_d[None, :]
        inv = _inverse_den(den, i_bh, tq, m_q, T)
        b_dy = tl.load(dy + i_bh * T * DV + tq[:, None] * DV + o_d[None, :], mask=m_qd, other=0.0).to(tl.float32)
        b_y = tl.load(y + i_bh * T * DV + tq[:, None] * DV + o_d[None, :], mask=m_qd, other=0.0)
        b_dn = b_dy * inv[:, None]
        b_dd = -tl.sum(b_dy * b_y, 1) * inv
        ok_p = _key_ok(km, i_b, L, tp, HAS_MASK)
        b_vpT = tl.load(v + tp[None, :] * DV + o_d[:, None], mask=m_d[:, None] & ok_p[None, :], other=0.0)
        b_fkp = tl.load(fk + tp[:, None] * F + o_f[None, :], mask=ok_p[:, None] & m_f[None, :], other=0.0)
        Qp = tl.where((jj <= ii + C - W) & ok_p[None, :],
                      _dot_split(b_dn, b_vpT, DT, PREC, EMULATE, True, False) + b_dd[:, None], 0.0)
        # fp32 operands: this term and the next cancel in part
        b_dfq = _dot_split(b_dn, ST, DT, PREC, EMULATE, True, True) + b_dd[:, None] * z[None, :]
        b_dfq += _dot(Qp, b_fkp, DT, PREC, EMULATE)
        if CUR_LIN:
            ok_c = _key_ok(km, i_b, L, t, HAS_MASK)
            b_vT = tl.load(v + t[None, :] * DV + o_d[:, None], mask=m_d[:, None] & ok_c[None, :], other=0.0)
            b_fk = tl.load(fk + t[:, None] * F + o_f[None, :], mask=ok_c[:, None] & m_f[None, :], other=0.0)
            Qc = tl.where((jj <= ii - W) & ok_c[None, :],
                          _dot_split(b_dn, b_vT, DT, PREC, EMULATE, True, False) + b_dd[:, None], 0.0)
            b_dfq += _dot(Qc, b_fk, DT, PREC, EMULATE)
        p_dfq = dfq + i_bh * T * F + tq[:, None] * F + o_f[None, :]
        tl.store(p_dfq, b_dfq.to(dfq.dtype.element_ty), mask=m_q[:, None] & m_f[None, :])
        ST += _dot(b_vpT, b_fkp, DT, PREC, EMULATE)
        z += tl.sum(b_fkp.to(tl.float32), 0)


@triton.jit
def _bwd_dfk(
    i_kf, i_bh, i_b, fq, v, km, y, den, dy, ds_final, dz_final, dfk, dz0,
    T, P, L, F, DV, W, fold_end,
    C: tl.constexpr, BKF: tl.constexpr, BDV: tl.constexpr,
    CUR_LIN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfk`` for features ``[i_kf * BKF, (i_kf + 1) * BKF)`` and ``dz0``, key chunks in reverse,
    with ``dS^T, dz`` of the queries two chunks or more later (and the final state's)."""
    o_c = tl.arange(0, C)
    o_f = i_kf * BKF + tl.arange(0, BKF)
    o_d = tl.arange(0, BDV)
    m_f = o_f < F
    m_d = o_d < DV
    if HAS_DFINAL:
        dST = tl.load(ds_final + i_bh * F * DV + o_f[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_f[None, :],
                      other=0.0).to(tl.float32)
        dz = tl.load(dz_final + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    else:
        dST = tl.zeros([BDV, BKF], dtype=tl.float32)
        dz = tl.zeros([BKF], dtype=tl.float32)
    jj = o_c[:, None]  # key offset (rows)
    ii = o_c[None, :]  # query offset (columns)
    v += i_bh * L * DV
    n_t = tl.cdiv(L, C)
    for i_r in range(0, n_t):
        t = (n_t - 1 - i_r) * C + o_c  # this chunk's keys; its queries, and the next chunk's
        tq = t - P
        tq1 = tq + C
        m_q = (tq >= 0) & (tq < T)
        m_q1 = (tq1 >= 0) & (tq1 < T)
        ok = _key_ok(km, i_b, L, t, HAS_MASK)
        b_v = tl.load(v + t[:, None] * DV + o_d[None, :], mask=ok[:, None] & m_d[None, :], other=0.0)
        inv1 = _inverse_den(den, i_bh, tq1, m_q1, T)
        m_dq1 = m_d[:, None] & m_q1[None, :]
        b_dyT1 = tl.load(dy + i_bh * T * DV + tq1[None, :] * DV + o_d[:, None], mask=m_dq1, other=0.0).to(tl.float32)
        b_yT1 = tl.load(y + i_bh * T * DV + tq1[None, :] * DV + o_d[:, None], mask=m_dq1, other=0.0)
        b_dnT1 = b_dyT1 * inv1[None, :]
        b_dd1 = -tl.sum(b_dyT1 * b_yT1, 0) * inv1
        b_fq1 = tl.load(fq + i_bh * T * F + tq1[:, None] * F + o_f[None, :], mask=m_q1[:, None] & m_f[None, :],
                        other=0.0)
        Q1 = tl.where((jj <= ii + C - W) & ok[:, None],
                      _dot_split(b_v, b_dnT1, DT, PREC, EMULATE, False, True) + b_dd1[None, :], 0.0)
        b_dfk = _dot(Q1, b_fq1, DT, PREC, EMULATE)
        if CUR_LIN:
            inv = _inverse_den(den, i_bh, tq, m_q, T)
            m_dq = m_d[:, None] & m_q[None, :]
            b_dyT = tl.load(dy + i_bh * T * DV + tq[None, :] * DV + o_d[:, None], mask=m_dq, other=0.0).to(tl.float32)
            b_yT = tl.load(y + i_bh * T * DV + tq[None, :] * DV + o_d[:, None], mask=m_dq, other=0.0)
            b_fq = tl.load(fq + i_bh * T * F + tq[:, None] * F + o_f[None, :], mask=m_q[:, None] & m_f[None, :],
                           other=0.0)
            Q = tl.where((jj <= ii - W) & ok[:, None],
                         _dot_split(b_v, b_dyT * inv[None, :], DT, PREC, EMULATE, False, True)
                         - (tl.sum(b_dyT * b_yT, 0) * inv)[None, :], 0.0)
            b_dfk += _dot(Q, b_fq, DT, PREC, EMULATE)
        # fp32 operands: this term and the local ones cancel in part. Keys still in the window
        # at the end are not in the final state; they have no query two chunks later either.
        far = _dot_split(b_v, dST, DT, PREC, EMULATE, False, True) + dz[None, :]
        b_dfk += tl.where((ok & (t < fold_end))[:, None], far, 0.0)
        tl.store(dfk + i_bh * L * F + t[:, None] * F + o_f[None, :], b_dfk.to(dfk.dtype.element_ty),
                 mask=(t < L)[:, None] & m_f[None, :])
        dST += _dot_split(b_dnT1, b_fq1, DT, PREC, EMULATE, True, False)
        dz += tl.sum(b_fq1.to(tl.float32) * b_dd1[:, None], 0)
    if STORE_DINIT:  # the first chunk's queries see the initial state too
        tq = o_c - P
        m_q = (tq >= 0) & (tq < T)
        inv = _inverse_den(den, i_bh, tq, m_q, T)
        b_dy = tl.load(dy + i_bh * T * DV + tq[:, None] * DV + o_d[None, :], mask=m_q[:, None] & m_d[None, :],
                       other=0.0).to(tl.float32)
        b_y = tl.load(y + i_bh * T * DV + tq[:, None] * DV + o_d[None, :], mask=m_q[:, None] & m_d[None, :], other=0.0)
        b_fq = tl.load(fq + i_bh * T * F + tq[:, None] * F + o_f[None, :], mask=m_q[:, None] & m_f[None, :], other=0.0)
        dz += tl.sum(b_fq.to(tl.float32) * (-tl.sum(b_dy * b_y, 1) * inv)[:, None], 0)
        tl.store(dz0 + i_bh * F + o_f, dz, mask=m_f)


@triton.jit
def _bwd_dv(
    i_v, i_bh, i_b, i_h, q, k, fq, fk, km, gamma, den, mx, dy, ds_final, dv, ds0,
    T, P, L, DK, F, DV, W, fold_end, scale,
    C: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    HAS_WIN: tl.constexpr, PREV_WIN: tl.constexpr, CUR_LIN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dv`` for values ``[i_v * BV, (i_v + 1) * BV)`` and that block of ``dS0``, key chunks in
    reverse, with ``dS`` of the queries two chunks or more later (and the final state's)."""
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < DK
    m_f = o_f < F
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]
    if HAS_DFINAL:
        dS = tl.load(ds_final + p_s, mask=m_fv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BF, BV], dtype=tl.float32)
    g = 0.0
    if HAS_WIN:
        g = tl.load(gamma + i_h).to(tl.float32)
    jj = o_c[:, None]  # key offset (rows)
    ii = o_c[None, :]  # query offset (columns)
    k += i_bh * L * DK
    fk += i_bh * L * F
    n_t = tl.cdiv(L, C)
    for i_r in range(0, n_t):
        t = (n_t - 1 - i_r) * C + o_c
        tq = t - P
        tq1 = tq + C
        m_q = (tq >= 0) & (tq < T)
        m_q1 = (tq1 >= 0) & (tq1 < T)
        ok = _key_ok(km, i_b, L, t, HAS_MASK)
        b_fk = tl.load(fk + t[:, None] * F + o_f[None, :], mask=ok[:, None] & m_f[None, :], other=0.0)  # [C, BF]
        # the next chunk's queries: linear terms, and window terms when the window reaches back
        b_fqT1 = tl.load(fq + i_bh * T * F + tq1[None, :] * F + o_f[:, None], mask=m_f[:, None] & m_q1[None, :],
                         other=0.0)
        inv1 = _inverse_den(den, i_bh, tq1, m_q1, T)
        b_dn1 = tl.load(dy + i_bh * T * DV + tq1[:, None] * DV + o_v[None, :], mask=m_q1[:, None] & m_v[None, :],
                        other=0.0).to(tl.float32) * inv1[:, None]  # [C, BV]
        R1 = tl.where((jj <= ii + C - W) & ok[:, None], _dot(b_fk, b_fqT1, DT, PREC, EMULATE), 0.0)  # [C, C]
        # this chunk's queries
        b_fqT = tl.load(fq + i_bh * T * F + tq[None, :] * F + o_f[:, None], mask=m_f[:, None] & m_q[None, :], other=0.0)
        inv = _inverse_den(den, i_bh, tq, m_q, T)
        b_dn = tl.load(dy + i_bh * T * DV + tq[:, None] * DV + o_v[None, :], mask=m_q[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32) * inv[:, None]
        if CUR_LIN:
            R = tl.where((jj <= ii - W) & ok[:, None], _dot(b_fk, b_fqT, DT, PREC, EMULATE), 0.0)
        else:
            R = tl.zeros([C, C], dtype=tl.float32)
        if HAS_WIN:
            b_k = tl.load(k + t[:, None] * DK + o_k[None, :], mask=ok[:, None] & m_k[None, :], other=0.0)
            b_qT = tl.load(q + i_bh * T * DK + tq[None, :] * DK + o_k[:, None], mask=m_k[:, None] & m_q[None, :],
                           other=0.0)
            m = tl.load(mx + i_bh * T + tq, mask=m_q, other=0.0)
            A = tl.where((jj <= ii) & (jj > ii - W) & ok[:, None], _dot(b_k, b_qT, DT, PREC, EMULATE) * scale,
                         float("-inf"))
            R += g * tl.exp(A - m[None, :])
            if PREV_WIN:
                b_qT1 = tl.load(q + i_bh * T * DK + tq1[None, :] * DK + o_k[:, None], mask=m_k[:, None] & m_q1[None, :],
                                other=0.0)
                m1 = tl.load(mx + i_bh * T + tq1, mask=m_q1, other=0.0)
                A1 = tl.where((jj > ii + C - W) & ok[:, None], _dot(b_k, b_qT1, DT, PREC, EMULATE) * scale,
                              float("-inf"))
                R1 += g * tl.exp(A1 - m1[None, :])
        b_dv = _dot(R, b_dn, DT, PREC, EMULATE) + _dot(R1, b_dn1, DT, PREC, EMULATE)
        b_dv += tl.where((t < fold_end)[:, None], _dot(b_fk, dS, DT, PREC, EMULATE), 0.0)
        tl.store(dv + i_bh * L * DV + t[:, None] * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=(t < L)[:, None] & m_v[None, :])
        dS += _dot(b_fqT1, b_dn1, DT, PREC, EMULATE)
    if STORE_DINIT:  # the first chunk's queries see the initial state too
        tq = o_c - P
        m_q = (tq >= 0) & (tq < T)
        inv = _inverse_den(den, i_bh, tq, m_q, T)
        b_fqT = tl.load(fq + i_bh * T * F + tq[None, :] * F + o_f[:, None], mask=m_f[:, None] & m_q[None, :], other=0.0)
        b_dn = tl.load(dy + i_bh * T * DV + tq[:, None] * DV + o_v[None, :], mask=m_q[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32) * inv[:, None]
        dS += _dot(b_fqT, b_dn, DT, PREC, EMULATE)
        tl.store(ds0 + p_s, dS, mask=m_fv)


@triton.jit
def _bwd_kernel(
    q, k, v, fq, fk, km, gamma, sk, sv, sfrom, s0, z0, y, den, mx, amx, dy, ds_final, dz_final,
    dq, dk, dv, dfq, dfk, dgamma, dsk, dsv, ds0, dz0,
    T, P, L, H, DK, F, DV, NS, W, fold_end, scale,
    C: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr,
    NSP: tl.constexpr, NK: tl.constexpr,
    HAS_WIN: tl.constexpr, PREV_WIN: tl.constexpr, CUR_LIN: tl.constexpr, HAS_SINKS: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(2 + 2 * NK + NV, B * H)``: program 0 of a head computes ``dq`` and ``dgamma``,
    program 1 ``dk`` and the sink slots' gradients, the next ``NK`` ``dfq``, the next ``NK``
    ``dfk`` and ``dz0``, the last ``NV`` ``dv`` and ``dS0``; all run at once. Without softmax
    terms (no window, no sinks) programs 0 and 1 only write zeros."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    if i_p == 0:
        if SOFTMAX:
            _bwd_dq(i_bh, i_b, i_h, q, k, v, km, gamma, sk, sv, sfrom, y, den, mx, amx, dy, dq, dgamma,
                    T, P, L, DK, DV, NS, W, scale, C, BK, BDV, NSP, HAS_WIN, PREV_WIN, HAS_SINKS, HAS_MASK,
                    DT, PREC, EMULATE)
    elif i_p == 1:
        if SOFTMAX:
            _bwd_dk(i_bh, i_b, i_h, q, k, v, km, gamma, sk, sv, sfrom, y, den, mx, amx, dy, dk, dsk, dsv,
                    T, P, L, DK, DV, NS, W, scale, C, BK, BDV, NSP, HAS_WIN, PREV_WIN, HAS_SINKS, HAS_MASK,
                    DT, PREC, EMULATE)
    elif i_p < 2 + NK:
        _bwd_dfq(i_p - 2, i_bh, i_b, fk, v, km, y, den, dy, s0, z0, dfq, T, P, L, F, DV, W,
                 C, BKF, BDV, CUR_LIN, HAS_MASK, HAS_INIT, DT, PREC, EMULATE)
    elif i_p < 2 + 2 * NK:
        _bwd_dfk(i_p - 2 - NK, i_bh, i_b, fq, v, km, y, den, dy, ds_final, dz_final, dfk, dz0,
                 T, P, L, F, DV, W, fold_end, C, BKF, BDV, CUR_LIN, HAS_MASK, HAS_DFINAL, STORE_DINIT,
                 DT, PREC, EMULATE)
    else:
        _bwd_dv(i_p - 2 - 2 * NK, i_bh, i_b, i_h, q, k, fq, fk, km, gamma, den, mx, dy, ds_final, dv, ds0,
                T, P, L, DK, F, DV, W, fold_end, scale, C, BK, BF, BV, HAS_WIN, PREV_WIN, CUR_LIN, HAS_MASK,
                HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE)


# ----------------------------------------------------------------------------- launchers


def chunk_for(window: int, chunk_size: int, features: int, dtype: torch.dtype) -> int:
    """The chunk the kernels take: a power of two ``>= window`` (at least 16), and at most
    ``chunk_size`` beyond that; with fp32 products 16 or the window's, with ``F > 128`` at most
    32 or the window's, so that a program's tiles stay in registers (as in the linear kernels)."""
    cap = 16 if dtype == torch.float32 else (64 if _pow2(features) <= 128 else 32)
    return max(16, triton.next_power_of_2(max(window, 1)), min(chunk_size, cap))


def _fwd_blocks(F: int, DV: int, C: int, heads: int, dtype) -> tuple[int, int]:
    """``(BV, num_warps)`` of the forward: value columns per program, shrunk while ``B * H``
    programs per block would leave multiprocessors idle."""
    BF = _pow2(F)
    if dtype == torch.float32:
        return 16, (8 if BF >= 128 or C >= 64 else 4)
    # 64-token chunks take 16 value columns a program: with 32 or 64 the program (255 registers
    # and spills) faults on sm_90 with Triton 3.6 (compute-sanitizer: out-of-range local address in
    # the forward; seen at F=128 with 32 columns, B=2 and B=16, and at F=64 with 64, B=16, H=9,
    # Dk=Dv=64; 16 columns ran forward and backward at F=128, B=16)
    BV = min(_pow2(DV), 16 if C >= 64 else (32 if BF >= 128 or C >= 128 else 64))
    sms = _sms()
    while sms and BV > 16 and heads * triton.cdiv(DV, BV) < sms:
        BV //= 2
    return BV, (8 if C >= 64 or BF * BV >= 8192 else 4)


def _bwd_blocks(BF: int, BDV: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BKF, BV)`` of the backward: features a ``dfq``/``dfk`` program takes, value columns a
    ``dv`` program takes."""
    if dtype == torch.float32:
        return 16, 16
    return (32 if BDV > 128 or BF > 128 else min(BF, 64)), min(BDV, 32 if BF >= 128 else 64)


def _stages(C: int, BF: int, backward: bool, dtype: torch.dtype, BD: int = 64) -> int:
    """Software-pipelining stages of a launch: 2, or 1 where two would ask for more shared memory
    than an sm_90 block may have (227 KiB). ``BD``: the head size's block (``q, k, v`` columns).
    Compiled for sm_90 with aligned inputs (``python -m linearize.kernels.resources``,
    ``tests/kernels/test_kernel_resources.py``), bf16 products:

    * head size 64: 128-token chunks need 303,104 bytes in the backward (F = 64; an H200 refused
      the launch) and 252,416 in the forward at F = 128, with one stage 135,168 and 84,480;
    * head size 128: the backward needs 308,224 bytes with two stages at every window up to 64
      and F = 64-128 (an H200 refused it at F = 128, window 64), 139,264 with one; the forward at
      F = 256 and 64-token chunks 242,176, 88,576 with one;

    and with fp32 products 256 features need 259,072 bytes in the forward of 64-token chunks.
    Everything else fits with two."""
    if C >= 128 and (backward or BF >= 128 or BD >= 128):
        return 1
    if BD >= 128 and (backward or BF >= 256):
        return 1
    if dtype == torch.float32 and BF >= 256:
        return 1
    return 2


def max_window(dtype: torch.dtype, head_dim: int = 64) -> int:
    """The longest window the kernels take with products of ``dtype`` and heads of ``head_dim``:
    ``MAX_WINDOW`` with 16-bit products and heads of at most 64; otherwise 64, since their
    128-token chunks ask for more shared memory than an sm_90 block has even with one pipelining
    stage (fp32 products: the backward 278,528 bytes at F = 128, 212,992 at F = 64 and the forward
    316,416 with two stages there; heads of 128: the backward 270,336 bytes at F = 64-128)."""
    return MAX_WINDOW if dtype != torch.float32 and head_dim <= 64 else 64


def _flags(window, sinks, C, key_mask):
    return dict(
        HAS_WIN=window > 0, PREV_WIN=window > 1, CUR_LIN=C > window, HAS_SINKS=sinks > 0,
        SOFTMAX=window > 0 or sinks > 0, HAS_MASK=key_mask is not None,
    )


def hybrid_attention_fwd(q, k, v, fq, fk, key_mask, gamma, sink_k, sink_v, sink_from, S0, z0, P, window, scale,
                         output_final_state=False, chunk_size=64, output_dtype=None, keep_fp32_output=False):
    """Launch the forward on contiguous ``q [B, H, T, Dk]``, ``fq [B, H, T, F]`` (the queries,
    at key positions ``P ...``), ``k [B, H, L, Dk]``, ``v [B, H, L, Dv]``, ``fk [B, H, L, F]``
    (``L = P + T`` keys), ``key_mask [B, L]`` int8 or None (False: padding or sink),
    ``sink_k [B, H, n, Dk]``, ``sink_v [B, H, n, Dv]``, ``sink_from [B, n]`` int32 (the first
    key position whose query sees the slot; ``NO_MAX``: empty).

    Returns ``(y [B, H, T, Dv], y32 or None, den, m, amax [B, H, T], S [B, H, F, Dv] or None,
    z [B, H, F] or None)``; the final state folds every key before position ``L - window``."""
    B, H, T, DK = q.shape
    L, F, DV = k.shape[2], fq.shape[-1], v.shape[-1]
    NS = sink_k.shape[2] if sink_k is not None else 0
    dtype = compute_dtype(q, k, v, fq, fk)
    DT, PREC, EMULATE = _dot_config(dtype)
    C = chunk_for(window, chunk_size, F, dtype)
    BV, num_warps = _fwd_blocks(F, DV, C, B * H, dtype)
    dev = v.device
    y = torch.empty(B, H, T, DV, device=dev, dtype=output_dtype or torch.promote_types(fq.dtype, v.dtype))
    store_y32 = keep_fp32_output and y.dtype != torch.float32
    y32 = torch.empty(B, H, T, DV, device=dev, dtype=torch.float32) if store_y32 else None
    den, mx = (torch.empty(B, H, T, device=dev, dtype=torch.float32) for _ in range(2))
    amx = torch.empty(B, H, T, device=dev, dtype=torch.int32)
    S = torch.empty(B, H, F, DV, device=dev, dtype=torch.float32) if output_final_state else None
    z = torch.empty(B, H, F, device=dev, dtype=torch.float32) if output_final_state else None
    _fwd_kernel[(triton.cdiv(DV, BV), B * H)](
        q, k, v, fq, fk, key_mask, gamma, sink_k, sink_v, sink_from, S0, z0,
        y, y32, den, mx, amx, S, z,
        T, P, L, H, DK, F, DV, NS, window, max(L - window, 0), scale,
        C=C, BK=_pow2(DK), BF=_pow2(F), BV=BV, NSP=_pow2(NS), **_flags(window, NS, C, key_mask),
        HAS_INIT=S0 is not None, STORE_FINAL=output_final_state, STORE_Y32=store_y32,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=num_warps, num_stages=_stages(C, _pow2(F), False, dtype, _pow2(max(DK, DV))),
    )
    if keep_fp32_output and not store_y32:
        y32 = y
    return y, y32, den, mx, amx, S, z


def hybrid_attention_bwd(q, k, v, fq, fk, key_mask, gamma, sink_k, sink_v, sink_from, S0, z0, P, window, scale,
                         y32, den, mx, amx, dy, dS=None, dz=None, chunk_size=64, want_dinit=True,
                         feature_grad_dtypes=None):
    """Launch the backward (arguments as :func:`hybrid_attention_fwd`, plus its saved ``y32,
    den, m, amax``, ``dy [B, H, T, Dv]`` and the final state's gradients ``dS, dz`` or None;
    ``feature_grad_dtypes``: the dtypes of ``dfq, dfk``, default those of ``fq, fk``).

    Returns ``(dq, dk, dv, dfq, dfk, dgamma [B, H] fp32 or None, dsink_k, dsink_v (fp32 or None),
    dS0, dz0 (fp32 or None))``."""
    B, H, T, DK = q.shape
    L, F, DV = k.shape[2], fq.shape[-1], v.shape[-1]
    NS = sink_k.shape[2] if sink_k is not None else 0
    dtype = compute_dtype(q, k, v, fq, fk)
    DT, PREC, EMULATE = _dot_config(dtype)
    C = chunk_for(window, chunk_size, F, dtype)
    dev = v.device
    softmax = window > 0 or NS > 0
    has_dfinal = dS is not None or dz is not None
    if has_dfinal:
        dS = torch.zeros(B, H, F, DV, device=dev, dtype=torch.float32) if dS is None else dS.float().contiguous()
        dz = torch.zeros(B, H, F, device=dev, dtype=torch.float32) if dz is None else dz.float().contiguous()
    dq = torch.empty_like(q) if softmax else torch.zeros_like(q)
    dk = torch.empty_like(k) if softmax else torch.zeros_like(k)
    dfq_dtype, dfk_dtype = feature_grad_dtypes or (fq.dtype, fk.dtype)
    dv = torch.empty_like(v)
    dfq, dfk = torch.empty_like(fq, dtype=dfq_dtype), torch.empty_like(fk, dtype=dfk_dtype)
    dgamma = torch.empty(B, H, device=dev, dtype=torch.float32) if softmax else None
    dsk = torch.empty(B, H, NS, DK, device=dev, dtype=torch.float32) if NS else None
    dsv = torch.empty(B, H, NS, DV, device=dev, dtype=torch.float32) if NS else None
    want_dinit = want_dinit and S0 is not None
    dS0 = torch.empty(B, H, F, DV, device=dev, dtype=torch.float32) if want_dinit else None
    dz0 = torch.empty(B, H, F, device=dev, dtype=torch.float32) if want_dinit else None
    BF, BDV = _pow2(F), _pow2(DV)
    BKF, BV = _bwd_blocks(BF, BDV, dtype)
    NK, NV = triton.cdiv(F, BKF), triton.cdiv(DV, BV)
    _bwd_kernel[(2 + 2 * NK + NV, B * H)](
        q, k, v, fq, fk, key_mask, gamma, sink_k, sink_v, sink_from, S0, z0, y32, den, mx, amx, dy, dS, dz,
        dq, dk, dv, dfq, dfk, dgamma, dsk, dsv, dS0, dz0,
        T, P, L, H, DK, F, DV, NS, window, max(L - window, 0), scale,
        C=C, BK=_pow2(DK), BF=BF, BKF=BKF, BV=BV, BDV=BDV, NSP=_pow2(NS), NK=NK, **_flags(window, NS, C, key_mask),
        HAS_INIT=S0 is not None, HAS_DFINAL=has_dfinal, STORE_DINIT=want_dinit,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=8, num_stages=_stages(C, BF, True, dtype, _pow2(max(DK, DV))),
    )
    return dq, dk, dv, dfq, dfk, dgamma, dsk, dsv, dS0, dz0


def features_as_read(fq, fk, dtype):
    """The features as the kernels take them: in ``dtype`` when that is 16-bit. Every product
    the kernels compute on them then rounds them to ``dtype`` anyway, so this changes no result
    of the forward, and the backward's sums of raw features (``z``, ``dz``) then use the same
    rounded values as its products. fp32 feature tiles beside bf16 queries, keys and values
    (what a student with an fp32 feature map hands over) doubled the forward's tiles of features
    in registers, and the forward, already at 255 registers and spilling, faulted on an H200 with
    Triton 3.6 (compute-sanitizer: out-of-range local address in ``_fwd_kernel``; cast first, it
    ran, forward and backward: results/h200-kernels/, "The hybrid fault")."""
    if dtype == torch.float32:
        return fq, fk
    return fq.to(dtype), fk.to(dtype)


class ChunkHybridAttentionFunction(torch.autograd.Function):
    """Autograd wrapper. Inputs: ``q, fq`` (the new queries), ``k, v, fk`` (carried window keys
    then new keys), ``gamma [H]`` or None, ``S0, z0`` or None, the state's sink slots
    ``sink_k, sink_v`` or None; then ``key_mask`` int8, ``sink_pos [B, n]`` (where a slot that
    fills in this call takes its key from, else -1), ``sink_from``, and the settings.

    The slots that fill here take their key and value from ``k, v`` inside the function, and
    their gradients go back into ``dk, dv`` at those positions (where the kernel wrote zeros:
    a sink is no window or linear key), so no ``[B, H, L, *]`` scatter runs outside."""

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, gamma, S0, z0, sink_k, sink_v, key_mask, sink_pos, sink_from, P, window,
                scale, output_final_state, chunk_size, output_dtype):
        ctx.feature_dtypes = (fq.dtype, fk.dtype)
        fq, fk = features_as_read(fq, fk, compute_dtype(q, k, v, fq, fk))
        q, k, v, fq, fk = (x.contiguous() for x in (q, k, v, fq, fk))
        if S0 is not None:
            S0, z0 = S0.float().contiguous(), z0.float().contiguous()
        g = gamma.float().contiguous() if gamma is not None else None
        sk = sv = None
        if sink_k is not None:
            fresh = (sink_pos >= 0)[:, None, :, None]  # [B, 1, n, 1]
            idx = sink_pos.clamp_min(0)[:, None, :, None]
            B, H = q.shape[:2]
            sk = torch.where(fresh, k.gather(2, idx.expand(B, H, -1, k.shape[-1])).float(), sink_k.float()).contiguous()
            sv = torch.where(fresh, v.gather(2, idx.expand(B, H, -1, v.shape[-1])).float(), sink_v.float()).contiguous()
        keep = any(ctx.needs_input_grad[:10])
        y, y32, den, mx, amx, S, z = hybrid_attention_fwd(
            q, k, v, fq, fk, key_mask, g, sk, sv, sink_from, S0, z0, P, window, scale,
            output_final_state, chunk_size, output_dtype, keep_fp32_output=keep,
        )
        ctx.save_for_backward(q, k, v, fq, fk, key_mask, g, sk, sv, sink_from, S0, z0, y32, den, mx, amx, sink_pos)
        ctx.settings = (P, window, scale, chunk_size, gamma.dtype if gamma is not None else None)
        ctx.set_materialize_grads(False)
        return y, S, z

    @staticmethod
    def backward(ctx, dy, dS, dz):
        q, k, v, fq, fk, key_mask, g, sk, sv, sink_from, S0, z0, y32, den, mx, amx, sink_pos = ctx.saved_tensors
        P, window, scale, chunk_size, gamma_dtype = ctx.settings
        dy = torch.zeros_like(y32) if dy is None else dy.contiguous()
        dq, dk, dv, dfq, dfk, dg, dsk, dsv, dS0, dz0 = hybrid_attention_bwd(
            q, k, v, fq, fk, key_mask, g, sk, sv, sink_from, S0, z0, P, window, scale, y32, den, mx, amx, dy,
            dS, dz, chunk_size, want_dinit=ctx.needs_input_grad[6] or ctx.needs_input_grad[7],
            feature_grad_dtypes=ctx.feature_dtypes,
        )
        dgamma = dg.sum(0).to(gamma_dtype) if dg is not None else None
        d_sink_k = d_sink_v = None
        if dsk is not None:
            fresh = (sink_pos >= 0)[:, None, :, None]
            idx = sink_pos.clamp_min(0)[:, None, :, None]
            B, H = q.shape[:2]
            # a fresh slot's gradient is its token's (whose window/linear gradient is zero)
            dk.scatter_add_(2, idx.expand(B, H, -1, dk.shape[-1]), torch.where(fresh, dsk, 0.0).to(dk.dtype))
            dv.scatter_add_(2, idx.expand(B, H, -1, dv.shape[-1]), torch.where(fresh, dsv, 0.0).to(dv.dtype))
            d_sink_k, d_sink_v = torch.where(fresh, 0.0, dsk), torch.where(fresh, 0.0, dsv)
        return (dq, dk, dv, dfq, dfk, dgamma, dS0, dz0, d_sink_k, d_sink_v) + (None,) * 9


def triton_chunk_hybrid_attention(
    q, k, v, fq, fk, gamma, window, scale, key_mask=None, state=None, chunk_size=64, output_state=True, sinks=0,
    output_dtype=None,
):
    """Sliding-window + linear attention with one normaliser, chunked, in Triton (forward and
    backward); the same function, arguments and state as the reference
    :func:`linearize.kernels.hybrid.chunk_hybrid_attention`.

    Args:
        q, k: ``[B, H, T, Dk]``; v: ``[B, H, T, Dv]``; fq, fk: ``[B, H, T, F]`` (fp32, bf16 or
            fp16; bf16 anywhere means bf16 products).
        gamma: ``[H]``, the softmax terms' factor (in (0, 1)); None only when ``window == 0``
            and ``sinks == 0``.
        window: ``W``, 0 ... 128: the current token and the ``W - 1`` before it take softmax
            terms.
        scale: the score scale (``1 / sqrt(Dk)``).
        key_mask: ``[B, T]`` bool, False for padding keys (they add nothing, and are never sinks).
        state: a :class:`HybridState` carried from earlier tokens (its window keys are put in
            front of the new ones), or None.
        chunk_size: 16, 32, 64 (default) or 128, an upper bound on the tokens a program takes at
            a time beyond the window's (see :func:`chunk_for`); the result does not depend on it.
        output_state: also return the new state.
        sinks: ``n`` (0 ... 64): the first ``n`` real tokens always take softmax terms.
        output_dtype: dtype of ``y``; default the promoted dtype of ``fq`` and ``v``.

    Returns:
        ``(y [B, H, T, Dv], HybridState or None)``. Gradients flow to ``q, k, v, fq, fk, gamma``
        and every tensor of the carried state; ``m_t`` is not detached (see the module
        docstring for ties).

    Example::

        B, H, T = 2, 9, 4096
        q, k, v = (torch.randn(B, H, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        fq, fk = (torch.rand(B, H, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        gamma = torch.full((H,), 0.1, device="cuda")
        y, state = triton_chunk_hybrid_attention(q, k, v, fq, fk, gamma, 64, 64**-0.5, sinks=4)
    """
    _check_arguments(q, k, v, fq, fk, gamma, window, key_mask, sinks, state, chunk_size)
    B, H, T, DK = q.shape
    DV, F = v.shape[-1], fq.shape[-1]
    if state is None:
        state = HybridState.empty(B, H, DK, DV, F, q.device, sinks)
        S0 = z0 = None
    else:
        S0, z0 = state.S, state.z
    if T == 0:
        y = v.new_zeros(B, H, 0, DV, dtype=output_dtype or torch.promote_types(fq.dtype, v.dtype))
        return y, (state if output_state else None)
    mask = None if key_mask is None else key_mask.bool()
    P = state.k.shape[2]
    sink_pos = sink_from = None
    if sinks:
        real = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        is_sink, slot = _sink_slots(real, state.sink_mask.sum(1), sinks)
        onehot = (slot[:, :, None] == torch.arange(sinks, device=q.device)) & is_sink[:, :, None]  # [B, T, n]
        fresh = onehot.any(1)  # [B, n]
        sink_pos = torch.where(fresh, P + onehot.long().argmax(1), -1)  # key position of a fresh slot's token
        sink_from = torch.where(state.sink_mask, -1, torch.where(fresh, sink_pos, NO_MAX)).to(torch.int32).contiguous()
        mask = real & ~is_sink
    if P:  # keys still in the window from earlier calls go in front
        new_mask = mask if mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        mask = torch.cat([state.mask, new_mask], 1)
        k = torch.cat([state.k.to(k.dtype), k], 2)
        v = torch.cat([state.v.to(v.dtype), v], 2)
        fk = torch.cat([state.fk.to(fk.dtype), fk], 2)
    km = None if mask is None else mask.to(torch.int8).contiguous()
    y, S, z = ChunkHybridAttentionFunction.apply(
        q, k, v, fq, fk, gamma if (window or sinks) else None, S0, z0,
        state.sink_k if sinks else None, state.sink_v if sinks else None, km, sink_pos, sink_from, P, window,
        float(scale), output_state, chunk_size, output_dtype,
    )
    if not output_state:
        return y, None
    L = k.shape[2]
    n_fold = max(L - window, 0)
    keep = (mask[:, n_fold:] if mask is not None else torch.ones(B, L - n_fold, dtype=torch.bool, device=q.device))
    off = ~keep[:, None, :, None]
    new_state = HybridState(
        S=S, z=z, k=k[:, :, n_fold:].float(), v=v[:, :, n_fold:].float().masked_fill(off, 0.0),
        fk=fk[:, :, n_fold:].float().masked_fill(off, 0.0), mask=keep,
        sink_k=state.sink_k, sink_v=state.sink_v, sink_mask=state.sink_mask,
    )
    if sinks:  # the slots that filled here (the function built them too, without autograd)
        fresh = sink_pos >= 0
        idx = sink_pos.clamp_min(0)[:, None, :, None]
        pick = fresh[:, None, :, None]
        new_state.sink_k = torch.where(pick, k.gather(2, idx.expand(B, H, -1, DK)).float(), state.sink_k)
        new_state.sink_v = torch.where(pick, v.gather(2, idx.expand(B, H, -1, DV)).float(), state.sink_v)
        new_state.sink_mask = state.sink_mask | fresh
    return y, new_state


def _check_arguments(q, k, v, fq, fk, gamma, window, key_mask, sinks, state, chunk_size):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, T, Dk]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T, DK = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be [B, H, T, Dv] = [{B}, {H}, {T}, Dv]; got {tuple(v.shape)}")
    if fq.dim() != 4 or fq.shape[:3] != (B, H, T) or fk.shape != fq.shape:
        raise ValueError(
            f"fq and fk must both be [B, H, T, F] = [{B}, {H}, {T}, F]; got {tuple(fq.shape)}, {tuple(fk.shape)}"
        )
    if max(DK, v.shape[-1], fq.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"Dk, Dv and F must be at most {MAX_HEAD_DIM}; got {DK}, {v.shape[-1]}, {fq.shape[-1]}")
    for name, x in (("q", q), ("k", k), ("v", v), ("fq", fq), ("fk", fk)):
        if x.dtype not in _DOT_DTYPES:
            raise ValueError(f"{name} must be fp32, bf16 or fp16; got {x.dtype}")
    limit = max_window(compute_dtype(q, k, v, fq, fk), max(DK, v.shape[-1]))
    if not 0 <= window <= limit:
        raise ValueError(
            f"window must be in 0 ... {limit} for the Triton kernel with these input dtypes and head size (a "
            f"query's window lies in its own chunk and the previous one; fp32 inputs take windows up to "
            f"{max_window(torch.float32)}, and so do heads over 64; bf16 ones up to {MAX_WINDOW}); "
            f"got {window}. Use the reference (LINEARIZE_KERNELS=reference) for longer windows"
        )
    if not 0 <= sinks <= MAX_SINKS:
        raise ValueError(f"sinks must be in 0 ... {MAX_SINKS} for the Triton kernel; got {sinks}")
    if (window or sinks) and (gamma is None or gamma.shape != (H,)):
        raise ValueError(f"window > 0 or sinks > 0 needs gamma of shape [H] = [{H}]; got "
                         f"{None if gamma is None else tuple(gamma.shape)}")
    _check_sinks(sinks, gamma, state)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    if key_mask is not None and key_mask.shape != (B, T):
        raise ValueError(f"key_mask must be [B, T] = [{B}, {T}]; got {tuple(key_mask.shape)}")
    if state is not None:
        L = state.k.shape[2]
        if state.S.shape != (B, H, fq.shape[-1], v.shape[-1]) or state.k.shape != (B, H, L, DK):
            raise ValueError(
                f"the state does not fit these inputs: S {tuple(state.S.shape)} (want [{B}, {H}, {fq.shape[-1]}, "
                f"{v.shape[-1]}]), window keys {tuple(state.k.shape)} (want [{B}, {H}, L, {DK}])"
            )
        if L > window:
            raise ValueError(f"the state holds {L} window keys but window={window}; pass the state of the same window")
