"""Fused feature maps in Triton. See ``README.md``; the PyTorch oracles are in
:mod:`linearize.feature_maps`. Importing this package needs ``triton``."""

from .hedgehog import hedgehog_feature_map

__all__ = ["hedgehog_feature_map"]
