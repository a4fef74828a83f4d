"""The Triton kernels equal their PyTorch references: chunked linear attention (forward, final
state, every gradient), the decode step, the fused Hedgehog map, and the dispatcher.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below),
on tiny shapes; with CUDA the same tests run compiled on the GPU, and
the ``gpu`` tests add real shapes. Errors are relative, ``||a - b|| / ||b||``, against the fp32
reference. Tolerances: 1e-5 for fp32 inputs (every product in fp32 in the kernels too). For
bf16 inputs the reference gets the same bf16-rounded inputs, so the differences are the
kernels' own roundings: mostly the bf16 outputs themselves (``y`` and the gradients of bf16
inputs are bf16, 2^-9 relative each), plus the 16-bit operands ``A = fq fk^T``, ``P`` and
``dn`` in the products whose result does not cancel. Seen in the interpreter: 3e-3 to 4e-3 on
``y``, 4e-3 to 7e-3 on the gradients (also with values offset by 3, where ``dfq`` cancels), 5e-3
on the Hedgehog map's bf16 ``dx``; 1e-2 and 2e-2 are asserted.
"""

import types

import pytest
import torch

from triton_env import DEVICE, Launches, Spy, interpreting, rel, through_kernels, triton  # noqa: F401  (sets TRITON_INTERPRET first)

from linearize.feature_maps import HedgehogFeatureMap
from linearize.kernels import (
    HybridState,
    chunk_hybrid_attention,
    hybrid_attention,
    hybrid_step,
)
from linearize.kernels.feature_map import hedgehog_feature_map
from linearize.kernels.linear import chunk_linear_attention, linear_step

B, H, F, DV = 2, 2, 12, 20  # F != Dv, neither a power of two


