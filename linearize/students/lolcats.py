"""LoLCATs: sliding-window softmax attention plus Hedgehog linear attention, one normaliser.

Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models", ICLR 2025
(arXiv 2410.10254), Sec. 3.3.1, Eq. 7: for query ``t`` the last ``W`` keys (``t-W < s <= t``)
use softmax terms ``gamma * exp(q.k/sqrt(d) - m_t)``, all earlier keys linear terms
``phi(q).phi(k)``, and a single denominator sums both:

    y_t = (sum_win gamma exp(q_t.k_s/sqrt(d) - m_t) v_s + sum_lin phi(q_t).phi(k_s) v_s)
        / (sum_win gamma exp(q_t.k_s/sqrt(d) - m_t)     + sum_lin phi(q_t).phi(k_s))

``m_t`` is the largest window score (the max of the softmax terms only), ``gamma = sigmoid(w)``
with one ``w`` per head, initialised so that ``gamma = 0.1``, trained during attention transfer
with the feature maps. The paper's window is 64 tokens.

The section and equation numbers could not be checked against the paper's text; the math was
checked against the public code (HazyResearch/lolcats,
``src/model/linear_attention/linear_window_attention_sw.py``, ``hybrid_attention_quadratic``,
with the configs ``configs/model/*_wsw64_fd64_w01.yaml``): window ``t - 64 < s <= t``, softmax
scores ``q.k/sqrt(d)`` masked outside it and reduced by their own max, times
``sigmoid(window_factors)`` (one per head, initialised at ``-2.1972``, i.e. ``0.1``), linear
terms for ``s <= t - 64`` with factor 1 (``affine_attention_factors: false``), one denominator.
Most configs of that repository (``*_wtk64_*``) use the "terracing" window arrangement of
``linear_window_attention_tk.py`` instead; this is the plain sliding-window variant.

``sink_size = n > 0`` (not in the paper; off by default) also keeps the first ``n`` real tokens
of the sequence in the softmax terms for every query, as StreamingLLM does (Xiao et al.,
"Efficient Streaming Language Models with Attention Sinks", ICLR 2024, arXiv 2309.17453):
pretrained models park much of their attention on the first token, a spike the feature maps of
a linear term cannot reproduce. The decode state holds those ``n`` keys/values in fixed slots.

Decoding keeps the last ``W`` raw keys/values and folds each into ``S, z`` as it leaves the
window: the decode window is the training window, by construction (one function in
``linearize.kernels`` serves both forms). With ``W`` at least the sequence length, the
student computes exactly the teacher's softmax attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .hedgehog import HedgehogConfig, HedgehogStudent


@dataclass
class LolcatsConfig(HedgehogConfig):
    window_size: int = 64  # W: the current token and the W-1 before it use softmax
    window_factor_init: float = 0.1  # gamma at initialisation
    sink_size: int = 0  # n: the first n real tokens always use softmax terms (0: as in the paper)


class LolcatsStudent(HedgehogStudent):
    kind = "lolcats"
    Config = LolcatsConfig

    def __init__(self, attn, adapter, config, layer_idx):
        super().__init__(attn, adapter, config, layer_idx)
        if config.window_size < 1:
            raise ValueError(f"lolcats needs window_size >= 1 (got {config.window_size}); use 'hedgehog' for none")
        if not 0.0 < config.window_factor_init < 1.0:
            raise ValueError(f"window_factor_init must lie in (0, 1), got {config.window_factor_init}")
        if config.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {config.sink_size}")
        self.window = config.window_size
        self.sinks = config.sink_size
        p = config.window_factor_init
        self.window_logit = nn.Parameter(torch.full((self.num_heads,), math.log(p / (1 - p))))

    def window_factor(self):
        return torch.sigmoid(self.window_logit)
