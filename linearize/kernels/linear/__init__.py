"""Normalised causal linear attention in Triton: the chunked kernel (forward and backward) and the
fused decode step. See ``README.md`` for the recurrence; the PyTorch oracle is
:mod:`linearize.kernels.hybrid` with ``window=0``. Importing this package needs ``triton``."""

from .chunk import chunk_linear_attention
from .recurrent import linear_step

__all__ = ["chunk_linear_attention", "linear_step"]
