"""STILL: exact softmax on the local chunks and on tokens selected by self-saliency, gated
linear attention on the rest, one shared normaliser.

Meng et al., "STILL: Selecting Tokens for Intra-Layer Hybrid Attention to Linearize LLMs",
NeurIPS 2026 (arXiv 2602.02180, https://arxiv.org/abs/2602.02180; code ZacharyMeng/STILL).

Sources: the abstract; the code's README (its Method section, whose two equations, the
Self-Saliency Score and NP-Map, are images that could not be read); and the code itself,
``still/models/still/modeling_still.py`` (``hybrid_causal_swa_kl_div_attention`` for training
and prefill, ``LinearAttentionSlidingWindowCache.update_for_decoding`` for decoding,
``StillHedgehogFeatureMap`` for NP-Map) and ``training/train.py``. The body of the paper could
not be read, so no section or equation numbers are cited. Per head, with ``C = chunk_size`` (64)
real tokens a chunk and ``K = tokens_per_chunk`` (4, the paper's 1/16):

    p_s  = softmax_j(q_s.k_j / sqrt(d)) over W_s = {s and the C - 1 real tokens before it}
    p_s' = the same without the term j = s
    score_s = KL(p_s' || p_s) = -log(1 - p_s[s])      self-saliency
    chunk n, once chunk n+1 is complete: its top-K tokens by score stay exact ("selected"),
                                         the others fold into S = sum phi(k) v^T, z = sum phi(k)
    y_t = (sum_{E_t} exp(q_t.k_s/sqrt(d) - m_t) v_s + g_t * phi(q_t)^T S_t)
        / (sum_{E_t} exp(q_t.k_s/sqrt(d) - m_t)     +       phi(q_t)^T z_t)
    E_t = {s <= t in the current and previous chunk} U {selected tokens},  m_t = max over E_t
    g_t = sigmoid(W_g x_t)                            per value channel, W_g: [hidden, H * D]

``phi`` is any registered feature map: ``hedgehog`` by default, ``npmap`` for the paper's
NP-Map (:class:`linearize.feature_maps.NPMapFeatureMap`); separate maps for q and k, k's
starting as a copy of q's, applied after RoPE and the GQA expansion. The attention itself is
:mod:`linearize.kernels.still`, with a chunked and a recurrent form over one state.

What agrees with the code: chunks of 64 and ``topk_ratio = 1/16`` (4 tokens); a 64-key
self-saliency window (the token's own chunk up to itself and the later part of the chunk
before, scaled by ``1/sqrt(d)``); the top K of every chunk; exact terms for the whole previous
chunk, the current chunk (causal) and the selected tokens of chunks ``<= n - 2``; every other
token of those chunks in an undecayed linear state seen from chunk ``n + 2`` on (the delayed
selection); ``g = sigmoid(g_proj(x))`` with ``g_proj`` a ``Linear(hidden, H * D, bias=False)``
whose weights start at 1, multiplying the linear numerator only; one max ``m_t`` over all exact
scores and one shared denominator; no window factor (the code's ``window_factors`` serve only its
cache-less fallback path); ``feature_map_k`` a deep copy of ``feature_map_q``; a selected-token
cache that grows by K per chunk (``T / 16``). Attention transfer (``still_at``) trains only the
feature maps and ``g_proj``; the second stage (``still_ar``) trains LoRA adapters of rank 8 on
the targets its configuration names (the configurations themselves could not be read). The
README reports, for Llama-3.1-8B and 0.04B training tokens: parity or better with the teacher on
PIQA, ARC, HellaSwag and WinoGrande, up to +10.5% MMLU over earlier linearised models, 86.2% on
long-context benchmarks (RULER, BABILong; "of full-attention performance" in the README, "relative
improvement over prior linearized attention methods" in the abstract), 45% less memory and 28%
faster decoding beyond 8K tokens.

Choices, where the sources leave room (or where we depart from them on purpose):

* **the score**: the README defines it by comparing the window's attention with and without the
  self term, with "a small constant for numerical stability"; the code computes
  ``sum_j a_j log(a_j / (a'_j + eps))`` with ``a`` the with-self and ``a'`` the without-self
  distribution, both smoothed by ``eps = 1e-8`` (and the last window slot of ``a'`` overwritten
  with ``1/C + eps``), i.e. ``KL(a || a')``. We use the other direction, which needs no epsilon:
  ``KL(p' || p) = -log(1 - p_self)`` exactly. Both grow with ``p_self`` (the code's up to its
  smoothing, for ``p_self`` above about ``eps``), so a chunk keeps the same top K except near
  ties; the values differ;
* **one score in both forms**: the code's decoding path scores without ``1/sqrt(d)`` and its
  overwritten slot is the self slot only there, so its prefill and decoding can pick different
  tokens; here one function scores both;
* **budget** (ours): the paper keeps every selected token, so its cache grows by ``T / 16``.
  Here at most ``selected_budget`` (``M``) per head stay exact, in ``M / K`` groups of ``K``:
  chunk ``n`` writes group ``n mod (M / K)``, and the group's previous tokens (chunk
  ``n - M / K``, the oldest selected) fold into ``S, z``: they move from the exact terms to the
  linear ones, never out of the attention. The decode state is then fixed in size. With ``T``
  up to ``(M / K + 2) * C`` no query sees an eviction and the paper's attention is computed exactly;
* the self-saliency window is the chunk size, counted in real tokens; the first real token,
  alone in its window, scores ``+inf`` (the code gets NaN there); ties go to the earlier token;
* the queries of the first chunk attend to real keys only (the code's first chunk also sees
  the 64 empty slots of the missing previous chunk at score 0, in its denominator);
* the gate acts on the query side, on the linear numerator only, from the module input
  ``x_t``, as in the code; at initialisation one token's channels share the gate
  ``sigmoid(sum_i x_ti)``; in SmolLM2-135M these sums reach +-15, so some layers start with the
  gate nearly shut and saturated (mean 0.05 in layer 14 on a sample sentence, 0.7 in layer 0);
* the denominator is clamped at ``1e-30`` where the code adds ``1e-6``;
* padding (``key_mask`` False) is skipped: chunks count real tokens only, and padding is never
  scored, selected or stored.

The attention-weight cross-entropy (``ce_weight``) sees the ungated weights (``g = 1``): with
a per-channel gate the output is not one weighting of the values.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..feature_maps import build_feature_map
from ..kernels import still_attention
from ..kernels.still import check_settings
from .base import Student


@dataclass
class StillConfig:
    feature_map: str = "hedgehog"  # any registered feature map; npmap is the paper's NP-Map
    feature_dim: int | None = None  # F (hedgehog/npmap output 2F features); default: the head size
    chunk_size: int = 64  # C: real tokens a chunk; also the self-saliency window
    tokens_per_chunk: int = 4  # K: tokens each chunk keeps exact (the paper's 1/16 of 64)
    selected_budget: int = 256  # M: selected tokens kept per head (a multiple of K); older ones fold into S, z

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting unless ``1 <= K <= C`` and ``K`` divides ``M``."""
        check_settings(self.chunk_size, self.tokens_per_chunk, self.selected_budget)


