"""Sliding-window + linear attention with one shared normaliser (LoLCATs Eq. 7; W = 0 is plain
linear attention). See ``reference.py`` for the math and ``README.md`` for the recurrence.

This package exports the PyTorch reference; the Triton kernels live in ``chunk.py`` and
``recurrent.py`` (importing those needs ``triton``) and are reached through
:func:`linearize.kernels.hybrid_attention`."""

from .reference import (
    HybridState,
    chunk_hybrid_attention,
    hybrid_step,
    naive_hybrid_attention,
    recurrent_hybrid_attention,
)

__all__ = [
    "HybridState",
    "chunk_hybrid_attention",
    "hybrid_step",
    "naive_hybrid_attention",
    "recurrent_hybrid_attention",
]
