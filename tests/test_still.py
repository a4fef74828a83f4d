"""STILL: self-saliency token selection + gated linear attention, one normaliser."""

import math

import pytest
import torch

from conftest import (converted_model, generate_options, generate_with_and_without_cache, greedy_by_rerun, logits_by_form,
                      relative_error, tiny_model, token_ids)
from linearize import ConversionSpec, attention_mode, convert_model, students
from linearize.architectures import adapter_for
from linearize.cache import cache_nbytes
from linearize.kernels import still_attention
from linearize.kernels.still import StillState, chunk_still_attention, recurrent_still_attention
from linearize.students import StillStudent

B, H, D, F = 2, 3, 8, 6
SMALL = dict(chunk_size=8, tokens_per_chunk=2, selected_budget=4)  # two chunks' worth of selected tokens


def converted(family="llama", seed=0, train_like=True, **settings):
    return converted_model(family, ConversionSpec("still", settings={**SMALL, **settings}), seed, train_like)


ids = token_ids


def inputs(T, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) * 2 for _ in range(3))
    fq, fk = (torch.rand(B, H, T, F, generator=g) for _ in range(2))
    gate = torch.rand(B, H, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : min(pad, T)] = False  # left padding in the second row
    return q, k, v, fq, fk, gate, mask


def brute_force(q, k, v, fq, fk, g, scale, mask, C, K, M):
    """The module docstring's definition written out with loops, in float64. Returns the output
    and, per row and head, the ranks the selected set holds at the end."""
    R = M // K
    y = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    held = {}
    for b in range(q.shape[0]):
        pos = [t for t in range(q.shape[2]) if mask[b, t]]
        n = len(pos)
        for h in range(q.shape[1]):
            Q, Kk, V, FQ, FK, G = (x[b, h, pos].double() for x in (q, k, v, fq, fk, g))
            score = []
            for r in range(n):  # self-saliency: -log(1 - p_self) over the C-token window
                a = Kk[max(0, r - C + 1) : r + 1] @ Q[r] * scale
                score.append(math.inf if len(a) == 1 else float(torch.logsumexp(a, 0) - torch.logsumexp(a[:-1], 0)))

            def chosen(J):
                return sorted(sorted(range(J * C, J * C + C), key=lambda s: (-score[s], s))[:K])

            for r in range(n):
                nq = r // C
                exact = [s for s in range(r + 1) if s // C >= nq - 1]
                if R:
                    exact += [s for J in range(max(0, nq - 1 - R), nq - 1) for s in chosen(J)]
                lin = [s for s in range(r) if s // C <= nq - 2 and s not in exact]
                a = Kk[exact] @ Q[r] * scale
                e = torch.exp(a - a.max())
                w = FK[lin] @ FQ[r]
                num = e @ V[exact] + G[r] * (w @ V[lin])
                y[b, h, pos[r]] = num / (e.sum() + w.sum())
            top = n // C - 2  # the last chunk split
            held[b, h] = [s for J in range(max(0, top - R + 1), top + 1) for s in chosen(J)] if R else []
    return y, held


def held_ranks(state: StillState):
    return {(b, h): sorted(int(p) for p in state.sel_pos[b, h] if p >= 0)
            for b in range(state.sel_pos.shape[0]) for h in range(state.sel_pos.shape[1])}


# ---------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("C,K,M", [(8, 2, 4), (8, 3, 0), (4, 4, 8), (8, 2, 64)], ids=["evicting", "no-budget", "whole-chunks", "no-eviction"])
@pytest.mark.parametrize("T", [1, 13, 30, 70])
def test_chunked_and_recurrent_equal_the_written_out_definition(C, K, M, T):
    q, k, v, fq, fk, g, mask = inputs(T, seed=T + C + K + M, pad=5)
    scale = D**-0.5
    expected, held = brute_force(q, k, v, fq, fk, g, scale, mask, C, K, M)
    settings = dict(chunk_size=C, tokens_per_chunk=K, budget=M)
    y_chunk, s_chunk = chunk_still_attention(q, k, v, fq, fk, g, scale, mask, **settings)
    y_rec, s_rec = recurrent_still_attention(q, k, v, fq, fk, g, scale, mask, **settings)
    assert relative_error(y_chunk.double(), expected) <= 1e-5
    assert relative_error(y_rec.double(), expected) <= 1e-5
    assert torch.equal(s_chunk.sel_pos, s_rec.sel_pos)  # the same tokens, in the same slots
    assert held_ranks(s_chunk) == held
    for name in ("S", "z", "prev_k", "prev_score", "cur_q", "cur_k", "sel_k", "sel_v", "sel_fk"):
        a, b = getattr(s_chunk, name), getattr(s_rec, name)
        assert torch.equal(a.isfinite(), b.isfinite()), name
        assert relative_error(a[a.isfinite()], b[b.isfinite()]) <= 1e-5 or b[b.isfinite()].norm() == 0, name
    assert s_chunk.count.tolist() == [T, max(T - 5, 0)]


def test_chunked_gradients_equal_recurrent():
    tensors = list(inputs(30, seed=9, pad=3))
    mask = tensors.pop()
    grads = []
    for fn in (chunk_still_attention, recurrent_still_attention):
        leaves = [t.clone().requires_grad_() for t in tensors]  # the reference computes in fp32
        y, _ = fn(*leaves, D**-0.5, mask, chunk_size=4, tokens_per_chunk=2, budget=4)
        do = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
        (y * do).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, a, b in zip("q k v fq fk g".split(), *grads):
        assert b.abs().sum() > 0, name
        assert relative_error(a, b) <= 1e-5, name


def test_selected_set_is_identical_at_every_step_of_decoding():
    """Token by token, the recurrent state holds exactly the selected tokens (same slots, same
    ranks) that the chunked form gives for the same prefix; and selection really happens and
    evicts: the held set changes over time and stays within the budget."""
    T, C, K, M = 60, 4, 2, 4
    q, k, v, fq, fk, g, mask = inputs(T, seed=3, pad=7)
    settings = dict(chunk_size=C, tokens_per_chunk=K, budget=M)
    state, seen = None, set()
    for t in range(T):
        sl = slice(t, t + 1)
        _, state = recurrent_still_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], g[:, :, sl], D**-0.5, mask[:, sl], state, **settings)
        _, prefix = chunk_still_attention(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], fq[:, :, : t + 1], fk[:, :, : t + 1], g[:, :, : t + 1], D**-0.5, mask[:, : t + 1], **settings)
        assert torch.equal(state.sel_pos, prefix.sel_pos), t
        assert torch.equal(state.count, prefix.count)
        seen.add(tuple(held_ranks(state)[0, 0]))
    assert len(seen) > 5
    assert all(len(s) <= M for s in seen)
    assert held_ranks(state)[1, 0] != held_ranks(state)[1, 1]  # heads select on their own


