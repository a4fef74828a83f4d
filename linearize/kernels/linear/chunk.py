"""Chunked causal normalised linear attention in Triton, forward and backward.

    n_t = fq_t . (S0 + sum_{s<=t} fk_s v_s^T)          [Dv]
    d_t = fq_t . (z0 + sum_{s<=t} fk_s)                 scalar
    y_t = n_t / max(d_t, 1e-30)

(``S0 = 0, z0 = 0`` without an initial state.) The oracle is
:func:`linearize.kernels.hybrid.naive_hybrid_attention` / ``chunk_hybrid_attention`` with
``window=0``.

How the work is split. One program walks the chunks of one (batch, head) in order and carries the
running state in fp32 registers, so no per-chunk state goes through memory:

* forward, grid ``(Dv / BV, B * H)``: per chunk ``A = fq fk^T`` (causal inside the chunk),
  ``y = (fq S + A v) / (fq z + rowsum A)``, then ``S += fk^T v, z += colsum fk``. It also writes
  the denominators ``d`` (fp32, ``[B, H, T]``), which the backward needs. Opt-in
  (``parallel=True``, :data:`PARALLEL_FORWARD`): the same forward in two passes, the chunk
  states first (grid ``(F / BK, Dv / BV, B * H)``, stored fp32), then every chunk's output at
  once: the forward kernel itself, launched on the ``B * H * T / C`` one-chunk sequences, each
  from its chunk's starting state (grid ``(Dv / BV, B * H * T / C)``), for more programs than
  ``B * H`` at long T. (A kernel of its own for the output pass computed wrong values when
  compiled for sm_90 with Triton 3.6, though right in the interpreter; the forward kernel with
  an initial state is right there.)
* backward, one launch with three kinds of program. With ``dn_t = dy_t / d_t`` and
  ``dd_t = -(dy_t . y_t) / d_t`` the backward is that of two unnormalised linear attentions
  (values ``v`` and a column of ones):

      dfq_t = S_t dn_t + z_t dd_t                              (forward in time, blocks of F)
      dfk_s = dS_s v_s + dz_s,  dS_s = sum_{t>=s} fq_t dn_t^T,  dz_s = sum_{t>=s} fq_t dd_t
                                                               (backward in time, blocks of F)
      dv_s  = dS_s^T fk_s                                      (backward in time, blocks of Dv)

  plus the final state's gradient, which seeds ``dS`` and ``dz``; what ``dS, dz`` hold after the
  first chunk is the initial state's gradient. Opt-in (:data:`PARALLEL_BACKWARD`, off): the same
  backward chunk-parallel, every chunk's starting state ``S, z`` (``_fwd_states_kernel``) and
  adjoint state ``dS, dz`` (``_bwd_states_kernel``, the chunks in reverse) stored fp32 first,
  then the backward kernel itself on the ``B * H * T / C`` one-chunk sequences, each from its two
  states. Right on an H200, but 0.77x the walk's speed at B=1, 32 heads, F = Dv = 128.

Precision: state and accumulation in fp32. With fp32 (or fp16) inputs every product is full fp32
(``input_precision="ieee"``). With bf16 inputs the products run on bf16 tensor cores; the
inputs are exact there, and every fp32 operand that meets them (the running state, the
normaliser, ``A`` in ``A v``, ``dn = dy / d`` where it meets ``v``) is split into ``hi + lo``
bf16 halves (:func:`_dot_split`), which keeps those products to about 2^-16 relative instead of
bf16's 2^-8. This matters
beyond the forward: ``dfq`` and ``dfk`` are differences of two large terms (``S_t dn_t`` against
``z_t dd_t``, ``dS v`` against ``dz``) whenever the values share a common offset, and a state
rounded to bf16 (or tf32) turned into errors of 10-20% there. Only products whose result is not
about to cancel (``A = fq fk^T``, ``P fk``, everything in ``dv``) take plain 16-bit operands.
The backward reads ``y`` in fp32 (kept by the forward when a gradient is needed) for the same
reason.

Triton 3.4-3.7 miscompiles, on Hopper, ``tl.trans`` of a ``tl.dot`` result cast to bf16/fp16 and
fed to another ``tl.dot``. Nothing here calls ``tl.trans``: every operand needed transposed
(``fk^T``, ``v^T``, ``fq^T``, ``dy^T``, ``y^T``, blocks of ``S0^T`` and ``dS^T``) is loaded
transposed from memory, and the running states are kept in the layout their products need.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TINY = 1e-30  # denominators are clamped here, as in the reference
_TINY = tl.constexpr(TINY)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """``a @ b`` with both operands rounded to ``DT``, accumulated in fp32 (``PREC``: "ieee" for
    fp32 operands).

    ``EMULATE`` (the CPU interpreter, bf16 operands): round to ``DT``, then multiply in fp32; the
    interpreter's own bf16 product multiplies the raw bit patterns."""
    a = a.to(DT)
    b = b.to(DT)
    if EMULATE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def _dot_split(a, b, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr, SPLIT_A: tl.constexpr,
               SPLIT_B: tl.constexpr):
    """``a @ b`` for fp32 operands on bf16 tensor cores, to about 2^-16 relative: each operand that
    is split is written as ``hi + lo`` (both ``DT``), and ``hi hi``, ``hi lo`` and ``lo hi`` are
    summed (``lo lo`` is smaller still). An operand already exact in ``DT`` (a bf16 input) needs
    no split. With ``DT = fp32`` a single fp32 product."""
    if DT == tl.float32:
        out = _dot(a, b, DT, PREC, EMULATE)
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        a_hi = a.to(DT)
        b_hi = b.to(DT)
        out = _dot(a_hi, b_hi, DT, PREC, EMULATE)
        if SPLIT_A:
            out += _dot(a - a_hi.to(tl.float32), b_hi, DT, PREC, EMULATE)
        if SPLIT_B:
            out += _dot(a_hi, b - b_hi.to(tl.float32), DT, PREC, EMULATE)
    return out


