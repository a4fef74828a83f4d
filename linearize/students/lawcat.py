"""LAWCAT: linear attention with a causal convolution across tokens and data-dependent decay.

Liu et al., "LAWCAT: Efficient Distillation from Quadratic to Linear Attention with
Convolution across Tokens for Long Context Modeling" (arXiv 2509.18467; public code
zeyuliu1037/LAWCAT, which was not available to check against here, nor the paper's equation
numbers: the math below is the project design's reading of the paper). Per layer, from the
teacher's projections (Qwen3's ``q_norm``/``k_norm`` kept, **no RoPE** on this path):

    q~ = conv_q(q),  k~ = conv_k(k)           causal depthwise conv1d over tokens, kernel 4, no bias,
                                              on queries and keys only (not values), after the
                                              kv heads are expanded for GQA
    log alpha_t = logsigmoid(W_up W_down x_t + b) / 16      GLA-style decay, a vector per key
                                              feature channel per head (low rank 16)
    S_t = diag(alpha_t) S_{t-1} + phi_k(k~_t) [v_t, 1]^T     the ones column carries the normaliser
    y_t = (phi_q(q~_t)^T S_t)[:D] / (phi_q(q~_t)^T S_t)[D]

with ``phi`` any registered feature map (Hedgehog by default). The paper applies the *same*
map to queries and keys, so that ``phi(q).phi(k)`` is one kernel (read from a public summary of
its method section; the code was not available to confirm), so by default ``phi_q`` and
``phi_k`` are one module; ``tie_feature_maps: false`` gives separate maps, k's starting as a
copy of q's, as Hedgehog and LoLCATs do. The recurrence and its three forms live in
:mod:`linearize.kernels.gated`. The decode state is the gated ``S`` plus the last ``K - 1 = 3``
inputs of each convolution (:class:`LawcatState`).

Choices, where the sources leave room (say so rather than guess silently):

* the convolutions start at the identity (last tap 1, all others exactly 0), so at
  initialisation the feature maps see the teacher's unrotated q and k;
* the decay is ``x -> Linear(hidden, 16, no bias) -> Linear(16, H * F_phi, bias)`` on the
  attention module's input, as GLA's ``gk_proj``; both layers keep PyTorch's default
  initialisation (the decay starts data-dependent, about ``sigmoid(0)^(1/16) ~ 0.96`` per step);
* padding keys (``key_mask`` False) contribute nothing anywhere: their q/k inputs are zeroed
  before the convolutions (so they never leak into a later token's conv window), their features
  and values are zeroed, and they do not decay the state;
* the attention is computed in fp32; queries are not scaled (the normaliser makes the scale
  irrelevant for positive features).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..feature_maps import build_feature_map
from ..kernels import GatedState, gated_attention, naive_gated_attention
from .base import Student


@dataclass
class LawcatConfig:
    feature_map: str = "hedgehog"  # any registered feature map
    feature_dim: int | None = None  # F (hedgehog/npmap output 2F features); default: the head size
    tie_feature_maps: bool = True  # one map for q and k (the paper's kernel); false: separate maps
    conv_size: int = 4  # kernel of the token convolution on q and k
    decay_rank: int = 16  # rank of the decay projection
    decay_normaliser: float = 16.0  # log alpha = logsigmoid(.) / this
    chunk_size: int = 16  # chunk length of the parallel form


@dataclass
class LawcatState:
    """A LAWCAT layer's decode state: the gated ``S`` and the last ``K - 1`` conv inputs."""

    attn: GatedState
    conv_q: torch.Tensor  # [B, H, K-1, D] fp32: the last inputs of the query convolution
    conv_k: torch.Tensor  # [B, H, K-1, D] fp32: the same for the keys (kv heads expanded)

    def map(self, fn) -> "LawcatState":
        return LawcatState(attn=self.attn.map(fn), conv_q=fn(self.conv_q), conv_k=fn(self.conv_k))

    def nbytes(self) -> int:
        return self.attn.nbytes() + self.conv_q.nbytes + self.conv_k.nbytes


