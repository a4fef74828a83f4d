"""Per-family adapters: where a checkpoint keeps its attention modules and how they project.

The Llama family as transformers 5.x defines it shares one attention shape: ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, rotary embeddings passed in by the decoder as
``position_embeddings=(cos, sin)``, GQA through ``num_key_value_groups``; Qwen3 adds per-head
RMSNorms (``q_norm``, ``k_norm``) before RoPE, Qwen2 adds biases (inside the Linear layers).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """How to reach and drive the attention modules of one model family."""

    family: str
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    qk_norm: bool = False

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that runs the decoder stack without the LM head."""
        return model.get_submodule(self.layers_path.rsplit(".", 1)[0])

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        setattr(layer, self.attention_name, module)

    def project(self, attn: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> tuple:
        """The teacher's queries, keys and values after RoPE: ``q: [B, H, T, D]``,
        ``k, v: [B, H_kv, T, D]`` (not yet expanded for GQA)."""
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape)
        k = attn.k_proj(hidden_states).view(shape)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = rotary_function(attn)(q, k, cos, sin)
        return q, k, v


def rotary_function(attn: nn.Module):
    """``apply_rotary_pos_emb`` of the module that defines the teacher's attention class."""
    module = importlib.import_module(getattr(attn, "teacher_class", type(attn)).__module__)
    return module.apply_rotary_pos_emb


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama"),
    "mistral": Adapter("mistral"),
    "qwen2": Adapter("qwen2"),
    "qwen3": Adapter("qwen3", qk_norm=True),
}


class UnsupportedArchitectureError(ValueError):
    pass


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config, or an error that lists the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; linearize converts these model types: "
            f"{', '.join(sorted(ADAPTERS))}. Other decoder-only models need an adapter in "
            f"linearize/architectures.py (where the attention modules live and how they project)."
        )
    return ADAPTERS[model_type]