def make_inputs(T, seed, dtype=torch.float32, b=B, h=H, f=F, dv=DV, device=DEVICE, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(b, h, T, f, generator=g)
    fk = torch.rand(b, h, T, f, generator=g)
    v = torch.randn(b, h, T, dv, generator=g) + offset
    S0 = torch.rand(b, h, f, dv, generator=g) * 2 - 0.5
    z0 = torch.rand(b, h, f, generator=g) + 0.5
    fq, fk, v = (x.to(device=device, dtype=dtype) for x in (fq, fk, v))
    return fq, fk, v, S0.to(device), z0.to(device)


def cotangents(y_shape, S_shape, z_shape, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1000)
    return tuple(torch.randn(s, generator=g).to(device) for s in (y_shape, S_shape, z_shape))


def reference(fq, fk, v, S0=None, z0=None, key_mask=None):
    """``chunk_hybrid_attention`` with ``window=0``: ``(y, S, z)``."""
    b, h, _, f = fq.shape
    state = None
    if S0 is not None:
        state = HybridState.empty(b, h, f, v.shape[-1], f, device=fq.device)
        state.S, state.z = S0, z0
    y, new = chunk_hybrid_attention(fq, fq, v, fq, fk, None, 0, 1.0, key_mask, state, chunk_size=16, output_state=True)
    return y, new.S, new.z


def run_both(T, seed, dtype=torch.float32, init=False, key_mask=None, chunk_size=16, corrupt=None, offset=0.0):
    """Outputs and gradients of the kernel and of the reference on the same inputs; ``corrupt``
    edits the kernel's and the reference's copies of ``(fk, v)`` before the call."""
    fq, fk, v, S0, z0 = make_inputs(T, seed, dtype, offset=offset)
    dy, dS, dz = cotangents(v.shape, S0.shape, z0.shape, seed)
    out = {}
    for impl in ("kernel", "reference"):
        leaves = [x.clone().requires_grad_() for x in (fq, fk, v, S0, z0)]
        a, b_, c, s, z = leaves
        if corrupt is not None:
            b_, c = corrupt(b_, c)
        if impl == "kernel":
            y, (S, Z) = chunk_linear_attention(
                a, b_, c, (s, z) if init else None, output_final_state=True, chunk_size=chunk_size, key_mask=key_mask
            )
        else:
            y, S, Z = reference(a, b_, c, s if init else None, z if init else None, key_mask)
        ((y.float() * dy).sum() + (S * dS).sum() + (Z * dz).sum()).backward()
        grads = [l.grad for l in leaves] if init else [l.grad for l in leaves[:3]]
        out[impl] = [y, S, Z, *grads]
    return out


NAMES = ["y", "S", "z", "dfq", "dfk", "dv", "dS0", "dz0"]


def errors(out):
    return {n: rel(a, b) for n, a, b in zip(NAMES, out["kernel"], out["reference"])}


@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", [1, 15, 63, 100])
def test_chunk_matches_reference_fp32(T, init):
    out = run_both(T, seed=T, init=init)
    assert out["kernel"][0].dtype == torch.float32
    err = errors(out)
    assert len(err) == (8 if init else 6)
    if T == 1 and not init:
        # y_0 = v_0 whatever fq (and S, z do not involve fq): dfq is zero up to rounding, in both
        assert max(float(x.abs().max()) for x in (out["kernel"][3], out["reference"][3])) <= 1e-6
        del err["dfq"]
    assert max(err.values()) <= 1e-5, err


def test_chunk_sizes_agree():
    """Asking for chunks of 64 (the default) gives the reference's results as 16 does. (With fp32
    products the kernels take 16 tokens at a time whatever is asked; the bf16 tests run 64.)"""
    err = errors(run_both(100, seed=7, init=True, chunk_size=64))
    assert max(err.values()) <= 1e-5, err


@pytest.mark.parametrize("offset,chunk_size", [(0.0, 16), (3.0, 64)])
def test_bf16_inputs(offset, chunk_size):
    """bf16 inputs; with values offset by 3 the gradients of the features are small differences of
    large terms, which a state rounded to bf16 would get wrong by 10-20%."""
    out = run_both(100, seed=3, dtype=torch.bfloat16, init=True, offset=offset, chunk_size=chunk_size)
    y, S, z, dfq, dfk, dv, dS0, dz0 = out["kernel"]
    assert y.dtype == dfq.dtype == dfk.dtype == dv.dtype == torch.bfloat16
    assert S.dtype == z.dtype == dS0.dtype == torch.float32
    err = errors(out)
    assert err["y"] <= 1e-2, err
    assert err["S"] <= 1e-5 and err["z"] <= 1e-5, err  # sums of exact products of bf16 inputs, in fp32
    assert max(err[n] for n in NAMES[3:]) <= 2e-2, err


def test_fp16_inputs():
    """fp16 inputs are computed with fp32 products (fp16 could not hold the state); the outputs
    and gradients are fp16, so their own rounding (2^-11) is what remains."""
    out = run_both(63, seed=4, dtype=torch.float16, init=True)
    assert out["kernel"][0].dtype == out["kernel"][3].dtype == torch.float16
    err = errors(out)
    assert max(err.values()) <= 2e-3, err


def test_padding_keys():
    """Left padding (row 1) and right padding (row 0) through ``key_mask``; the padded keys hold
    NaN and huge values, which must not leak into outputs or gradients."""
    T = 40
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, :9] = False
    mask[0, -5:] = False

    def corrupt(fk, v):
        pad = ~mask[:, None, :, None]
        return fk.masked_fill(pad, float("nan")), v.masked_fill(pad, 1e6)

    out = run_both(T, seed=5, key_mask=mask, corrupt=corrupt)
    err = errors(out)
    assert max(err.values()) <= 1e-5, err
    y, _, _, dfq, dfk, dv = (x.detach() for x in out["kernel"])
    assert torch.isfinite(y).all() and torch.isfinite(dfq).all()
    assert float(y[1, :, :9].abs().max()) == 0.0  # no valid key yet: y = 0
    assert float(dfk[1, :, :9].abs().max()) == 0.0 and float(dv[0, :, -5:].abs().max()) == 0.0


def test_split_sequence_with_carried_state_equals_whole():
    T = 75
    fq, fk, v, _, _ = make_inputs(T, seed=11)
    whole, (S, z) = chunk_linear_attention(fq, fk, v, output_final_state=True, chunk_size=16)
    state, parts = None, []
    for a, b in [(0, 1), (1, 40), (40, 75)]:
        y, state = chunk_linear_attention(
            fq[:, :, a:b], fk[:, :, a:b], v[:, :, a:b], state, output_final_state=True, chunk_size=16
        )
        parts.append(y)
    assert rel(torch.cat(parts, 2), whole) <= 1e-5
    assert rel(state[0], S) <= 1e-5 and rel(state[1], z) <= 1e-5


