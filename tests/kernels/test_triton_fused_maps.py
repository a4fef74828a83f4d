"""The fused feature-map attention kernels (:mod:`linearize.kernels.linear.fused`) equal the
PyTorch maps followed by the reference attention: outputs, final states and every gradient (q,
k, v, both maps' parameters, the initial state), for the Hedgehog and the NP-Map map, tied and
untied; and the Hedgehog student through them equals the reference path.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``), on tiny
shapes; with CUDA the same tests run compiled, and the ``gpu`` tests add real shapes. Errors are
relative, ``||a - b|| / ||b||``, against the fp32 reference (``HedgehogFeatureMap`` /
``NPMapFeatureMap``, then ``chunk_hybrid_attention`` with ``window=0``), with random ``dy`` and
random gradients of the final state.

Tolerances. fp32 inputs: 1e-5 (every product in fp32; seen over all 32 cases of the slow test:
at most 2e-6, on dk; 6e-7 on everything else). bf16 inputs (the reference gets the same bf16
values, in fp32): the kernels round the features to bf16 for the attention's products (relative
2^-9 = 2e-3 at most per feature, the same rounding as the unfused Triton path on fp32 features
and bf16 values) and the bf16 outputs ``dq, dk, dv`` are rounded once more; products whose
result cancels keep fp32 operands (hi + lo halves). The features' rounding is systematic where
features take similar values, so it shows almost whole in the sums ``S, z``. Seen in the
interpreter (T = 40 and 100, D = 12 and 16): ``y`` 1.5-1.7e-3, ``S, z`` 2.2-2.8e-3, ``dq, dk``
3.2-4.4e-3, ``dv`` 6.1-6.4e-3, the maps' weights and reflections 2.4e-4 to 3.7e-3, ``dS0, dz0``
6e-4 to 1.1e-3. Asserted, about 3x above: 5e-3 on ``y``, 1e-2 on ``S, z`` and the maps'
parameters, 2e-2 on ``dq, dk, dv`` (as the unfused kernels' tests), 5e-3 on ``dS0, dz0``.
"""


import pytest
import torch

from triton_env import DEVICE, Spy, interpreting, rel, through_kernels, triton  # noqa: F401  (sets TRITON_INTERPRET first)

from linearize.feature_maps import EluFeatureMap, HedgehogFeatureMap, NPMapFeatureMap
from linearize.kernels import HybridState, chunk_hybrid_attention, feature_map_attention
from linearize.kernels.linear import fused
from linearize.kernels.linear.fused import fused_map_linear_attention, npmap_weight

B, H, D, FH, DV = 2, 2, 12, 10, 12  # F = 20 features; none a power of two
MAPS = {"hedgehog": HedgehogFeatureMap, "npmap": NPMapFeatureMap}


def make_maps(kind, seed, tied=False, h=H, d=D, fh=FH, device=DEVICE):
    """A query and a key map off their initialisation (the same module when ``tied``)."""
    torch.manual_seed(seed)
    maps = [MAPS[kind](h, d, fh) for _ in range(1 if tied else 2)]
    with torch.no_grad():
        for m in maps:
            m.weight.add_(torch.randn_like(m.weight) * 0.5)
    maps = [m.to(device) for m in maps]
    return (maps[0], maps[0]) if tied else tuple(maps)


def make_inputs(T, seed, dtype=torch.float32, b=B, h=H, d=D, fh=FH, dv=DV, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, T, d, generator=g) * 1.5
    k = torch.randn(b, h, T, d, generator=g) * 1.5
    v = torch.randn(b, h, T, dv, generator=g)
    S0 = torch.rand(b, h, 2 * fh, dv, generator=g) * 2 - 0.5
    z0 = torch.rand(b, h, 2 * fh, generator=g) + 0.5
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    return q, k, v, S0.to(device), z0.to(device)


