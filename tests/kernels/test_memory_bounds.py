"""Every Triton kernel loads and stores only inside the tensors it is given, forward and backward,
at lengths that are not a multiple of the chunk, with padding and carried states (the cases where
an unmasked tail or a wrong stride would reach past a buffer). Runs only under Triton's CPU
interpreter, whose loads and stores :func:`triton_env.memory_checked` watches; compiled on a
GPU, such an access is a fault or a silent read of another tensor."""

import pytest
import torch

from triton_env import interpreting, memory_checked, triton  # noqa: F401  (sets TRITON_INTERPRET first)

from linearize.kernels import HybridState
from linearize.kernels.gated.chunk import triton_chunk_gated_attention
from linearize.kernels.gated.recurrent import triton_gated_step
from linearize.kernels.hybrid.chunk import triton_chunk_hybrid_attention
from linearize.kernels.hybrid.recurrent import triton_hybrid_step
from linearize.kernels.linear.chunk import chunk_linear_attention
from linearize.kernels.linear.recurrent import linear_step

pytestmark = pytest.mark.skipif(not interpreting(), reason="watches the interpreter's loads and stores")

B, H, DK, DV, F = 2, 2, 8, 12, 12


def _inputs(T, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, DK, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, DV, generator=g)
    fq, fk = (torch.rand(B, H, T, F, generator=g) for _ in range(2))
    gamma = torch.rand(H, generator=g) * 0.8 + 0.1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, : min(3, T)] = False
    return q, k, v, fq, fk, gamma, mask


def _leaves(*xs):
    return [x.clone().requires_grad_() for x in xs]


def _grad(*outputs):
    sum(o.float().square().sum() for o in outputs if o is not None).backward()


def test_the_checker_sees_an_access_past_a_tensor():
    """The watch itself: a kernel that reads one element past its input is caught; the same kernel
    with the right bound is not."""
    tl = triton.language

    @triton.jit
    def shifted_copy(x, y, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(y + o, tl.load(x + o + 1, mask=o < n), mask=o < n)

    x, y = torch.arange(8.0), torch.empty(8)
    with memory_checked() as bad:
        shifted_copy[(1,)](x, y, 8, BLOCK=8)
    assert bad == [("shifted_copy", "load", 1)]
    with memory_checked() as bad:
        shifted_copy[(1,)](x, y, 7, BLOCK=8)
    assert bad == [] and torch.equal(y[:7], x[1:])


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("T", [1, 50, 100])
def test_linear(monkeypatch, T, parallel):
    """Both forwards, with the walking backward and (``parallel``) the chunk-parallel one."""
    import linearize.kernels.linear.chunk as lchunk

    monkeypatch.setattr(lchunk, "PARALLEL_BACKWARD", parallel)
    _, _, v, fq, fk, _, mask = _inputs(T, seed=T)
    S0, z0 = torch.rand(B, H, F, DV), torch.rand(B, H, F) + 0.5
    fq, fk, v, S0, z0 = _leaves(fq, fk, v, S0, z0)
    with memory_checked() as bad:
        y, (S, z) = chunk_linear_attention(fq, fk, v, (S0, z0), output_final_state=True, key_mask=mask,
                                           chunk_size=64, parallel=parallel)
        _grad(y, S, z)
        linear_step(fq[:, :, 0].detach(), fk[:, :, 0].detach(), v[:, :, 0].detach(), S.detach(), z.detach(), mask[:, 0])
    assert bad == []


@pytest.mark.parametrize("window,sinks", [(16, 4), (64, 4), (4, 0)])
@pytest.mark.parametrize("T", [1, 50, 100])
def test_hybrid(T, window, sinks):
    """From no state, then on from the state the first call left (window keys and sinks carried),
    and one decode step."""
    q, k, v, fq, fk, gamma, mask = _inputs(T, seed=T + window)
    leaves = _leaves(q, k, v, fq, fk, gamma)
    with memory_checked() as bad:
        y, state = triton_chunk_hybrid_attention(*leaves, window, DK**-0.5, mask, None, chunk_size=64, sinks=sinks)
        y2, state2 = triton_chunk_hybrid_attention(*leaves, window, DK**-0.5, mask, state, chunk_size=64, sinks=sinks)
        _grad(y, y2, state2.S, state2.z)
        q1, k1, v1, fq1, fk1 = (x[:, :, 0].detach() for x in (q, k, v, fq, fk))
        fresh = HybridState.empty(B, H, DK, DV, F, sinks=sinks)
        for carried in (fresh, state2):
            triton_hybrid_step(q1, k1, v1, fq1, fk1, gamma, window, DK**-0.5, mask[:, 0], carried)
    assert bad == []


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("T", [1, 50, 100])
def test_gated(T, parallel):
    _, _, v, fq, fk, _, mask = _inputs(T, seed=T + 7)
    g = -torch.rand(B, H, T, F) * 0.1
    S0, z0 = torch.rand(B, H, F, DV), torch.rand(B, H, F) + 0.5
    fq, fk, v, g, S0, z0 = _leaves(fq, fk, v, g, S0, z0)
    with memory_checked() as bad:
        y, final = triton_chunk_gated_attention(fq, fk, v, g, (S0, z0), output_final_state=True, key_mask=mask,
                                                parallel=parallel)
        _grad(y, *final)
        S = torch.cat([final[0], final[1][..., None]], -1).detach()
        triton_gated_step(fq[:, :, 0].detach(), fk[:, :, 0].detach(), v[:, :, 0].detach(), g[:, :, 0].detach(), S,
                          mask[:, 0])
    assert bad == []