def test_step_matches_reference():
    b = 3
    g = torch.Generator().manual_seed(21)
    fq, fk = (torch.rand(b, H, F, generator=g).to(DEVICE) for _ in range(2))
    v = torch.randn(b, H, DV, generator=g).to(DEVICE)
    S = torch.rand(b, H, F, DV, generator=g).to(DEVICE)
    z = torch.rand(b, H, F, generator=g).to(DEVICE) + 0.5
    mask = torch.tensor([True, False, True], device=DEVICE)
    fk[1] = float("nan")  # a padding token's features must not reach the state
    state = dataclass_state(S, z)
    y_ref, new = hybrid_step(fq, fq, v, fq, fk, None, 0, 1.0, mask, state)
    y, S1, z1 = linear_step(fq, fk, v, S, z, key_mask=mask)
    assert rel(y, y_ref) <= 1e-6 and rel(S1, new.S) <= 1e-6 and rel(z1, new.z) <= 1e-6
    assert torch.equal(S1[1], S[1]) and torch.equal(z1[1], z[1])
    S2, z2 = S.clone(), z.clone()
    y2, S3, z3 = linear_step(fq, fk, v, S2, z2, key_mask=mask, inplace=True)
    assert S3.data_ptr() == S2.data_ptr() and torch.equal(S2, S1) and torch.equal(z2, z1) and torch.equal(y2, y)


def dataclass_state(S, z):
    b, h, f, dv = S.shape
    state = HybridState.empty(b, h, f, dv, f, device=S.device)
    state.S, state.z = S, z
    return state


def test_steps_continue_the_chunked_form():
    """Prefill with the chunked kernel, then decode token by token: the same outputs as the
    chunked kernel over the whole sequence."""
    T, P = 24, 19
    fq, fk, v, _, _ = make_inputs(T, seed=13)
    whole, _ = chunk_linear_attention(fq, fk, v, chunk_size=16)
    _, (S, z) = chunk_linear_attention(fq[:, :, :P], fk[:, :, :P], v[:, :, :P], output_final_state=True, chunk_size=16)
    ys = []
    for t in range(P, T):
        y, S, z = linear_step(fq[:, :, t], fk[:, :, t], v[:, :, t], S, z)
        ys.append(y)
    assert rel(torch.stack(ys, 2), whole[:, :, P:]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 37])
def test_hedgehog_feature_map(T, dtype):
    D, Fh = 12, 10
    torch.manual_seed(T)
    fmap = HedgehogFeatureMap(3, D, Fh).to(DEVICE)
    with torch.no_grad():
        fmap.weight.add_(torch.randn_like(fmap.weight) * 0.5)  # off the identity
    x = (torch.randn(B, 3, T, D) * 2).to(device=DEVICE, dtype=dtype)
    g = torch.randn(B, 3, T, 2 * Fh).to(DEVICE)
    results = []
    for fn in (lambda x: fmap(x), lambda x: hedgehog_feature_map(x, fmap.weight)):
        xl = x.clone().requires_grad_()
        fmap.weight.grad = None
        phi = fn(xl)
        (phi * g).sum().backward()
        results.append((phi, xl.grad, fmap.weight.grad.clone()))
    (phi_ref, dx_ref, dw_ref), (phi, dx, dw) = results
    assert phi.dtype == phi_ref.dtype == torch.float32 and dx.dtype == dtype
    # bf16: phi and dW come out in fp32 (the map's dtype), dx in bf16, rounded to 2^-9
    tol = (1e-5, 1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2, 1e-4)
    errs = rel(phi, phi_ref), rel(dx, dx_ref), rel(dw, dw_ref)
    assert all(e <= t for e, t in zip(errs, tol)), errs


