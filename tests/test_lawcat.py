"""LAWCAT: token convolution + data-dependent decay + normalised linear attention."""

import pytest
import torch

from conftest import converted_model, generate_options, generate_with_and_without_cache, logits_by_form, relative_error, tiny_model, token_ids
from linearize import ConversionSpec, attention_mode, convert_model, students
from linearize.cache import cache_nbytes
from linearize.students import LawcatState, LawcatStudent
from linearize.students.lawcat import causal_conv


def converted(family="llama", seed=0, train_like=True, **settings):
    return converted_model(family, ConversionSpec("lawcat", settings=settings), seed, train_like)


ids = token_ids


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_parallel_equals_recurrent_gqa(family, tie):
    model = converted(family, tie_feature_maps=tie)
    assert all(isinstance(s, LawcatStudent) for s in students(model).values())
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    for T in (1, 5, 37):  # chunk 16: 37 is not a multiple of it
        x = ids(2, T, seed=T)
        logits = logits_by_form(model, x)
        assert relative_error(logits["recurrent"], logits["chunk"]) <= 1e-5
        assert relative_error(logits["naive"], logits["chunk"]) <= 1e-5


@pytest.mark.parametrize("feature_map", ["npmap", "elu"])
def test_any_registered_feature_map(feature_map):
    model = converted("llama", feature_map=feature_map, feature_dim=8)
    s = students(model)[0]
    assert s.feature_map_q.name == feature_map
    assert s.decay_up.out_features == 2 * s.feature_map_q.feature_size  # one decay vector per kv head
    x = ids(2, 37, seed=2)
    logits = logits_by_form(model, x, ("chunk", "recurrent"))
    assert relative_error(logits["recurrent"], logits["chunk"]) <= 1e-5


def test_feature_maps_are_tied_unless_asked_otherwise():
    model = converted("llama")
    s = students(model)[0]
    assert s.feature_map_k is s.feature_map_q
    assert sum("feature_map" in n for n, _ in s.student_parameters()) == 1
    untied = students(converted("llama", tie_feature_maps=False, train_like=False))[0]
    assert untied.feature_map_k is not untied.feature_map_q
    assert torch.equal(untied.feature_map_k.weight, untied.feature_map_q.weight)


def test_conv_starts_as_identity_and_is_causal():
    model = tiny_model("qwen3")
    convert_model(model, ConversionSpec("lawcat"))
    s = students(model)[0]
    x = torch.randn(2, 4, 9, 16)
    for w in (s.conv_q, s.conv_k):
        y, hist = causal_conv(x, w.detach(), None)
        assert torch.equal(y, x)
        assert torch.equal(hist, x[:, :, -3:])
    w = torch.randn(4, 16, 4)
    y, _ = causal_conv(x, w, None)
    x2 = x.clone()
    x2[:, :, 5:] += 1.0  # the future must not change the past
    y2, _ = causal_conv(x2, w, None)
    assert torch.equal(y2[:, :, :5], y[:, :, :5]) and not torch.allclose(y2[:, :, 5], y[:, :, 5])
    # a split call with the carried history gives the same output
    a, h = causal_conv(x[:, :, :4], w, None)
    b, _ = causal_conv(x[:, :, 4:], w, h)
    assert torch.allclose(torch.cat([a, b], 2), y, atol=1e-6)


def test_no_rope_on_the_student_path():
    """The student output does not depend on absolute position: a sequence read after a prefix
    of padding, with shifted positions, gives the same output as alone (RoPE would change it)."""
    model = converted("llama")
    x = ids(1, 12, seed=4)
    with torch.no_grad():
        alone = model(x).logits
        shifted = model(x, position_ids=torch.arange(100, 112)[None]).logits
    assert relative_error(shifted, alone) <= 1e-5


def test_transfer_mode_teacher_side_uses_rope():
    """In transfer mode the teacher's attention (with RoPE) is passed on: the model's logits are
    the teacher's own, while each layer's recorded loss is the student's."""
    model = tiny_model("qwen3")
    x = ids(2, 20, seed=6)
    with torch.no_grad():
        expected = model(x).logits
        convert_model(model, ConversionSpec("lawcat"))
        for s in students(model).values():
            s.attention_ce = True
        with attention_mode(model, "transfer"):
            got = model(x).logits
    assert (got - expected).abs().max() <= 1e-4
    for s in students(model).values():
        rec = s.transfer_record
        assert rec is not None and rec.sq_err > 0
        assert torch.isfinite(rec.ce) and rec.ce > 0


def test_padding_contributes_nothing():
    model = converted("llama")
    a = ids(1, 10, seed=9)
    pad = ids(1, 6, seed=10)  # real token ids under the padding mask (id 0 would embed to zeros)
    batch = torch.cat([pad, a], 1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 10)], 1).long()
    with torch.no_grad():
        alone = model(a).logits
        padded = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    assert relative_error(padded[:, 6:], alone) <= 1e-5


@generate_options
def test_generate_with_state_equals_generate_without_cache(options):
    model = converted("qwen3")
    prompt = ids(2, 9, seed=5)
    with_cache, without = generate_with_and_without_cache(model, prompt, 10, options)
    assert with_cache == without


