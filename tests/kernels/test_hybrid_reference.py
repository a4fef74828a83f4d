"""The three forms of sliding-window + linear attention compute one function."""

import pytest
import torch

from linearize.kernels import (
    HybridState,
    chunk_hybrid_attention,
    hybrid_attention,
    naive_hybrid_attention,
    recurrent_hybrid_attention,
)

B, H, D, F = 2, 3, 16, 10


def inputs(T, seed, pad=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) * 2 for _ in range(3))
    fq, fk = (torch.rand(B, H, T, F, generator=g, dtype=dtype) for _ in range(2))
    gamma = torch.rand(H, generator=g, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : min(pad, T)] = False  # left padding in the second row
    return q, k, v, fq, fk, gamma, mask


def rel(a, b):
    """Relative error ||a - b|| / ||b|| (0 when both are exactly zero)."""
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("window", [0, 1, 5, 64])
@pytest.mark.parametrize("T", [1, 15, 63, 100, 130])
def test_chunked_and_recurrent_equal_quadratic(window, T, sinks):
    q, k, v, fq, fk, gamma, mask = inputs(T, seed=T * 100 + window + sinks, pad=4)
    scale = D**-0.5
    y_naive, weights = naive_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, mask, sinks=sinks)
    y_chunk, s_chunk = chunk_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, mask, chunk_size=16, sinks=sinks)
    y_rec, s_rec = recurrent_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, mask, sinks=sinks)
    assert rel(y_chunk, y_naive) <= 1e-5
    assert rel(y_rec, y_naive) <= 1e-5
    assert torch.allclose(weights.sum(-1)[0], torch.ones(H, T))  # rows normalised (no padding in row 0)
    for name in ("S", "z", "k", "v", "fk", "sink_k", "sink_v"):
        a, b = getattr(s_chunk, name), getattr(s_rec, name)
        assert a.shape == b.shape
        if b.numel():
            assert rel(a, b) <= 1e-5, name
    assert torch.equal(s_chunk.mask, s_rec.mask)
    assert torch.equal(s_chunk.sink_mask, s_rec.sink_mask)
    assert s_chunk.k.shape[2] == min(window, T)  # the window buffer never exceeds W
    assert s_chunk.sink_k.shape[2] == sinks  # fixed sink slots, filled by real tokens only
    assert s_chunk.sink_mask.sum(1).tolist() == [min(sinks, T), min(sinks, max(T - 4, 0))]


@pytest.mark.parametrize("window,sinks", [(0, 0), (7, 0), (16, 0), (7, 4), (0, 12)])
def test_split_sequence_with_carried_state_equals_whole(window, sinks):
    T = 75
    q, k, v, fq, fk, gamma, mask = inputs(T, seed=window, pad=3)
    scale = D**-0.5
    whole, _ = chunk_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, mask, chunk_size=16, sinks=sinks)
    state, parts = None, []
    for a, b in [(0, 2), (2, 9), (9, 10), (10, 50), (50, 75)]:
        sl = slice(a, b)
        y, state = chunk_hybrid_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], gamma, window, scale, mask[:, sl],
            state=state, chunk_size=16, sinks=sinks,
        )
        parts.append(y)
    assert rel(torch.cat(parts, 2), whole) <= 1e-5


def test_sinks_are_the_first_real_tokens():
    """A left-padded row attends to the same sinks as the same tokens unpadded, and the sinks
    change the output (they are not a no-op)."""
    T, pad, window, sinks = 40, 6, 5, 3
    q, k, v, fq, fk, gamma, _ = inputs(T, seed=11)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :pad] = False
    k2 = k.clone()
    k2[:, :, :pad] = float("nan")
    sl = slice(pad, T)
    y, _ = chunk_hybrid_attention(q, k2, v, fq, fk, gamma, window, D**-0.5, mask, chunk_size=16, sinks=sinks)
    y_ref, _ = chunk_hybrid_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], gamma, window, D**-0.5, sinks=sinks)
    y_none, _ = chunk_hybrid_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], gamma, window, D**-0.5)
    assert rel(y[:, :, pad:], y_ref) <= 1e-5
    assert rel(y_none, y_ref) > 1e-2
    # with no window, every later query gives its softmax terms to exactly the sinks
    _, weights = naive_hybrid_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], gamma, 0, D**-0.5, sinks=sinks)
    _, linear_only = naive_hybrid_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], None, 0, D**-0.5)
    assert not torch.allclose(weights[..., :sinks], linear_only[..., :sinks])
    assert torch.allclose(weights[..., sinks:] / weights[..., sinks:].sum(-1, keepdim=True).clamp_min(1e-30),
                          linear_only[..., sinks:] / linear_only[..., sinks:].sum(-1, keepdim=True).clamp_min(1e-30),
                          atol=1e-5)