def test_dispatch(monkeypatch):
    import linearize.kernels.linear as linear

    T = 20
    fq, fk, v, _, _ = make_inputs(T, seed=17)
    q = torch.randn(B, H, T, 8, device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False
    chunk, step = Spy(monkeypatch, linear, "chunk_linear_attention"), Spy(monkeypatch, linear, "linear_step")

    def call(**kw):
        return hybrid_attention(q, q, v, fq, fk, None, 0, 1.0, key_mask=mask, output_state=True, **kw)

    monkeypatch.setenv("LINEARIZE_KERNELS", "reference")
    y_ref, s_ref = call()
    assert chunk.calls == 0
    monkeypatch.setenv("LINEARIZE_KERNELS", "auto")
    call()
    assert chunk.calls == (1 if DEVICE == "cuda" else 0)  # auto: the kernels for CUDA tensors only
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    y, s = call()
    assert chunk.calls >= 1
    assert y.dtype == torch.float32 and rel(y, y_ref) <= 1e-5 and rel(s.S, s_ref.S) <= 1e-5 and rel(s.z, s_ref.z) <= 1e-5
    for name in ("k", "v", "fk", "mask", "sink_k", "sink_v", "sink_mask"):
        assert getattr(s, name).shape == getattr(s_ref, name).shape, name
    # decode: one token with a state goes to the fused step, and equals the reference step
    one = [x[:, :, :1] for x in (q, v, fq, fk)]
    y1, s1 = hybrid_attention(one[0], one[0], one[1], one[2], one[3], None, 0, 1.0, key_mask=mask[:, :1], state=s,
                              output_state=True)
    assert step.calls == 1
    monkeypatch.setenv("LINEARIZE_KERNELS", "reference")
    y1_ref, s1_ref = hybrid_attention(one[0], one[0], one[1], one[2], one[3], None, 0, 1.0, key_mask=mask[:, :1],
                                      state=s_ref, output_state=True)
    assert rel(y1, y1_ref) <= 1e-5 and rel(s1.S, s1_ref.S) <= 1e-5 and rel(s1.z, s1_ref.z) <= 1e-5
    # forcing Triton where it has no kernel is an error, not a silent fallback
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    with pytest.raises(ValueError, match="no Triton kernel for window=200"):
        hybrid_attention(q, q, v, fq, fk, torch.full((H,), 0.1, device=DEVICE), 200, 1.0)
    monkeypatch.setenv("LINEARIZE_KERNELS", "fast")
    with pytest.raises(ValueError, match="LINEARIZE_KERNELS must be one of"):
        call()


def test_hedgehog_student_through_the_kernels(monkeypatch):
    """A tiny Llama with Hedgehog students (left-padded batch): logits, the gradients of the
    feature maps, and greedy decoding through the cache (the fused step) are the same with the
    Triton kernels as with the reference. The maps run in PyTorch here (``triton``, not
    ``triton-fused``): this is the unfused kernels' test; tests/kernels/test_triton_fused_maps.py
    has the fused one's."""
    from conftest import converted_model, token_ids

    import linearize.kernels.linear as linear
    from linearize import ConversionSpec, students

    chunk, step = Spy(monkeypatch, linear, "chunk_linear_attention"), Spy(monkeypatch, linear, "linear_step")
    model = converted_model("llama", ConversionSpec("hedgehog"), seed=0).to(DEVICE)
    x = token_ids(2, 20, seed=1).to(DEVICE)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    params = [p for s in students(model).values() for _, p in s.student_parameters()]
    results = through_kernels(monkeypatch, model, x, mask, params, max_new_tokens=6)
    (l_ref, g_ref, t_ref, _), (l_tri, g_tri, t_tri, _) = results["reference"], results["triton"]
    assert rel(l_tri, l_ref) <= 1e-5
    assert max(rel(a, b) for a, b in zip(g_tri, g_ref)) <= 1e-4
    assert t_tri.tolist() == t_ref.tolist()
    assert chunk.calls >= 6 and step.calls >= 3 * 5  # 3 layers: forward, prefill; a step per new token


def test_bad_arguments_say_what_to_fix():
    fq, fk, v, S0, z0 = make_inputs(8, seed=1)
    with pytest.raises(ValueError, match="v must be"):
        chunk_linear_attention(fq, fk, v[:, :, :4])
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_linear_attention(fq, fk, v, (S0, z0[..., :3]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_linear_attention(fq, fk, v, chunk_size=48)
    with pytest.raises(ValueError, match="key_mask must be"):
        chunk_linear_attention(fq, fk, v, key_mask=torch.ones(B, 9, dtype=torch.bool, device=DEVICE))


# ----------------------------------------------------------------------------- real shapes, on the GPU


def _hedgehog_like(shape, device, dtype):
    """Features as a Hedgehog map gives them: two softmaxes of F/2 each."""
    z = torch.randn(*shape[:-1], shape[-1] // 2, device=device) * 2
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1).to(dtype)


def check_bf16_against_reference(b, h, T, f, dv, device, parallel=False):
    """bf16 kernel vs the fp32 reference, initial state in and final state out, every gradient
    (``parallel``: through the two-pass forward)."""
    torch.manual_seed(0)
    fq, fk = (_hedgehog_like((b, h, T, f), device, torch.bfloat16) for _ in range(2))
    v = torch.randn(b, h, T, dv, device=device).to(torch.bfloat16)
    S0 = torch.rand(b, h, f, dv, device=device)
    z0 = torch.rand(b, h, f, device=device) + 0.5
    dy, dS, dz = (torch.randn(s, device=device) for s in (v.shape, S0.shape, z0.shape))
    out = {}
    for impl in ("kernel", "reference"):
        leaves = [x.clone().requires_grad_() for x in (fq, fk, v, S0, z0)]
        a, k_, c, s, z = leaves
        if impl == "kernel":
            y, (S, Z) = chunk_linear_attention(a, k_, c, (s, z), output_final_state=True, parallel=parallel)
        else:
            y, S, Z = reference(a, k_, c, s, z)
        ((y.float() * dy).sum() + (S * dS).sum() + (Z * dz).sum()).backward()
        out[impl] = [y, S, Z, *(l.grad for l in leaves)]
    err = errors(out)
    assert err["y"] <= 1e-2 and err["S"] <= 1e-4 and err["z"] <= 1e-4, err
    assert max(err[n] for n in NAMES[3:]) <= 2e-2, err
    return err


@pytest.mark.parametrize("parallel", [False, True])
def test_bf16_hedgehog_features_small(parallel):
    """The GPU test's code at a small shape (two chunks of 64, F = 32)."""
    check_bf16_against_reference(1, 2, 100, 32, 16, DEVICE, parallel=parallel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("b,h,T", [(1, 32, 8192), (16, 9, 1024)])
def test_gpu_parallel_forward_real_shapes_bf16(b, h, T):
    """The two-pass forward compiled: B=1 x 32 heads at 8K (the states pass's blocks shrunk to
    fill the multiprocessors) and the converted SmolLM2's batch 16 x 9 heads."""
    check_bf16_against_reference(b, h, T, 128, 64, "cuda", parallel=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled Triton)")
def test_gpu_chunk_real_shapes_bf16():
    check_bf16_against_reference(2, 8, 4096, 128, 64, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled Triton)")
def test_gpu_step_and_hedgehog_real_shapes():
    check_step_and_hedgehog(b=16, h=32, f=128, dv=128, d=128, T=4096, device="cuda")


def check_step_and_hedgehog(b, h, f, dv, d, T, device):
    """A decode step of a batch, and the Hedgehog map (fp32 and bf16 inputs, fp32 map)."""
    torch.manual_seed(1)
    fq, fk = (_hedgehog_like((b, h, f), device, torch.float32) for _ in range(2))
    v = torch.randn(b, h, dv, device=device)
    S = torch.rand(b, h, f, dv, device=device)
    z = torch.rand(b, h, f, device=device) + 0.5
    keep = torch.ones(b, dtype=torch.bool, device=device)
    y_ref, new = hybrid_step(fq, fq, v, fq, fk, None, 0, 1.0, keep, dataclass_state(S, z))
    y, S1, z1 = linear_step(fq, fk, v, S, z)
    assert rel(y, y_ref) <= 1e-5 and rel(S1, new.S) <= 1e-6 and rel(z1, new.z) <= 1e-6

    heads = min(h, 8)
    fmap = HedgehogFeatureMap(heads, d, f // 2).to(device)
    with torch.no_grad():
        fmap.weight.add_(torch.randn_like(fmap.weight) * 0.1)
    x = torch.randn(2, heads, T, d, device=device)
    g = torch.randn(2, heads, T, f, device=device)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        res = []
        for fn in (fmap, lambda t: hedgehog_feature_map(t, fmap.weight)):
            xl = x.to(dtype).clone().requires_grad_()
            fmap.weight.grad = None
            phi = fn(xl)
            (phi * g).sum().backward()
            res.append((phi, xl.grad, fmap.weight.grad.clone()))
        errs = [rel(a, b_) for a, b_ in zip(res[1], res[0])]
        assert max(errs) <= tol, (dtype, errs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled Triton)")
def test_gpu_chunk_many_programs_bf16():
    """Batch 16 x 9 heads (the converted SmolLM2 at batch 16): with as many programs as that the
    launchers keep their wider blocks of value columns, which the B=2 tests (blocks shrunk to
    fill the multiprocessors) never compile; such a block faulted in the hybrid forward on an H200."""
    check_bf16_against_reference(16, 9, 1024, 128, 64, "cuda")


def test_auto_sends_cuda_tensors_to_the_kernels_and_everything_else_to_the_reference(monkeypatch):
    """``LINEARIZE_KERNELS=auto`` (the default): the kernels for CUDA tensors that one takes, the
    reference for CPU tensors, for calls no kernel takes, and where triton cannot be imported;
    ``reference`` and ``triton`` force either."""
    import linearize.kernels as K

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LINEARIZE_KERNELS", raising=False)
    monkeypatch.setattr(K, "triton_available", lambda: True)
    assert K._use_triton(device=cuda) and not K._use_triton(device=cpu) and not K._use_triton()
    assert not K._use_triton("window=256", device=cuda)  # no kernel for it: the reference, no error
    x = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    step, chunked = dict(inputs=(x,) * 5, chunked=False), dict(inputs=(x,) * 5)
    assert K._beyond_hybrid_kernels(256, 4, **step) is not None
    assert K._beyond_hybrid_kernels(64, 4, **step) is None and K._beyond_hybrid_kernels(64, 65, **step) is not None
    assert K._beyond_hybrid_kernels(128, 4, **chunked) is None and K._beyond_hybrid_kernels(129, 4, **chunked)
    # heads of 128 on CUDA: no compiled hybrid kernel (they fault on sm_90), whatever the window
    wide = types.SimpleNamespace(shape=(1, 1, 4, 128), dtype=torch.bfloat16, is_cuda=True)
    assert "heads of 128" in K._beyond_hybrid_kernels(16, 4, inputs=(wide,) * 5)
    monkeypatch.setenv("LINEARIZE_KERNELS", "reference")
    assert not K._use_triton(device=cuda)
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    assert K._use_triton(device=cpu)
    with pytest.raises(ValueError, match="no Triton kernel for window=256"):
        K._use_triton("window=256", device=cuda)
    monkeypatch.delenv("LINEARIZE_KERNELS")
    monkeypatch.setattr(K, "triton_available", lambda: False)
    assert not K._use_triton(device=cuda)


# ----------------------------------------------------------------------------- the two-pass forward
def run_impls(T, seed, impls, dtype=torch.float32, init=False, chunk_size=16, offset=0.0, key_mask=None, f=F, dv=DV,
              monkeypatch=None):
    """Outputs and gradients (the final state's included) of each of ``impls``: ``{name: None}``
    for the reference, ``{name: (parallel forward, parallel backward)}`` for the kernels (a
    backward of None leaves :data:`PARALLEL_BACKWARD` as it is; otherwise ``monkeypatch`` sets it)."""
    import linearize.kernels.linear.chunk as lchunk

    fq, fk, v, S0, z0 = make_inputs(T, seed, dtype, offset=offset, f=f, dv=dv)
    dy, dS, dz = cotangents(v.shape, S0.shape, z0.shape, seed)
    out = {}
    for impl, passes in impls.items():
        leaves = [x.clone().requires_grad_() for x in (fq, fk, v, S0, z0)]
        a, b_, c, s, z = leaves
        if passes is None:
            y, S, Z = reference(a, b_, c, s if init else None, z if init else None, key_mask)
        else:
            if passes[1] is not None:
                monkeypatch.setattr(lchunk, "PARALLEL_BACKWARD", passes[1])
            y, (S, Z) = chunk_linear_attention(a, b_, c, (s, z) if init else None, output_final_state=True,
                                               chunk_size=chunk_size, key_mask=key_mask, parallel=passes[0])
        ((y.float() * dy).sum() + (S * dS).sum() + (Z * dz).sum()).backward()
        out[impl] = [y, S, Z, *[l.grad for l in (leaves if init else leaves[:3])]]
    return out


def run_forwards(T, seed, **kw):
    """Through the sequential forward, the two-pass one and the reference."""
    return run_impls(T, seed, {"sequential": (False, None), "parallel": (True, None), "reference": None}, **kw)


def assert_within_reference_tolerances(out, ref, T, init, bf16):
    """Outputs and gradients against the reference's: 1e-5 in fp32; with bf16 inputs 1e-2 on
    ``y``, 1e-5 on the final state, 2e-2 on the gradients."""
    err = {n: rel(a, b) for n, a, b in zip(NAMES, out, ref)}
    if T == 1 and not init:  # y_0 = v_0 whatever fq: dfq is zero up to rounding
        del err["dfq"]
    if bf16:
        assert err["y"] <= 1e-2 and err["S"] <= 1e-5 and err["z"] <= 1e-5, err
        assert max(err[n] for n in NAMES[3:] if n in err) <= 2e-2, err
    else:
        assert max(err.values()) <= 1e-5, err


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize(
    "T,dtype,init", [(1, torch.float32, False), (15, torch.float32, True), (63, torch.bfloat16, False),
                     (100, torch.float32, True), (130, torch.bfloat16, True)],
)
def test_parallel_forward_matches_sequential_and_reference(T, dtype, init, chunk_size):
    """The two-pass forward (each chunk's starting state, then all chunks at once): lengths that
    are not a multiple of the chunk, with and without an initial state, fp32 and bf16 (values
    offset by 3). Outputs, final state and every gradient (the backward is shared, and reads the
    forward's ``y`` and ``d``) equal the sequential forward's up to the order of a product's sum
    (1e-6 in fp32, 1e-3 on bf16 tensors, where that can cross a rounding boundary), and the
    reference within the file's tolerances."""
    bf16 = dtype == torch.bfloat16
    out = run_forwards(T, seed=40 + T, dtype=dtype, init=init, chunk_size=chunk_size, offset=3.0 if bf16 else 0.0)
    par, seq, ref = out["parallel"], out["sequential"], out["reference"]
    assert par[0].dtype == dtype and len(par) == (8 if init else 6)
    for name, a, b in zip(NAMES, par, seq):
        assert rel(a, b) <= (1e-3 if a.dtype == torch.bfloat16 else 1e-6), (name, rel(a, b))
    assert_within_reference_tolerances(par, ref, T, init, bf16)


def test_parallel_forward_padding_keys():
    """Left and right padding keys through the two-pass forward: the reference's results."""
    T = 40
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :7] = False
    mask[-1, -5:] = False
    out = run_forwards(T, seed=9, init=True, key_mask=mask.to(DEVICE))
    for name, a, b in zip(NAMES, out["parallel"], out["reference"]):
        assert rel(a, b) <= 1e-5, name


@pytest.mark.parametrize("parallel", [False, True])
def test_the_forward_reads_no_memory_it_did_not_write(monkeypatch, parallel):
    """Every buffer the forward allocates (the chunk states ``h``, ``hz``, ``y``, ``d``, the final
    state) starts as NaN, so a load of a slot nobody wrote shows in the results (on the CPU
    ``torch.empty`` often hands out zeroed memory, which would hide it). Both forwards, T = 100
    with 64-token chunks (a last chunk with tokens past the end)."""
    import linearize.kernels.linear.chunk as lchunk

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    fq, fk, v, S0, z0 = make_inputs(100, seed=12, dtype=torch.bfloat16)
    monkeypatch.setattr(lchunk.torch, "empty", nan_empty)
    y, _, d, S, z = lchunk.linear_attention_fwd(fq, fk, v, S0, z0, True, 64, keep_fp32_output=True, parallel=parallel)
    monkeypatch.undo()
    for name, t in (("y", y), ("d", d), ("S", S), ("z", z)):
        assert torch.isfinite(t).all(), name
    y_ref, S_ref, _ = reference(fq, fk, v, S0, z0)
    assert rel(y, y_ref) <= 1e-2 and rel(S, S_ref) <= 1e-5


def test_parallel_forward_is_off_by_default(monkeypatch):
    """The sequential forward stays the default until a GPU run measures the two-pass one; the
    module switch picks the two-pass forward when ``parallel`` is not given."""
    import linearize.kernels.linear.chunk as lchunk

    assert lchunk.PARALLEL_FORWARD is False
    walk, states = (Launches(monkeypatch, lchunk, n) for n in ("_fwd_kernel", "_fwd_states_kernel"))
    fq, fk, v, _, _ = make_inputs(20, seed=7)
    y, _ = chunk_linear_attention(fq, fk, v)
    assert (walk.calls, states.calls) == (1, 0)
    monkeypatch.setattr(lchunk, "PARALLEL_FORWARD", True)
    y_par, _ = chunk_linear_attention(fq, fk, v)
    assert (walk.calls, states.calls) == (2, 1)  # the states, then the forward kernel on every chunk at once
    assert rel(y_par, y) <= 1e-6
    chunk_linear_attention(fq, fk, v, parallel=False)
    assert (walk.calls, states.calls) == (3, 1)


def test_parallel_forward_in_several_launches(monkeypatch):
    """The two-pass forward's output pass launches at most ``MAX_GRID_Y`` one-chunk sequences at a
    time (CUDA's limit on the grid's second axis); with the limit at 3, the B x H x chunks
    sequences go in launches of 3 and a last one of the rest, and y, d and the final state are
    those of one launch."""
    import linearize.kernels.linear.chunk as lchunk

    fq, fk, v, S0, z0 = make_inputs(100, seed=21)
    one = lchunk.linear_attention_fwd(fq, fk, v, S0, z0, True, 64, parallel=True)
    monkeypatch.setattr(lchunk, "MAX_GRID_Y", 3)
    launches = Launches(monkeypatch, lchunk, "_fwd_kernel")
    many = lchunk.linear_attention_fwd(fq, fk, v, S0, z0, True, 64, parallel=True)
    n = B * H * triton.cdiv(100, lchunk._par_config(F, DV, 64, B * H, torch.float32)[0])
    assert n > 3 and [g[1] for g in launches.grids] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    for name, a, b in zip(("y", "d", "S", "z"), (one[0], one[2], one[3], one[4]), (many[0], many[2], many[3], many[4])):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- the chunk-parallel backward
def run_backwards(monkeypatch, T, seed, **kw):
    """Through the walking backward, the chunk-parallel one (``PARALLEL_BACKWARD``) and the reference."""
    return run_impls(T, seed, {"walk": (None, False), "parallel": (None, True), "reference": None},
                     monkeypatch=monkeypatch, **kw)


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize(
    "T,dtype,init,f,dv", [(1, torch.float32, False, F, DV), (15, torch.float32, True, F, DV),
                          (63, torch.bfloat16, False, F, DV), (100, torch.float32, True, 70, 70),
                          (130, torch.bfloat16, True, F, DV)],
)
def test_parallel_backward_matches_walk_and_reference(monkeypatch, T, dtype, init, f, dv, chunk_size):
    """The chunk-parallel backward (each chunk's starting state and adjoint state, then the
    backward kernel on every chunk at once): lengths that are not a multiple of the chunk, with
    and without an initial state, the final state's gradient always, fp32 and bf16 (values
    offset by 3), and F = Dv = 70 (two blocks of features and of value columns in the states
    passes). Every gradient equals the walk's up to fp32 rounding (the states are summed a chunk
    at a time instead of in the walk's registers: 1e-5; 1e-3 with bf16 inputs, where the
    backward rounds what it derives from them to bf16 for its products), and the reference's
    within the file's tolerances."""
    bf16 = dtype == torch.bfloat16
    out = run_backwards(monkeypatch, T, seed=70 + T, dtype=dtype, init=init, chunk_size=chunk_size,
                        offset=3.0 if bf16 else 0.0, f=f, dv=dv)
    par, walk, ref = out["parallel"], out["walk"], out["reference"]
    assert len(par) == (8 if init else 6)
    for name, a, b in zip(NAMES, par, walk):
        assert a.dtype == b.dtype and rel(a, b) <= (1e-3 if bf16 else 1e-5), (name, rel(a, b))
    assert_within_reference_tolerances(par, ref, T, init, bf16)


def test_parallel_backward_padding_keys(monkeypatch):
    """Left and right padding keys through the chunk-parallel backward: the reference's gradients."""
    T = 40
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :7] = False
    mask[-1, -5:] = False
    out = run_backwards(monkeypatch, T, seed=11, init=True, key_mask=mask.to(DEVICE))
    for name, a, b in zip(NAMES, out["parallel"], out["reference"]):
        assert rel(a, b) <= 1e-5, name


def test_parallel_backward_in_several_launches_reads_only_what_it_wrote(monkeypatch):
    """The chunk-parallel backward with every buffer it allocates starting as NaN (a read of a
    slot nobody wrote shows in the gradients) and its last pass in launches of at most 3
    one-chunk sequences (``MAX_GRID_Y``): the gradients of one launch, all finite. T = 100 in
    64-token chunks (a last chunk with tokens past the end)."""
    import linearize.kernels.linear.chunk as lchunk

    fq, fk, v, S0, z0 = make_inputs(100, seed=31, dtype=torch.bfloat16)
    y, y32, d, _, _ = lchunk.linear_attention_fwd(fq, fk, v, S0, z0, True, 64, keep_fp32_output=True)
    dy, dS, dz = cotangents(v.shape, S0.shape, z0.shape, 31)
    args = (fq, fk, v, y32, d, dy.to(torch.bfloat16), S0, z0, dS, dz, 64)
    one = lchunk.linear_attention_bwd(*args, parallel=True)
    walk = lchunk.linear_attention_bwd(*args, parallel=False)
    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(lchunk.torch, "empty", nan_empty)
    monkeypatch.setattr(lchunk, "MAX_GRID_Y", 3)
    launches = Launches(monkeypatch, lchunk, "_bwd_kernel")
    many = lchunk.linear_attention_bwd(*args, parallel=True)
    monkeypatch.undo()
    n = B * H * triton.cdiv(100, lchunk._bwd_config(F, DV, 64, B * H, torch.bfloat16)[0])
    assert n > 3 and [g[1] for g in launches.grids] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    for name, a, b, w in zip(("dfq", "dfk", "dv", "dS0", "dz0"), one, many, walk):
        assert torch.isfinite(b).all() and torch.equal(a, b), name
        assert rel(a, w) <= 1e-3, name


def test_parallel_backward_is_off_by_default(monkeypatch):
    """The walking backward is the default (the chunk-parallel one ran at 0.77x its speed on an
    H200); the module switch picks the chunk-parallel one."""
    import linearize.kernels.linear.chunk as lchunk

    assert lchunk.PARALLEL_BACKWARD is False
    states = Launches(monkeypatch, lchunk, "_bwd_states_kernel")
    fq, fk, v, _, _ = make_inputs(20, seed=8)
    fq.requires_grad_()
    chunk_linear_attention(fq, fk, v)[0].sum().backward()
    assert states.calls == 0
    monkeypatch.setattr(lchunk, "PARALLEL_BACKWARD", True)
    chunk_linear_attention(fq, fk, v)[0].sum().backward()
    assert states.calls == 1
