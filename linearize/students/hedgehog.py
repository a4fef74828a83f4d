"""Hedgehog: linear attention whose feature maps are trained to mimic softmax.

Zhang, Bhatia, Kumbong, Ré, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry", ICLR 2024 (arXiv 2402.04347).

    y_t = sum_{s<=t} phi_q(q_t).phi_k(k_s) v_s / sum_{s<=t} phi_q(q_t).phi_k(k_s)       (Sec. 3, Eq. 2)
    phi(x) = [softmax(x W), softmax(-x W)]                                               (Sec. 4.2, Eq. 5)

The section and equation numbers could not be checked against the paper's text; the math was
checked against the LoLCATs code, which uses this map (HazyResearch/lolcats:
``src/model/feature_map.py`` for ``phi``, ``src/model/linear_attention/linear_attention.py`` for
the attention). Separate maps for queries and keys (``tie_qk_kernels: false`` in its configs:
the key map is a deep copy of the query map), one ``W: [head_dim, F]`` per head, identity at
initialisation (``--lk_zero_init``); applied after RoPE and after the key/value heads are
expanded for GQA (``process_qkv`` rotates and repeats, then the feature maps run). The parallel
form is the chunked linear attention of ``linearize.kernels`` with no window; the recurrent
form carries ``S = sum phi(k) v^T`` and ``z = sum phi(k)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..feature_maps import build_feature_map
from ..kernels import feature_map_attention, naive_hybrid_attention
from .base import Student


@dataclass
class HedgehogConfig:
    feature_map: str = "hedgehog"  # hedgehog | npmap | elu | relu
    feature_dim: int | None = None  # F (the map outputs 2F features); default: the head size


class HedgehogStudent(Student):
    kind = "hedgehog"
    Config = HedgehogConfig

    def __init__(self, attn, adapter, config, layer_idx):
        super().__init__(attn, adapter, config, layer_idx)
        self.feature_map_q = build_feature_map(config.feature_map, self.num_heads, self.head_dim, config.feature_dim)
        self.feature_map_k = copy.deepcopy(self.feature_map_q)

    window = 0
    sinks = 0

    def window_factor(self):
        return None

    def attend(self, q, k, v, key_mask, state, output_state):
        # phi_q(q), phi_k(k), then the attention; with LINEARIZE_KERNELS=triton-fused and no window
        # the maps run inside the attention kernel (see linearize.kernels.feature_map_attention)
        return feature_map_attention(
            q, k, v, self.feature_map_q, self.feature_map_k, self.window_factor(), self.window, self.scaling,
            key_mask=key_mask, state=state, output_state=output_state, form=self.form, sinks=self.sinks,
        )

    def attention_weights(self, q, k, key_mask):
        fq, fk = self.feature_map_q(q.float()), self.feature_map_k(k.float())
        _, weights = naive_hybrid_attention(q, k, k, fq, fk, self.window_factor(), self.window, self.scaling, key_mask, self.sinks)
        return weights
