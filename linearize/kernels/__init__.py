"""Attention kernels and their PyTorch references.

Students call :func:`hybrid_attention` (or :func:`gated_attention`, for decayed linear
attention, or :func:`still_attention`, for STILL's token-selecting hybrid); it picks the form (chunked for prefill and training,
the recurrent step for decoding) and, where one exists, a fused kernel on CUDA. The Hedgehog and
LoLCATs students call :func:`feature_map_attention`, which takes their feature-map modules:
it applies them and calls :func:`hybrid_attention`, or, where the fused kernel applies, hands
raw queries and keys and the maps' parameters to the kernel that computes the maps inside the
attention (:mod:`linearize.kernels.linear.fused`).

Kernels (``LINEARIZE_KERNELS``), the same switch for plain linear attention
(:mod:`linearize.kernels.linear`), sliding-window + linear attention with sinks
(:mod:`linearize.kernels.hybrid`'s ``chunk.py`` and ``recurrent.py``) and gated linear attention
(:mod:`linearize.kernels.gated`'s ``chunk.py`` and ``recurrent.py``):

* ``auto`` (default): the Triton kernels for CUDA tensors where a kernel takes the call (the
  chunked form and the one-token decode step), the PyTorch reference for anything else (CPU
  tensors, STILL, windows over 128, or over 64 with fp32 inputs or heads over 64, more than 64
  sinks, and hybrid calls with heads over 64, which fault compiled on sm_90 with Triton 3.6:
  ``hybrid/chunk.py``, ``MAX_COMPILED_HEAD``). Compiled on an H200 (Triton 3.6), every GPU test
  of the kernels and of the CUDA-graph decoder passes, batch 16 x 9 heads included, but two
  known limits (both ``xfail``): the gated kernels' ``dg`` with strong decays is 1.1e-4 from
  float64 where the fp32 reference is 2.5e-6, and the hybrid kernels with heads of 128. The
  gated forward and backward are chunk-parallel (``gated/chunk.py``, ``PARALLEL_FORWARD``,
  ``PARALLEL_BACKWARD``: 4.6x the sequential walk's speed forward, 5.4x forward + backward, at
  B=1, 32 heads, head 128, 32K); the linear kernels' opt-in two-pass forward (``parallel=True``) is not used
  here: it is right on the H200 but slower than the walk (0.49x at 256 heads);
* ``reference``: the PyTorch reference everywhere;
* ``triton``: the Triton kernels wherever the form has one, whatever the device (CPU tensors
  need ``TRITON_INTERPRET=1``): :func:`hybrid_attention` sends plain linear attention (window 0,
  no sinks) to the linear kernels and any other window (up to 128; 64 with fp32 inputs, see
  ``hybrid.chunk.max_window``) and sinks (up to 64) to the
  hybrid kernels; an error if ``triton`` cannot be imported or the window or the sinks are
  larger. :func:`feature_map_attention` computes the maps in PyTorch, then calls
  :func:`hybrid_attention`;
* ``triton-fused``: as ``triton``, and :func:`feature_map_attention` sends the chunked form of
  plain linear attention with Hedgehog or NP-Map maps to the fused-map kernel
  (``linear/fused.py``). On an H200 that kernel is slower than computing the maps first (B=1,
  32 heads, T=64K, head size 64, forward: 20.0 ms, against 5.4 ms for the maps in PyTorch then
  the linear kernel and 2.3 ms for the Triton Hedgehog map then the linear kernel), hence its
  own switch.

Triton replaces the chunked form and the one-token step; the quadratic ``naive`` form and the
multi-token ``recurrent`` loop, which exist to check the others, always run the reference. The
gated kernels take 64 tokens a step (four 16-token sub-chunks) whatever ``chunk_size`` says (the
result does not depend on it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import torch

from .gated import (
    GatedState,
    chunk_gated_attention,
    gated_step,
    naive_gated_attention,
    recurrent_gated_attention,
)
from .hybrid import (
    HybridState,
    chunk_hybrid_attention,
    hybrid_step,
    naive_hybrid_attention,
    recurrent_hybrid_attention,
)
from .still import StillState, chunk_still_attention, recurrent_still_attention

__all__ = [
    "GatedState",
    "gated_attention",
    "chunk_gated_attention",
    "gated_step",
    "naive_gated_attention",
    "recurrent_gated_attention",
    "HybridState",
    "feature_map_attention",
    "hybrid_attention",
    "chunk_hybrid_attention",
    "hybrid_step",
    "naive_hybrid_attention",
    "recurrent_hybrid_attention",
    "StillState",
    "still_attention",
    "chunk_still_attention",
    "recurrent_still_attention",
]

FORMS = ("auto", "chunk", "recurrent", "naive")
KERNELS = ("auto", "triton", "triton-fused", "reference")


def triton_available() -> bool:
    """Whether ``triton`` can be imported here."""
    return importlib.util.find_spec("triton") is not None


def kernel_choice() -> str:
    """``LINEARIZE_KERNELS``: one of :data:`KERNELS` (``auto`` when unset)."""
    choice = os.environ.get("LINEARIZE_KERNELS", "").strip().lower() or "auto"
    if choice not in KERNELS:
        raise ValueError(f"LINEARIZE_KERNELS must be one of {KERNELS}, got {choice!r}")
    return choice


def _use_triton(unsupported: str | None = None, device: torch.device | None = None) -> bool:
    """Whether this call goes to the Triton kernels. ``unsupported`` says why there is no kernel
    for it (None: there is one); ``device``: where the call's tensors are (``auto`` sends only
    CUDA tensors to the kernels)."""
    choice = kernel_choice()
    if choice == "reference":
        return False
    if choice in ("triton", "triton-fused"):
        if not triton_available():
            raise RuntimeError(f"LINEARIZE_KERNELS={choice} but triton cannot be imported: pip install triton")
        if unsupported:
            raise ValueError(
                f"LINEARIZE_KERNELS={choice}: there is no Triton kernel for {unsupported}; "
                "unset LINEARIZE_KERNELS to use the reference"
            )
        return True
    # auto: the kernels for CUDA tensors that one takes, silently the reference otherwise
    return unsupported is None and device is not None and device.type == "cuda" and triton_available()


def _triton_form(form, T, state) -> bool:
    """Whether ``form`` has a Triton kernel: the chunked form, or the recurrent one for one token
    with a state (the decode step)."""
    return form == "chunk" or (form == "recurrent" and T == 1 and state is not None)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_linear(q, fq, fk, v, key_mask, state, output_state, chunk_size):
    """Plain normalised linear attention through the Triton kernels, with the reference's
    contract: ``(y [B, H, T, Dv] fp32, HybridState or None)``."""
    from . import linear

    B, H, T, F = fq.shape
    carried = () if state is None else (state.S, state.z)
    if T == 1 and state is not None and not _needs_grad(fq, fk, v, *carried):  # decode: the fused step
        mask = None if key_mask is None else key_mask[:, 0]
        y, S, z = linear.linear_step(fq[:, :, 0], fk[:, :, 0], v[:, :, 0], state.S, state.z, mask)
        y = y[:, :, None]
    else:
        chunk = max(c for c in (16, 32, 64, 128) if c <= max(chunk_size, 16))
        y, final = linear.chunk_linear_attention(
            fq, fk, v, carried or None, output_final_state=output_state, chunk_size=chunk, key_mask=key_mask,
            output_dtype=torch.float32,
        )
        S, z = final if output_state else (None, None)
    if not output_state:
        return y, None
    return y, _linear_state(state, q, v, F, S, z)


def _linear_state(state, q, v, features, S, z):
    """The :class:`HybridState` of plain linear attention after a call: ``state`` (or an empty
    one: no window or sink buffers) with the new ``S, z``."""
    if state is None:
        B, H = q.shape[:2]
        state = HybridState.empty(B, H, q.shape[-1], v.shape[-1], features, device=v.device)
    return dataclasses.replace(state, S=S, z=z)


def _fused_map_kind(feature_map_q, feature_map_k) -> str | None:
    """``"hedgehog"`` or ``"npmap"`` when both maps are of that kind (the kinds the fused kernel
    computes), else None."""
    from ..feature_maps import HedgehogFeatureMap, NPMapFeatureMap

    for kind, cls in (("hedgehog", HedgehogFeatureMap), ("npmap", NPMapFeatureMap)):
        if type(feature_map_q) is cls and type(feature_map_k) is cls:
            return kind
    return None


def feature_map_attention(
    q, k, v, feature_map_q, feature_map_k, gamma, window, scale, key_mask=None, state=None, output_state=False,
    form="auto", chunk_size=64, sinks=0,
):
    """:func:`hybrid_attention` over ``fq = feature_map_q(q)``, ``fk = feature_map_k(k)`` (the
    maps of :mod:`linearize.feature_maps`, applied to fp32 ``q`` and ``k``). Arguments and
    result as :func:`hybrid_attention`, with the two map modules in place of ``fq, fk``.

    With ``LINEARIZE_KERNELS=triton-fused``, the chunked form of plain linear attention (``window ==
    0``, no sinks, no window in the carried state) with Hedgehog or NP-Map maps on both sides
    goes to :func:`linearize.kernels.linear.fused.fused_map_linear_attention`, which computes
    the maps inside the attention kernels (forward and backward) from raw ``q``, ``k`` and the
    maps' parameters. Everything else computes the maps here and calls
    :func:`hybrid_attention`: other maps, windows and sinks, the quadratic and recurrent forms,
    and the one-token decode step (one token's map costs next to nothing in PyTorch; the step
    itself still runs the Triton decode kernel).
    """
    kind = _fused_map_kind(feature_map_q, feature_map_k)
    plain = window == 0 and sinks == 0 and (state is None or (state.k.shape[2] == 0 and state.sinks == 0))
    fused_asked = kernel_choice() == "triton-fused"
    if kind is not None and plain and fused_asked and _pick_form(form, q.shape[2], state) == "chunk" and _use_triton():
        from .linear import fused

        fits = (q.shape[-1] <= fused.MAX_HEAD_DIM and feature_map_q.feature_dim <= fused.MAX_MAP_FEATURES
                and v.shape[-1] <= fused.MAX_VALUE_DIM)
        if fits:
            return _triton_fused_maps(q, k, v, kind, feature_map_q, feature_map_k, key_mask, state, output_state,
                                      chunk_size)
    fq, fk = feature_map_q(q.float()), feature_map_k(k.float())
    return hybrid_attention(
        q, k, v, fq, fk, gamma, window, scale, key_mask=key_mask, state=state, output_state=output_state, form=form,
        chunk_size=chunk_size, sinks=sinks,
    )


def _triton_fused_maps(q, k, v, kind, feature_map_q, feature_map_k, key_mask, state, output_state, chunk_size):
    """Plain normalised linear attention with the maps inside the Triton kernels, with the
    reference's contract: ``(y [B, H, T, Dv] fp32, HybridState or None)``."""
    from .linear import fused

    reflections = {}
    if kind == "npmap":
        reflections = dict(query_reflection=feature_map_q.reflection, key_reflection=feature_map_k.reflection)
    chunk = max(c for c in (16, 32, 64, 128) if c <= max(chunk_size, 16))
    y, final = fused.fused_map_linear_attention(
        q, k, v, kind, feature_map_q.weight, feature_map_k.weight, **reflections,
        initial_state=None if state is None else (state.S, state.z), output_final_state=output_state,
        chunk_size=chunk, key_mask=key_mask, output_dtype=torch.float32,
    )
    if not output_state:
        return y, None
    return y, _linear_state(state, q, v, feature_map_q.feature_size, *final)


