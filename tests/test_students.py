"""The student contract on tiny random models of every supported family."""

import pytest
import torch

from conftest import (FAMILIES, converted_model, generate_options, generate_with_and_without_cache, greedy_by_rerun,
                      logits_by_form, relative_error, tiny_model, token_ids)
from linearize import ConversionSpec, attention_mode, convert_model, students
from linearize.architectures import UnsupportedArchitectureError, adapter_for
from linearize.cache import cache_nbytes
from linearize.students import HedgehogStudent, LolcatsStudent, key_padding_mask

SPECS = {
    "hedgehog": ConversionSpec("hedgehog"),
    "lolcats": ConversionSpec("lolcats", settings={"window_size": 8}),
    "lolcats+sinks": ConversionSpec("lolcats", settings={"window_size": 8, "sink_size": 3}),
}


def converted(family="llama", kind="lolcats", seed=0, train_like=True):
    return converted_model(family, SPECS[kind], seed, train_like)


ids = token_ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sinks", [0, 4])
def test_lolcats_with_window_over_whole_sequence_equals_teacher(family, sinks):
    model = tiny_model(family)
    x = ids(2, 50)
    with torch.no_grad():
        expected = model(x).logits
        convert_model(model, ConversionSpec("lolcats", settings={"window_size": 64, "sink_size": sinks}))
        got = model(x).logits
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_parallel_equals_recurrent_gqa(family, kind):
    model = converted(family, kind)
    for T in (1, 13, 30):  # window 8: none of these is a multiple of it
        x = ids(2, T, seed=T)
        logits = logits_by_form(model, x)
        assert relative_error(logits["recurrent"], logits["chunk"]) <= 1e-5
        assert relative_error(logits["naive"], logits["chunk"]) <= 1e-5


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_generate_equals_parallel_rerun(kind):
    model = converted("llama", kind)
    prompt = ids(1, 11, seed=3)
    out = model.generate(prompt, max_new_tokens=32, do_sample=False)
    assert out.tolist() == greedy_by_rerun(model, prompt, 32).tolist()


@pytest.mark.parametrize("kind", sorted(SPECS))
@generate_options
def test_generate_with_state_equals_generate_without_cache(kind, options):
    """The recurrent cache (reordered for beams, expanded for several returns) decodes exactly
    what re-running the parallel form on the whole sequence gives."""
    model = converted("qwen3", kind)
    prompt = ids(2, 9, seed=5)
    with_cache, without = generate_with_and_without_cache(model, prompt, 20, options)
    assert with_cache == without


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_left_padded_batch_generates_what_each_prompt_does_alone(kind):
    model = converted("llama", kind)
    a, b = ids(1, 14, seed=7), ids(1, 5, seed=8)
    pad = torch.zeros(1, 9, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 14), torch.cat([torch.zeros(1, 9), torch.ones(1, 5)], 1)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    alone_a = model.generate(a, max_new_tokens=12, do_sample=False)
    alone_b = model.generate(b, max_new_tokens=12, do_sample=False)
    assert together[0, 14:].tolist() == alone_a[0, 14:].tolist()
    assert together[1, 14:].tolist() == alone_b[0, 5:].tolist()


@pytest.mark.parametrize("kind,grows_until", [("hedgehog", 0), ("lolcats", 8), ("lolcats+sinks", 8)])
def test_cache_size_does_not_grow_with_context(kind, grows_until):
    model = converted("llama", kind)
    sizes = []
    for T in (grows_until + 1, 40, 200):
        out = model(ids(1, T), use_cache=True)
        sizes.append(cache_nbytes(out.cache if hasattr(out, "cache") else out.past_key_values))
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_only_student_parameters_train():
    model = converted("llama", "lolcats")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("feature_map" in n or "window_logit" in n) for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_every_kth_layer_keeps_the_others_softmax():
    model = tiny_model("llama", num_hidden_layers=5)
    convert_model(model, ConversionSpec("hedgehog", layers={"every": 2}))
    kinds = [type(layer.self_attn) for layer in model.model.layers]
    assert [k is HedgehogStudent for k in kinds] == [True, False, True, False, True]
    # a mixed model still generates from its cache exactly as without one
    prompt = ids(1, 7)
    assert model.generate(prompt, max_new_tokens=10, do_sample=False).tolist() == model.generate(
        prompt, max_new_tokens=10, do_sample=False, use_cache=False
    ).tolist()


def test_teacher_mode_is_the_original_attention():
    model = tiny_model("mistral")
    x = ids(2, 20)
    with torch.no_grad():
        expected = model(x).logits
        convert_model(model, SPECS["hedgehog"])
        with attention_mode(model, "teacher"):
            teacher = model(x).logits
        student = model(x).logits
    assert torch.equal(teacher, expected)
    assert (student - expected).abs().max() > 1e-3  # the student really is different


def test_parameter_names_keep_the_teacher_layout():
    model = tiny_model("qwen3")
    before = {n for n, _ in model.named_parameters()}
    convert_model(model, SPECS["lolcats"])
    after = {n for n, _ in model.named_parameters()}
    assert before <= after
    assert all("feature_map" in n or "window_logit" in n for n in after - before)


def test_hedgehog_feature_map_starts_at_identity_softmax():
    model = tiny_model("llama")
    convert_model(model, SPECS["hedgehog"])
    fm = students(model)[0].feature_map_q
    x = torch.randn(1, 4, 5, 16)
    expected = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
    assert torch.allclose(fm(x), expected, atol=1e-6)
    assert torch.equal(students(model)[0].feature_map_k.weight, fm.weight)


def test_lolcats_window_factor_starts_at_one_tenth():
    model = tiny_model("llama")
    convert_model(model, SPECS["lolcats"])
    s = students(model)[1]
    assert isinstance(s, LolcatsStudent)
    assert torch.allclose(s.window_factor(), torch.full((4,), 0.1))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        adapter_for(GPT2Config())


def test_key_padding_mask_from_each_mask_form():
    keep = torch.tensor([[False, True, True], [True, True, True]])
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    mask4 = causal[None, None] & keep[:, None, None, :]
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~mask4, torch.finfo(torch.float32).min)
    for m in (keep.long(), mask4, additive):
        assert torch.equal(key_padding_mask(m, 3), keep)
    assert key_padding_mask(None, 3) is None
    assert key_padding_mask(torch.ones(2, 3), 3) is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_teacher_and_transfer_modes_of_a_fully_converted_model_give_the_teacher_logits_with_padding(family,
                                                                                                   implementation):
    """A fully converted model masks by padding alone (linearize.masks); in teacher and transfer
    modes its students rebuild the causal-and-padding mask the teacher's own implementation
    needs, so a left-padded batch gives the unconverted teacher's logits at every real position."""
    model = tiny_model(family)
    model.config._attn_implementation = implementation
    x = ids(2, 24, seed=5)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :9] = 0  # row 1 is left-padded
    with torch.no_grad():
        expected = model(x, attention_mask=mask).logits
        convert_model(model, SPECS["lolcats"])
        assert model.config._attn_implementation == "linearize"
        for mode in ("teacher", "transfer"):
            with attention_mode(model, mode):
                got = model(x, attention_mask=mask).logits
            real = mask.bool()
            assert (got[real] - expected[real]).abs().max() <= 1e-5, mode