@pytest.mark.parametrize("M", [0, 4, 64])
def test_split_sequence_with_carried_state_equals_whole(M):
    T = 75
    q, k, v, fq, fk, g, mask = inputs(T, seed=M, pad=3)
    settings = dict(chunk_size=8, tokens_per_chunk=2, budget=M)
    whole, s_whole = chunk_still_attention(q, k, v, fq, fk, g, D**-0.5, mask, **settings)
    state, parts = None, []
    for a, b in [(0, 2), (2, 9), (9, 10), (10, 50), (50, 75)]:
        sl = slice(a, b)
        y, state = chunk_still_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], g[:, :, sl], D**-0.5, mask[:, sl], state, **settings)
        parts.append(y)
    assert relative_error(torch.cat(parts, 2), whole) <= 1e-5
    assert torch.equal(state.sel_pos, s_whole.sel_pos)
    assert relative_error(state.S, s_whole.S) <= 1e-5


def test_padding_is_never_selected_stored_or_attended():
    T, pad = 40, 9
    q, k, v, fq, fk, g, _ = inputs(T, seed=4)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :pad] = False
    mask[:, 20] = False  # a hole too: chunks count real tokens only
    keep = mask[0].nonzero()[:, 0]
    k2, v2, fk2 = k.clone(), v.clone(), fk.clone()
    k2[:, :, ~mask[0]] = float("nan")  # whatever a padding row holds must not leak
    v2[:, :, ~mask[0]] = 1e6
    fk2[:, :, ~mask[0]] = float("nan")
    for form in ("chunk", "recurrent"):
        y, state = still_attention(q, k2, v2, fq, fk2, g, D**-0.5, mask, output_state=True, form=form, chunk_size=8, tokens_per_chunk=2, budget=8)
        y_ref, ref = still_attention(*(x[:, :, keep] for x in (q, k, v, fq, fk, g)), D**-0.5, output_state=True, form=form, chunk_size=8, tokens_per_chunk=2, budget=8)
        assert relative_error(y[:, :, keep], y_ref) <= 1e-5
        assert torch.equal(y[:, :, ~mask[0]], torch.zeros_like(y[:, :, ~mask[0]]))
        assert torch.equal(state.sel_pos, ref.sel_pos) and bool((state.sel_pos >= 0).any())
        assert torch.isfinite(state.S).all() and torch.isfinite(state.sel_k).all()


