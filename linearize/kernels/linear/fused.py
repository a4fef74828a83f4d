"""Chunked causal normalised linear attention with the feature map inside the kernels (Hedgehog
and NP-Map), forward and backward, in Triton.

Per head ``h`` and token, with ``x`` the query or key (``[D]``, after RoPE and the GQA
expansion) and the map's weight ``W_h: [D, Fh]``:

    hedgehog:  u = x W_h                                   (HedgehogFeatureMap)
    npmap:     u = z ||x|| / max(||z||, 1e-12),  z = x W'_h,  W'_h = (I - 2 w w^T) W_h,
               w = w_h / ||w_h||                           (NPMapFeatureMap)
    phi(x) = [softmax(u), softmax(-u)]                     F = 2 Fh features

and, with ``fq = phi_q(q)``, ``fk = phi_k(k)`` (a query map and a key map, possibly the same
tensors), the attention of :mod:`linearize.kernels.linear.chunk`:

    y_t = (fq_t S0 + sum_{s<=t} (fq_t . fk_s) v_s) / max(fq_t z0 + sum_{s<=t} fq_t . fk_s, 1e-30)

NP-Map's reflection is folded into its weight: ``(H x) W = x (H W)`` (``H`` is symmetric), so
the kernels see one ``[D, Fh]`` weight per head for either map; ``W' = H W`` is a tiny PyTorch
product (:func:`npmap_weight`), and autograd carries ``dW'`` back to ``w_h`` and ``W_h``. The
oracle is the PyTorch maps (:mod:`linearize.feature_maps`) followed by
:func:`linearize.kernels.hybrid.chunk_hybrid_attention` with ``window=0``.

How the work is split: as in ``chunk.py`` (one program walks the chunks of a (batch, head) with
the running state in fp32 registers), with ``fq``/``fk`` never in memory. Each program computes
the map of the chunk's queries and keys itself, in fp32 (``z = x W`` as a tensor-core product,
then per token a max, ``exp`` and sum over the ``Fh`` features of each softmax, in registers).
The features are kept as their two halves ``p = softmax(u)``, ``n = softmax(-u)``
(``[C, Fh]`` each), and the state as the matching halves of ``S`` and ``z``, so that no tile of
``F`` is ever assembled: ``fq fk^T = p_q p_k^T + n_q n_k^T``, ``fq S = p_q S_p + n_q S_n``.

* Forward, grid ``(Dv / BV, B * H)``: per chunk the map of ``q`` (rows: ``q W_q``) and of ``k``
  (columns: ``W_k^T k^T``, the layout of ``fk^T`` that ``fq fk^T`` and ``S += fk^T v`` need),
  then chunk.py's forward. Stores ``y``, the fp32 ``y`` for the backward, the denominators and
  the final state.
* Backward, one launch, grid ``(2 + Dv / BV, B * H)``; nothing of the forward's maps is stored,
  every program recomputes the features it needs from ``q``, ``k`` and the weights:

  - program 0 of a head: ``dfq_t = S_t dn_t + z_t dd_t + sum_s P_ts fk_s`` for all ``F``
    features (chunks in order, ``S`` rebuilt from the recomputed ``fk``), then, in registers,
    the map's backward on the chunk's queries (``fq`` recomputed):
    ``du = p (g_p - <g_p, p>) - n (g_n - <g_n, n>)``; Hedgehog ``dz = du``; NP-Map
    ``dz = (r/s) (du - z (z.du) / s^2)`` and ``dr = z.du / s`` (``r = ||x||``,
    ``s = max(||z||, eps)``); ``dq = dz W^T + (dr / r) q``, ``dW_q += q^T dz``;
  - program 1: ``dfk_s = dS_s v_s + dz_s + sum_t Q_st fq_t`` (chunks in reverse), then the
    same map backward on the keys (``dk``, ``dW_k``), and the initial ``z``'s gradient;
  - programs 2...: ``dv`` and the initial ``S``'s gradient for a block of value columns
    (chunks in reverse), with both maps recomputed.

  ``dn_t = dy_t / d_t``, ``dd_t = -(dy_t . y_t) / d_t`` as in chunk.py. The map's softmax
  backward needs whole rows of ``dfq`` (the ``<g, p>`` terms), hence one ``dfq`` and one
  ``dfk`` program per head rather than chunk.py's blocks of features.

The weights' gradients are sums over every token of a head (and over the batch). The program
that walks a (batch, head) keeps its share ``sum_t x_t^T dz_t`` (``[D, Fh]`` fp32) in registers
and writes it once to its own slot of a ``[B, H, D, Fh]`` buffer; PyTorch sums the slots over
the batch afterwards. No two programs write the same slot, so there is no race and no atomic,
and the sum is deterministic (atomics would make it depend on the order the programs finish,
and each program has only one write to make anyway).

Precision: as chunk.py (state and accumulation in fp32; fp32 inputs: every product in fp32;
bf16 inputs: bf16 tensor cores with fp32 operands split into ``hi + lo`` halves where a product
cancels). The map: ``x W`` with ``x`` exact in bf16 and ``W`` as two bf16 halves ``hi + lo``
(about 2^-16 relative, as ``../feature_map/hedgehog.py``; split once in PyTorch,
:func:`weight_halves`, so no program holds an fp32 copy), the softmaxes in fp32; for the
attention the features are rounded to bf16 (what the unfused Triton path computes from fp32
features and bf16 values), the same rounded values in every product of a program, so numerator
and denominator agree; in the backward ``dfq``/``dfk`` stay fp32 in registers into the map's
backward, whose products take ``dz`` split, and ``dv``'s product with the long fp32 sum ``dS``
takes it split too.

Registers (compiled for sm_90a with Triton 3.9 and its ptxas, ``benchmarks/fused_registers.py``;
the GPU machines run Triton 3.6, whose figures may differ). At D = Fh = Dv = 64 with bf16
products, in chunks of 16: the forward 241 registers (BV = 16) / 245 (BV = 64), no spill; the
backward's ``dq``, ``dk``, ``dv`` programs alone 249, 253, 222, no spill; the three in one
launch 255 and 20 bytes a thread of spill stores (static). NP-Map the same within 8 bytes.
Chunks of 32 spill 8-136 bytes in the forward and 70-130 in ``dq``/``dk``, chunks of 64
200-650. Not yet fitted: D = Dv = 128 (forward 72 bytes, ``dq`` 390, ``dk`` 170: two
``[Dv, Fh]`` states, the ``[D, Fh]`` gradient share and three ``[D, Fh]`` weight tiles are
carried through the walk), and fp32 products (FMA units, not tensor cores: the forward 28
bytes, ``dq`` 780, ``dk`` 350). Measured on an H200 (results/h200-kernels/): 20.0 ms forward at B=1, 32 heads, T=64K, head
size 64, against 2.3 ms for the Triton Hedgehog map then the linear kernel, hence its own switch
(``LINEARIZE_KERNELS=triton-fused``).

Padding keys (``key_mask`` False): the kernels zero their features (``tl.where``, so a NaN key
cannot leak), their keys' map gradient and their keys where ``dW_k`` and ``dk`` read them;
``v`` is zeroed before the kernels. No ``tl.trans`` anywhere (the Hopper miscompile noted in
chunk.py): ``k^T``, ``q^T``, ``v^T``, ``dy^T``, ``y^T``, ``W^T`` and the states are loaded in
the layout each product needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import (
    _DOT_DTYPES,
    MAX_VALUE_DIM,
    TINY,
    _check_chunk,
    _dot,
    _dot_config,
    _dot_split,
    _inverse_den,
    _pow2,
    _sms,
)

MAP_KINDS = ("hedgehog", "npmap")
NPMAP_EPS = 1e-12  # NPMapFeatureMap.eps: ||z|| and ||w_h|| are clamped here
MAX_HEAD_DIM = 256
MAX_MAP_FEATURES = 128  # Fh: the map gives 2 Fh <= 256 features
_TINY = tl.constexpr(TINY)
_EPS = tl.constexpr(NPMAP_EPS)


# ----------------------------------------------------------------------------- the map


@triton.jit
def _softmax_rows(u, valid):
    """``softmax(u)`` and ``softmax(-u)`` along axis 1 over the features where ``valid``."""
    up = tl.where(valid, u, float("-inf"))
    un = tl.where(valid, -u, float("-inf"))
    ep = tl.exp(up - tl.max(up, 1)[:, None])
    en = tl.exp(un - tl.max(un, 1)[:, None])
    return ep / tl.sum(ep, 1)[:, None], en / tl.sum(en, 1)[:, None]


@triton.jit
def _softmax_cols(u, valid):
    """``softmax(u)`` and ``softmax(-u)`` along axis 0 over the features where ``valid``."""
    up = tl.where(valid, u, float("-inf"))
    un = tl.where(valid, -u, float("-inf"))
    ep = tl.exp(up - tl.max(up, 0)[None, :])
    en = tl.exp(un - tl.max(un, 0)[None, :])
    return ep / tl.sum(ep, 0)[None, :], en / tl.sum(en, 0)[None, :]


@triton.jit
def _load_weight(w, offsets, mask, H, D, FH, DT: tl.constexpr):
    """A tile of a map's weight as ``(hi, lo)``: for fp32 products the fp32 weight (``lo`` is
    not used), for bf16 products its two bf16 halves, stored one after the other
    (``[2, H, D, FH]``, see :func:`weight_halves`)."""
    hi = tl.load(w + offsets, mask=mask, other=0.0)
    if DT == tl.float32:
        lo = hi
    else:
        lo = tl.load(w + H * D * FH + offsets, mask=mask, other=0.0)
    return hi, lo


@triton.jit
def _dot_xw(a, w_hi, w_lo, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr, SPLIT_A: tl.constexpr):
    """``a @ W`` with ``W`` given as its halves (:func:`_load_weight`): ``a_hi W_hi + a_hi W_lo``
    (``+ a_lo W_hi`` when ``SPLIT_A``: ``a`` is fp32, not exact in ``DT``)."""
    if DT == tl.float32:
        out = _dot(a, w_hi, DT, PREC, EMULATE)
    else:
        a = a.to(tl.float32)
        a_hi = a.to(DT)
        out = _dot(a_hi, w_hi, DT, PREC, EMULATE) + _dot(a_hi, w_lo, DT, PREC, EMULATE)
        if SPLIT_A:
            out += _dot(a - a_hi.to(tl.float32), w_hi, DT, PREC, EMULATE)
    return out


@triton.jit
def _dot_wx(wT_hi, wT_lo, b, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """``W^T @ b`` with ``W^T`` given as its halves and ``b`` exact in ``DT``."""
    if DT == tl.float32:
        out = _dot(wT_hi, b, DT, PREC, EMULATE)
    else:
        out = _dot(wT_hi, b, DT, PREC, EMULATE) + _dot(wT_lo, b, DT, PREC, EMULATE)
    return out


@triton.jit
def _map_rows(x, w_hi, w_lo, m_f, NORM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """The map of tokens as rows: ``x [C, BD]`` (exact in ``DT``), the weight ``[BD, BF]`` as its
    halves. Returns ``(p, n, z, r, s)``: the two softmaxes ``[C, BF]`` (zero on padded
    features), ``z = x W``, and for NP-Map ``r = ||x||``, ``s = max(||z||, eps)`` (``[C]``;
    unused for Hedgehog)."""
    z = _dot_xw(x, w_hi, w_lo, DT, PREC, EMULATE, False)  # [C, BF]
    if NORM:
        xf = x.to(tl.float32)
        r = tl.sqrt(tl.sum(xf * xf, 1))
        s = tl.maximum(tl.sqrt(tl.sum(z * z, 1)), _EPS)
        u = z * (r / s)[:, None]
    else:
        r = tl.sum(z, 1)  # unused (removed by the compiler)
        s = r
        u = z
    p, n = _softmax_rows(u, m_f[None, :])
    return p, n, z, r, s


@triton.jit
def _map_cols(xT, wT_hi, wT_lo, m_f, NORM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
              EMULATE: tl.constexpr):
    """The map of tokens as columns: ``xT [BD, C]``, ``W^T [BF, BD]`` as its halves ->
    ``(p^T, n^T) [BF, C]``."""
    z = _dot_wx(wT_hi, wT_lo, xT, DT, PREC, EMULATE)  # [BF, C]
    if NORM:
        xf = xT.to(tl.float32)
        r = tl.sqrt(tl.sum(xf * xf, 0))
        s = tl.maximum(tl.sqrt(tl.sum(z * z, 0)), _EPS)
        z = z * (r / s)[None, :]
    return _softmax_cols(z, m_f[:, None])


@triton.jit
def _map_rows_bwd(p, n, g_p, g_n, z, r, s, NORM: tl.constexpr):
    """The map's backward for tokens as rows, from the gradients ``g_p, g_n [C, BF]`` of its two
    halves: ``(dz [C, BF], c [C])`` with ``dx = dz W^T + c x`` and ``dW = x^T dz``."""
    du = p * (g_p - tl.sum(g_p * p, 1)[:, None]) - n * (g_n - tl.sum(g_n * n, 1)[:, None])
    if NORM:
        dr = tl.sum(z * du, 1) / s  # d/dr of u = z r / s
        # through the normalisation; no gradient through s where ||z|| was clamped at eps
        dz = (r / s)[:, None] * (du - tl.where(s > _EPS, dr / s, 0.0)[:, None] * z)
        c = tl.where(r > 0, dr / tl.where(r > 0, r, 1.0), 0.0)  # d||x||/dx = x / ||x|| (0 at x = 0)
    else:
        dz = du
        c = tl.sum(du, 1) * 0.0
    return dz, c


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    q, k, v, wq, wk, km, y, y32, den, s0, z0, s_out, z_out,
    T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    STORE_Y32: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(cdiv(DV, BV), B * H)``. ``wq, wk: [H, D, FH]``; the state ``[B, H, 2 FH, DV]``
    holds the ``p`` features in rows ``[0, FH)`` and the ``n`` features in ``[FH, 2 FH)``."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_c = tl.arange(0, C)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_f = o_f < FH
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    F = 2 * FH
    q += i_bh * T * D
    k += i_bh * T * D
    v += i_bh * T * DV
    y += i_bh * T * DV
    wq_hi, wq_lo = _load_weight(wq, i_h * D * FH + o_d[:, None] * FH + o_f[None, :], m_d[:, None] & m_f[None, :],
                                H, D, FH, DT)
    wkT_hi, wkT_lo = _load_weight(wk, i_h * D * FH + o_d[None, :] * FH + o_f[:, None], m_f[:, None] & m_d[None, :],
                                  H, D, FH, DT)
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]  # [BF, BV], the p rows; + FH * DV: the n rows
    # z is kept as column 0 of [BF, 16] matrices (see chunk.py's forward)
    first = tl.arange(0, 16)[None, :] == 0
    if HAS_INIT:
        S_p = tl.load(s0 + p_s, mask=m_fv, other=0.0)
        S_n = tl.load(s0 + p_s + FH * DV, mask=m_fv, other=0.0)
        Z_p = tl.where(first, tl.load(z0 + i_bh * F + o_f, mask=m_f, other=0.0)[:, None], 0.0)
        Z_n = tl.where(first, tl.load(z0 + i_bh * F + FH + o_f, mask=m_f, other=0.0)[:, None], 0.0)
    else:
        S_p = tl.zeros([BF, BV], dtype=tl.float32)
        S_n = tl.zeros([BF, BV], dtype=tl.float32)
        Z_p = tl.zeros([BF, 16], dtype=tl.float32)
        Z_n = tl.zeros([BF, 16], dtype=tl.float32)
    ones = tl.where(first, 1.0, 0.0) + tl.zeros([C, 16], dtype=tl.float32)
    causal = o_c[:, None] >= o_c[None, :]
    for i_t in range(0, tl.cdiv(T, C)):
        t = i_t * C + o_c
        m_t = t < T
        b_q = tl.load(q + t[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)  # [C, BD]
        b_kT = tl.load(k + t[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)  # [BD, C]
        ok = m_t
        if HAS_MASK:
            ok = ok & (tl.load(km + i_b * T + t, mask=m_t, other=0) != 0)
            b_kT = tl.where(ok[None, :], b_kT, 0.0)
        qp, qn, _, _, _ = _map_rows(b_q, wq_hi, wq_lo, m_f, NORM, DT, PREC, EMULATE)
        kpT, knT = _map_cols(b_kT, wkT_hi, wkT_lo, m_f, NORM, DT, PREC, EMULATE)
        # the features as the products take them (bf16 for bf16 inputs), padding keys zero
        qp = tl.where(m_t[:, None], qp, 0.0).to(DT)
        qn = tl.where(m_t[:, None], qn, 0.0).to(DT)
        kpT = tl.where(ok[None, :], kpT, 0.0).to(DT)
        knT = tl.where(ok[None, :], knT, 0.0).to(DT)
        b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [C, BV]
        A = _dot(qp, kpT, DT, PREC, EMULATE) + _dot(qn, knT, DT, PREC, EMULATE)
        A = tl.where(causal, A, 0.0)  # [C, C]
        qz = _dot_split(qp, Z_p, DT, PREC, EMULATE, False, True) + _dot_split(qn, Z_n, DT, PREC, EMULATE, False, True)
        d = tl.sum(A, 1) + tl.sum(qz, 1)  # [C]
        o = _dot_split(qp, S_p, DT, PREC, EMULATE, False, True) + _dot_split(qn, S_n, DT, PREC, EMULATE, False, True)
        o += _dot_split(A, b_v, DT, PREC, EMULATE, True, False)
        o = o / tl.maximum(d, _TINY)[:, None]
        tl.store(y + t[:, None] * DV + o_v[None, :], o.to(y.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        if STORE_Y32:
            tl.store(y32 + i_bh * T * DV + t[:, None] * DV + o_v[None, :], o, mask=m_t[:, None] & m_v[None, :])
        if i_v == 0:
            tl.store(den + i_bh * T + t, d, mask=m_t)
        S_p += _dot(kpT, b_v, DT, PREC, EMULATE)
        S_n += _dot(knT, b_v, DT, PREC, EMULATE)
        Z_p += _dot(kpT, ones, DT, PREC, EMULATE)
        Z_n += _dot(knT, ones, DT, PREC, EMULATE)
    if STORE_FINAL:
        tl.store(s_out + p_s, S_p, mask=m_fv)
        tl.store(s_out + p_s + FH * DV, S_n, mask=m_fv)
        if i_v == 0:
            tl.store(z_out + i_bh * F + o_f, tl.sum(Z_p, 1), mask=m_f)
            tl.store(z_out + i_bh * F + FH + o_f, tl.sum(Z_n, 1), mask=m_f)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dq(
    i_bh, q, k, v, wq, wk, km, y, den, dy, s0, z0, dq, dwq, T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfq`` (all features), chunks in order, then the query map's backward: ``dq`` and this
    (batch, head)'s share of ``dW_q``."""
    i_b = i_bh // H
    i_h = i_bh % H
    o_c = tl.arange(0, C)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_e = tl.arange(0, BDV)
    m_d = o_d < D
    m_f = o_f < FH
    m_e = o_e < DV
    m_df = m_d[:, None] & m_f[None, :]
    F = 2 * FH
    p_w = i_h * D * FH + o_d[:, None] * FH + o_f[None, :]  # [BD, BF]
    wq_hi, wq_lo = _load_weight(wq, p_w, m_df, H, D, FH, DT)
    wk_hi, wk_lo = _load_weight(wk, p_w, m_df, H, D, FH, DT)
    wqT_hi, wqT_lo = _load_weight(wq, i_h * D * FH + o_d[None, :] * FH + o_f[:, None], m_f[:, None] & m_d[None, :],
                                  H, D, FH, DT)
    # S^T, [BDV, BF] per half, loaded transposed from S0 [F, DV]
    if HAS_INIT:
        p_st = i_bh * F * DV + o_f[None, :] * DV + o_e[:, None]
        m_st = m_e[:, None] & m_f[None, :]
        ST_p = tl.load(s0 + p_st, mask=m_st, other=0.0)
        ST_n = tl.load(s0 + p_st + FH * DV, mask=m_st, other=0.0)
        z_p = tl.load(z0 + i_bh * F + o_f, mask=m_f, other=0.0)
        z_n = tl.load(z0 + i_bh * F + FH + o_f, mask=m_f, other=0.0)
    else:
        ST_p = tl.zeros([BDV, BF], dtype=tl.float32)
        ST_n = tl.zeros([BDV, BF], dtype=tl.float32)
        z_p = tl.zeros([BF], dtype=tl.float32)
        z_n = tl.zeros([BF], dtype=tl.float32)
    dW = tl.zeros([BD, BF], dtype=tl.float32)
    causal = o_c[:, None] >= o_c[None, :]
    for i_t in range(0, tl.cdiv(T, C)):
        t = i_t * C + o_c
        m_t = t < T
        m_te = m_t[:, None] & m_e[None, :]
        m_td = m_t[:, None] & m_d[None, :]
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dy = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_e[None, :], mask=m_te, other=0.0).to(tl.float32)
        b_y = tl.load(y + i_bh * T * DV + t[:, None] * DV + o_e[None, :], mask=m_te, other=0.0).to(tl.float32)
        b_dn = b_dy * inv[:, None]  # [C, BDV]
        b_dd = -tl.sum(b_dy * b_y, 1) * inv  # [C]
        b_vT = tl.load(v + i_bh * T * DV + t[None, :] * DV + o_e[:, None], mask=m_e[:, None] & m_t[None, :], other=0.0)
        # the key features of the chunk, rows
        b_k = tl.load(k + i_bh * T * D + t[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        ok = m_t
        if HAS_MASK:
            ok = ok & (tl.load(km + i_b * T + t, mask=m_t, other=0) != 0)
            b_k = tl.where(ok[:, None], b_k, 0.0)
        kp, kn, _, _, _ = _map_rows(b_k, wk_hi, wk_lo, m_f, NORM, DT, PREC, EMULATE)
        kp = tl.where(ok[:, None], kp, 0.0).to(DT)
        kn = tl.where(ok[:, None], kn, 0.0).to(DT)
        P = tl.where(causal, _dot_split(b_dn, b_vT, DT, PREC, EMULATE, True, False) + b_dd[:, None], 0.0)  # [C, C]
        # dfq, both halves; fp32 operands in the state terms (they cancel in part against dd z)
        g_p = _dot_split(b_dn, ST_p, DT, PREC, EMULATE, True, True) + b_dd[:, None] * z_p[None, :]
        g_p += _dot(P, kp, DT, PREC, EMULATE)
        g_n = _dot_split(b_dn, ST_n, DT, PREC, EMULATE, True, True) + b_dd[:, None] * z_n[None, :]
        g_n += _dot(P, kn, DT, PREC, EMULATE)
        # the query map's backward, on the recomputed query features (fp32)
        b_q = tl.load(q + i_bh * T * D + t[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        qp, qn, zq, rq, sq = _map_rows(b_q, wq_hi, wq_lo, m_f, NORM, DT, PREC, EMULATE)
        dz, c = _map_rows_bwd(qp, qn, g_p, g_n, zq, rq, sq, NORM)
        dz = tl.where(m_t[:, None], dz, 0.0)
        b_dq = _dot_xw(dz, wqT_hi, wqT_lo, DT, PREC, EMULATE, True)
        if NORM:
            b_dq += c[:, None] * b_q.to(tl.float32)
        tl.store(dq + i_bh * T * D + t[:, None] * D + o_d[None, :], b_dq.to(dq.dtype.element_ty), mask=m_td)
        b_qT = tl.load(q + i_bh * T * D + t[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        dW += _dot_split(b_qT, dz, DT, PREC, EMULATE, False, True)
        ST_p += _dot(b_vT, kp, DT, PREC, EMULATE)
        ST_n += _dot(b_vT, kn, DT, PREC, EMULATE)
        z_p += tl.sum(kp.to(tl.float32), 0)
        z_n += tl.sum(kn.to(tl.float32), 0)
    tl.store(dwq + i_bh * D * FH + o_d[:, None] * FH + o_f[None, :], dW, mask=m_df)


@triton.jit
def _bwd_dk(
    i_bh, q, k, v, wq, wk, km, y, den, dy, ds_final, dz_final, dk, dwk, dz0, T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfk`` (all features), chunks in reverse, then the key map's backward: ``dk``, this
    (batch, head)'s share of ``dW_k``, and the initial ``z``'s gradient."""
    i_b = i_bh // H
    i_h = i_bh % H
    o_c = tl.arange(0, C)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_e = tl.arange(0, BDV)
    m_d = o_d < D
    m_f = o_f < FH
    m_e = o_e < DV
    m_df = m_d[:, None] & m_f[None, :]
    F = 2 * FH
    p_w = i_h * D * FH + o_d[:, None] * FH + o_f[None, :]
    wq_hi, wq_lo = _load_weight(wq, p_w, m_df, H, D, FH, DT)
    wk_hi, wk_lo = _load_weight(wk, p_w, m_df, H, D, FH, DT)
    wkT_hi, wkT_lo = _load_weight(wk, i_h * D * FH + o_d[None, :] * FH + o_f[:, None], m_f[:, None] & m_d[None, :],
                                  H, D, FH, DT)
    # dS^T, [BDV, BF] per half
    if HAS_DFINAL:
        p_st = i_bh * F * DV + o_f[None, :] * DV + o_e[:, None]
        m_st = m_e[:, None] & m_f[None, :]
        dST_p = tl.load(ds_final + p_st, mask=m_st, other=0.0)
        dST_n = tl.load(ds_final + p_st + FH * DV, mask=m_st, other=0.0)
        dz_p = tl.load(dz_final + i_bh * F + o_f, mask=m_f, other=0.0)
        dz_n = tl.load(dz_final + i_bh * F + FH + o_f, mask=m_f, other=0.0)
    else:
        dST_p = tl.zeros([BDV, BF], dtype=tl.float32)
        dST_n = tl.zeros([BDV, BF], dtype=tl.float32)
        dz_p = tl.zeros([BF], dtype=tl.float32)
        dz_n = tl.zeros([BF], dtype=tl.float32)
    dW = tl.zeros([BD, BF], dtype=tl.float32)
    later = o_c[:, None] <= o_c[None, :]  # [key j, query i]: i >= j
    n_t = tl.cdiv(T, C)
    for i_r in range(0, n_t):
        t = (n_t - 1 - i_r) * C + o_c
        m_t = t < T
        m_et = m_e[:, None] & m_t[None, :]
        m_td = m_t[:, None] & m_d[None, :]
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dyT = tl.load(dy + i_bh * T * DV + t[None, :] * DV + o_e[:, None], mask=m_et, other=0.0).to(tl.float32)
        b_yT = tl.load(y + i_bh * T * DV + t[None, :] * DV + o_e[:, None], mask=m_et, other=0.0).to(tl.float32)
        b_dnT = b_dyT * inv[None, :]  # [BDV, C]
        b_dd = -tl.sum(b_dyT * b_yT, 0) * inv  # [C]
        b_v = tl.load(v + i_bh * T * DV + t[:, None] * DV + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0)
        # the query features of the chunk, rows
        b_q = tl.load(q + i_bh * T * D + t[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        qp, qn, _, _, _ = _map_rows(b_q, wq_hi, wq_lo, m_f, NORM, DT, PREC, EMULATE)
        qp = tl.where(m_t[:, None], qp, 0.0).to(DT)
        qn = tl.where(m_t[:, None], qn, 0.0).to(DT)
        Q = tl.where(later, _dot_split(b_v, b_dnT, DT, PREC, EMULATE, False, True) + b_dd[None, :], 0.0)  # [C, C]
        g_p = _dot_split(b_v, dST_p, DT, PREC, EMULATE, False, True) + dz_p[None, :]
        g_p += _dot(Q, qp, DT, PREC, EMULATE)
        g_n = _dot_split(b_v, dST_n, DT, PREC, EMULATE, False, True) + dz_n[None, :]
        g_n += _dot(Q, qn, DT, PREC, EMULATE)
        # the key map's backward (padding keys: no gradient, and their keys read as zero)
        b_k = tl.load(k + i_bh * T * D + t[:, None] * D + o_d[None, :], mask=m_td, other=0.0)
        b_kT = tl.load(k + i_bh * T * D + t[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        ok = m_t
        if HAS_MASK:
            ok = ok & (tl.load(km + i_b * T + t, mask=m_t, other=0) != 0)
            b_k = tl.where(ok[:, None], b_k, 0.0)
            b_kT = tl.where(ok[None, :], b_kT, 0.0)
        kp, kn, zk, rk, sk = _map_rows(b_k, wk_hi, wk_lo, m_f, NORM, DT, PREC, EMULATE)
        dz, c = _map_rows_bwd(kp, kn, g_p, g_n, zk, rk, sk, NORM)
        dz = tl.where(ok[:, None], dz, 0.0)
        b_dk = _dot_xw(dz, wkT_hi, wkT_lo, DT, PREC, EMULATE, True)
        if NORM:
            b_dk += tl.where(ok, c, 0.0)[:, None] * b_k.to(tl.float32)
        tl.store(dk + i_bh * T * D + t[:, None] * D + o_d[None, :], b_dk.to(dk.dtype.element_ty), mask=m_td)
        dW += _dot_split(b_kT, dz, DT, PREC, EMULATE, False, True)
        dST_p += _dot_split(b_dnT, qp, DT, PREC, EMULATE, True, False)
        dST_n += _dot_split(b_dnT, qn, DT, PREC, EMULATE, True, False)
        dz_p += tl.sum(qp.to(tl.float32) * b_dd[:, None], 0)
        dz_n += tl.sum(qn.to(tl.float32) * b_dd[:, None], 0)
    tl.store(dwk + i_bh * D * FH + o_d[:, None] * FH + o_f[None, :], dW, mask=m_df)
    if STORE_DINIT:
        tl.store(dz0 + i_bh * F + o_f, dz_p, mask=m_f)
        tl.store(dz0 + i_bh * F + FH + o_f, dz_n, mask=m_f)


@triton.jit
def _bwd_dv(
    i_v, i_bh, q, k, wq, wk, km, den, dy, ds_final, dv, ds0, T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dv`` for values ``[i_v * BV, (i_v + 1) * BV)`` and that block of the initial ``S``'s
    gradient, chunks in reverse."""
    i_b = i_bh // H
    i_h = i_bh % H
    o_c = tl.arange(0, C)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_f = o_f < FH
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    F = 2 * FH
    wk_hi, wk_lo = _load_weight(wk, i_h * D * FH + o_d[:, None] * FH + o_f[None, :], m_d[:, None] & m_f[None, :],
                                H, D, FH, DT)
    wqT_hi, wqT_lo = _load_weight(wq, i_h * D * FH + o_d[None, :] * FH + o_f[:, None], m_f[:, None] & m_d[None, :],
                                  H, D, FH, DT)
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]  # [BF, BV]
    if HAS_DFINAL:
        dS_p = tl.load(ds_final + p_s, mask=m_fv, other=0.0)
        dS_n = tl.load(ds_final + p_s + FH * DV, mask=m_fv, other=0.0)
    else:
        dS_p = tl.zeros([BF, BV], dtype=tl.float32)
        dS_n = tl.zeros([BF, BV], dtype=tl.float32)
    later = o_c[:, None] <= o_c[None, :]  # [key j, query i]: i >= j
    n_t = tl.cdiv(T, C)
    for i_r in range(0, n_t):
        t = (n_t - 1 - i_r) * C + o_c
        m_t = t < T
        m_tv = m_t[:, None] & m_v[None, :]
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dn = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_dn = b_dn * inv[:, None]  # [C, BV]
        b_k = tl.load(k + i_bh * T * D + t[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        ok = m_t
        if HAS_MASK:
            ok = ok & (tl.load(km + i_b * T + t, mask=m_t, other=0) != 0)
            b_k = tl.where(ok[:, None], b_k, 0.0)
        kp, kn, _, _, _ = _map_rows(b_k, wk_hi, wk_lo, m_f, NORM, DT, PREC, EMULATE)
        kp = tl.where(ok[:, None], kp, 0.0).to(DT)
        kn = tl.where(ok[:, None], kn, 0.0).to(DT)
        b_qT = tl.load(q + i_bh * T * D + t[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        qpT, qnT = _map_cols(b_qT, wqT_hi, wqT_lo, m_f, NORM, DT, PREC, EMULATE)
        qpT = tl.where(m_t[None, :], qpT, 0.0).to(DT)
        qnT = tl.where(m_t[None, :], qnT, 0.0).to(DT)
        R = tl.where(later, _dot(kp, qpT, DT, PREC, EMULATE) + _dot(kn, qnT, DT, PREC, EMULATE), 0.0)  # [C, C]
        # dS split: it is a long fp32 sum, and rounded to bf16 it doubled dv's error
        b_dv = _dot_split(kp, dS_p, DT, PREC, EMULATE, False, True) + _dot_split(kn, dS_n, DT, PREC, EMULATE, False, True)
        b_dv += _dot(R, b_dn, DT, PREC, EMULATE)
        tl.store(dv + i_bh * T * DV + t[:, None] * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        dS_p += _dot(qpT, b_dn, DT, PREC, EMULATE)
        dS_n += _dot(qnT, b_dn, DT, PREC, EMULATE)
    if STORE_DINIT:
        tl.store(ds0 + p_s, dS_p, mask=m_fv)
        tl.store(ds0 + p_s + FH * DV, dS_n, mask=m_fv)


@triton.jit
def _bwd_kernel(
    q, k, v, wq, wk, km, y, den, dy, s0, z0, ds_final, dz_final, dq, dk, dv, dwq, dwk, ds0, dz0,
    T, H, D, FH, DV,
    C: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr,
    NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_DINIT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(2 + NV, B * H)``: program 0 of a head computes ``dq`` and its ``dW_q`` share,
    program 1 ``dk``, its ``dW_k`` share and ``dz0``, the last ``NV`` ``dv`` and ``dS0``."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    if i_p == 0:
        _bwd_dq(
            i_bh, q, k, v, wq, wk, km, y, den, dy, s0, z0, dq, dwq, T, H, D, FH, DV,
            C, BD, BF, BDV, NORM, HAS_MASK, HAS_INIT, DT, PREC, EMULATE,
        )
    elif i_p == 1:
        _bwd_dk(
            i_bh, q, k, v, wq, wk, km, y, den, dy, ds_final, dz_final, dk, dwk, dz0, T, H, D, FH, DV,
            C, BD, BF, BDV, NORM, HAS_MASK, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE,
        )
    else:
        _bwd_dv(
            i_p - 2, i_bh, q, k, wq, wk, km, den, dy, ds_final, dv, ds0, T, H, D, FH, DV,
            C, BD, BF, BV, NORM, HAS_MASK, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE,
        )


# ----------------------------------------------------------------------------- launchers


def fused_compute_dtype(q, k, v) -> torch.dtype:
    """bf16 products when ``q``, ``k`` and ``v`` are all bf16 (the map's ``x W`` and the state
    products rely on them being exact in bf16), else fp32."""
    return torch.bfloat16 if all(t.dtype == torch.bfloat16 for t in (q, k, v)) else torch.float32


def _fwd_config(D, FH, DV, chunk_size, heads, dtype):
    """``(C, BD, BF, BV, num_warps, num_stages)`` of the forward. ``BV`` (value columns a
    program) starts at 64 and halves while ``B * H * Dv / BV`` programs would leave
    multiprocessors idle (every program computes the maps of its chunk, so more programs cost
    more map work but run at once). Chunks of 16 tokens: compiled for sm_90a (Triton 3.9) at
    D = Fh = Dv = 64 with bf16 products, the forward holds in registers (235-246 of 255, no
    spill) with 8 warps at BV = 64 and 16 and 4 warps at BV = 32, while chunks of 32 spill
    8-136 bytes a thread and chunks of 64 200-650 (``benchmarks/fused_registers.py``)."""
    BD, BF = _pow2(D), _pow2(FH)
    if dtype == torch.float32:  # fp32 products run on FMA units: the exact path, not the fast one
        return min(chunk_size, 16), BD, BF, 16, 8, 2
    BV = min(_pow2(DV), 64)
    sms = _sms()
    while sms and BV > 16 and heads * triton.cdiv(DV, BV) < sms:
        BV //= 2
    return min(chunk_size, 16), BD, BF, BV, (4 if BV == 32 else 8), 2


def _bwd_config(D, FH, DV, chunk_size, heads, dtype):
    """``(C, BD, BF, BV, BDV, num_warps, num_stages)`` of the backward: the ``dq``/``dk``
    programs take every value column (``BDV``), the ``dv`` programs ``BV`` of them. The
    ``dq``/``dk`` programs carry two ``[Dv, Fh]`` states, the ``[D, Fh]`` weight-gradient share
    and three weight tiles through the walk: with 8 warps and chunks of 16 they hold in registers
    on sm_90a (248-253 of 255 at D = Fh = Dv = 64, bf16), with chunks of 32 they spill 70-130
    bytes a thread."""
    BD, BF, BDV = _pow2(D), _pow2(FH), _pow2(DV)
    if dtype == torch.float32:
        return min(chunk_size, 16), BD, BF, 16, BDV, 8, 2
    return min(chunk_size, 16), BD, BF, min(BDV, 64), BDV, 8, 2


def weight_halves(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A map's fp32 weight ``[H, D, Fh]`` as the kernels read it: for bf16 products its bf16
    halves ``hi = bf16(w)``, ``lo = bf16(w - hi)`` stacked (``[2, H, D, Fh]``; ``hi + lo`` is
    ``w`` to about 2^-16), split once here rather than in every program; for fp32 products
    ``w`` itself (``[1, H, D, Fh]``)."""
    w = w.float()
    if dtype == torch.float32:
        return w[None].contiguous()
    hi = w.to(dtype)
    return torch.stack([hi, (w - hi.float()).to(dtype)]).contiguous()


def fused_attention_fwd(q, k, v, wq, wk, norm, key_mask=None, S0=None, z0=None, output_final_state=False,
                        chunk_size=64, output_dtype=torch.float32, keep_fp32_output=False):
    """Launch the forward on contiguous ``q, k: [B, H, T, D]``, ``v: [B, H, T, Dv]``, the maps'
    weights as :func:`weight_halves` gives them (``wq, wk: [., H, D, Fh]``), ``key_mask: [B, T]``
    int8 or None. Returns ``(y, y32, d, S, z)`` as
    :func:`linearize.kernels.linear.chunk.linear_attention_fwd`."""
    B, H, T, D = q.shape
    FH = wq.shape[-1]
    F, DV = 2 * FH, v.shape[-1]
    dtype = fused_compute_dtype(q, k, v)
    DT, PREC, EMULATE = _dot_config(dtype)
    y = torch.empty(B, H, T, DV, device=v.device, dtype=output_dtype)
    d = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
    S = torch.empty(B, H, F, DV, device=v.device, dtype=torch.float32) if output_final_state else None
    z = torch.empty(B, H, F, device=v.device, dtype=torch.float32) if output_final_state else None
    store_y32 = keep_fp32_output and y.dtype != torch.float32
    y32 = torch.empty(B, H, T, DV, device=v.device, dtype=torch.float32) if store_y32 else None
    C, BD, BF, BV, num_warps, num_stages = _fwd_config(D, FH, DV, chunk_size, B * H, dtype)
    _fwd_kernel[(triton.cdiv(DV, BV), B * H)](
        q, k, v, wq, wk, key_mask, y, y32, d, S0, z0, S, z, T, H, D, FH, DV,
        C=C, BD=BD, BF=BF, BV=BV, NORM=norm, HAS_MASK=key_mask is not None, HAS_INIT=S0 is not None,
        STORE_FINAL=output_final_state, STORE_Y32=store_y32, DT=DT, PREC=PREC, EMULATE=EMULATE,
        num_warps=num_warps, num_stages=num_stages,
    )
    if keep_fp32_output and not store_y32:
        y32 = y
    return y, y32, d, S, z


def fused_attention_bwd(q, k, v, wq, wk, norm, key_mask, y, d, dy, S0=None, z0=None, dS=None, dz=None,
                        chunk_size=64, want_dinit=True):
    """Launch the backward (weights as in :func:`fused_attention_fwd`). Returns
    ``(dq, dk, dv, dWq [H, D, Fh], dWk, dS0, dz0)`` (the last two None without an initial state
    or when ``want_dinit`` is False)."""
    B, H, T, D = q.shape
    FH = wq.shape[-1]
    F, DV = 2 * FH, v.shape[-1]
    dtype = fused_compute_dtype(q, k, v)
    DT, PREC, EMULATE = _dot_config(dtype)
    has_init = S0 is not None
    has_dfinal = dS is not None or dz is not None
    if has_dfinal:
        dS = torch.zeros(B, H, F, DV, device=v.device, dtype=torch.float32) if dS is None else dS.float().contiguous()
        dz = torch.zeros(B, H, F, device=v.device, dtype=torch.float32) if dz is None else dz.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # one slot per (batch, head): each written by exactly one program, summed over the batch below
    dwq = torch.empty(B, H, D, FH, device=v.device, dtype=torch.float32)
    dwk = torch.empty(B, H, D, FH, device=v.device, dtype=torch.float32)
    want_dinit = want_dinit and has_init
    dS0 = torch.empty(B, H, F, DV, device=v.device, dtype=torch.float32) if want_dinit else None
    dz0 = torch.empty(B, H, F, device=v.device, dtype=torch.float32) if want_dinit else None
    C, BD, BF, BV, BDV, num_warps, num_stages = _bwd_config(D, FH, DV, chunk_size, B * H, dtype)
    _bwd_kernel[(2 + triton.cdiv(DV, BV), B * H)](
        q, k, v, wq, wk, key_mask, y, d, dy, S0, z0, dS, dz, dq, dk, dv, dwq, dwk, dS0, dz0, T, H, D, FH, DV,
        C=C, BD=BD, BF=BF, BV=BV, BDV=BDV, NORM=norm, HAS_MASK=key_mask is not None, HAS_INIT=has_init,
        HAS_DFINAL=has_dfinal, STORE_DINIT=want_dinit, DT=DT, PREC=PREC, EMULATE=EMULATE,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv, dwq.sum(0), dwk.sum(0), dS0, dz0


class FusedMapLinearAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: inputs ``q, k, v, wq, wk, S0, z0`` (the last two may be None);
    ``wq, wk`` are the kernels' ``[H, D, Fh]`` weights (NP-Map's already reflected)."""

    @staticmethod
    def forward(ctx, q, k, v, wq, wk, S0, z0, key_mask, norm, output_final_state, chunk_size, output_dtype):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dtype = fused_compute_dtype(q, k, v)
        wq32, wk32 = weight_halves(wq, dtype), weight_halves(wk, dtype)
        if S0 is not None:
            S0, z0 = S0.float().contiguous(), z0.float().contiguous()
        keep = any(ctx.needs_input_grad[:7])
        y, y32, d, S, z = fused_attention_fwd(
            q, k, v, wq32, wk32, norm, key_mask, S0, z0, output_final_state, chunk_size, output_dtype,
            keep_fp32_output=keep,
        )
        ctx.save_for_backward(q, k, v, wq32, wk32, key_mask, S0, z0, y32, d)
        ctx.norm, ctx.chunk_size = norm, chunk_size
        ctx.weight_dtypes = (wq.dtype, wk.dtype)
        ctx.set_materialize_grads(False)
        return y, S, z

    @staticmethod
    def backward(ctx, dy, dS, dz):
        q, k, v, wq, wk, key_mask, S0, z0, y, d = ctx.saved_tensors  # y in fp32
        dy = torch.zeros_like(y) if dy is None else dy.contiguous()
        dq, dk, dv, dwq, dwk, dS0, dz0 = fused_attention_bwd(
            q, k, v, wq, wk, ctx.norm, key_mask, y, d, dy, S0, z0, dS, dz, ctx.chunk_size,
            want_dinit=ctx.needs_input_grad[5] or ctx.needs_input_grad[6],
        )
        dwq, dwk = dwq.to(ctx.weight_dtypes[0]), dwk.to(ctx.weight_dtypes[1])
        return dq, dk, dv, dwq, dwk, dS0, dz0, None, None, None, None, None


def npmap_weight(reflection: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """NP-Map's reflection folded into its weight: ``W'_h = (I - 2 w w^T) W_h`` with
    ``w = w_h / max(||w_h||, 1e-12)``, so that ``(H_h x) W_h = x W'_h``.
    ``reflection: [H, D]``, ``weight: [H, D, Fh]`` -> ``[H, D, Fh]`` (differentiable)."""
    w = torch.nn.functional.normalize(reflection.float(), dim=-1, eps=NPMAP_EPS)  # [H, D]
    weight = weight.float()
    return weight - 2.0 * w[:, :, None] * torch.einsum("hd,hdf->hf", w, weight)[:, None, :]


def fused_map_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
    query_reflection: torch.Tensor | None = None,
    key_reflection: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    key_mask: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
):
    """``fq = phi_q(q)``, ``fk = phi_k(k)`` and causal normalised linear attention over them, in
    one Triton kernel (forward and backward); ``fq``, ``fk`` never go through memory.

    ``y_t = (fq_t S0 + sum_{s<=t} (fq_t . fk_s) v_s) / (fq_t z0 + sum_{s<=t} fq_t . fk_s)`` with
    ``phi = [softmax(u), softmax(-u)]`` and ``u`` the Hedgehog or NP-Map direction (module
    docstring). Equal to ``chunk_linear_attention(fmap_q(q), fmap_k(k), v, ...)`` with the
    PyTorch maps of :mod:`linearize.feature_maps`.

    Args:
        q, k: queries and keys ``[B, H, T, D]`` (after RoPE, kv heads expanded), fp32, bf16 or
            fp16.
        v: values ``[B, H, T, Dv]``.
        kind: ``"hedgehog"`` or ``"npmap"``, the map of both queries and keys.
        query_weight, key_weight: ``[H, D, Fh]`` (the maps' ``weight``); may be the same tensor
            (tied maps; the gradient is then the sum of both uses).
        query_reflection, key_reflection: ``[H, D]``, NP-Map's reflection vectors (``npmap``
            only).
        initial_state: ``(S0 [B, H, 2 Fh, Dv], z0 [B, H, 2 Fh])`` fp32, or None (zeros); the
            feature order is the map's, ``softmax(u)`` first.
        output_final_state: also return the state after the last token.
        chunk_size: an upper bound on the tokens a program takes at a time (16, 32, 64 or 128);
            the result does not depend on it.
        key_mask: ``[B, T]`` bool, False for padding keys: they add nothing to either sum
            (whatever ``k`` and ``v`` hold there, NaN included) and get no gradient.
        output_dtype: dtype of ``y``; default the promoted dtype of ``q``, ``v`` and the
            weights (fp32 for bf16 inputs and fp32 maps, as the unfused path gives).

    Returns:
        ``(y [B, H, T, Dv], (S [B, H, 2 Fh, Dv] fp32, z [B, H, 2 Fh] fp32) or None)``.

    Gradients flow to ``q``, ``k``, ``v``, the weights, the reflections and the initial state.
    With bf16 ``q``, ``k``, ``v`` the products run on bf16 tensor cores (fp32 operands split
    where the result cancels; the features rounded to bf16 for the attention), otherwise in
    fp32; the map and all accumulation are fp32. ``D <= 256``, ``Fh <= 128``, ``Dv <= 256``.

    Example::

        fmap_q, fmap_k = HedgehogFeatureMap(8, 64, 64).cuda(), HedgehogFeatureMap(8, 64, 64).cuda()
        y, _ = fused_map_linear_attention(q, k, v, "hedgehog", fmap_q.weight, fmap_k.weight)
    """
    if kind not in MAP_KINDS:
        raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, T, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T, D = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be [B, H, T, Dv] = [{B}, {H}, {T}, Dv]; got {tuple(v.shape)}")
    DV = v.shape[-1]
    for name, w in (("query_weight", query_weight), ("key_weight", key_weight)):
        if w.dim() != 3 or w.shape[:2] != (H, D) or w.shape != query_weight.shape:
            raise ValueError(
                f"query_weight and key_weight must both be [H, D, Fh] = [{H}, {D}, Fh]; got {name} {tuple(w.shape)}"
            )
    FH = query_weight.shape[-1]
    if D > MAX_HEAD_DIM or FH > MAX_MAP_FEATURES or DV > MAX_VALUE_DIM:
        raise ValueError(
            f"at most D={MAX_HEAD_DIM}, Fh={MAX_MAP_FEATURES} (2 Fh features) and Dv={MAX_VALUE_DIM}; "
            f"got D={D}, Fh={FH}, Dv={DV}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _DOT_DTYPES:
            raise ValueError(f"{name} must be fp32, bf16 or fp16; got {x.dtype}")
    reflections = (query_reflection, key_reflection)
    if kind == "npmap":
        if any(r is None or r.shape != (H, D) for r in reflections):
            raise ValueError(
                f"kind='npmap' needs query_reflection and key_reflection of shape [H, D] = [{H}, {D}]; got "
                f"{[None if r is None else tuple(r.shape) for r in reflections]}"
            )
        wq, wk = npmap_weight(query_reflection, query_weight), npmap_weight(key_reflection, key_weight)
    else:
        if any(r is not None for r in reflections):
            raise ValueError("query_reflection and key_reflection are NP-Map's; pass them only with kind='npmap'")
        wq, wk = query_weight, key_weight
    _check_chunk(chunk_size)
    F = 2 * FH
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = initial_state
        if S0.shape != (B, H, F, DV) or z0.shape != (B, H, F):
            raise ValueError(
                f"initial_state must be (S [B, H, 2 Fh, Dv], z [B, H, 2 Fh]) = ([{B}, {H}, {F}, {DV}], "
                f"[{B}, {H}, {F}]); got ({tuple(S0.shape)}, {tuple(z0.shape)})"
            )
    output_dtype = output_dtype or torch.promote_types(torch.promote_types(q.dtype, v.dtype), query_weight.dtype)
    mask = None
    if key_mask is not None:
        if key_mask.shape != (B, T):
            raise ValueError(f"key_mask must be [B, T] = [{B}, {T}]; got {tuple(key_mask.shape)}")
        v = v.masked_fill(~key_mask.bool()[:, None, :, None], 0.0)
        mask = key_mask.to(torch.int8).contiguous()
    if T == 0:
        y = v.new_zeros(B, H, 0, DV, dtype=output_dtype)
        if not output_final_state:
            return y, None
        if S0 is None:
            S0, z0 = v.new_zeros(B, H, F, DV, dtype=torch.float32), v.new_zeros(B, H, F, dtype=torch.float32)
        return y, (S0.float(), z0.float())
    y, S, z = FusedMapLinearAttentionFunction.apply(
        q, k, v, wq, wk, S0, z0, mask, kind == "npmap", output_final_state, chunk_size, output_dtype
    )
    return y, ((S, z) if output_final_state else None)