@triton.jit
def _inverse_den(den, i_bh, t, m_t, T):
    """``1 / d`` where ``d >= TINY``, else 0 (a query with no valid key passes no gradient)."""
    d = tl.load(den + i_bh * T + t, mask=m_t, other=0.0)
    ok = d >= _TINY
    return tl.where(ok, 1.0 / tl.where(ok, d, 1.0), 0.0)


@triton.jit
def _chunk_readout(b_fq, b_fkT, b_v, S, Z, causal, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """One chunk's output against the state at its start, for both forwards: ``A = fq fk^T``
    (causal), ``d = rowsum A + fq z`` (``z`` as column 0 of ``Z [BF, 16]``), ``o = (fq S + A v) /
    max(d, 1e-30)``. Returns ``(o [C, BV], d [C])``, fp32."""
    A = tl.where(causal, _dot(b_fq, b_fkT, DT, PREC, EMULATE), 0.0)  # [C, C]
    d = tl.sum(A, 1) + tl.sum(_dot_split(b_fq, Z, DT, PREC, EMULATE, False, True), 1)  # [C]
    o = _dot_split(b_fq, S, DT, PREC, EMULATE, False, True) + _dot_split(A, b_v, DT, PREC, EMULATE, True, False)
    return o / tl.maximum(d, _TINY)[:, None], d


@triton.jit
def _fwd_kernel(
    fq, fk, v, y, y32, den, s0, z0, s_out, z_out,
    T, F, DV,
    C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_Y32: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, C)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_f = o_f < F
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    fq += i_bh * T * F
    fk += i_bh * T * F
    v += i_bh * T * DV
    y += i_bh * T * DV
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]  # [BF, BV]
    # z is kept as column 0 of a [BF, 16] matrix, so that fq . z and its update are (small)
    # matrix products rather than [C, BF] fp32 temporaries, which would not fit in registers.
    first = tl.arange(0, 16)[None, :] == 0
    if HAS_INIT:
        S = tl.load(s0 + p_s, mask=m_fv, other=0.0).to(tl.float32)
        z = tl.load(z0 + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        Z = tl.where(first, z[:, None], 0.0)  # [BF, 16]
    else:
        S = tl.zeros([BF, BV], dtype=tl.float32)
        Z = tl.zeros([BF, 16], dtype=tl.float32)
    ones = tl.where(first, 1.0, 0.0) + tl.zeros([C, 16], dtype=tl.float32)  # [C, 16]: column 0 is ones
    causal = o_c[:, None] >= o_c[None, :]
    for i_t in range(0, tl.cdiv(T, C)):
        t = i_t * C + o_c
        m_t = t < T
        b_fq = tl.load(fq + t[:, None] * F + o_f[None, :], mask=m_t[:, None] & m_f[None, :], other=0.0)  # [C, BF]
        b_fkT = tl.load(fk + t[None, :] * F + o_f[:, None], mask=m_f[:, None] & m_t[None, :], other=0.0)  # [BF, C]
        b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [C, BV]
        o, d = _chunk_readout(b_fq, b_fkT, b_v, S, Z, causal, DT, PREC, EMULATE)
        tl.store(y + t[:, None] * DV + o_v[None, :], o.to(y.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        if STORE_Y32:  # the backward's copy of y, in fp32 (see linear_attention_fwd)
            tl.store(y32 + i_bh * T * DV + t[:, None] * DV + o_v[None, :], o, mask=m_t[:, None] & m_v[None, :])
        if i_v == 0:
            tl.store(den + i_bh * T + t, d, mask=m_t)
        S += _dot(b_fkT, b_v, DT, PREC, EMULATE)
        Z += _dot(b_fkT, ones, DT, PREC, EMULATE)
    if STORE_FINAL:
        tl.store(s_out + p_s, S, mask=m_fv)
        if i_v == 0:
            tl.store(z_out + i_bh * F + o_f, tl.sum(Z, 1), mask=m_f)


@triton.jit
def _fwd_states_kernel(
    fk, v, s0, z0, h, hz, s_out, z_out,
    T, F, DV,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """The two-pass forward's first pass: each chunk's starting state. Grid ``(F / BK, Dv / BV,
    B * H)``: features ``[i_k * BK, ...)`` and value columns ``[i_v * BV, ...)`` of one head (a
    feature's row of the state evolves on its own), the chunks in order. Before a chunk's keys
    enter, ``S [BK, BV]`` is stored, fp32, as ``h[b, h, chunk]`` and ``z`` as ``hz[b, h, chunk]``
    (by the ``i_v == 0`` programs); then ``S += fk^T v`` and ``z += colsum fk``, the products of
    ``_fwd_kernel`` (``z`` as column 0 of a ``[BK, 16]`` matrix, as there): the states it reads out
    against. Only keys and values are read, so this pass moves about half of what the output pass
    does and has ``F / BK`` times as many programs as the sequential walk."""
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < F
    m_v = o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    fk += i_bh * T * F
    v += i_bh * T * DV
    n_t = tl.cdiv(T, C)
    p_s = i_bh * F * DV + o_k[:, None] * DV + o_v[None, :]  # [BK, BV]
    first = tl.arange(0, 16)[None, :] == 0
    if HAS_INIT:
        S = tl.load(s0 + p_s, mask=m_kv, other=0.0).to(tl.float32)
        z = tl.load(z0 + i_bh * F + o_k, mask=m_k, other=0.0).to(tl.float32)
        Z = tl.where(first, z[:, None], 0.0)  # [BK, 16]
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        Z = tl.zeros([BK, 16], dtype=tl.float32)
    ones = tl.where(first, 1.0, 0.0) + tl.zeros([C, 16], dtype=tl.float32)  # [C, 16]: column 0 is ones
    for i_t in range(0, n_t):
        p_h = (i_bh * n_t + i_t) * F * DV + o_k[:, None] * DV + o_v[None, :]
        tl.store(h + p_h, S, mask=m_kv)
        if i_v == 0:
            tl.store(hz + (i_bh * n_t + i_t) * F + o_k, tl.sum(Z, 1), mask=m_k)
        t = i_t * C + o_c
        m_t = t < T
        # keys loaded transposed, [BK, C]: no tl.trans (see the module docstring)
        b_fkT = tl.load(fk + t[None, :] * F + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [C, BV]
        S += _dot(b_fkT, b_v, DT, PREC, EMULATE)
        Z += _dot(b_fkT, ones, DT, PREC, EMULATE)
    if STORE_FINAL:
        tl.store(s_out + p_s, S, mask=m_kv)
        if i_v == 0:
            tl.store(z_out + i_bh * F + o_k, tl.sum(Z, 1), mask=m_k)


@triton.jit
def _bwd_states_kernel(
    fq, dy, den, dd, ds_final, dz_final, dh, dhz, ds0, dz0,
    T, F, DV,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """The chunk-parallel backward's adjoint states: for each chunk, what the queries after it
    (and the final state's gradient) send back through the state, ``dS = sum_{t later} fq_t
    dn_t^T + dS_T`` and ``dz = sum_{t later} fq_t dd_t + dz_T``. Grid ``(F / BK, Dv / BV, B * H)``,
    the chunks in reverse, ``dS [BK, BV]`` and ``dz [BK]`` in fp32 registers: before a chunk's
    queries enter, ``dS`` is stored, fp32, as ``dh[b, h, chunk]`` and ``dz`` as ``dhz[b, h,
    chunk]`` (by the ``i_v == 0`` programs); after the first chunk they are the initial state's
    gradient. ``dd [B, H, T]``: ``-(dy . y) / d`` per token, computed before the launch; ``dn =
    dy / d`` is split into bf16 halves where it meets ``fq`` (as in ``_bwd_dk``: ``dfk`` cancels
    against ``dz``)."""
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < F
    m_v = o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    n_t = tl.cdiv(T, C)
    p_s = i_bh * F * DV + o_k[:, None] * DV + o_v[None, :]  # [BK, BV]
    if HAS_DFINAL:
        dS = tl.load(ds_final + p_s, mask=m_kv, other=0.0).to(tl.float32)
        dz = tl.load(dz_final + i_bh * F + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
    for i_r in range(0, n_t):
        i_t = n_t - 1 - i_r
        p_h = (i_bh * n_t + i_t) * F * DV + o_k[:, None] * DV + o_v[None, :]
        tl.store(dh + p_h, dS, mask=m_kv)
        if i_v == 0:
            tl.store(dhz + (i_bh * n_t + i_t) * F + o_k, dz, mask=m_k)
        t = i_t * C + o_c
        m_t = t < T
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dn = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32) * inv[:, None]  # [C, BV]
        b_dd = tl.load(dd + i_bh * T + t, mask=m_t, other=0.0)  # [C]
        # queries loaded transposed, [BK, C]: no tl.trans (see the module docstring)
        b_fqT = tl.load(fq + i_bh * T * F + t[None, :] * F + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        dS += _dot_split(b_fqT, b_dn, DT, PREC, EMULATE, False, True)
        dz += tl.sum(b_fqT.to(tl.float32) * b_dd[None, :], 1)
    if STORE_DINIT:
        tl.store(ds0 + p_s, dS, mask=m_kv)
        if i_v == 0:
            tl.store(dz0 + i_bh * F + o_k, dz, mask=m_k)


@triton.jit
def _bwd_dq(
    i_k, i_bh, fk, v, y, den, dy, s0, z0, dfq, T, F, DV,
    C: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, HAS_INIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfq`` for features ``[i_k * BK, (i_k + 1) * BK)``, chunks in order."""
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_d = tl.arange(0, BDV)
    m_k = o_k < F
    m_d = o_d < DV
    # S^T restricted to this block of features, [BDV, BK], loaded transposed from S0 [F, DV].
    if HAS_INIT:
        ST = tl.load(s0 + i_bh * F * DV + o_k[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_k[None, :], other=0.0)
        z = tl.load(z0 + i_bh * F + o_k, mask=m_k, other=0.0)
    else:
        ST = tl.zeros([BDV, BK], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    causal = o_c[:, None] >= o_c[None, :]
    for i_t in range(0, tl.cdiv(T, C)):
        t = i_t * C + o_c
        m_t = t < T
        m_td = m_t[:, None] & m_d[None, :]
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dy = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        b_y = tl.load(y + i_bh * T * DV + t[:, None] * DV + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        b_dn = b_dy * inv[:, None]  # [C, BDV]
        b_dd = -tl.sum(b_dy * b_y, 1) * inv  # [C]
        b_vT = tl.load(v + i_bh * T * DV + t[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        b_fk = tl.load(fk + i_bh * T * F + t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        P = tl.where(causal, _dot_split(b_dn, b_vT, DT, PREC, EMULATE, True, False) + b_dd[:, None], 0.0)  # [C, C]
        # fp32 operands: this term and the next cancel in part
        b_dq = _dot_split(b_dn, ST, DT, PREC, EMULATE, True, True) + b_dd[:, None] * z[None, :]
        b_dq += _dot(P, b_fk, DT, PREC, EMULATE)
        p_dq = dfq + i_bh * T * F + t[:, None] * F + o_k[None, :]
        tl.store(p_dq, b_dq.to(dfq.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        ST += _dot(b_vT, b_fk, DT, PREC, EMULATE)
        z += tl.sum(b_fk.to(tl.float32), 0)


@triton.jit
def _bwd_dk(
    i_k, i_bh, fq, v, y, den, dy, ds_final, dz_final, dfk, dz0, T, F, DV,
    C: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfk`` for features ``[i_k * BK, (i_k + 1) * BK)`` and the initial ``z``'s gradient,
    chunks in reverse."""
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_d = tl.arange(0, BDV)
    m_k = o_k < F
    m_d = o_d < DV
    # dS^T restricted to this block of features, [BDV, BK]
    if HAS_DFINAL:
        p = ds_final + i_bh * F * DV + o_k[None, :] * DV + o_d[:, None]
        dST = tl.load(p, mask=m_d[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        dz = tl.load(dz_final + i_bh * F + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        dST = tl.zeros([BDV, BK], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
    later = o_c[:, None] <= o_c[None, :]  # [key j, query i]: i >= j
    n_t = tl.cdiv(T, C)
    for i_r in range(0, n_t):
        t = (n_t - 1 - i_r) * C + o_c
        m_t = t < T
        m_dt = m_d[:, None] & m_t[None, :]
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dyT = tl.load(dy + i_bh * T * DV + t[None, :] * DV + o_d[:, None], mask=m_dt, other=0.0).to(tl.float32)
        b_yT = tl.load(y + i_bh * T * DV + t[None, :] * DV + o_d[:, None], mask=m_dt, other=0.0).to(tl.float32)
        b_dnT = b_dyT * inv[None, :]  # [BDV, C]
        b_dd = -tl.sum(b_dyT * b_yT, 0) * inv  # [C]
        b_v = tl.load(v + i_bh * T * DV + t[:, None] * DV + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_fq = tl.load(fq + i_bh * T * F + t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        Q = tl.where(later, _dot_split(b_v, b_dnT, DT, PREC, EMULATE, False, True) + b_dd[None, :], 0.0)  # [C, C]
        # fp32 operands: this term and the next cancel in part
        b_dk = _dot_split(b_v, dST, DT, PREC, EMULATE, False, True) + dz[None, :]
        b_dk += _dot(Q, b_fq, DT, PREC, EMULATE)
        p_dk = dfk + i_bh * T * F + t[:, None] * F + o_k[None, :]
        tl.store(p_dk, b_dk.to(dfk.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        dST += _dot_split(b_dnT, b_fq, DT, PREC, EMULATE, True, False)
        dz += tl.sum(b_fq.to(tl.float32) * b_dd[:, None], 0)
    if STORE_DINIT:
        tl.store(dz0 + i_bh * F + o_k, dz, mask=m_k)


@triton.jit
def _bwd_dv(
    i_v, i_bh, fq, fk, den, dy, ds_final, dv, ds0, T, F, DV,
    C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dv`` for values ``[i_v * BV, (i_v + 1) * BV)`` and that block of the initial ``S``'s
    gradient, chunks in reverse."""
    o_c = tl.arange(0, C)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_f = o_f < F
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]  # [BF, BV]
    if HAS_DFINAL:
        dS = tl.load(ds_final + p_s, mask=m_fv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BF, BV], dtype=tl.float32)
    later = o_c[:, None] <= o_c[None, :]  # [key j, query i]: i >= j
    n_t = tl.cdiv(T, C)
    for i_r in range(0, n_t):
        t = (n_t - 1 - i_r) * C + o_c
        m_t = t < T
        m_tv = m_t[:, None] & m_v[None, :]
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dn = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_dn = b_dn * inv[:, None]  # [C, BV]
        b_fk = tl.load(fk + i_bh * T * F + t[:, None] * F + o_f[None, :], mask=m_t[:, None] & m_f[None, :], other=0.0)
        b_fqT = tl.load(fq + i_bh * T * F + t[None, :] * F + o_f[:, None], mask=m_f[:, None] & m_t[None, :], other=0.0)
        R = tl.where(later, _dot(b_fk, b_fqT, DT, PREC, EMULATE), 0.0)  # [C, C]
        b_dv = _dot(b_fk, dS, DT, PREC, EMULATE) + _dot(R, b_dn, DT, PREC, EMULATE)
        tl.store(dv + i_bh * T * DV + t[:, None] * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        dS += _dot(b_fqT, b_dn, DT, PREC, EMULATE)
    if STORE_DINIT:
        tl.store(ds0 + p_s, dS, mask=m_fv)


@triton.jit
def _bwd_kernel(
    fq, fk, v, y, den, dy, s0, z0, ds_final, dz_final, dfq, dfk, dv, ds0, dz0,
    T, F, DV,
    C: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr, NK: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(2 * NK + NV, B * H)``: the first ``NK`` programs of a head compute ``dfq``, the next
    ``NK`` ``dfk`` (and ``dz0``), the last ``NV`` ``dv`` (and ``dS0``); all run at once."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    if i_p < NK:
        _bwd_dq(i_p, i_bh, fk, v, y, den, dy, s0, z0, dfq, T, F, DV, C, BK, BDV, HAS_INIT, DT, PREC, EMULATE)
    elif i_p < 2 * NK:
        _bwd_dk(
            i_p - NK, i_bh, fq, v, y, den, dy, ds_final, dz_final, dfk, dz0, T, F, DV,
            C, BK, BDV, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE,
        )
    else:
        _bwd_dv(
            i_p - 2 * NK, i_bh, fq, fk, den, dy, ds_final, dv, ds0, T, F, DV,
            C, BF, BV, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE,
        )


# ----------------------------------------------------------------------------- launchers

_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
MAX_FEATURES = 256
MAX_VALUE_DIM = 256


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The operand type of the products: bf16 when any input is bf16, else fp32 (fp16 inputs are
    computed like fp32 ones: fp16 cannot hold a long sequence's state, and they are rare here)."""
    return torch.bfloat16 if any(t.dtype == torch.bfloat16 for t in tensors) else torch.float32


def _dot_config(dtype: torch.dtype):
    emulate = interpreting() and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return _DOT_DTYPES[dtype], precision, emulate


def _sms() -> int | None:
    if torch.cuda.is_available() and not interpreting():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return None


def _fwd_config(F: int, DV: int, chunk_size: int, heads: int, dtype=torch.bfloat16):
    """``(C, BF, BV, num_warps)`` of the forward kernel. The chunk and the block of value columns
    are chosen so that a program's tiles (``[C, BF]`` features, ``[BF, BV]`` state) stay in
    registers (checked by compiling for sm_90 with Triton 3.6: at most about 100 bytes a thread
    spilled, except with fp32 products at F = 256), then ``BV`` shrinks while ``B * H`` programs
    per block would leave multiprocessors idle. fp32 products (fp32 inputs) need the smallest
    tiles."""
    BF = _pow2(F)
    if dtype == torch.float32:
        return min(chunk_size, 16), BF, 16, (8 if BF >= 128 else 4)
    C = min(chunk_size, max(16, 8192 // BF))
    BV = min(_pow2(DV), 64, max(16, triton.next_power_of_2(262144 // (BF * C) + 1) // 2))
    sms = _sms()
    while sms and BV > 16 and heads * triton.cdiv(DV, BV) < sms:
        BV //= 2
    return C, BF, BV, (8 if BF * BV >= 8192 else 4)


# the forward in two passes (_fwd_states_kernel, then _fwd_kernel over every chunk at once)
# rather than the sequential walk (_fwd_kernel); off until a GPU run measures its speed
PARALLEL_FORWARD = False
# the backward chunk-parallel (each chunk's starting and adjoint states first, then every chunk at
# once through _bwd_kernel) rather than walking the chunks. Off: right on an H200 (Triton 3.6, the bf16
# GPU check at three shapes) but slower, 0.77x the walk's forward + backward at B=1, 32 heads,
# F = Dv = 128, 8K and 32K (12.96 ms against 10.04 at 32K; results/h200-kernels/)
PARALLEL_BACKWARD = False
MAX_GRID_Y = 65535  # programs on a launch grid's second axis (CUDA)


def _par_config(F: int, DV: int, chunk_size: int, heads: int, dtype=torch.bfloat16):
    """``(C, BK, BV_states, BF, BV_out, out_warps)`` of the two-pass forward. The output pass takes
    the sequential kernel's chunk and tiles (its programs are many: ``T / C`` a head and block of
    value columns, so its value blocks need no shrinking). The states pass (``[BK, BV]`` fp32
    state, ``[BK, C]`` keys, ``[C, BV]`` values) starts at 64 x 64 (32 x 32 with fp32 products)
    and halves ``BV``, then ``BK``, down to 16, while ``B * H`` heads times its blocks would
    leave multiprocessors idle: it holds the only sequential work left. (The states pass was
    right on an H200; the output pass through the forward kernel is not yet measured there.)"""
    C, BF, BV_out, out_warps = _fwd_config(F, DV, chunk_size, 1 << 30, dtype)
    fp32 = dtype == torch.float32
    BK = min(BF, 32 if fp32 else 64)
    BV = min(_pow2(DV), 32 if fp32 else 64)
    sms = _sms()
    while sms and heads * triton.cdiv(F, BK) * triton.cdiv(DV, BV) < sms and max(BK, BV) > 16:
        if BV >= BK and BV > 16:
            BV //= 2
        else:
            BK //= 2
    return C, BK, BV, BF, BV_out, out_warps


def launch_in_slices(kernel, columns, seqs, *args, limit, **meta):
    """``kernel[(columns, n)](*seqs, *args, **meta)`` for tensors ``seqs`` (or None) whose first
    dimension is the ``n`` sequences of the grid's second axis, in launches of at most ``limit``
    sequences each (CUDA's limit on that axis, :data:`MAX_GRID_Y`)."""
    n = next(x for x in seqs if x is not None).shape[0]
    for start in range(0, n, limit):
        part = [None if x is None else x[start : start + limit] for x in seqs]
        kernel[(columns, min(limit, n - start))](*part, *args, **meta)


def _bwd_config(F: int, DV: int, chunk_size: int, heads: int, dtype=torch.bfloat16):
    """``(C, BF, BK, BV, BDV)`` of the backward kernel (8 warps): ``dfq``/``dfk`` programs take
    ``BK`` features and every value column, ``dv`` programs ``BV`` columns and every feature."""
    C, BF, BV, _ = _fwd_config(F, DV, chunk_size, heads, dtype)
    BDV = _pow2(DV)
    if dtype == torch.float32:
        return C, BF, 16, 16, BDV
    # BK stays at 32-64: spreading dfq/dfk over more programs with BK = 16 when B * H is small
    # compiles on sm_90 into an illegal memory access (seen at F=128, Dv=64, B*H=16, bf16).
    BK = 32 if (BDV > 128 or BF > 128) else min(BF, 64)
    # 64-token chunks with fewer than 64 value columns (BDV = 16 or 32) compile on sm_90 (Triton
    # 3.6) into an invalid shared-memory read in the dfq program's ``dn v^T`` product
    # (compute-sanitizer, F=12, Dv=20) or, with BK = 32, into wrong values; 32-token chunks are
    # right there
    C = min(chunk_size, 64 if (BF <= 128 and BDV >= 64) else 32)
    return C, BF, BK, BV, BDV


def _check_chunk(chunk_size: int):
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be one of 16, 32, 64, 128, got {chunk_size}")


def linear_attention_fwd(
    fq, fk, v, S0=None, z0=None, output_final_state=False, chunk_size=64, output_dtype=None, keep_fp32_output=False,
    parallel=None,
):
    """Launch the forward kernel on contiguous ``fq, fk: [B, H, T, F]``, ``v: [B, H, T, Dv]``.

    Returns ``(y [B, H, T, Dv], y32, d [B, H, T] fp32, S [B, H, F, Dv] fp32 or None, z [B, H, F]
    fp32 or None)``. ``y32`` is ``y`` in fp32 when ``keep_fp32_output`` (the same tensor when
    ``y`` is fp32 already), else None. The backward needs ``y`` in fp32: ``dy . y`` cancels
    against ``dy . v`` wherever the values share a common offset, and ``y`` rounded to bf16
    would carry that rounding, amplified, into ``dfq`` and ``dfk``. ``parallel``: the two-pass
    forward (each chunk's starting state, then every chunk's output at once) instead of the
    sequential walk; None takes :data:`PARALLEL_FORWARD`. Both give the same tensors (up to the
    order in which a product's tiles are summed)."""
    _check_chunk(chunk_size)
    B, H, T, F = fq.shape
    DV = v.shape[-1]
    dtype = compute_dtype(fq, fk, v)
    DT, PREC, EMULATE = _dot_config(dtype)
    y = torch.empty(B, H, T, DV, device=v.device, dtype=output_dtype or torch.promote_types(fq.dtype, v.dtype))
    d = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
    S = torch.empty(B, H, F, DV, device=v.device, dtype=torch.float32) if output_final_state else None
    z = torch.empty(B, H, F, device=v.device, dtype=torch.float32) if output_final_state else None
    store_y32 = keep_fp32_output and y.dtype != torch.float32
    y32 = torch.empty(B, H, T, DV, device=v.device, dtype=torch.float32) if store_y32 else None
    if PARALLEL_FORWARD if parallel is None else parallel:
        C, BK, BVs, BF, BV, num_warps = _par_config(F, DV, chunk_size, B * H, dtype)
        N = triton.cdiv(T, C)
        h = torch.empty(B, H, N, F, DV, device=v.device, dtype=torch.float32)  # each chunk's starting state
        hz = torch.empty(B, H, N, F, device=v.device, dtype=torch.float32)
        _fwd_states_kernel[(triton.cdiv(F, BK), triton.cdiv(DV, BVs), B * H)](
            fk, v, S0, z0, h, hz, S, z, T, F, DV,
            C=C, BK=BK, BV=BVs, HAS_INIT=S0 is not None, STORE_FINAL=output_final_state,
            DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=4, num_stages=2,
        )
        # the output pass: the forward kernel on B * H * N sequences of one chunk, each from its
        # starting state (T padded with zeros to N * C: a padded key is after every real query)
        pad = N * C - T
        grow = (lambda x: torch.nn.functional.pad(x, (0, 0, 0, pad))) if pad else (lambda x: x)
        yp = torch.empty(B, H, N * C, DV, device=v.device, dtype=y.dtype) if pad else y
        dp = torch.empty(B, H, N * C, device=v.device, dtype=torch.float32) if pad else d
        y32p = (torch.empty(B, H, N * C, DV, device=v.device, dtype=torch.float32) if pad else y32) if store_y32 else None
        # in launches of at most MAX_GRID_Y sequences (CUDA's limit on the grid's second axis:
        # B=8 x 32 heads x 512 chunks at T=32K would be "invalid argument")
        n = B * H * N
        whole = (grow(fq).reshape(n, C, F), grow(fk).reshape(n, C, F), grow(v).reshape(n, C, DV), yp.view(n, C, DV),
                 y32p.view(n, C, DV) if store_y32 else None, dp.view(n, C), h.view(n, F, DV), hz.view(n, F))
        launch_in_slices(
            _fwd_kernel, triton.cdiv(DV, BV), whole, None, None, C, F, DV, limit=MAX_GRID_Y,
            C=C, BF=BF, BV=BV, HAS_INIT=True, STORE_FINAL=False, STORE_Y32=store_y32,
            DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=num_warps, num_stages=2,
        )
        if pad:
            y.copy_(yp[:, :, :T])
            d.copy_(dp[:, :, :T])
            if store_y32:
                y32.copy_(y32p[:, :, :T])
    else:
        C, BF, BV, num_warps = _fwd_config(F, DV, chunk_size, B * H, dtype)
        _fwd_kernel[(triton.cdiv(DV, BV), B * H)](
            fq, fk, v, y, y32, d, S0, z0, S, z, T, F, DV,
            C=C, BF=BF, BV=BV, HAS_INIT=S0 is not None, STORE_FINAL=output_final_state, STORE_Y32=store_y32,
            DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=num_warps, num_stages=2,
        )
    if keep_fp32_output and not store_y32:
        y32 = y
    return y, y32, d, S, z


def linear_attention_bwd(fq, fk, v, y, d, dy, S0=None, z0=None, dS=None, dz=None, chunk_size=64, want_dinit=True,
                         parallel=None):
    """Launch the backward kernels. ``dS [B, H, F, Dv]``, ``dz [B, H, F]``: gradients of the
    final state (or None). Returns ``(dfq, dfk, dv, dS0, dz0)``, the last two None without an
    initial state or when ``want_dinit`` is False. ``parallel``: the chunk-parallel backward
    (every chunk's starting state with ``_fwd_states_kernel`` and its adjoint state with
    ``_bwd_states_kernel``, fp32 ``[B, H, T / C, F, Dv]`` each, then ``_bwd_kernel`` on the
    one-chunk sequences from those states) instead of the walks; None takes
    :data:`PARALLEL_BACKWARD`. The same gradients up to fp32 rounding."""
    _check_chunk(chunk_size)
    B, H, T, F = fq.shape
    DV = v.shape[-1]
    dtype = compute_dtype(fq, fk, v)
    DT, PREC, EMULATE = _dot_config(dtype)
    has_init = S0 is not None
    has_dfinal = dS is not None or dz is not None
    if has_dfinal:
        dS = torch.zeros(B, H, F, DV, device=v.device, dtype=torch.float32) if dS is None else dS.contiguous()
        dz = torch.zeros(B, H, F, device=v.device, dtype=torch.float32) if dz is None else dz.contiguous()
    dfq, dfk, dv = torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(v)
    want_dinit = want_dinit and has_init
    dS0 = torch.empty(B, H, F, DV, device=v.device, dtype=torch.float32) if want_dinit else None
    dz0 = torch.empty(B, H, F, device=v.device, dtype=torch.float32) if want_dinit else None
    C, BF, BK, BV, BDV = _bwd_config(F, DV, chunk_size, B * H, dtype)
    NK, NV = triton.cdiv(F, BK), triton.cdiv(DV, BV)
    if not (PARALLEL_BACKWARD if parallel is None else parallel):
        _bwd_kernel[(2 * NK + NV, B * H)](
            fq, fk, v, y, d, dy, S0, z0, dS, dz, dfq, dfk, dv, dS0, dz0, T, F, DV,
            C=C, BF=BF, BK=BK, BV=BV, BDV=BDV, NK=NK,
            HAS_INIT=has_init, HAS_DFINAL=has_dfinal, STORE_DINIT=want_dinit,
            DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=8, num_stages=2,
        )
        return dfq, dfk, dv, dS0, dz0
    # chunk-parallel: every chunk's starting state and every chunk's adjoint state first, then the
    # backward kernel itself on the B * H * N one-chunk sequences, each from its chunk's states
    N = triton.cdiv(T, C)
    _, BKs, BVs, _, _, _ = _par_config(F, DV, chunk_size, B * H, dtype)
    grid = (triton.cdiv(F, BKs), triton.cdiv(DV, BVs), B * H)
    h = torch.empty(B, H, N, F, DV, device=v.device, dtype=torch.float32)
    hz = torch.empty(B, H, N, F, device=v.device, dtype=torch.float32)
    _fwd_states_kernel[grid](
        fk, v, S0, z0, h, hz, None, None, T, F, DV,
        C=C, BK=BKs, BV=BVs, HAS_INIT=has_init, STORE_FINAL=False,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=4, num_stages=2,
    )
    inv = torch.where(d >= TINY, 1.0 / torch.where(d >= TINY, d, 1.0), 0.0)
    dd = (-(dy.float() * y).sum(-1) * inv).contiguous()  # [B, H, T]: d L / d (the normaliser)
    dh = torch.empty(B, H, N, F, DV, device=v.device, dtype=torch.float32)
    dhz = torch.empty(B, H, N, F, device=v.device, dtype=torch.float32)
    _bwd_states_kernel[grid](
        fq, dy, d, dd, dS, dz, dh, dhz, dS0, dz0, T, F, DV,
        C=C, BK=BKs, BV=BVs, HAS_DFINAL=has_dfinal, STORE_DINIT=want_dinit,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=4, num_stages=2,
    )
    pad = N * C - T
    grow = (lambda x: torch.nn.functional.pad(x, (0, 0, 0, pad))) if pad else (lambda x: x)
    n = B * H * N
    dp = torch.nn.functional.pad(d, (0, pad)) if pad else d  # padded queries: d = 0, so no gradient
    outs = [torch.empty(B, H, N * C, x.shape[-1], device=v.device, dtype=x.dtype) if pad else x for x in (dfq, dfk, dv)]
    seqs = (grow(fq).reshape(n, C, F), grow(fk).reshape(n, C, F), grow(v).reshape(n, C, DV), grow(y).reshape(n, C, DV),
            dp.reshape(n, C), grow(dy).reshape(n, C, DV), h.view(n, F, DV), hz.view(n, F), dh.view(n, F, DV),
            dhz.view(n, F), *(o.view(n, C, o.shape[-1]) for o in outs))
    launch_in_slices(
        _bwd_kernel, 2 * NK + NV, seqs, None, None, C, F, DV, limit=MAX_GRID_Y,
        C=C, BF=BF, BK=BK, BV=BV, BDV=BDV, NK=NK, HAS_INIT=True, HAS_DFINAL=True, STORE_DINIT=False,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=8, num_stages=2,
    )
    if pad:
        for x, o in zip((dfq, dfk, dv), outs):
            x.copy_(o[:, :, :T])
    return dfq, dfk, dv, dS0, dz0


class ChunkLinearAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: inputs ``fq, fk, v, S0, z0`` (the last two may be None)."""

    @staticmethod
    def forward(ctx, fq, fk, v, S0, z0, output_final_state, chunk_size, output_dtype, parallel=None):
        fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
        if S0 is not None:
            S0, z0 = S0.float().contiguous(), z0.float().contiguous()
        keep = any(ctx.needs_input_grad[:5])
        y, y32, d, S, z = linear_attention_fwd(
            fq, fk, v, S0, z0, output_final_state, chunk_size, output_dtype, keep_fp32_output=keep, parallel=parallel
        )
        ctx.save_for_backward(fq, fk, v, S0, z0, y32, d)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, S, z

    @staticmethod
    def backward(ctx, dy, dS, dz):
        fq, fk, v, S0, z0, y, d = ctx.saved_tensors  # y in fp32
        if dy is None:
            dy = torch.zeros_like(y)
        dfq, dfk, dv, dS0, dz0 = linear_attention_bwd(
            fq, fk, v, y, d, dy.contiguous(), S0, z0, dS, dz, ctx.chunk_size,
            want_dinit=ctx.needs_input_grad[3] or ctx.needs_input_grad[4],
        )
        return dfq, dfk, dv, dS0, dz0, None, None, None, None


def chunk_linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    key_mask: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    parallel: bool | None = None,
):
    """Causal normalised linear attention, chunked, in Triton (forward and backward).

    ``y_t = sum_{s<=t} (fq_t . fk_s) v_s / sum_{s<=t} fq_t . fk_s``, with an optional state
    carried in from earlier tokens (``S0 = sum fk v^T``, ``z0 = sum fk`` over them).

    Args:
        fq: query features ``[B, H, T, F]`` (non-negative, e.g. a Hedgehog map's output), fp32,
            bf16 or fp16.
        fk: key features ``[B, H, T, F]``.
        v: values ``[B, H, T, Dv]``.
        initial_state: ``(S0 [B, H, F, Dv], z0 [B, H, F])`` (fp32) or None (zeros).
        output_final_state: also return the state after the last token.
        chunk_size: tokens a program takes at a time: 16, 32, 64 (default) or 128.
        key_mask: ``[B, T]`` bool, False for padding keys. Their ``fk`` and ``v`` are set to
            zero (``masked_fill``, before the kernel), so they add nothing to either sum; a
            query that sees no valid key at all gets ``y = 0``.
        output_dtype: dtype of ``y``; default the promoted dtype of ``fq`` and ``v``.
        parallel: the forward in two passes, each chunk's starting state (fp32, ``[B, H, T / C,
            F, Dv]`` in memory), then every chunk's output at once, instead of one walk over the
            chunks; None (default) takes :data:`PARALLEL_FORWARD`, off until measured on a GPU.
            The same results; the backward is the same either way.

    Returns:
        ``(y [B, H, T, Dv], (S [B, H, F, Dv] fp32, z [B, H, F] fp32) or None)``.

    Gradients flow to ``fq``, ``fk``, ``v`` and the initial state (a query that sees no valid key
    passes none). Products take fp32 operands unless an input is bf16; then bf16 operands, with
    every fp32 operand whose product cancels later (the state, the normaliser) split into two
    bf16 halves; accumulation and state are fp32 either way (see the module docstring).
    ``F <= 256`` and ``Dv <= 256``. Denominators are clamped at 1e-30 as in the reference.
    ``chunk_size`` only sets how the work is cut (the result is the same); it is an upper bound:
    with ``F > 128`` the kernels take at most 32 tokens at a time, with fp32 products 16, so that
    a program's tiles stay in registers.

    Example::

        fq = torch.rand(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
        fk = torch.rand_like(fq)
        v = torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
        y, (S, z) = chunk_linear_attention(fq, fk, v, output_final_state=True)
    """
    if fq.dim() != 4 or fk.shape != fq.shape:
        raise ValueError(f"fq and fk must both be [B, H, T, F]; got {tuple(fq.shape)} and {tuple(fk.shape)}")
    B, H, T, F = fq.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be [B, H, T, Dv] = [{B}, {H}, {T}, Dv]; got {tuple(v.shape)}")
    if F > MAX_FEATURES or v.shape[-1] > MAX_VALUE_DIM:
        raise ValueError(f"at most {MAX_FEATURES} features and {MAX_VALUE_DIM} value channels; got F={F}, Dv={v.shape[-1]}")
    for name, x in (("fq", fq), ("fk", fk), ("v", v)):
        if x.dtype not in _DOT_DTYPES:
            raise ValueError(f"{name} must be fp32, bf16 or fp16; got {x.dtype}")
    _check_chunk(chunk_size)
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = initial_state
        if S0.shape != (B, H, F, v.shape[-1]) or z0.shape != (B, H, F):
            raise ValueError(
                f"initial_state must be (S [B, H, F, Dv], z [B, H, F]) = ([{B}, {H}, {F}, {v.shape[-1]}], "
                f"[{B}, {H}, {F}]); got ({tuple(S0.shape)}, {tuple(z0.shape)})"
            )
    if key_mask is not None:
        if key_mask.shape != (B, T):
            raise ValueError(f"key_mask must be [B, T] = [{B}, {T}]; got {tuple(key_mask.shape)}")
        pad = ~key_mask.bool()[:, None, :, None]
        fk, v = fk.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    if T == 0:
        y = v.new_zeros(B, H, 0, v.shape[-1], dtype=output_dtype or torch.promote_types(fq.dtype, v.dtype))
        if not output_final_state:
            return y, None
        if S0 is None:
            S0, z0 = fq.new_zeros(B, H, F, v.shape[-1], dtype=torch.float32), fq.new_zeros(B, H, F, dtype=torch.float32)
        return y, (S0.float(), z0.float())
    y, S, z = ChunkLinearAttentionFunction.apply(fq, fk, v, S0, z0, output_final_state, chunk_size, output_dtype,
                                                 parallel)
    return y, ((S, z) if output_final_state else None)