def hybrid_attention(
    q, k, v, fq, fk, gamma, window, scale, key_mask=None, state=None, output_state=False, form="auto", chunk_size=64,
    sinks=0,
):
    """Sliding-window + linear attention. ``q, k: [B, H, T, Dk]``, ``v: [B, H, T, Dv]``,
    ``fq, fk: [B, H, T, F]``, ``gamma: [H]`` or None when ``window == 0``, ``key_mask: [B, T]``,
    ``sinks``: how many first tokens always take softmax terms.

    Returns ``(y [B, H, T, Dv] fp32, state or None)``. ``form`` is one of ``auto`` (the
    recurrent step for a single token with a state, chunked otherwise), ``chunk``,
    ``recurrent`` or ``naive`` (quadratic; no state in or out). ``LINEARIZE_FORM`` overrides
    ``auto``; ``LINEARIZE_KERNELS`` picks Triton or the reference (see the module docstring).
    """
    form = _pick_form(form, q.shape[2], state)
    if _triton_form(form, q.shape[2], state):
        plain = window == 0 and sinks == 0 and (state is None or (state.k.shape[2] == 0 and state.sinks == 0))
        # the chunked kernels' window limit depends on the products' dtype; the decode step's does not
        chunked = not (q.shape[2] == 1 and state is not None)
        if _use_triton(None if plain else _beyond_hybrid_kernels(window, sinks, (q, k, v, fq, fk), chunked), v.device):
            if plain:
                return _triton_linear(q, fq, fk, v, key_mask, state, output_state, chunk_size)
            return _triton_hybrid(
                q, k, v, fq, fk, gamma, window, scale, key_mask, state, output_state, chunk_size, sinks
            )
    if form == "naive":
        if state is not None or output_state:
            raise ValueError("the naive form takes and returns no state; use form='chunk' or 'recurrent'")
        y, _ = naive_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask, sinks)
        return y, None
    if form == "recurrent":
        y, state = recurrent_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask, state, sinks)
        return y, (state if output_state else None)
    return chunk_hybrid_attention(
        q, k, v, fq, fk, gamma, window, scale, key_mask, state, chunk_size=chunk_size, output_state=output_state,
        sinks=sinks,
    )


