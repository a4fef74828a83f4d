"""Feature maps ``phi`` for linear attention: the trainable Hedgehog map and simple baselines.

Hedgehog (Zhang et al., "The Hedgehog & the Porcupine", ICLR 2024, Sec. 4.2 Eq. 5; as used by
LoLCATs, arXiv 2410.10254, Sec. 3.1): per head ``z = x W_h`` with ``W_h: [head_dim, F]`` and no
bias, then ``phi(x) = [softmax(z), softmax(-z)]`` over the feature dimension, so ``2F`` features.
``W_h`` starts as a (rectangular) identity, so at initialisation ``phi`` is the softmax of the
raw query/key coordinates and their negatives. The map is applied after RoPE and after the key
heads are expanded for GQA, so every query head has its own map.

Every map takes ``x: [B, H, T, D]`` and returns ``[B, H, T, feature_size]``.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_MAPS: dict[str, type[nn.Module]] = {}


def register_feature_map(name: str):
    def wrap(cls):
        cls.name = name
        FEATURE_MAPS[name] = cls
        return cls

    return wrap


@register_feature_map("hedgehog")
class HedgehogFeatureMap(nn.Module):
    """``phi(x) = [softmax(x W_h), softmax(-x W_h)]`` per head, ``W_h`` initialised to identity."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.feature_dim = feature_dim or head_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, self.feature_dim))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            for w in self.weight:
                nn.init.eye_(w)

    @property
    def feature_size(self) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bhtd,hdf->bhtf", x.to(self.weight.dtype), self.weight)  # [B, H, T, F]
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


@register_feature_map("elu")
class EluFeatureMap(nn.Module):
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al., 2020): a fixed baseline with no parameters."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim

    @property
    def feature_size(self) -> int:
        return self.head_dim

    def forward(self, x):
        return torch.nn.functional.elu(x) + 1


@register_feature_map("relu")
class ReluFeatureMap(EluFeatureMap):
    """``phi(x) = relu(x)``: a fixed baseline with no parameters."""

    def forward(self, x):
        return torch.relu(x)


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int | None = None) -> nn.Module:
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; choose one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim)
