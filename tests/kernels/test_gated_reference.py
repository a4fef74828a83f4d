"""The three forms of gated (decayed) normalised linear attention compute one function."""

import torch

from linearize.kernels import GatedState, gated_attention


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_gated_kernel_forms_agree_with_strong_decay_padding_and_split_calls():
    g0 = torch.Generator().manual_seed(0)
    B, H, T, F, D = 2, 3, 37, 8, 5
    fq, fk = torch.rand(B, H, T, F, generator=g0), torch.rand(B, H, T, F, generator=g0)
    v = torch.randn(B, H, T, D, generator=g0)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, T, F, generator=g0) * 20)  # some near-total decay
    mask = torch.rand(B, T, generator=g0) > 0.3
    mask[:, -1] = True
    naive, _ = gated_attention(fq, fk, v, g, mask, form="naive")
    chunk, s_chunk = gated_attention(fq, fk, v, g, mask, form="chunk", output_state=True)
    rec, s_rec = gated_attention(fq, fk, v, g, mask, form="recurrent", output_state=True)
    assert torch.isfinite(chunk).all()
    assert relative_error(chunk, naive) <= 1e-5 and relative_error(rec, naive) <= 1e-5
    assert relative_error(s_rec.S, s_chunk.S) <= 1e-5
    first, s1 = gated_attention(fq[:, :, :20], fk[:, :, :20], v[:, :, :20], g[:, :, :20], mask[:, :20], form="chunk", output_state=True)
    second, s2 = gated_attention(fq[:, :, 20:], fk[:, :, 20:], v[:, :, 20:], g[:, :, 20:], mask[:, 20:], state=s1, form="chunk", output_state=True)
    assert relative_error(torch.cat([first, second], 2), naive) <= 1e-5
    assert relative_error(s2.S, s_chunk.S) <= 1e-5
    # a padding key is a no-op: same output as dropping it
    keep = mask[0]
    alone, _ = gated_attention(fq[:1, :, keep], fk[:1, :, keep], v[:1, :, keep], g[:1, :, keep], form="naive")
    assert relative_error(naive[:1, :, keep], alone) <= 1e-5


def test_gated_kernel_matches_decayed_sums_written_out():
    g0 = torch.Generator().manual_seed(1)
    fq, fk = torch.rand(1, 1, 4, 3, generator=g0), torch.rand(1, 1, 4, 3, generator=g0)
    v = torch.randn(1, 1, 4, 2, generator=g0)
    g = -torch.rand(1, 1, 4, 3, generator=g0)
    y, _ = gated_attention(fq, fk, v, g, form="chunk")
    t = 3  # last query, by hand: w_s = sum_f fq_f fk_s,f prod_{r=s+1..t} alpha_r,f
    w = torch.stack([(fq[0, 0, t] * fk[0, 0, s] * g[0, 0, s + 1 : t + 1].sum(0).exp()).sum() for s in range(4)])
    assert torch.allclose(y[0, 0, t], (w[:, None] * v[0, 0]).sum(0) / w.sum(), atol=1e-6)


def test_state_maps_over_the_batch():
    s = GatedState.empty(3, 2, 4, 5)
    assert s.S.shape == (3, 2, 4, 6) and s.nbytes() == 3 * 2 * 4 * 6 * 4
    picked = s.map(lambda x: x[[2, 0]])
    assert picked.S.shape[0] == 2


def test_chunked_gradients_equal_the_naive_form():
    g0 = torch.Generator().manual_seed(2)
    shapes = dict(fq=(2, 2, 21, 6), fk=(2, 2, 21, 6), v=(2, 2, 21, 3), g=(2, 2, 21, 6))
    base = {n: torch.rand(s, generator=g0) for n, s in shapes.items()}
    base["g"] = -base["g"]
    mask = torch.rand(2, 21, generator=g0) > 0.2
    w = torch.randn(2, 2, 21, 3, generator=g0)
    grads = []
    for form in ("naive", "chunk"):
        xs = {n: t.clone().requires_grad_(True) for n, t in base.items()}
        y, _ = gated_attention(xs["fq"], xs["fk"], xs["v"], xs["g"], mask, form=form, chunk_size=8)
        (y * w).sum().backward()
        grads.append({n: x.grad for n, x in xs.items()})
    for n in base:
        assert relative_error(grads[1][n], grads[0][n]) <= 1e-5, n
