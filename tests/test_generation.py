"""The static decode path (linearize.generation): the same tokens and logits as generate(), a
step of fixed shapes and addresses, and no host reads inside the step (what a CUDA graph needs).
On a CPU the step runs eagerly; the CUDA graph capture itself is exercised only on a GPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import converted_model, token_ids
from linearize import ConversionSpec, StaticDecoder, convert_model, fast_generate
from linearize.generation import _tensors
from linearize.kernels import HybridState

NEW_TOKENS = 16

# every student kind; LoLCATs with a window longer than the prompt (its window buffer is padded
# to W empty slots) and shorter (it folds from the prompt on), both with sinks; STILL with small
# chunks and budget so that chunks complete, split and evict during the decode
STUDENT_SPECS = {
    "hedgehog": ("hedgehog", {}),
    "lolcats-long-window": ("lolcats", {"window_size": 10, "sink_size": 2}),
    "lolcats-short-window": ("lolcats", {"window_size": 3, "sink_size": 2}),
    "lawcat": ("lawcat", {}),
    "still": ("still", {"chunk_size": 4, "tokens_per_chunk": 1, "selected_budget": 2}),
}
students_param = pytest.mark.parametrize("name", list(STUDENT_SPECS))


def left_padded(batch=2, length=7, pads=(3, 0), seed=0):
    ids = token_ids(batch, length, seed=seed)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        ids[row, :p] = 0
        mask[row, :p] = 0
    return ids, mask


def model_for(name, family="llama", seed=0):
    kind, settings = STUDENT_SPECS[name]
    return converted_model(family, ConversionSpec(kind, settings=settings), seed=seed)


def reference(model, ids, mask, new_tokens=NEW_TOKENS, **options):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, output_logits=True,
                          return_dict_in_generate=True, **options)


@students_param
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_generate(name, family):
    model = model_for(name, family)
    ids, mask = left_padded()
    ref = reference(model, ids, mask, do_sample=False)
    out, logits = StaticDecoder(model, 2).generate(ids, mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert torch.equal(out, ref.sequences)
    assert len(logits) == len(ref.logits) == NEW_TOKENS
    for mine, theirs in zip(logits, ref.logits):
        torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=1e-5)


@students_param
@pytest.mark.parametrize("options", [dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9), dict(do_sample=True)],
                         ids=["warpers", "defaults"])
def test_sampling_matches_generate(name, options):
    """The same draws from the same seed (unset settings: generate()'s defaults, top_k=50)."""
    model = model_for(name)
    ids, mask = left_padded()
    torch.manual_seed(123)
    ref = reference(model, ids, mask, **options)
    torch.manual_seed(123)
    out = fast_generate(model, ids, mask, max_new_tokens=NEW_TOKENS, **options)
    assert torch.equal(out, ref.sequences)


def test_eos_stops_like_generate():
    model = model_for("lolcats-long-window")
    ids, mask = left_padded()
    greedy = reference(model, ids, mask, do_sample=False).sequences
    eos = int(greedy[0, ids.shape[1] + 3])  # row 0 ends at its fourth new token
    ref = reference(model, ids, mask, do_sample=False, eos_token_id=eos, pad_token_id=0).sequences
    out = fast_generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


@students_param
def test_static_buffers_keep_address_and_shape(name):
    model = model_for(name)
    ids, mask = left_padded()
    decoder = StaticDecoder(model, 2)
    logits = decoder.prefill(ids, mask)
    layout = {k: (t.data_ptr(), tuple(t.shape), t.dtype) for k, t in decoder.static_tensors().items()}
    assert sum(k.startswith("layer") for k in layout) > 0
    buffers = {i: list(layer.buffers) for i, layer in decoder.layers.items()}

    def check():
        assert {k: (t.data_ptr(), tuple(t.shape), t.dtype) for k, t in decoder.static_tensors().items()} == layout
        for i, layer in decoder.layers.items():  # the state the students read is the buffers themselves
            assert all(a is b for a, b in zip(_tensors(decoder.cache.layers[i].state), buffers[i]))
            assert decoder.cache.layers[i] is layer

    check()
    for _ in range(NEW_TOKENS):
        logits = decoder.step(logits.argmax(-1))
        check()
    # a second batch of prompts reuses the same buffers (and, on CUDA, the same graph)
    ids2, mask2 = left_padded(pads=(0, 2), seed=5)
    ref = reference(model, ids2, mask2, new_tokens=6, do_sample=False).sequences
    assert torch.equal(decoder.generate(ids2, mask2, max_new_tokens=6), ref)
    check()


def test_lolcats_window_slots_of_padding_stay_masked():
    """The window buffer after a left-padded prompt holds the padding slots (mask False) and the
    empty slots the static form adds in front; both get no softmax term and fold zeros."""
    model = model_for("lolcats-long-window")
    ids, mask = left_padded()
    decoder = StaticDecoder(model, 2)
    decoder.prefill(ids, mask)
    state = decoder.layers[0].state
    assert isinstance(state, HybridState) and state.k.shape[2] == 10
    real = mask.sum(1) - 2  # the first two real tokens of each row went to the sink slots
    for row in range(2):
        assert state.mask[row].tolist() == [False] * (10 - int(real[row])) + [True] * int(real[row])
        assert float(state.fk[row][:, ~state.mask[row]].abs().sum()) == 0.0
        assert float(state.v[row][:, ~state.mask[row]].abs().sum()) == 0.0
    assert state.sink_mask.all()


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host or make a data-dependent shape:
    none of them can be inside a CUDA graph."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(name.startswith(f) for f in self.FORBIDDEN):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@students_param
def test_decode_step_reads_nothing_on_the_host(name):
    model = model_for(name)
    ids, mask = left_padded()
    decoder = StaticDecoder(model, 2)
    logits = decoder.prefill(ids, mask)
    token = logits.argmax(-1)
    for _ in range(6):  # STILL completes a chunk within these steps
        with HostReads() as reads:
            logits = decoder.step(token)
        assert reads.seen == []
        token = logits.argmax(-1)


def test_host_read_detector_sees_still_branch():
    """Without branch_free, STILL's step asks the device whether a chunk completed."""
    model = model_for("still")
    ids, mask = left_padded()
    decoder = StaticDecoder(model, 2)
    token = decoder.prefill(ids, mask).argmax(-1)
    with HostReads() as reads:
        decoder.model(input_ids=token[:, None], position_ids=decoder.position_ids, use_cache=True,
                      **{decoder._cache_name: decoder.cache})
    assert "_local_scalar_dense" in reads.seen


def test_refuses_a_model_with_softmax_layers():
    from conftest import tiny_model

    model = tiny_model("llama")
    convert_model(model, ConversionSpec("lolcats", layers=[0, 2], settings={"window_size": 4}))
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] of 3 still run softmax attention"):
        StaticDecoder(model, 1)
    with pytest.raises(ValueError, match="softmax attention"):
        fast_generate(model, token_ids(1, 4), max_new_tokens=2)


