"""LAWCAT: linear attention with a causal convolution across tokens and data-dependent decay.

Liu et al., "LAWCAT: Efficient Distillation from Quadratic to Linear Attention with
Convolution across Tokens for Long Context Modeling", EMNLP 2025 Findings (arXiv 2509.18467,
https://arxiv.org/html/2509.18467v2; official code zeyuliu1037/LAWCAT).

Sources, and what each one settles:

* the abstract (v2): causal Conv1D layers for local dependencies and *normalised* gated linear
  attention for generalisation across context lengths; Mistral-7B distilled on 1K-token
  sequences keeps over 90% passkey retrieval up to 22K tokens; a Llama3.2-1B student is
  evaluated on S-NIAH 1/2/3 (1K-8K) and BABILong QA2/QA3 (0K-16K) with under 0.1% of the
  pre-training tokens; prefill is faster than FlashAttention-2 beyond 8K tokens;
* a public summary of the method section (themoonlight.io review of the paper): one causal
  depthwise Conv1D of kernel size ``r + 1`` (4 in practice) for the queries and one for the
  keys, ``q~_t = f_theta(q_{t-r}, ..., q_t)``, a plain weighted moving average with no
  activation between it and the feature map, and one feature map shared by queries and keys so
  that ``phi(q).phi(k)`` is a single kernel;
* a public copy of the LAWCAT code (``src/model/linear_attention/linear_window_attention_sw_gla.py``,
  class ``GLASlidingWindowAttention``, "LAWCAT attention combining Conv1d and GLA", built on the
  LoLCATs code and flash-linear-attention's GLA kernels), for what is listed under "What agrees
  with the code" below;
* the published training command (``distill_llama.py --model_config
  distill_llama3_2_1b_wsw0_fd32_gla_woCV_rep1_woSiLU_map2_idt_norm_ins_QK --distill_config
  distill_passkey_1208_xent0_mse1000_lr1e-2 --finetune_config finetune_lora_qkvo_passkey_1208
  --lk_zero_init``), known only as quoted by third parties.

The body of the paper could not be read, so no section or equation numbers are cited; nor could
the official repository itself.

Per layer, from the teacher's projections (Qwen3's ``q_norm``/``k_norm`` kept, **no RoPE** on
this path):

    q~ = conv_q(q),  k~ = conv_k(k)           causal depthwise conv1d over tokens, kernel 4, no bias,
                                              on queries and keys only (not values), after the
                                              kv heads are expanded for GQA
    log alpha_t = logsigmoid(W_up W_down x_t + b) / 16      GLA-style decay, a vector over the
                                              feature channels per kv head, shared by the
                                              query heads of its group (rank 16)
    S_t = diag(alpha_t) S_{t-1} + phi_k(k~_t) [v_t, 1]^T     the ones column carries the normaliser
    y_t = (phi_q(q~_t)^T S_t)[:D] / (phi_q(q~_t)^T S_t)[D]

with ``phi`` any registered feature map (Hedgehog by default), one module for queries and keys
by default (``tie_feature_maps: false`` gives separate maps, k's starting as a copy of q's, as
Hedgehog and LoLCATs do). The recurrence and its three forms live in
:mod:`linearize.kernels.gated`. The decode state is the gated ``S`` plus the last ``K - 1 = 3``
inputs of each convolution (:class:`LawcatState`).

What agrees with the code: a ``ShortConvolution`` (depthwise, causal, kernel 4, no bias) on q
and on k and none on v; no activation after it; k (and v) repeated to the query heads *before*
the convolution; RoPE applied only on the teacher/softmax branch, never on the linear one; the
LoLCATs Hedgehog map (``softmax_dim`` of an ``untied_head_einsum`` kernel), identity-initialised
(``--lk_zero_init``); the decay ``gk_proj = Linear(hidden, 16, no bias) -> Linear(16, ., bias)``
on the module input, ``logsigmoid(gk) / 16`` (``gate_low_rank_dim = gate_logit_normalizer =
16``, GLA's ``alpha = sigmoid(.)^(1/16)``); the normaliser carried as a ones column appended to
v, ``y = o[:D] / (o[D] + 1e-10)``; no sliding window (``wsw0``), no output gate, no output norm.
The published recipe distils on passkey data (MSE x 1000, no cross-entropy, lr 1e-2, 1K-token
sequences), then trains LoRA on q/k/v/o on passkey data; its LoRA rank and token counts were not
seen.

Choices, where the sources leave room or where we depart from the code (say so rather than
guess silently):

* the decay, as in the code, has one vector per *kv* head over the ``F_phi`` feature channels
  (``Linear(16, H_kv * F_phi)``), repeated to the query heads of its group, with a zero bias, so
  it starts near ``sigmoid(0)^(1/16) ~ 0.958`` a step. The code sizes the map so that
  ``2F = head_dim`` (``fd32`` for Llama3.2-1B's head size 64); the built-in recipe does the same
  for the bundled teacher (``feature_dim: 32``);
* the two decay layers keep PyTorch's default (fan-in) initialisation (``decay_init:
  default``, the code's ``la_init: default`` for these two layers; our convs stay the identity
  whatever this setting says). The code's default, ``la_init: idt`` (the published config's name
  carries ``idt`` too), draws both from ``N(0, 0.006)`` (``decay_init: normal``). The gate logit is
  the product ``W_up W_down x``: an (Adam) step moves each weight by about the learning rate, so
  how far the logits move is proportional to the scale of the other factor. With both at
  ``0.006`` the decay becomes data-dependent only slowly; at the default scale it starts almost
  as constant (on the bundled teacher's layers 0/14/29, ``alpha`` has mean 0.958 and a
  standard deviation of 0.0004-0.004 over tokens and channels) and moves from the first step.
  On that teacher, 60 attention-transfer steps (the smoke recipe's) take
  layer 14's held-out MSE from 0.096 to 0.0195 with ``normal`` and to 0.0178-0.0186 with
  ``default`` (four initialisation seeds); the starting MSE is the same to within 1%;
* the convolutions start at the exact identity (last tap 1, all others 0), so at initialisation
  the feature maps see the teacher's unrotated q and k; the code's other taps start at ``0.001``
  (``conv_init_coeff``);
* padding keys (``key_mask`` False) contribute nothing anywhere: their q/k inputs are zeroed
  before the convolutions (so they never leak into a later token's conv window), their features
  and values are zeroed, and they do not decay the state (the code zeroes only their values);
* the attention is computed in fp32; queries are not scaled (the normaliser makes the scale
  irrelevant for positive features; the code's GLA kernels scale by ``D^-1/2``, which cancels);
  the denominator is clamped at ``1e-30`` instead of the code's ``+ 1e-10``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..feature_maps import build_feature_map
from ..kernels import GatedState, gated_attention, naive_gated_attention
from .base import Student, repeat_kv


@dataclass
class LawcatConfig:
    feature_map: str = "hedgehog"  # any registered feature map
    feature_dim: int | None = None  # F (hedgehog/npmap output 2F features); default: the head size
    tie_feature_maps: bool = True  # one map for q and k (the paper's kernel); false: separate maps
    conv_size: int = 4  # kernel of the token convolution on q and k
    decay_rank: int = 16  # rank of the decay projection
    decay_normaliser: float = 16.0  # log alpha = logsigmoid(.) / this
    decay_init: str = "default"  # the decay layers: "default" (PyTorch's fan-in init) or "normal" (N(0, 0.006))
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
        if config.decay_init not in ("default", "normal"):
            raise ValueError(f"lawcat decay_init must be 'default' or 'normal', not {config.decay_init!r}")
        H, D, K = self.num_heads, self.head_dim, config.conv_size
        self.feature_map_q = build_feature_map(config.feature_map, H, D, config.feature_dim)
        self.feature_map_k = self.feature_map_q if config.tie_feature_maps else copy.deepcopy(self.feature_map_q)
        self.conv_q = nn.Parameter(torch.zeros(H, D, K))
        self.conv_k = nn.Parameter(torch.zeros(H, D, K))
        with torch.no_grad():  # identity: the current token's tap is 1, the rest 0
            self.conv_q[..., -1] = 1.0
            self.conv_k[..., -1] = 1.0
        hidden, H_kv = attn.config.hidden_size, attn.config.num_key_value_heads
        self.decay_down = nn.Linear(hidden, config.decay_rank, bias=False)
        # one decay vector per kv head, shared by the query heads of its group (as the code does)
        self.decay_up = nn.Linear(config.decay_rank, H_kv * self.feature_map_q.feature_size, bias=True)
        if config.decay_init == "normal":  # the code's `la_init: idt` (and `normal`)
            for layer in (self.decay_down, self.decay_up):
                nn.init.normal_(layer.weight, mean=0.0, std=0.006)
        nn.init.zeros_(self.decay_up.bias)  # both of the code's choices zero the bias
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
        g = g.view(B, T, self.config.num_key_value_heads, -1).transpose(1, 2)  # [B, H_kv, T, F_phi]
        return repeat_kv(g, self.num_key_value_groups)

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
