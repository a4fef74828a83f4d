"""LoRA on a converted model, through peft.

The adapters are injected into the model in place (``peft.inject_adapter_in_model``), so it
stays an ordinary transformers model: ``generate()``, the student cache and our save/load work
unchanged. Targets are module names (``q_proj``, ``o_proj``, ...); inside a student layer the
teacher's projections keep their names, so the same targets reach softmax and student layers.
"""

from __future__ import annotations

import contextlib

import torch

ADAPTER = "default"


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str]):
    """Inject LoRA adapters (A random, B zero: the model's function is unchanged at first)."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:
        raise ValueError(
            f"LoRA target_modules {list(target_modules)} match no module of the model ({str(err).splitlines()[0]}); "
            "use names such as q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        ) from None
    for _, p in lora_parameters(model):  # trained in fp32 whatever the base weights are
        p.data = p.data.float()
    return config


def has_lora(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_settings(model) -> dict | None:
    """The adapter's settings as plain data (for linearize.json), or None."""
    if not has_lora(model):
        return None
    c = model.peft_config[ADAPTER]
    return {"rank": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "target_modules": sorted(c.target_modules)}


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n]


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_lora_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    expected = set(lora_state_dict(model))
    if expected != set(state):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"LoRA weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER)


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base weights only inside the block (the teacher of a KL loss)."""
    layers = [m for _, m in _lora_layers(model)]
    grads = {id(p): p.requires_grad for _, p in lora_parameters(model)}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for _, p in lora_parameters(model):
            p.requires_grad_(grads[id(p)])


def merged_weights(model) -> dict[str, torch.Tensor]:
    """``W + (alpha / r) B A`` of every adapted module, keyed as in the plain model
    (``model.layers.0.self_attn.q_proj.weight``). The model itself is not changed. Under FSDP
    the sharded base weights are gathered: every process must call it."""
    from .distributed import full_tensor

    out = {}
    with torch.no_grad():
        for name, m in _lora_layers(model):
            base = m.get_base_layer()
            delta = m.get_delta_weight(ADAPTER).to(torch.float32)
            weight = full_tensor(base.weight)
            out[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype).detach().cpu().contiguous()
    return out


def load_merged_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise ValueError(f"merged weights name modules the model lacks: {missing[:3]}")
    with torch.no_grad():
        for k, w in weights.items():
            if params[k].shape != w.shape:
                raise ValueError(f"merged weight {k} has shape {tuple(w.shape)}, expected {tuple(params[k].shape)}")
            params[k].copy_(w)
