"""Attention kernels and their PyTorch references.

Students call :func:`hybrid_attention`; it picks the form (chunked for prefill and training,
the recurrent step for decoding) and, where one exists, a fused kernel on CUDA.
Set ``LINEARIZE_KERNELS=reference`` to force the PyTorch reference everywhere.
"""

from __future__ import annotations

import os

from .hybrid import (
    HybridState,
    chunk_hybrid_attention,
    hybrid_step,
    naive_hybrid_attention,
    recurrent_hybrid_attention,
)

__all__ = [
    "HybridState",
    "hybrid_attention",
    "chunk_hybrid_attention",
    "hybrid_step",
    "naive_hybrid_attention",
    "recurrent_hybrid_attention",
]

FORMS = ("auto", "chunk", "recurrent", "naive")


def hybrid_attention(
    q, k, v, fq, fk, gamma, window, scale, key_mask=None, state=None, output_state=False, form="auto", chunk_size=64
):
    """Sliding-window + linear attention. ``q, k: [B, H, T, Dk]``, ``v: [B, H, T, Dv]``,
    ``fq, fk: [B, H, T, F]``, ``gamma: [H]`` or None when ``window == 0``, ``key_mask: [B, T]``.

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
        y, _ = naive_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask)
        return y, None
    if form == "recurrent":
        return recurrent_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask, state)
    return chunk_hybrid_attention(
        q, k, v, fq, fk, gamma, window, scale, key_mask, state, chunk_size=chunk_size, output_state=output_state
    )
