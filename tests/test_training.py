"""The shared training loop and the LoRA stage on tiny models."""

import math

import pytest
import torch

from conftest import relative_error, tiny_model, token_ids
from linearize import ConversionSpec, attention_mode, convert_model, load, save, students
from linearize.architectures import adapter_for
from linearize.lora import add_lora, lora_disabled, lora_parameters
from linearize.recipe import AttentionTransferStage, DataSpec, LoraStage
from linearize.stages.attention_transfer import AttentionTransfer
from linearize.stages.lora import LoraStage as LoraRunner
from linearize.training import lr_factor, total_steps


def spec(cls, **kw):
    base = dict(data=DataSpec(source="teacher"), seq_len=24, batch_size=4, steps=6, val_blocks=4, eval_every=0)
    base.update(kw)
    return cls(stage="lora" if cls is LoraStage else "attention_transfer", **base)


def converted(kind="lolcats", seed=0):
    model = tiny_model("llama", seed=seed)
    convert_model(model, ConversionSpec(kind, settings={"window_size": 4, "sink_size": 1} if kind == "lolcats" else {}))
    return model


def test_schedules():
    assert [lr_factor("constant", u, 10, warmup=2) for u in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor("linear", 2, 12, warmup=2) == 1.0 and math.isclose(lr_factor("linear", 12, 12, 2, 0.1), 0.1)
    assert math.isclose(lr_factor("cosine", 7, 12, 2, 0.0), 0.5)  # half-way through the decay
    assert math.isclose(lr_factor("cosine", 12, 12, 2, 0.2), 0.2)


def test_token_budget_sets_the_steps():
    s = spec(AttentionTransferStage, steps=None, tokens=1000, batch_size=2, grad_accum=3, seq_len=24)
    assert total_steps(s) == math.ceil(1000 / (2 * 3 * 24)) == 7


def test_gradient_accumulation_equals_the_large_batch():
    """Batch 4 in one step and 2 x 2 accumulated give the same update (SGD, no clipping)."""
    data = token_ids(20, 24, seed=1)
    results = []
    for bs, accum in ((4, 1), (2, 2)):
        model = converted()
        s = spec(AttentionTransferStage, batch_size=bs, grad_accum=accum, steps=3, optimizer="sgd", lr=0.5,
                 betas=[0.0, 0.999], max_grad_norm=0.0, val_blocks=0)
        AttentionTransfer(s, model, adapter_for(model.config), data, seed=3).run()
        results.append(torch.cat([p.detach().flatten() for _, p in sorted(students(model)[0].student_parameters())]))
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for _, p in sorted(students(converted())[0].student_parameters())]))
    assert relative_error(results[1], results[0]) <= 1e-5


def test_lora_trains_only_the_adapters_and_lowers_the_loss():
    model = converted()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    runner = LoraRunner(spec(LoraStage, steps=30, lr=5e-2, rank=4, loss="ce", target_modules=targets), model, adapter_for(model.config),
                        token_ids(24, 24, seed=2) % 8 + 2, seed=0)  # a small alphabet: something to learn
    runner.prepare()
    result = runner.run()
    assert result["after"]["loss"] < result["before"]["loss"] - 0.3  # nats per token
    for n, p in model.named_parameters():
        if ".lora_" in n:
            continue
        key = n.replace(".base_layer", "")
        assert torch.equal(p, frozen[key]), n  # teacher weights and the students' own untouched
    assert any(p.abs().sum() > 0 for n, p in lora_parameters(model) if "lora_B" in n)


def test_kl_teacher_is_the_softmax_model_without_adapters():
    x = token_ids(2, 20, seed=4)
    reference = tiny_model("llama")
    with torch.no_grad():
        expected = reference(x).logits
    model = converted()
    add_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "o_proj"])
    with torch.no_grad():
        for n, p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
        with attention_mode(model, "teacher"), lora_disabled(model):
            teacher = model(x).logits
        student = model(x).logits
    assert (teacher - expected).abs().max() <= 1e-5
    assert (student - expected).abs().max() > 1e-2
    assert all(p.requires_grad for _, p in lora_parameters(model))  # switching off and on keeps them trainable


@pytest.mark.parametrize("merge", [False, True])
def test_saved_lora_loads_to_the_same_logits(tmp_path, merge):
    from conftest import make_base_folder
    from linearize.models import load_teacher

    folder = make_base_folder(tmp_path / "base")
    model, tokenizer, source = load_teacher(str(folder))
    convert_model(model, ConversionSpec("lolcats", settings={"window_size": 4}))
    add_lora(model, 4, 8.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
    x = token_ids(2, 19, seed=5)
    with torch.no_grad():
        expected = model(x).logits
    out = save(model, tmp_path / "out", tokenizer, source.reference, merge_lora=merge)
    names = {p.name for p in out.iterdir()}
    assert ("merged.safetensors" in names) == merge and ("lora.safetensors" in names) == (not merge)
    again = load(out)
    assert (".lora_" in " ".join(n for n, _ in again.named_parameters())) == (not merge)
    with torch.no_grad():
        got = again(x).logits
    assert relative_error(got, expected) <= 1e-5