def _beyond_hybrid_kernels(window, sinks, inputs, chunked=True) -> str | None:
    """Why the hybrid Triton kernels cannot take this window, these sinks or these heads (None:
    they can); ``inputs``: the call's ``q, k, v, fq, fk``; ``chunked``: the chunked kernels
    (their window limit depends on the products' dtype and the head size; the decode step's does
    not). Imports the kernels only when ``LINEARIZE_KERNELS`` may send the call to them."""
    choice = kernel_choice()
    if choice == "reference" or not triton_available():
        return None
    from .hybrid.chunk import MAX_COMPILED_HEAD, MAX_SINKS, MAX_WINDOW, compute_dtype, max_window

    head = max(inputs[0].shape[-1], inputs[2].shape[-1])
    if head > MAX_COMPILED_HEAD and inputs[0].is_cuda:
        return (f"heads of {head} (the compiled hybrid kernels take heads up to {MAX_COMPILED_HEAD}: larger ones "
                f"fault on sm_90 with Triton 3.6, see linearize/kernels/hybrid/chunk.py)")
    if not chunked:
        limit, why = MAX_WINDOW, ""
    else:
        dtype = compute_dtype(*inputs)
        limit = max_window(dtype, head)
        why = "" if limit == MAX_WINDOW else " with fp32 inputs" if dtype == torch.float32 else f" with heads of {head}"
    if window <= limit and sinks <= MAX_SINKS:
        return None
    return (f"window={window}, sinks={sinks} (the hybrid kernels take windows up to {limit}{why} and up to "
            f"{MAX_SINKS} sinks)")


