"""Gated (GLA-style, per-channel data-dependent decay) normalised linear attention, as LAWCAT
uses it. See ``reference.py`` for the math."""

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
