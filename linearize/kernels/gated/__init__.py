"""Gated (GLA-style, per-channel data-dependent decay) normalised linear attention, as LAWCAT
uses it. See ``reference.py`` for the math. The Triton kernels (``chunk.py``: chunked forward and
backward, ``recurrent.py``: the decode step) are not imported here, so that the reference needs no
``triton``; :func:`linearize.kernels.gated_attention` reaches them."""

from .reference import (
    GatedState,
    chunk_gated_attention,
    gated_step,
    naive_gated_attention,
    recurrent_gated_attention,
)

__all__ = [
    "GatedState",
    "chunk_gated_attention",
    "gated_step",
    "naive_gated_attention",
    "recurrent_gated_attention",
]