class StillStudent(Student):
    kind = "still"
    Config = StillConfig

    def __init__(self, attn, adapter, config, layer_idx):
        super().__init__(attn, adapter, config, layer_idx)
        config.validate()
        H, D = self.num_heads, self.head_dim
        self.feature_map_q = build_feature_map(config.feature_map, H, D, config.feature_dim)
        self.feature_map_k = copy.deepcopy(self.feature_map_q)
        self.gate = nn.Linear(attn.config.hidden_size, H * D, bias=False)
        nn.init.ones_(self.gate.weight)
        self._inputs = None

    def forward(self, hidden_states, *args, **kwargs):
        self._inputs = hidden_states  # the gate reads the module's input
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._inputs = None

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """``g: [B, H, T, D]`` in (0, 1) from the module input ``x: [B, T, hidden]``."""
        B, T, _ = x.shape
        g = torch.sigmoid(self.gate(x.to(self.gate.weight.dtype)))
        return g.view(B, T, self.num_heads, -1).transpose(1, 2)

    def _attention(self, q, k, v, g, key_mask, state, output_state):
        fq, fk = self.feature_map_q(q.float()), self.feature_map_k(k.float())
        s = self.settings
        return still_attention(
            q, k, v, fq, fk, g, self.scaling, key_mask=key_mask, state=state, output_state=output_state,
            form=self.form, chunk_size=s.chunk_size, tokens_per_chunk=s.tokens_per_chunk, budget=s.selected_budget,
            branch_free=self.static_step,
        )

    def attend(self, q, k, v, key_mask, state, output_state):
        if self._inputs is None:
            raise RuntimeError("StillStudent.attend needs the module input; call the module itself")
        return self._attention(q, k, v, self.gate_values(self._inputs), key_mask, state, output_state)

    def attention_weights(self, q, k, key_mask):
        """The ungated weights ``[B, H, T, T]``: the attention applied to one-hot values."""
        B, H, T, _ = q.shape
        eye = torch.eye(T, device=q.device).expand(B, H, T, T)
        weights, _ = self._attention(q, k, eye, torch.ones_like(eye), key_mask, None, False)
        return weights
