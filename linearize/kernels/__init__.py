"""Attention kernels and their PyTorch references.

Students call :func:`hybrid_attention` (or :func:`gated_attention`, for decayed linear
attention); it picks the form (chunked for prefill and training,
the recurrent step for decoding) and, where one exists, a fused kernel on CUDA.
Set ``LINEARIZE_KERNELS=reference`` to force the PyTorch reference everywhere.
"""

from __future__ import annotations

import os

from .gated import (
    GatedState,
    chunk_gated_attention,
    gated_step,
    naive_gated_attention,
    recurrent_gated_attention,
)
from .hybrid import (
    HybridState,
    chunk_hybrid_attention,
    hybrid_step,
    naive_hybrid_attention,
    recurrent_hybrid_attention,
)

__all__ = [
    "GatedState",
    "gated_attention",
    "chunk_gated_attention",
    "gated_step",
    "naive_gated_attention",
    "recurrent_gated_attention",
    "HybridState",
    "hybrid_attention",
    "chunk_hybrid_attention",
    "hybrid_step",
    "naive_hybrid_attention",
    "recurrent_hybrid_attention",
]

FORMS = ("auto", "chunk", "recurrent", "naive")


def hybrid_attention(
    q, k, v, fq, fk, gamma, window, scale, key_mask=None, state=None, output_state=False, form="auto", chunk_size=64,
    sinks=0,
):
    """Sliding-window + linear attention. ``q, k: [B, H, T, Dk]``, ``v: [B, H, T, Dv]``,
    ``fq, fk: [B, H, T, F]``, ``gamma: [H]`` or None when ``window == 0``, ``key_mask: [B, T]``,
    ``sinks``: how many first tokens always take softmax terms.

    Returns ``(y [B, H, T, Dv] fp32, state or None)``. ``form`` is one of ``auto`` (the
    recurrent step for a single token with a state, chunked otherwise), ``chunk``,
    ``recurrent`` or ``naive`` (quadratic; no state in or out).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if os.environ.get("LINEARIZE_FORM") in FORMS[1:] and form == "auto":
        form = os.environ["LINEARIZE_FORM"]
    T = q.shape[2]
    if form == "auto":
        form = "recurrent" if (T == 1 and state is not None) else "chunk"
    if form == "naive":
        if state is not None or output_state:
            raise ValueError("the naive form takes and returns no state; use form='chunk' or 'recurrent'")
        y, _ = naive_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask, sinks)
        return y, None
    if form == "recurrent":
        y, state = recurrent_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask, state, sinks)
        return y, (state if output_state else None)
    return chunk_hybrid_attention(
        q, k, v, fq, fk, gamma, window, scale, key_mask, state, chunk_size=chunk_size, output_state=output_state,
        sinks=sinks,
    )


def _pick_form(form, T, state):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if os.environ.get("LINEARIZE_FORM") in FORMS[1:] and form == "auto":
        form = os.environ["LINEARIZE_FORM"]
    if form == "auto":
        form = "recurrent" if (T == 1 and state is not None) else "chunk"
    return form


def gated_attention(fq, fk, v, g, key_mask=None, state=None, output_state=False, form="auto", chunk_size=16):
    """Normalised linear attention with per-channel decay ``exp(g)``. ``fq, fk, g: [B, H, T, F]``
    (``g <= 0``), ``v: [B, H, T, Dv]``, ``key_mask: [B, T]``.

    Returns ``(y [B, H, T, Dv] fp32, GatedState or None)``; ``form`` as for
    :func:`hybrid_attention`. Only the PyTorch reference exists so far.
    """
    form = _pick_form(form, fq.shape[2], state)
    if form == "naive":
        if state is not None or output_state:
            raise ValueError("the naive form takes and returns no state; use form='chunk' or 'recurrent'")
        y, _ = naive_gated_attention(fq, fk, v, g, key_mask)
        return y, None
    if form == "recurrent":
        y, state = recurrent_gated_attention(fq, fk, v, g, key_mask, state)
        return y, (state if output_state else None)
    return chunk_gated_attention(fq, fk, v, g, key_mask, state, chunk_size=chunk_size, output_state=output_state)