def test_sinks_need_a_window_factor_and_a_matching_state():
    q, k, v, fq, fk, gamma, mask = inputs(10, seed=12)
    with pytest.raises(ValueError, match="window factor"):
        chunk_hybrid_attention(q, k, v, fq, fk, None, 0, D**-0.5, sinks=2)
    _, state = chunk_hybrid_attention(q, k, v, fq, fk, gamma, 4, D**-0.5, sinks=2)
    with pytest.raises(ValueError, match="2 sink slots but sinks=3"):
        chunk_hybrid_attention(q, k, v, fq, fk, gamma, 4, D**-0.5, state=state, sinks=3)


def test_full_window_is_softmax_attention():
    T = 40
    q, k, v, fq, fk, gamma, _ = inputs(T, seed=1)
    scale = D**-0.5
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    y, _ = chunk_hybrid_attention(q, k, v, fq, fk, gamma, T, scale)
    assert rel(y, expected) <= 1e-5


def test_no_window_is_normalised_linear_attention():
    T = 33
    q, k, v, fq, fk, gamma, _ = inputs(T, seed=2)
    a = (fq @ fk.transpose(-1, -2)).tril()
    expected = (a @ v) / a.sum(-1, keepdim=True)
    y, _ = chunk_hybrid_attention(q, k, v, fq, fk, None, 0, D**-0.5, chunk_size=8)
    assert rel(y, expected) <= 1e-5


@pytest.mark.parametrize("window,sinks", [(0, 0), (6, 0), (6, 2)])
def test_chunked_gradients_equal_quadratic(window, sinks):
    T = 45
    tensors = list(inputs(T, seed=3, pad=2))
    mask = tensors.pop()
    grads = []
    for fn in ("naive", "chunk"):
        leaves = [t.clone().double().requires_grad_() for t in tensors]
        q, k, v, fq, fk, gamma = leaves
        y, _ = hybrid_attention(q, k, v, fq, fk, gamma, window, D**-0.5, mask, form=fn, chunk_size=16, sinks=sinks)
        do = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
        (y * do).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for name, a, b in zip("q k v fq fk gamma".split(), *grads):
        if window == 0 and name in ("q", "k", "gamma"):
            continue  # no softmax terms: no gradient path
        assert rel(a.float(), b.float()) <= 1e-5, name


def test_padding_keys_do_not_change_real_outputs():
    T, pad = 30, 7
    q, k, v, fq, fk, gamma, _ = inputs(T, seed=4)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :pad] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :pad] = float("nan")  # whatever a padding row holds must not leak
    v2[:, :, :pad] = 1e6
    y, _ = chunk_hybrid_attention(q, k2, v2, fq, fk, gamma, 8, D**-0.5, mask, chunk_size=16)
    y_ref, _ = chunk_hybrid_attention(q[:, :, pad:], k[:, :, pad:], v[:, :, pad:], fq[:, :, pad:], fk[:, :, pad:], gamma, 8, D**-0.5)
    assert rel(y[:, :, pad:], y_ref) <= 1e-5


def test_state_reorders_on_the_batch_axis():
    state = HybridState.empty(3, H, D, D, F)
    state = state.map(lambda x: x + torch.arange(3).view(3, *[1] * (x.dim() - 1)).to(x.dtype) if x.dtype != torch.bool else x)
    picked = state.map(lambda x: x.index_select(0, torch.tensor([2, 0])))
    assert picked.S.shape[0] == 2 and float(picked.S[0].max()) == 2.0 and float(picked.S[1].max()) == 0.0