def test_everything_selected_is_softmax_attention():
    """With every token of a chunk selected and room for all of them, nothing is linear: the
    output is causal softmax attention, whatever the features and the gate."""
    T = 70
    q, k, v, fq, fk, g, _ = inputs(T, seed=5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5)
    y, _ = chunk_still_attention(q, k, v, fq, fk, g, D**-0.5, chunk_size=8, tokens_per_chunk=8, budget=80)
    assert relative_error(y, expected) <= 1e-5
    y_small, _ = chunk_still_attention(q, k, v, fq, fk, g, D**-0.5, chunk_size=8, tokens_per_chunk=8, budget=16)
    assert relative_error(y_small, expected) > 1e-3  # a smaller budget really folds tokens away


def test_budget_only_matters_once_tokens_are_evicted():
    q, k, v, fq, fk, g, _ = inputs(70, seed=6)
    small, big = (chunk_still_attention(q, k, v, fq, fk, g, D**-0.5, chunk_size=8, tokens_per_chunk=2, budget=M)[0] for M in (4, 64))
    # budget 4 = two chunks: the first eviction (chunk 0's tokens) happens when chunk 2 is split,
    # visible from chunk 4 (rank 32) on
    assert relative_error(small[:, :, :32], big[:, :, :32]) <= 1e-6
    assert relative_error(small[:, :, 32:], big[:, :, 32:]) > 1e-4


def test_ungated_weights_are_the_attention():
    q, k, v, fq, fk, _, mask = inputs(30, seed=7, pad=4)
    ones = torch.ones_like(v)
    y, _ = chunk_still_attention(q, k, v, fq, fk, ones, D**-0.5, mask, chunk_size=4, tokens_per_chunk=2, budget=4)
    eye = torch.eye(30).expand(B, H, 30, 30)
    w, _ = chunk_still_attention(q, k, eye, fq, fk, torch.ones_like(eye), D**-0.5, mask, chunk_size=4, tokens_per_chunk=2, budget=4)
    assert relative_error(w @ v, y) <= 1e-5
    assert torch.allclose(w.sum(-1)[mask[:, None].expand(B, H, 30)], torch.ones(()), atol=1e-5)


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(tokens_per_chunk=0), "tokens_per_chunk must lie in 1..chunk_size"),
        (dict(tokens_per_chunk=9), "tokens_per_chunk must lie in 1..chunk_size"),
        (dict(selected_budget=5), "selected_budget must be a multiple of tokens_per_chunk"),
        (dict(chunk_size=0), "chunk_size must be >= 1"),
    ],
)
def test_bad_settings_name_the_key(settings, match):
    with pytest.raises(ValueError, match=match):
        converted(train_like=False, **settings)


def test_state_of_another_shape_is_refused():
    q, k, v, fq, fk, g, _ = inputs(10, seed=8)
    _, state = chunk_still_attention(q, k, v, fq, fk, g, D**-0.5, chunk_size=8, tokens_per_chunk=2, budget=4)
    with pytest.raises(ValueError, match="chunk_size=8, selected_budget=4"):
        chunk_still_attention(q, k, v, fq, fk, g, D**-0.5, state=state, chunk_size=8, tokens_per_chunk=2, budget=8)


# ---------------------------------------------------------------------------------- the student
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("feature_map", ["hedgehog", "npmap"])
def test_parallel_equals_recurrent_gqa(family, feature_map):
    model = converted(family, feature_map=feature_map)
    assert all(isinstance(s, StillStudent) for s in students(model).values())
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    for T in (1, 13, 30, 70):  # chunk 8: none of these is a multiple of it
        logits = logits_by_form(model, ids(2, T, seed=T), ("chunk", "recurrent"))
        assert relative_error(logits["recurrent"], logits["chunk"]) <= 1e-5


def test_chunks_within_reach_are_the_teachers_attention():
    """Up to two chunks every key is exact: the converted model gives the teacher's logits."""
    model = tiny_model("qwen3")
    x = ids(2, 16)
    with torch.no_grad():
        expected = model(x).logits
        convert_model(model, ConversionSpec("still", settings=SMALL))
        got = model(x).logits
        longer = model(ids(2, 30)).logits
        with attention_mode(model, "teacher"):
            teacher_longer = model(ids(2, 30)).logits
    assert (got - expected).abs().max() <= 1e-4
    assert (longer - teacher_longer).abs().max() > 1e-3  # beyond two chunks it is a student


def test_gate_starts_all_ones_and_scales_only_the_linear_numerator():
    model = converted(train_like=False)
    s = students(model)[0]
    assert torch.equal(s.gate.weight, torch.ones_like(s.gate.weight))
    x = torch.randn(1, 5, 64)
    assert torch.allclose(s.gate_values(x), torch.sigmoid(x.sum(-1))[:, None, :, None].expand(1, 4, 5, 16))


def test_generate_equals_parallel_rerun():
    model = converted("llama")
    prompt = ids(1, 11, seed=3)
    out = model.generate(prompt, max_new_tokens=32, do_sample=False)
    assert out.tolist() == greedy_by_rerun(model, prompt, 32).tolist()


