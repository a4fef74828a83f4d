"""STILL: exact softmax on the local chunks and on tokens selected by self-saliency, gated
linear attention on the rest, one shared normaliser.

Meng et al., "STILL: Selecting Tokens for Intra-Layer Hybrid Attention to Linearize LLMs"
(arXiv 2602.02180; public code ZacharyMeng/STILL, ``still/models/still/modeling_still.py``).
Neither the paper's full text nor its code could be read here (only its abstract: the
Self-Saliency Score, NP-Map, chunk-wise parallelisation with delayed selection): the math below
is the project design's reading of them. Only NP-Map's section (Sec. 3.2) is known; the other
section and equation numbers could not be checked, so none are given. Per head, with
``C = chunk_size`` (64) real tokens a chunk and ``K = tokens_per_chunk`` (4, the paper's 1/16):

    score_s = KL(p_s' || p_s) = -log(1 - p_s[s])      self-saliency: p_s the softmax
                                                      attention of token s over its C-token sliding
                                                      window, p_s' the same without s's own term
    chunk n, once chunk n+1 is complete: its top-K tokens by score stay exact ("selected"),
                                         the others fold into S = sum phi(k) v^T, z = sum phi(k)
    y_t = (sum_{E_t} exp(q_t.k_s/sqrt(d) - m_t) v_s + g_t * phi(q_t)^T S_t)
        / (sum_{E_t} exp(q_t.k_s/sqrt(d) - m_t)     +       phi(q_t)^T z_t)
    E_t = {s <= t in the current and previous chunk} U {selected tokens},  m_t = max over E_t
    g_t = sigmoid(W_g x_t)                            per value channel, W_g: [hidden, H * D]

``phi`` is any registered feature map: ``hedgehog`` by default, ``npmap`` for the paper's
NP-Map (Sec. 3.2, :class:`linearize.feature_maps.NPMapFeatureMap`); separate maps for q and k,
k's starting as a copy of q's, applied after RoPE and the GQA expansion. The attention itself
is :mod:`linearize.kernels.still`, with a chunked and a recurrent form over one state.

Choices, where the sources leave room (or where we depart from them on purpose):

* **budget** (ours): the paper keeps every selected token, so its cache grows by ``T / 16``.
  Here at most ``selected_budget`` (``M``) per head stay exact, in ``M / K`` groups of ``K``:
  chunk ``n`` writes group ``n mod (M / K)``, and the group's previous tokens (chunk
  ``n - M / K``, the oldest selected) fold into ``S, z``: they move from the exact terms to the
  linear ones, never out of the attention. The decode state is then fixed in size. With ``T``
  up to ``(M / K + 2) * C`` no query sees an eviction and the paper's attention is computed exactly;
* the self-saliency window is the chunk size, counted in real tokens (the first real token,
  alone in its window, scores ``+inf``); ties go to the earlier token;
* the gate acts on the query side, on the linear numerator only (the denominator is shared
  and ungated), from the module input ``x_t``; ``W_g`` has no bias and starts all ones, as the
  design records for the paper's ``g_proj`` (so at initialisation one token's channels share
  the gate ``sigmoid(sum_i x_ti)``; in SmolLM2-135M these sums reach +-15, so some layers start
  with the gate nearly shut and saturated: mean 0.05 in layer 14 on a sample sentence, 0.7 in
  layer 0);
* there is no window factor (LoLCATs' ``gamma``): exact and linear terms enter the normaliser
  as they are, with ``m_t`` the max over the exact scores only;
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
