"""Normalised causal linear attention in Triton: the chunked kernel (forward and backward), the
same with the Hedgehog / NP-Map feature map computed inside it (``fused.py``), and the fused
decode step. See ``README.md`` for the recurrence; the PyTorch oracle is
:mod:`linearize.kernels.hybrid` with ``window=0``. Importing this package needs ``triton``."""

from .chunk import chunk_linear_attention
from .fused import fused_map_linear_attention
from .recurrent import linear_step

__all__ = ["chunk_linear_attention", "fused_map_linear_attention", "linear_step"]
