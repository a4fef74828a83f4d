"""STILL's hybrid attention: exact softmax on the current and previous chunk and on the tokens
each chunk selects by self-saliency, gated linear attention on the rest. See ``reference.py``."""

from .reference import (
    StillState,
    check_settings,
    chunk_still_attention,
    recurrent_still_attention,
    self_saliency,
    still_step,
)

__all__ = [
    "StillState",
    "check_settings",
    "chunk_still_attention",
    "recurrent_still_attention",
    "self_saliency",
    "still_step",
]