def test_refuses_wrong_batch_and_right_padding():
    model = model_for("hedgehog")
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="batch size 3"):
        StaticDecoder(model, 3).prefill(ids, mask)
    with pytest.raises(ValueError, match="left-padded"):
        StaticDecoder(model, 2).prefill(ids, mask.flip(1))
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, 2, cuda_graph=True)


@pytest.mark.parametrize("name", ["lolcats-long-window", "still", "lawcat"])
def test_greedy_matches_generate_with_a_one_token_row(name):
    """Row 0 holds one real token: its second sink slot (LoLCATs) fills during the decode, its
    first chunk (STILL) completes there, its convolution history (LAWCAT) starts from zeros."""
    model = model_for(name, seed=2)
    ids, mask = left_padded(pads=(6, 1), seed=3)
    ref = reference(model, ids, mask, do_sample=False)
    out, logits = StaticDecoder(model, 2).generate(ids, mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert torch.equal(out, ref.sequences)
    for mine, theirs in zip(logits, ref.logits):
        torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@students_param
def test_cuda_graph_matches_eager(name):
    """On a GPU: the captured and replayed step gives generate()'s greedy tokens, and the eager
    static step's logits."""
    model = model_for(name).cuda()
    ids, mask = (x.cuda() for x in left_padded())
    ref = reference(model, ids, mask, do_sample=False)
    graphed = StaticDecoder(model, 2, cuda_graph=True)
    out, logits = graphed.generate(ids, mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert graphed.graph is not None
    eager_out, eager_logits = StaticDecoder(model, 2, cuda_graph=False).generate(
        ids, mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert torch.equal(out, ref.sequences) and torch.equal(out, eager_out)
    for a, b in zip(logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the same graph serves the next prompts of this batch size
    graph = graphed.graph
    ids2, mask2 = (x.cuda() for x in left_padded(pads=(0, 2), seed=5))
    assert torch.equal(graphed.generate(ids2, mask2, max_new_tokens=6),
                      reference(model, ids2, mask2, new_tokens=6, do_sample=False).sequences)
    assert graphed.graph is graph
