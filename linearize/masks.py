"""Attention masks of fully converted models: padding only, never a ``[B, 1, T, T]`` mask.

A transformers model builds one attention mask per forward for the attention implementation in
its config. For softmax attention that is a ``[B, 1, T, T]`` matrix whenever the batch holds
padding (left-padded prompts) or the queries do not start at key 0: 1 GiB per row at 32K
tokens. A student needs only which keys are real. So once every attention layer of a model is a
student, :func:`linearize.convert.convert_model` switches the model to the attention
implementation registered here under :data:`IMPLEMENTATION`, through transformers' own
extension points (``AttentionInterface`` and ``AttentionMaskInterface``):

* its mask function, :func:`padding_mask`, returns the 2D padding mask of the keys
  (``[B, kv_length]`` bool), or None when no key is padding, as transformers does for
  FlashAttention; students read it with :func:`linearize.students.base.key_padding_mask`;
* its attention function, :func:`softmax_attention`, serves the students' teacher and transfer
  modes (the original softmax attention, used while training on short blocks): it builds the
  causal-and-padding mask the teacher's own implementation expects, then calls that
  implementation (recorded on each student as ``softmax_implementation`` when it was built).

A model that keeps some softmax layers keeps its own implementation and masks: those layers
need them.
"""

from __future__ import annotations

import importlib

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPLEMENTATION = "linearize"


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """Mask function of :data:`IMPLEMENTATION`: ``attention_mask[:, -kv_length:]`` as bool, or
    None when every key is a real token."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    return None if bool(attention_mask.all()) else attention_mask


def causal_padding_mask(attention_mask, q_length: int, kv_length: int, device, sliding_window=None) -> torch.Tensor:
    """``[B or 1, 1, q_length, kv_length]`` bool: query ``i`` (the last ``q_length`` positions
    of ``kv_length``) may see key ``j``. A query that may see no key at all (a left-padding
    position) is allowed every key, as transformers' own masks do, so that softmax stays finite
    there (its output is never used)."""
    i = torch.arange(q_length, device=device)[:, None] + (kv_length - q_length)
    j = torch.arange(kv_length, device=device)[None, :]
    allowed = j <= i
    if sliding_window:
        allowed = allowed & (j > i - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, -kv_length:].bool()[:, None, None, :]
    return allowed | ~allowed.any(-1, keepdim=True)


def softmax_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function of :data:`IMPLEMENTATION`: the teacher's softmax attention for a
    student in teacher or transfer mode. ``query: [B, H, q, D]``, ``key, value: [B, H_kv, kv, D]``,
    ``attention_mask``: the 2D padding mask of :func:`padding_mask`, None, or a 4D mask already
    built (used as it is). Returns what the teacher's implementation returns."""
    impl = getattr(module, "softmax_implementation", None) or "eager"
    if impl == IMPLEMENTATION:
        raise RuntimeError("a student's softmax_implementation cannot be the student implementation itself")
    q_length, kv_length = query.shape[2], key.shape[2]
    if attention_mask is None or attention_mask.dim() == 2:
        if impl.startswith("flash"):
            pass  # FlashAttention takes the 2D padding mask itself
        elif impl == "sdpa" and attention_mask is None and q_length == kv_length and not kwargs.get("sliding_window"):
            pass  # plain causal: SDPA's own causal path (is_causal)
        else:
            mask = causal_padding_mask(attention_mask, q_length, kv_length, query.device, kwargs.get("sliding_window"))
            if impl == "eager":  # eager adds the mask to the scores
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min
                )
            attention_mask = mask
    if impl == "eager":
        fn = importlib.import_module(module.teacher_class.__module__).eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[impl]
    return fn(module, query, key, value, attention_mask, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, softmax_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, padding_mask)