def _triton_hybrid(q, k, v, fq, fk, gamma, window, scale, key_mask, state, output_state, chunk_size, sinks):
    """Sliding-window + linear attention through the Triton kernels, with the reference's
    contract: ``(y [B, H, T, Dv] fp32, HybridState or None)``."""
    from .hybrid import chunk, recurrent
    from .hybrid.reference import _check_sinks

    _check_sinks(sinks, gamma, state)
    carried = () if state is None else (state.S, state.z, state.k, state.v, state.fk, state.sink_k, state.sink_v)
    if q.shape[2] == 1 and state is not None and not _needs_grad(q, k, v, fq, fk, gamma, *carried):  # decode
        mask = None if key_mask is None else key_mask[:, 0]
        y, new = recurrent.triton_hybrid_step(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], fq[:, :, 0], fk[:, :, 0], gamma, window, scale, mask, state
        )
        return y[:, :, None], (new if output_state else None)
    size = max(c for c in chunk.CHUNK_SIZES if c <= max(chunk_size, 16))
    return chunk.triton_chunk_hybrid_attention(
        q, k, v, fq, fk, gamma, window, scale, key_mask, state, chunk_size=size, output_state=output_state,
        sinks=sinks, output_dtype=torch.float32,
    )


def _pick_form(form, T, state):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if os.environ.get("LINEARIZE_FORM") in FORMS[1:] and form == "auto":
        form = os.environ["LINEARIZE_FORM"]
    if form == "auto":
        form = "recurrent" if (T == 1 and state is not None) else "chunk"
    return form


