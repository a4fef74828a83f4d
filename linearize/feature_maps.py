"""Feature maps ``phi`` for linear attention: the trainable Hedgehog map and simple baselines.

Hedgehog (Zhang et al., "The Hedgehog & the Porcupine", ICLR 2024, arXiv 2402.04347, Sec. 4.2
Eq. 5; as used by LoLCATs, arXiv 2410.10254, Sec. 3.1; these section and equation numbers could
not be checked against the papers' text): per head ``z = x W_h`` with ``W_h: [head_dim, F]`` and
no bias, then ``phi(x) = [softmax(z), softmax(-z)]`` over the feature dimension, so ``2F``
features. This is the LoLCATs code's map (HazyResearch/lolcats, ``src/model/feature_map.py``:
``FeatureMapMLP`` of kind ``untied_head_einsum`` followed by ``SoftmaxDim``, whose output it
also clamps at ``1e-12``, which we do not). ``W_h`` starts as a (rectangular) identity, so at
initialisation ``phi`` is the softmax of the raw query/key coordinates and their negatives:
LoLCATs' ``zero_init`` (``eye_``), which the commands in its README turn on with
``--lk_zero_init`` (its configs alone leave ``W_h`` Kaiming-uniform). The map is applied after
RoPE and after the key heads are expanded for GQA (LoLCATs' ``process_qkv`` rotates, then
repeats the kv heads, then the feature maps run), so every query head has its own map.

NP-Map (STILL, arXiv 2602.02180; code ZacharyMeng/STILL): a norm-preserving variant of the
Hedgehog map; see :class:`NPMapFeatureMap`.

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


@register_feature_map("npmap")
class NPMapFeatureMap(nn.Module):
    """NP-Map, the Norm-Preserved Feature Map of STILL (Meng et al., arXiv 2602.02180):

        r = ||x||                                    (the pretrained query/key norm)
        u = f(H_h x) / ||f(H_h x)|| * r              (direction learned, norm kept)
        phi(x) = [softmax(u), softmax(-u)]

    per head ``h``, where ``H_h = I - 2 w_h w_h^T / ||w_h||^2`` is a learnable Householder
    reflection and ``f`` a linear map ``[head_dim, F]`` without bias. Because ``||u|| = ||x||``,
    the norm the teacher learned decides how peaked the softmax features are, while ``H_h`` and
    ``f`` only turn their direction.

    Sources: the STILL README describes NP-Map as decoupling "feature direction from magnitude"
    and reinjecting "pretrained norms into Linear Attention feature maps", with ``f`` "the
    learnable MLP in the feature map" (its equation is an image, which could not be read, and
    the body of the paper could not be read either, so no section or equation number is cited).
    The formula above is what the public code computes (``still/models/still/modeling_still.py``,
    ``StillHedgehogFeatureMap``: ``r = ||x||``, ``normalize(mlp(hh(x))) * r``, then the two
    softmaxes), with ``hh`` one Householder reflection per head (``x - 2 (x.u) u``, ``u`` a
    normalised ``randn`` vector) and ``mlp`` one ``Linear(head_dim, feature_dim, bias=False)``
    per head (``feature_dim = 128``, the head size of its Llama-3.1-8B teacher). ``x`` is the
    query or key after RoPE and the GQA expansion; RoPE rotates pairs of coordinates, so
    ``||x||`` is the same before and after it.

    ``||u|| = ||x||`` holds for every value of the parameters, wherever ``f(H_h x) != 0``: the
    norm is put back by construction, not by the initialisation. With ``f`` at its identity
    initialisation (``F = head_dim``) the map is moreover exactly ``u = H_h x``, the Hedgehog map
    of the reflected ``x`` (``tests/test_feature_maps.py`` asserts both). Choices where the
    sources leave room:

    * the reflection acts first, then ``f`` (the code's ``mlp(hh(x))``);
    * ``f`` starts as the (rectangular) identity, as our Hedgehog map does; the public code's
      ``StillHedgehogFeatureMap`` builds its ``FeatureMapMLP`` with ``zero_init=False``, i.e.
      Kaiming-uniform weights (the identity is its ``zero_init`` option, not its default). The
      reflection vectors ``w_h`` start random normal as in the code (no reflection is the
      identity, and any one is orthogonal, so the choice does not affect the norm);
    * ``||f(H x)||`` is clamped below at ``1e-12`` (an all-zero input maps to ``u = 0``, i.e.
      uniform features), as the code's ``normalize`` does; the code also clamps the features at
      ``1e-12``, which we do not (softmax outputs are already positive), and normalises ``w_h``
      with ``eps = 1e-6`` where we use ``1e-12`` (only a zero ``w_h`` tells them apart).
    """

    eps = 1e-12

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        self.feature_dim = feature_dim or head_dim
        self.reflection = nn.Parameter(torch.empty(num_heads, head_dim))
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, self.feature_dim))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            nn.init.normal_(self.reflection)
            for w in self.weight:
                nn.init.eye_(w)

    @property
    def feature_size(self) -> int:
        return 2 * self.feature_dim

    def reflect(self, x: torch.Tensor) -> torch.Tensor:
        """``H_h x = x - 2 (x.w_h) w_h`` with ``w_h`` normalised: ``[B, H, T, D] -> [B, H, T, D]``."""
        w = torch.nn.functional.normalize(self.reflection, dim=-1, eps=self.eps)  # [H, D]
        proj = torch.einsum("bhtd,hd->bht", x, w)
        return x - 2.0 * proj[..., None] * w[None, :, None, :]

    def directions(self, x: torch.Tensor) -> torch.Tensor:
        """``u`` of the docstring: ``[B, H, T, F]`` with ``||u|| = ||x||`` row by row."""
        x = x.to(self.weight.dtype)
        z = torch.einsum("bhtd,hdf->bhtf", self.reflect(x), self.weight)
        return torch.nn.functional.normalize(z, dim=-1, eps=self.eps) * x.norm(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.directions(x)
        return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)


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