def map_params(kind, fmap):
    return [fmap.weight] + ([fmap.reflection] if kind == "npmap" else [])


def kernel_call(kind, mq, mk, q, k, v, state=None, key_mask=None, chunk_size=16):
    reflections = dict(query_reflection=mq.reflection, key_reflection=mk.reflection) if kind == "npmap" else {}
    return fused_map_linear_attention(
        q, k, v, kind, mq.weight, mk.weight, **reflections, initial_state=state, output_final_state=True,
        chunk_size=chunk_size, key_mask=key_mask,
    )


def reference_call(mq, mk, q, k, v, state=None, key_mask=None):
    """The PyTorch maps, then chunk_hybrid_attention with window=0: ``(y, (S, z))``."""
    b, h, _, d = q.shape
    fq, fk = mq(q.float()), mk(k.float())
    carried = None
    if state is not None:
        carried = HybridState.empty(b, h, d, v.shape[-1], fq.shape[-1], device=q.device)
        carried.S, carried.z = state
    y, new = chunk_hybrid_attention(q, k, v, fq, fk, None, 0, 1.0, key_mask, carried, chunk_size=16, output_state=True)
    return y, (new.S, new.z)


def run_both(kind, T, seed, init=False, tied=False, dtype=torch.float32, key_mask=None, corrupt=None, chunk_size=16,
             b=B):
    """``{name: (kernel, reference)}`` for the outputs and every gradient. ``corrupt`` edits the
    kernel's copy of ``(k, v)`` (e.g. NaN at padding), the reference gets the clean inputs."""
    mq, mk = make_maps(kind, seed, tied)
    q, k, v, S0, z0 = make_inputs(T, seed, dtype, b=b)
    g = torch.Generator().manual_seed(seed + 1000)
    dy, dS, dz = (torch.randn(s, generator=g).to(DEVICE) for s in (v.shape, S0.shape, z0.shape))
    params = map_params(kind, mq) + ([] if tied else map_params(kind, mk))
    out = {}
    for impl in ("kernel", "reference"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, S0, z0)]
        for p in params:
            p.grad = None
        a, b_, c, s, z = leaves
        if impl == "kernel":
            if corrupt is not None:
                b_, c = corrupt(b_, c)
            y, (S, Z) = kernel_call(kind, mq, mk, a, b_, c, (s, z) if init else None, key_mask, chunk_size)
        else:
            y, (S, Z) = reference_call(mq, mk, a, b_, c, (s, z) if init else None, key_mask)
        ((y.float() * dy).sum() + (S * dS).sum() + (Z * dz).sum()).backward()
        results = dict(y=y, S=S, z=Z, dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        names = [f"d{side}_{n}" for side in (("qk",) if tied else ("q", "k")) for n in ("weight", "reflection")
                 if n == "weight" or kind == "npmap"]
        results.update({n: p.grad.clone() for n, p in zip(names, params)})
        if init:
            results.update(dS0=s.grad, dz0=z.grad)
        out[impl] = results
    return {n: (out["kernel"][n], out["reference"][n]) for n in out["reference"]}


def errors(pairs):
    return {n: rel(a, b) for n, (a, b) in pairs.items()}


def check_fp32(kind, T, init, tied, seed, b=B):
    pairs = run_both(kind, T, seed=seed, init=init, tied=tied, b=b)
    expected = 6 + (1 if kind == "hedgehog" else 2) * (1 if tied else 2) + (2 if init else 0)
    assert len(pairs) == expected and pairs["y"][0].dtype == torch.float32
    err = errors(pairs)
    if T == 1 and not init:
        # y_0 = v_0 whatever q: the query side's gradients are zero up to rounding, in both (a
        # tied map's gradient, dqk_*, is the key side's and is compared as usual)
        for name in [n for n in err if n == "dq" or n.startswith("dq_")]:
            assert max(float(x.abs().max()) for x in pairs[name]) <= 1e-6, name
            del err[name]
    assert max(err.values()) <= 1e-5, err


# every length, both maps, tied and untied maps, with and without an initial state (the longest
# with one sequence: the interpreter's time grows with B * H * T)
@pytest.mark.parametrize("kind,T,init,tied,b", [
    ("hedgehog", 1, True, False, 2),
    ("npmap", 15, False, True, 2),
    ("hedgehog", 63, False, True, 2),
    ("npmap", 100, True, False, 1),
])
def test_matches_reference_fp32(kind, T, init, tied, b):
    check_fp32(kind, T, init, tied, seed=T, b=b)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", [1, 15, 63, 100])
@pytest.mark.parametrize("kind", ["hedgehog", "npmap"])
def test_matches_reference_fp32_every_case(kind, T, init, tied):
    check_fp32(kind, T, init, tied, seed=T + 1)


@pytest.mark.parametrize("kind,init", [("hedgehog", False), ("npmap", True)])
def test_left_padding(kind, init):
    """Row 1 left-padded, row 0 right-padded; the padded keys and values hold NaN and huge
    values in the kernel's inputs, which must not reach any output or gradient. Without a
    state, the queries before row 1's first real token see no key: y = 0 and no gradient."""
    T = 24
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False
    mask[0, -3:] = False

    def corrupt(k, v):
        pad = ~mask[:, None, :, None]
        return k.masked_fill(pad, float("nan")), v.masked_fill(pad, 1e6)

    pairs = run_both(kind, T, seed=5, init=init, key_mask=mask, corrupt=corrupt)
    err = errors(pairs)
    assert max(err.values()) <= 1e-5, err
    y, dq, dk, dv = (pairs[n][0].detach() for n in ("y", "dq", "dk", "dv"))
    assert all(torch.isfinite(x).all() for x in (y, dq, dk, dv))
    assert float(dk[1, :, :7].abs().max()) == 0.0 and float(dk[0, :, -3:].abs().max()) == 0.0
    assert float(dv[1, :, :7].abs().max()) == 0.0
    if not init:
        assert float(y[1, :, :7].abs().max()) == 0.0 and float(dq[1, :, :7].abs().max()) == 0.0
        assert float(y[1, :, 7:].abs().min()) > 0.0


def test_split_sequence_with_carried_state_equals_whole():
    kind, T = "npmap", 40
    mq, mk = make_maps(kind, 11)
    q, k, v, _, _ = make_inputs(T, seed=11)
    whole, (S, z) = kernel_call(kind, mq, mk, q, k, v)
    ref, (S_ref, z_ref) = reference_call(mq, mk, q, k, v)
    state, parts = None, []
    for a, b in [(0, 1), (1, 23), (23, 40)]:
        y, state = kernel_call(kind, mq, mk, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state)
        parts.append(y)
    assert rel(torch.cat(parts, 2), whole) <= 1e-5 and rel(whole, ref) <= 1e-5
    assert rel(state[0], S) <= 1e-5 and rel(state[1], z) <= 1e-5
    assert rel(S, S_ref) <= 1e-5 and rel(z, z_ref) <= 1e-5


def test_npmap_weight_folds_the_reflection():
    """``(H x) W = x (H W)``: what the kernels compute for NP-Map is the module's direction."""
    fmap = make_maps("npmap", 2, tied=True)[0]
    x = torch.randn(B, H, 7, D, device=DEVICE)
    z = torch.einsum("bhtd,hdf->bhtf", x, npmap_weight(fmap.reflection, fmap.weight))
    u = torch.nn.functional.normalize(z, dim=-1, eps=fused.NPMAP_EPS) * x.norm(dim=-1, keepdim=True)
    assert rel(u, fmap.directions(x)) <= 1e-6


def test_bad_arguments_say_what_to_fix():
    mq, mk = make_maps("npmap", 1)
    q, k, v, S0, z0 = make_inputs(8, seed=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        fused_map_linear_attention(q, k, v, "elu", mq.weight, mk.weight)
    with pytest.raises(ValueError, match="needs query_reflection and key_reflection"):
        fused_map_linear_attention(q, k, v, "npmap", mq.weight, mk.weight)
    with pytest.raises(ValueError, match="only with kind='npmap'"):
        fused_map_linear_attention(q, k, v, "hedgehog", mq.weight, mk.weight, query_reflection=mq.reflection)
    with pytest.raises(ValueError, match="query_weight and key_weight must both be"):
        fused_map_linear_attention(q, k, v, "hedgehog", mq.weight, mk.weight[:, :4])
    with pytest.raises(ValueError, match="v must be"):
        fused_map_linear_attention(q, k, v[:, :, :3], "hedgehog", mq.weight, mk.weight)
    with pytest.raises(ValueError, match="initial_state must be"):
        fused_map_linear_attention(q, k, v, "hedgehog", mq.weight, mk.weight, initial_state=(S0, z0[..., :3]))
    with pytest.raises(ValueError, match="key_mask must be"):
        fused_map_linear_attention(q, k, v, "hedgehog", mq.weight, mk.weight,
                                   key_mask=torch.ones(B, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_map_linear_attention(q, k, v, "hedgehog", mq.weight, mk.weight, chunk_size=48)


# ----------------------------------------------------------------------------- dispatch and the student


def test_dispatch(monkeypatch):
    """``feature_map_attention``: the fused kernel only with LINEARIZE_KERNELS=triton-fused, in the
    chunked form, window 0, Hedgehog/NP-Map maps on both sides; otherwise the maps in PyTorch
    and ``hybrid_attention`` (whose own kernels then run), with equal results."""
    import linearize.kernels.linear as linear

    T = 20
    mq, mk = make_maps("hedgehog", 17)
    q, k, v, _, _ = make_inputs(T, seed=17)
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False
    spy = Spy(monkeypatch, fused, "fused_map_linear_attention")
    unfused = Spy(monkeypatch, linear, "chunk_linear_attention")

    def call(fq_map=mq, fk_map=mk, **kw):
        return feature_map_attention(q, k, v, fq_map, fk_map, None, 0, 1.0, key_mask=mask, output_state=True, **kw)

    results = {}
    for kernels in ("reference", "auto", "triton", "triton-fused"):
        monkeypatch.setenv("LINEARIZE_KERNELS", kernels)
        results[kernels] = call()
    # auto stays on the reference; triton computes the maps in PyTorch, then the linear kernels
    assert spy.calls == 1 and unfused.calls == 1
    assert rel(results["triton"][0], results["reference"][0]) <= 1e-5
    (y_ref, s_ref), (y, s) = results["reference"], results["triton-fused"]
    assert y.dtype == torch.float32 and rel(y, y_ref) <= 1e-5 and rel(s.S, s_ref.S) <= 1e-5 and rel(s.z, s_ref.z) <= 1e-5
    for name in ("k", "v", "fk", "mask", "sink_k", "sink_v", "sink_mask"):
        assert getattr(s, name).shape == getattr(s_ref, name).shape, name
    # the decode step (one token, a state): maps in PyTorch, then the Triton step
    step = Spy(monkeypatch, linear, "linear_step")
    one = [x[:, :, :1] for x in (q, k, v)]
    with torch.no_grad():  # as in generation (with a gradient the chunked kernel takes the token)
        y1, s1 = feature_map_attention(*one, mq, mk, None, 0, 1.0, key_mask=mask[:, :1], state=s, output_state=True)
        assert step.calls == 1 and spy.calls == 1
        monkeypatch.setenv("LINEARIZE_KERNELS", "reference")
        y1_ref, s1_ref = feature_map_attention(*one, mq, mk, None, 0, 1.0, key_mask=mask[:, :1], state=s_ref,
                                               output_state=True)
    assert rel(y1, y1_ref) <= 1e-5 and rel(s1.S, s1_ref.S) <= 1e-5
    # no fused kernel: another map (elu), or maps of two kinds, go the unfused way (linear kernels)
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton-fused")
    elu = EluFeatureMap(H, D)
    call(elu, elu)
    call(mq, make_maps("npmap", 2)[1])
    assert spy.calls == 1 and unfused.calls == 3
    # the naive form has no fused kernel either
    feature_map_attention(q, k, v, mq, mk, None, 0, 1.0, form="naive")
    assert spy.calls == 1


def test_window_falls_back_to_the_unfused_path(monkeypatch):
    """A LoLCATs window (> 0) has no fused kernel: the maps run in PyTorch and the hybrid
    kernels take the attention."""
    import linearize.kernels.hybrid.chunk as hybrid_chunk

    monkeypatch.setenv("LINEARIZE_KERNELS", "triton-fused")
    spy = Spy(monkeypatch, fused, "fused_map_linear_attention")
    hybrid = Spy(monkeypatch, hybrid_chunk, "triton_chunk_hybrid_attention")
    mq, mk = make_maps("npmap", 4)
    q, k, v, _, _ = make_inputs(8, seed=4, b=1)
    gamma = torch.full((H,), 0.1, device=DEVICE)
    y, _ = feature_map_attention(q, k, v, mq, mk, gamma, 4, D**-0.5)
    monkeypatch.setenv("LINEARIZE_KERNELS", "reference")
    y_ref, _ = feature_map_attention(q, k, v, mq, mk, gamma, 4, D**-0.5)
    assert spy.calls == 0 and hybrid.calls == 1 and rel(y, y_ref) <= 1e-5


def test_hedgehog_student_through_the_fused_kernel(monkeypatch):
    """A tiny Llama with Hedgehog students (layer 0 with the Hedgehog map, layer 1 with NP-Map),
    a left-padded batch: logits, the gradients of every map parameter, and cached greedy
    decoding (prefill through the fused kernel, then a step a token: the maps in PyTorch and
    the Triton step) are the same as on the reference path."""
    from conftest import converted_model, token_ids

    import linearize.kernels.linear as linear
    from linearize import ConversionSpec, students

    spec = ConversionSpec("hedgehog", settings={"feature_map": "hedgehog"}, per_layer={1: {"feature_map": "npmap"}})
    model = converted_model("llama", spec, seed=0, num_hidden_layers=2).to(DEVICE)
    x = token_ids(2, 16, seed=1).to(DEVICE)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    params = [p for s in students(model).values() for _, p in s.student_parameters()]
    assert len(params) == 2 + 4  # hedgehog: a weight per map; npmap: a weight and a reflection per map
    spy = Spy(monkeypatch, fused, "fused_map_linear_attention")
    step = Spy(monkeypatch, linear, "linear_step")
    results = through_kernels(monkeypatch, model, x, mask, params, max_new_tokens=4,
                              choices=("reference", "triton-fused"))
    (l_ref, g_ref, t_ref, s_ref), (l_tri, g_tri, t_tri, s_tri) = results["reference"], results["triton-fused"]
    assert rel(l_tri, l_ref) <= 1e-5
    assert max(rel(a, b) for a, b in zip(g_tri, g_ref)) <= 1e-4
    assert t_tri.tolist() == t_ref.tolist() and rel(s_tri, s_ref) <= 1e-5
    assert spy.calls == 2 * 2  # both layers: the training forward and the prefill
    assert step.calls == 2 * 3  # both layers, a step a new token after the first


# ----------------------------------------------------------------------------- real shapes, on the GPU


def check_bf16_against_reference(kind, b, h, T, d, fh, dv, device, tied=False):
    """bf16 q, k, v vs the fp32 reference on the same values: initial state in, final state out,
    every gradient; tolerances as the module docstring says."""
    mq, mk = make_maps(kind, 0, tied, h=h, d=d, fh=fh, device=device)
    with torch.no_grad():  # a trained-looking scale: z = x W of order 1-3 for head sizes 12 to 128
        for m in {mq, mk}:
            m.weight.mul_(min(1.0, 2 * d**-0.5))
    q, k, v, S0, z0 = make_inputs(T, 0, torch.bfloat16, b=b, h=h, d=d, fh=fh, dv=dv, device=device)
    dy, dS, dz = (torch.randn(s, device=device) for s in (v.shape, S0.shape, z0.shape))
    params = map_params(kind, mq) + ([] if tied else map_params(kind, mk))
    out = {}
    for impl in ("kernel", "reference"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, S0, z0)]
        for p in params:
            p.grad = None
        a, k_, c, s, z = leaves
        if impl == "kernel":
            y, (S, Z) = kernel_call(kind, mq, mk, a, k_, c, (s, z), chunk_size=64)
        else:
            y, (S, Z) = reference_call(mq, mk, a, k_, c, (s, z))
        ((y.float() * dy).sum() + (S * dS).sum() + (Z * dz).sum()).backward()
        if impl == "kernel":
            assert y.dtype == S.dtype == torch.float32  # the maps' dtype, as the unfused path gives
            assert leaves[0].grad.dtype == leaves[1].grad.dtype == leaves[2].grad.dtype == torch.bfloat16
        out[impl] = [y, S, Z, *(l.grad for l in leaves), *(p.grad.clone() for p in params)]
    names = ["y", "S", "z", "dq", "dk", "dv", "dS0", "dz0"] + [f"dparam{i}" for i in range(len(params))]
    err = {n: rel(a, b_) for n, a, b_ in zip(names, out["kernel"], out["reference"])}
    assert err["y"] <= 5e-3, err
    assert max(err[n] for n in ["S", "z", *names[8:]]) <= 1e-2, err
    assert max(err[n] for n in ("dq", "dk", "dv")) <= 2e-2, err
    assert max(err["dS0"], err["dz0"]) <= 5e-3, err
    return err


@pytest.mark.parametrize("kind,tied", [("hedgehog", False), ("npmap", True)])
def test_bf16_inputs(kind, tied):
    """bf16 inputs at a small shape: the GPU tests' code."""
    err = check_bf16_against_reference(kind, 1, H, 40, D, FH, DV, DEVICE, tied=tied)
    assert len(err) == 8 + (1 if kind == "hedgehog" else 2) * (1 if tied else 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("kind", ["hedgehog", "npmap"])
def test_gpu_real_shapes_bf16(kind):
    check_bf16_against_reference(kind, 2, 8, 4096, 64, 64, 64, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled Triton)")
def test_gpu_real_shapes_fp32_forward():
    mq, mk = make_maps("hedgehog", 0, h=8, d=64, fh=64, device="cuda")
    q, k, v, S0, z0 = make_inputs(4096, 0, b=2, h=8, d=64, fh=64, dv=64, device="cuda")
    y, (S, z) = kernel_call("hedgehog", mq, mk, q, k, v, (S0, z0), chunk_size=64)
    y_ref, (S_ref, z_ref) = reference_call(mq, mk, q, k, v, (S0, z0))
    err = errors(dict(y=(y, y_ref), S=(S, S_ref), z=(z, z_ref)))
    assert max(err.values()) <= 1e-5, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("kind", ["hedgehog", "npmap"])
def test_gpu_many_programs_bf16(kind):
    """Batch 16 x 9 heads (the converted SmolLM2 at batch 16): with as many programs as that the
    launchers keep their wider blocks of value columns, which the B=2 tests (blocks shrunk to
    fill the multiprocessors) never compile; such a block faulted in the hybrid forward on an H200."""
    check_bf16_against_reference(kind, 16, 9, 1024, 64, 64, 64, "cuda")