def causal_conv(x: torch.Tensor, weight: torch.Tensor, history: torch.Tensor | None):
    """Depthwise causal convolution over tokens. ``x: [B, H, T, D]``, ``weight: [H, D, K]``
    (tap ``K-1`` multiplies the current token), ``history: [B, H, K-1, D]`` (the inputs before
    ``x``, zeros at the start). Returns ``(y [B, H, T, D], new history)``."""
    B, H, T, D = x.shape
    K = weight.shape[-1]
    if history is None:
        history = x.new_zeros(B, H, K - 1, D)
    xp = torch.cat([history, x], 2)  # [B, H, K-1+T, D]
    y = sum(xp[:, :, i : i + T] * weight[None, :, None, :, i] for i in range(K))
    return y, xp[:, :, xp.shape[2] - (K - 1) :]


class LawcatStudent(Student):
    kind = "lawcat"
    Config = LawcatConfig
    rotary = False

    def __init__(self, attn, adapter, config, layer_idx):
        super().__init__(attn, adapter, config, layer_idx)
        if config.conv_size < 1 or config.decay_rank < 1 or config.decay_normaliser <= 0:
            raise ValueError("lawcat needs conv_size >= 1, decay_rank >= 1 and decay_normaliser > 0")
        H, D, K = self.num_heads, self.head_dim, config.conv_size
        self.feature_map_q = build_feature_map(config.feature_map, H, D, config.feature_dim)
        self.feature_map_k = self.feature_map_q if config.tie_feature_maps else copy.deepcopy(self.feature_map_q)
        self.conv_q = nn.Parameter(torch.zeros(H, D, K))
        self.conv_k = nn.Parameter(torch.zeros(H, D, K))
        with torch.no_grad():  # identity: the current token's tap is 1, the rest 0
            self.conv_q[..., -1] = 1.0
            self.conv_k[..., -1] = 1.0
        hidden = attn.config.hidden_size
        self.decay_down = nn.Linear(hidden, config.decay_rank, bias=False)
        self.decay_up = nn.Linear(config.decay_rank, H * self.feature_map_q.feature_size, bias=True)
        self._inputs = None

    def forward(self, hidden_states, *args, **kwargs):
        self._inputs = hidden_states  # the decay reads the module's input
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._inputs = None

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """``log alpha: [B, H, T, F_phi]`` from the module input ``x: [B, T, hidden]``."""
        B, T, _ = x.shape
        x = x.to(self.decay_down.weight.dtype)
        g = torch.nn.functional.logsigmoid(self.decay_up(self.decay_down(x))) / self.settings.decay_normaliser
        return g.view(B, T, self.num_heads, -1).transpose(1, 2)

    def _features(self, q, k, key_mask, state):
        """Mask, convolve, map. Returns ``(fq, fk, new conv_q history, new conv_k history)``."""
        q, k = q.float(), k.float()
        if key_mask is not None:  # padding must not reach a later token through the conv
            pad = ~key_mask.bool()[:, None, :, None]
            q, k = q.masked_fill(pad, 0.0), k.masked_fill(pad, 0.0)
        q, hq = causal_conv(q, self.conv_q, None if state is None else state.conv_q)
        k, hk = causal_conv(k, self.conv_k, None if state is None else state.conv_k)
        return self.feature_map_q(q), self.feature_map_k(k), hq, hk

    def attend(self, q, k, v, key_mask, state, output_state):
        if self._inputs is None:
            raise RuntimeError("LawcatStudent.attend needs the module input; call the module itself")
        fq, fk, hq, hk = self._features(q, k, key_mask, state)
        g = self.log_decay(self._inputs)
        y, attn_state = gated_attention(
            fq, fk, v, g, key_mask,
            state=None if state is None else state.attn,
            output_state=output_state, form=self.form, chunk_size=self.settings.chunk_size,
        )
        if not output_state:
            return y, None
        return y, LawcatState(attn=attn_state, conv_q=hq, conv_k=hk)

    def attention_weights(self, q, k, key_mask):
        if self._inputs is None:
            raise RuntimeError("LawcatStudent.attention_weights needs the module input; call the module itself")
        fq, fk, _, _ = self._features(q, k, key_mask, None)
        _, weights = naive_gated_attention(fq, fk, fk[..., :1], self.log_decay(self._inputs), key_mask)
        return weights