def test_cache_size_does_not_grow_with_context():
    model = converted("llama")
    sizes = []
    for T in (1, 40, 200):
        with torch.no_grad():
            out = model(ids(1, T), use_cache=True)
        cache = out.past_key_values
        sizes.append(cache_nbytes(cache))
        assert all(isinstance(layer.state, LawcatState) for layer in cache.layers)
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_left_padded_batch_generates_what_each_prompt_does_alone():
    model = converted("llama")
    a, b = ids(1, 14, seed=7), ids(1, 5, seed=8)
    batch = torch.cat([a, torch.cat([ids(1, 9, seed=11), b], 1)])
    mask = torch.cat([torch.ones(1, 14), torch.cat([torch.zeros(1, 9), torch.ones(1, 5)], 1)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    alone_a = model.generate(a, max_new_tokens=8, do_sample=False)
    alone_b = model.generate(b, max_new_tokens=8, do_sample=False)
    assert together[0, 14:].tolist() == alone_a[0, 14:].tolist()
    assert together[1, 14:].tolist() == alone_b[0, 5:].tolist()


def test_attention_weights_reproduce_the_output():
    """The weights behind the attention-CE loss are the student's own: rows sum to one and,
    applied to the values, give the attention output."""
    model = converted("qwen3")
    s = students(model)[1]
    x = torch.randn(2, 11, 64)
    captured = {}

    def attend(q, k, v, key_mask, state, output_state):
        captured["y"], _ = LawcatStudent.attend(s, q, k, v, key_mask, state, output_state)
        captured["w"] = s.attention_weights(q, k, key_mask)
        captured["v"] = v
        return captured["y"], None

    s.attend = attend
    pe = model.model.rotary_emb(x, torch.arange(11)[None])
    with torch.no_grad():
        s(x, position_embeddings=pe, attention_mask=None)
    w = captured["w"]
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5)
    assert relative_error(w @ captured["v"].float(), captured["y"]) <= 1e-5


def test_save_then_load_gives_identical_logits(tmp_path):
    from linearize import load, save
    from linearize.models import load_teacher
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "base"
    tiny_model("qwen3").save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1").save_pretrained(folder)
    model, tokenizer, source = load_teacher(str(folder))
    convert_model(model, ConversionSpec("lawcat", layers=[1]))
    with torch.no_grad():
        for s in students(model).values():
            for _, p in s.student_parameters():
                p.add_(torch.randn_like(p) * 0.5)
    x = ids(2, 19, seed=12)
    with torch.no_grad():
        expected = model(x).logits
    out = save(model, tmp_path / "converted", tokenizer, source.reference)
    loaded = load(str(out))
    assert isinstance(loaded.model.layers[1].self_attn, LawcatStudent)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)


def test_at_init_a_layer_computes_the_written_out_math():
    """Identity convs, identity Hedgehog maps, no RoPE: the layer output is the decayed,
    normalised linear attention of the teacher's raw (q_norm'ed) projections, by hand."""
    model = tiny_model("qwen3")
    convert_model(model, ConversionSpec("lawcat"))
    s = students(model)[2]
    T, H, D = 7, 4, 16
    x = torch.randn(1, T, 64)
    pe = model.model.rotary_emb(x, torch.arange(T)[None])
    with torch.no_grad():
        got = s(x, position_embeddings=pe, attention_mask=None)[0]
        q = s.q_norm(s.q_proj(x).view(1, T, H, D))[0]  # [T, H, D]
        k = s.k_norm(s.k_proj(x).view(1, T, 2, D))[0].repeat_interleave(2, dim=1)
        v = s.v_proj(x).view(1, T, 2, D)[0].repeat_interleave(2, dim=1)
        phi = lambda z: torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)  # noqa: E731
        alpha = torch.sigmoid(s.decay_up(s.decay_down(x))).pow(1 / 16).view(T, 2, 2 * D)  # per kv head
        alpha = alpha.repeat_interleave(2, dim=1)  # [T, H, 2D]: each kv head's decay serves its 2 query heads
        out = torch.zeros(T, H, D)
        for h in range(H):
            S, z = torch.zeros(2 * D, D), torch.zeros(2 * D)
            for t in range(T):
                S = alpha[t, h, :, None] * S + phi(k[t, h])[:, None] * v[t, h][None, :]
                z = alpha[t, h] * z + phi(k[t, h])
                out[t, h] = phi(q[t, h]) @ S / (phi(q[t, h]) @ z)
        expected = s.o_proj(out.reshape(1, T, H * D))
    assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("decay_init, spread", [("default", 0.05), ("normal", 2e-3)])
def test_decay_is_shared_by_the_query_heads_of_a_kv_group_and_starts_near_sigmoid_0(decay_init, spread):
    """As LAWCAT's code: one decay vector per kv head, repeated to its query heads, from a
    projection with a zero bias, so alpha starts near sigmoid(0)^(1/16): data-dependent from
    the start under PyTorch's default init, almost constant under the code's N(0, 0.006)."""
    model = converted("llama", train_like=False, decay_init=decay_init)  # 4 query heads, 2 kv heads
    s = students(model)[1]
    assert torch.equal(s.decay_up.bias, torch.zeros_like(s.decay_up.bias))
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        g = s.log_decay(x)  # [B, H, T, F]
    assert g.shape == (2, 4, 9, s.feature_map_q.feature_size)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 2], g[:, 3])
    assert not torch.equal(g[:, 0], g[:, 2])
    alpha = g.exp()
    assert (alpha - 0.5 ** (1 / 16)).abs().max() < spread


def test_unknown_decay_init_is_refused():
    with pytest.raises(ValueError, match="decay_init"):
        converted("llama", decay_init="xavier")