@generate_options
def test_generate_with_state_equals_generate_without_cache(options):
    model = converted("qwen3")
    prompt = ids(2, 9, seed=5)
    with_cache, without = generate_with_and_without_cache(model, prompt, 24, options)
    assert with_cache == without


def test_left_padded_batch_generates_what_each_prompt_does_alone():
    model = converted("llama")
    a, b = ids(1, 14, seed=7), ids(1, 5, seed=8)
    batch = torch.cat([a, torch.cat([ids(1, 9, seed=11), b], 1)])  # real ids under the padding mask
    mask = torch.cat([torch.ones(1, 14), torch.cat([torch.zeros(1, 9), torch.ones(1, 5)], 1)]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=24, do_sample=False)
    alone_a = model.generate(a, max_new_tokens=24, do_sample=False)
    alone_b = model.generate(b, max_new_tokens=24, do_sample=False)
    assert together[0, 14:].tolist() == alone_a[0, 14:].tolist()
    assert together[1, 14:].tolist() == alone_b[0, 5:].tolist()


def test_padding_contributes_nothing():
    model = converted("qwen3")
    a = ids(1, 30, seed=9)
    pad = ids(1, 6, seed=10)
    batch = torch.cat([pad, a], 1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 30)], 1).long()
    with torch.no_grad():
        alone = model(a).logits
        padded = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    assert relative_error(padded[:, 6:], alone) <= 1e-5


def test_cache_size_does_not_grow_with_context():
    model = converted("llama")
    sizes = []
    for T in (1, 40, 200):
        with torch.no_grad():
            cache = model(ids(1, T), use_cache=True).past_key_values
        sizes.append(cache_nbytes(cache))
        assert all(isinstance(layer.state, StillState) for layer in cache.layers)
    assert sizes[0] == sizes[1] == sizes[2] > 0


def test_save_then_load_gives_identical_logits(tmp_path):
    from linearize import load, save
    from linearize.models import load_teacher
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "base"
    tiny_model("qwen3").save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1").save_pretrained(folder)
    model, tokenizer, source = load_teacher(str(folder))
    convert_model(model, ConversionSpec("still", layers=[0, 2], settings={**SMALL, "feature_map": "npmap"}))
    with torch.no_grad():
        for s in students(model).values():
            for _, p in s.student_parameters():
                p.add_(torch.randn_like(p) * 0.5)
    x = ids(2, 37, seed=12)
    with torch.no_grad():
        expected = model(x).logits
    loaded = load(str(save(model, tmp_path / "converted", tokenizer, source.reference)))
    assert isinstance(loaded.model.layers[2].self_attn, StillStudent)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)


def test_npmap_inside_still_trains():
    """Gradients reach NP-Map's reflection and map and the gate, and attention transfer lowers
    the held-out error."""
    from linearize.recipe import AttentionTransferStage, DataSpec
    from linearize.stages.attention_transfer import AttentionTransfer, measure_transfer, transfer_forward

    model = tiny_model("llama")
    convert_model(model, ConversionSpec("still", settings={**SMALL, "feature_map": "npmap"}))
    adapter = adapter_for(model.config)
    blocks = torch.randint(1, 97, (24, 48), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(1, 97, (8, 48), generator=torch.Generator().manual_seed(99))
    loss, _ = transfer_forward(model, adapter, blocks[:4], 1000.0, 0.0)
    loss.backward()
    s = students(model)[1]
    for p in (s.feature_map_q.reflection, s.feature_map_q.weight, s.feature_map_k.weight, s.gate.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()
    before = measure_transfer(model, adapter, held_out, 4)
    spec = AttentionTransferStage(stage="attention_transfer", data=DataSpec(source="teacher"), seq_len=48, batch_size=4,
                                  steps=40, lr=1e-1, val_blocks=4, eval_every=10)
    AttentionTransfer(spec, model, adapter, blocks, seed=0).run()
    after = measure_transfer(model, adapter, held_out, 4)
    # random tokens through a random tiny teacher: the linear share is hard to fit; 40 steps
    # take about a quarter off the loss (0.75x measured)
    assert after["loss"] <= 0.85 * before["loss"]


def test_recipe_rejects_bad_settings_naming_the_key():
    from linearize.recipe import RecipeError, parse_recipe

    data = {"students": {"kind": "still", "tokens_per_chunk": 3, "selected_budget": 16},
            "stages": [{"stage": "attention_transfer", "data": {"source": "teacher"}, "steps": 1}]}
    with pytest.raises(RecipeError, match="key 'students': selected_budget must be a multiple of tokens_per_chunk \\(3\\)"):
        parse_recipe(data, "bad.yaml")
    data["students"]["selected_budget"] = 15
    assert parse_recipe(data, "good.yaml").students.settings["selected_budget"] == 15