def gated_attention(fq, fk, v, g, key_mask=None, state=None, output_state=False, form="auto", chunk_size=16):
    """Normalised linear attention with per-channel decay ``exp(g)``. ``fq, fk, g: [B, H, T, F]``
    (``g <= 0``), ``v: [B, H, T, Dv]``, ``key_mask: [B, T]``.

    Returns ``(y [B, H, T, Dv] fp32, GatedState or None)``; ``form`` as for
    :func:`hybrid_attention`, and ``LINEARIZE_KERNELS`` picks Triton or the reference (see the
    module docstring).
    """
    form = _pick_form(form, fq.shape[2], state)
    if _triton_form(form, fq.shape[2], state) and _use_triton(device=v.device):
        return _triton_gated(fq, fk, v, g, key_mask, state, output_state)
    if form == "naive":
        if state is not None or output_state:
            raise ValueError("the naive form takes and returns no state; use form='chunk' or 'recurrent'")
        y, _ = naive_gated_attention(fq, fk, v, g, key_mask)
        return y, None
    if form == "recurrent":
        y, state = recurrent_gated_attention(fq, fk, v, g, key_mask, state)
        return y, (state if output_state else None)
    return chunk_gated_attention(fq, fk, v, g, key_mask, state, chunk_size=chunk_size, output_state=output_state)


def _triton_gated(fq, fk, v, g, key_mask, state, output_state):
    """Gated linear attention through the Triton kernels, with the reference's contract:
    ``(y [B, H, T, Dv] fp32, GatedState or None)``. The kernels keep the state as ``S [.., F, Dv]``
    and ``z [.., F]``; ``GatedState.S`` is the two side by side."""
    from .gated import chunk, recurrent

    T = fq.shape[2]
    carried = None if state is None else state.S
    if T == 1 and state is not None and not _needs_grad(fq, fk, v, g, carried):  # decode: the fused step
        mask = None if key_mask is None else key_mask[:, 0]
        y, S = recurrent.triton_gated_step(fq[:, :, 0], fk[:, :, 0], v[:, :, 0], g[:, :, 0], state.S, mask)
        return y[:, :, None], (GatedState(S=S) if output_state else None)
    initial = None if state is None else (state.S[..., :-1], state.S[..., -1])
    y, final = chunk.triton_chunk_gated_attention(
        fq, fk, v, g, initial, output_final_state=output_state, key_mask=key_mask, output_dtype=torch.float32
    )
    if not output_state:
        return y, None
    S, z = final
    return y, GatedState(S=torch.cat([S, z[..., None]], -1))


def still_attention(
    q, k, v, fq, fk, g, scale, key_mask=None, state=None, output_state=False, form="auto", chunk_size=64,
    tokens_per_chunk=4, budget=64, branch_free=False,
):
    """STILL's hybrid attention (see :mod:`linearize.kernels.still`). ``q, k: [B, H, T, Dk]``,
    ``v, g: [B, H, T, Dv]`` (``g``: the gate of the linear numerator), ``fq, fk: [B, H, T, F]``,
    ``key_mask: [B, T]``; ``budget``: selected tokens kept per head.

    Returns ``(y [B, H, T, Dv] fp32, StillState or None)``. ``form`` is ``auto`` (the
    recurrent step for a single token with a state, chunked otherwise), ``chunk`` or
    ``recurrent``; there is no quadratic form. Only the PyTorch reference exists so far.
    ``branch_free``: the recurrent form's step reads no tensor value on the host (see
    :func:`linearize.kernels.still.still_step`).
    """
    form = _pick_form(form, q.shape[2], state)
    settings = dict(chunk_size=chunk_size, tokens_per_chunk=tokens_per_chunk, budget=budget)
    if form == "naive":
        raise ValueError("STILL has no quadratic ('naive') form; use form='chunk' or 'recurrent'")
    if form == "recurrent":
        y, state = recurrent_still_attention(
            q, k, v, fq, fk, g, scale, key_mask, state, **settings, branch_free=branch_free
        )
        return y, (state if output_state else None)
    return chunk_still_attention(q, k, v, fq, fk, g, scale, key_mask, state, output_state=output_state, **settings)
