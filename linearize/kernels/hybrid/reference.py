"""Sliding-window softmax + linear attention under one shared normaliser, in plain PyTorch.

For a query at position ``t`` and window ``W`` (the current token and the ``W - 1`` before it):

    a_ts = q_t . k_s / sqrt(d)                       for t - W < s <= t   (window, softmax terms)
    m_t  = max_{s in window} a_ts
    e_ts = gamma * exp(a_ts - m_t)
    l_ts = phi(q_t) . phi(k_s)                       for s <= t - W       (linear terms)
    y_t  = (sum_s e_ts v_s + sum_s l_ts v_s) / (sum_s e_ts + sum_s l_ts)

This is LoLCATs' Eq. 7 (Zhang et al., arXiv 2410.10254, Sec. 3.3.1; numbering not checked
against the paper's text), as its public code computes it (HazyResearch/lolcats,
``linear_window_attention_sw.py``, ``hybrid_attention_quadratic``). ``W = 0`` leaves only the
linear terms, i.e. plain normalised linear attention (Katharopoulos et al., 2020) as Hedgehog
uses it. Keys whose ``key_mask`` is False (padding) contribute nothing to either sum.

Attention sinks (``sinks = n > 0``, an extension in the manner of StreamingLLM, Xiao et al.,
arXiv 2309.17453): the first ``n`` real tokens of each sequence (padding skipped, so a left-padded
row picks the same tokens as the unpadded one) always take softmax terms, for every later query,
as if they were inside the window. ``m_t`` is then the max over the window and the sinks. The
decode state keeps their raw keys/values in ``n`` fixed slots.

Three forms of the same function, all computed in fp32:

* :func:`naive_hybrid_attention`: the quadratic masked form; returns the attention weights too;
* :func:`chunk_hybrid_attention`: chunks of ``C >= W`` tokens; each chunk sees the previous
  chunk's raw keys (for the window and the newest linear terms) and a running state for
  everything older, so memory and time are linear in ``T``;
* :func:`recurrent_hybrid_attention`: one token at a time (:func:`hybrid_step`), the decode path.

The state that carries a sequence across calls (:class:`HybridState`) is the linear state
``S = sum phi(k) v^T`` and ``z = sum phi(k)`` of the keys that left the window, plus the raw
keys/values (and their features) still inside it, plus the sink slots. A sink is stored in its
slot only; it is never part of the window buffer or of ``S, z``. Shapes: ``q, k: [B, H, T, Dk]``,
``v: [B, H, T, Dv]``, ``fq, fk: [B, H, T, F]``, ``gamma: [H]`` (already in (0, 1)),
``key_mask: [B, T]`` bool.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Denominators are clamped here; only an all-padding prefix (no valid key at all) gets near it.
_TINY = 1e-30


@dataclass
class HybridState:
    """What a hybrid/linear attention layer carries from one call to the next."""

    S: torch.Tensor  # [B, H, F, Dv] fp32: sum of phi(k) v^T over keys that left the window
    z: torch.Tensor  # [B, H, F] fp32: sum of phi(k) over the same keys
    k: torch.Tensor  # [B, H, L, Dk] fp32: raw keys still inside the window (L <= W)
    v: torch.Tensor  # [B, H, L, Dv]
    fk: torch.Tensor  # [B, H, L, F]
    mask: torch.Tensor  # [B, L] bool: which of those keys are real (non-sink) tokens
    sink_k: torch.Tensor  # [B, H, n, Dk] fp32: the sink slots (n = the number of sinks)
    sink_v: torch.Tensor  # [B, H, n, Dv]
    sink_mask: torch.Tensor  # [B, n] bool: which slots are filled (they fill in order)

    @classmethod
    def empty(
        cls, batch: int, heads: int, dk: int, dv: int, features: int, device=None, sinks: int = 0
    ) -> "HybridState":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            S=torch.zeros(batch, heads, features, dv, **f32),
            z=torch.zeros(batch, heads, features, **f32),
            k=torch.zeros(batch, heads, 0, dk, **f32),
            v=torch.zeros(batch, heads, 0, dv, **f32),
            fk=torch.zeros(batch, heads, 0, features, **f32),
            mask=torch.zeros(batch, 0, dtype=torch.bool, device=device),
            sink_k=torch.zeros(batch, heads, sinks, dk, **f32),
            sink_v=torch.zeros(batch, heads, sinks, dv, **f32),
            sink_mask=torch.zeros(batch, sinks, dtype=torch.bool, device=device),
        )

    @property
    def sinks(self) -> int:
        return self.sink_mask.shape[1]

    def map(self, fn) -> "HybridState":
        """A new state with ``fn`` applied to every tensor (all have the batch first)."""
        return HybridState(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


def _as_f32(*xs):
    return [x.float() for x in xs]


def _mask_or_ones(key_mask, batch, length, device):
    if key_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return key_mask.bool()


def _check_sinks(sinks, gamma, state):
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if sinks and gamma is None:
        raise ValueError("attention sinks take softmax terms: they need a window factor gamma")
    if state is not None and state.sinks != sinks:
        raise ValueError(f"the state holds {state.sinks} sink slots but sinks={sinks} was asked for")


def _sink_slots(key_mask, filled, sinks):
    """Which new keys become sinks. ``key_mask: [B, T]``, ``filled: [B]`` slots already taken.
    Returns ``(is_sink [B, T] bool, slot [B, T] long)`` (slot is meaningful where ``is_sink``)."""
    slot = filled[:, None] + key_mask.long().cumsum(1) - 1
    return key_mask & (slot < sinks), slot


def naive_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask=None, sinks=0):
    """Quadratic reference with no carried state. Returns ``(y [B,H,T,Dv], weights [B,H,T,T])``.

    ``weights`` are the normalised attention weights (rows sum to 1 over valid keys).
    """
    _check_sinks(sinks, gamma, None)
    q, k, v, fq, fk = _as_f32(q, k, v, fq, fk)
    B, H, T, _ = q.shape
    key_mask = _mask_or_ones(key_mask, B, T, q.device)
    t = torch.arange(T, device=q.device)[:, None]
    s = torch.arange(T, device=q.device)[None, :]
    causal = s <= t
    is_sink, _ = _sink_slots(key_mask, torch.zeros(B, dtype=torch.long, device=q.device), sinks)
    in_window = (s > t - window) | is_sink[:, None, None, :]  # [B, 1, T, T]
    valid = key_mask[:, None, None, :]  # [B, 1, 1, T]
    win = causal & in_window & valid
    lin = causal & ~in_window & valid
    weights = (fq @ fk.transpose(-1, -2)).masked_fill(~lin, 0.0)  # [B, H, T, T]
    if window > 0 or sinks:
        a = (q @ k.transpose(-1, -2) * scale).masked_fill(~win, float("-inf"))
        m = a.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        weights = weights + gamma.float()[None, :, None, None] * torch.exp(a - m)
    den = weights.sum(-1, keepdim=True).clamp_min(_TINY)
    weights = weights / den
    return weights @ v, weights


def _previous_chunk(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift chunks by one along ``dim`` (chunk c gets chunk c-1; chunk 0 gets zeros)."""
    first = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([first, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


def chunk_hybrid_attention(
    q, k, v, fq, fk, gamma, window, scale, key_mask=None, state=None, chunk_size=64, output_state=True, sinks=0
):
    """Chunked form. Returns ``(y [B,H,T,Dv] fp32, new_state or None)``.

    With a ``state``, the tokens it holds in its window are put in front of the new ones (their
    queries are dummies, dropped from the output), so the window and the fold into the linear
    state line up exactly as in :func:`hybrid_step`.
    """
    _check_sinks(sinks, gamma, state)
    q, k, v, fq, fk = _as_f32(q, k, v, fq, fk)
    B, H, T, Dk = q.shape
    Dv, F = v.shape[-1], fq.shape[-1]
    key_mask = _mask_or_ones(key_mask, B, T, q.device)
    if state is None:
        state = HybridState.empty(B, H, Dk, Dv, F, q.device, sinks)
    if T == 0:
        return v.new_zeros(B, H, 0, Dv), (state if output_state else None)
    P = state.k.shape[2]
    if sinks:
        # New sinks take the free slots in order; they leave the window/linear parts (mask off).
        is_sink, slot = _sink_slots(key_mask, state.sink_mask.sum(1), sinks)
        onehot = (slot[:, :, None] == torch.arange(sinks, device=q.device)) & is_sink[:, :, None]  # [B, T, n]
        new = onehot.any(1)  # [B, n]
        hot = onehot.float()
        sink_k = torch.where(new[:, None, :, None], torch.einsum("btn,bhtd->bhnd", hot, k.nan_to_num()), state.sink_k)
        sink_v = torch.where(new[:, None, :, None], torch.einsum("btn,bhtd->bhnd", hot, v.nan_to_num()), state.sink_v)
        sink_mask = state.sink_mask | new
        # position (in this call, after the P window tokens) from which each slot is visible
        sink_from = torch.where(new, P + (onehot.long() * torch.arange(T, device=q.device)[None, :, None]).sum(1), -1)
        key_mask = key_mask & ~is_sink
    if P:  # tokens still in the window from earlier calls: keys only, dummy queries
        k = torch.cat([state.k, k], 2)
        v = torch.cat([state.v, v], 2)
        fk = torch.cat([state.fk, fk], 2)
        key_mask = torch.cat([state.mask, key_mask], 1)
        q = torch.cat([q.new_zeros(B, H, P, Dk), q], 2)
        fq = torch.cat([fq.new_zeros(B, H, P, F), fq], 2)
    L = P + T
    C = max(chunk_size, window)
    N = -(-L // C)
    pad = N * C - L
    if pad:
        q, k, v, fq, fk = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, fq, fk))
        key_mask = torch.nn.functional.pad(key_mask, (0, pad), value=False)
    # padding keys: zero features and values (masked_fill, not a product: a pad row may hold anything)
    fk = fk.masked_fill(~key_mask[:, None, :, None], 0.0)
    v = v.masked_fill(~key_mask[:, None, :, None], 0.0)

    qc, kc, vc = (x.reshape(B, H, N, C, -1) for x in (q, k, v))  # [B, H, N, C, *]
    fqc, fkc = fq.reshape(B, H, N, C, F), fk.reshape(B, H, N, C, F)
    mc = key_mask.reshape(B, N, C)

    # Linear state seen by chunk c: every key of chunks <= c-2, plus what the state already held.
    kv = torch.einsum("bhncf,bhncd->bhnfd", fkc, vc)  # [B, H, N, F, Dv]
    kz = fkc.sum(3)  # [B, H, N, F]
    S_seen = state.S[:, :, None] + _previous_chunk(_previous_chunk(kv.cumsum(2), 2), 2)
    z_seen = state.z[:, :, None] + _previous_chunk(_previous_chunk(kz.cumsum(2), 2), 2)
    num = torch.einsum("bhncf,bhnfd->bhncd", fqc, S_seen)  # [B, H, N, C, Dv]
    den = torch.einsum("bhncf,bhnf->bhnc", fqc, z_seen)  # [B, H, N, C]

    # Chunk c against the raw keys of chunks c-1 and c: window terms and the newest linear terms.
    k_loc = torch.cat([_previous_chunk(kc, 2), kc], 3)  # [B, H, N, 2C, Dk]
    v_loc = torch.cat([_previous_chunk(vc, 2), vc], 3)
    fk_loc = torch.cat([_previous_chunk(fkc, 2), fkc], 3)
    m_loc = torch.cat([_previous_chunk(mc, 1), mc], 2)[:, None, :, None, :]  # [B, 1, N, 1, 2C]
    i = torch.arange(C, device=q.device)[:, None]  # query offset in its chunk
    j = torch.arange(2 * C, device=q.device)[None, :] - C  # key offset from the chunk start
    causal = j <= i
    in_window = j > i - window
    w = torch.einsum("bhncf,bhnjf->bhncj", fqc, fk_loc).masked_fill(~(causal & ~in_window & m_loc), 0.0)
    if window > 0 or sinks:
        g = gamma.float()[None, :, None, None, None]
        a = torch.einsum("bhncd,bhnjd->bhncj", qc, k_loc) * scale
        a = a.masked_fill(~(causal & in_window & m_loc), float("-inf"))
        m = a.amax(-1, keepdim=True)
        if sinks:
            pos = torch.arange(N * C, device=q.device).reshape(1, N, C, 1)
            seen = sink_mask[:, None, None, :] & (sink_from[:, None, None, :] <= pos)  # [B, N, C, n]
            a_s = torch.einsum("bhncd,bhsd->bhncs", qc, sink_k) * scale
            a_s = a_s.masked_fill(~seen[:, None], float("-inf"))
            m = torch.maximum(m, a_s.amax(-1, keepdim=True))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = w + g * torch.exp(a - m)
        if sinks:
            e_s = g * torch.exp(a_s - m)
            num = num + torch.einsum("bhncs,bhsd->bhncd", e_s, sink_v)
            den = den + e_s.sum(-1)
    num = num + w @ v_loc
    den = den + w.sum(-1)
    y = (num / den.clamp_min(_TINY)[..., None]).reshape(B, H, N * C, Dv)[:, :, P : P + T]
    if not output_state:
        return y, None

    # New state: keys older than the last W fold into S, z; the last W stay raw.
    n_fold = max(L - window, 0)
    fk_fold, v_fold = fk[:, :, :n_fold], v[:, :, :n_fold]
    new_state = HybridState(
        S=state.S + fk_fold.transpose(-1, -2) @ v_fold,
        z=state.z + fk_fold.sum(2),
        k=k[:, :, n_fold:L],
        v=v[:, :, n_fold:L],
        fk=fk[:, :, n_fold:L],
        mask=key_mask[:, n_fold:L],
        sink_k=sink_k if sinks else state.sink_k,
        sink_v=sink_v if sinks else state.sink_v,
        sink_mask=sink_mask if sinks else state.sink_mask,
    )
    return y, new_state


def hybrid_step(q, k, v, fq, fk, gamma, window, scale, key_mask, state: HybridState):
    """One token: ``q, k: [B, H, Dk]``, ``v: [B, H, Dv]``, ``fq, fk: [B, H, F]``, ``key_mask: [B]``.

    Returns ``(y [B, H, Dv] fp32, new_state)``. The new key joins the window (or, while sink
    slots are free, its sink slot); whatever then lies ``W`` or more tokens back is folded into
    ``S, z``. The number of sinks is the state's.
    """
    q, k, v, fq, fk = _as_f32(q, k, v, fq, fk)
    keep = key_mask.bool()
    n = state.sinks
    sink_k, sink_v, sink_mask = state.sink_k, state.sink_v, state.sink_mask
    if n:
        is_sink, slot = _sink_slots(keep[:, None], sink_mask.sum(1), n)
        hot = (slot == torch.arange(n, device=q.device)) & is_sink  # [B, n]
        sink_k = torch.where(hot[:, None, :, None], k.nan_to_num()[:, :, None], sink_k)
        sink_v = torch.where(hot[:, None, :, None], v.nan_to_num()[:, :, None], sink_v)
        sink_mask = sink_mask | hot
        keep = keep & ~is_sink[:, 0]
    fk = fk.masked_fill(~keep[:, None, None], 0.0)
    v = v.masked_fill(~keep[:, None, None], 0.0)
    kb = torch.cat([state.k, k[:, :, None]], 2)
    vb = torch.cat([state.v, v[:, :, None]], 2)
    fkb = torch.cat([state.fk, fk[:, :, None]], 2)
    mb = torch.cat([state.mask, keep[:, None]], 1)
    S, z = state.S, state.z
    n_out = kb.shape[2] - window
    if n_out > 0:  # leaving the window (already zeroed if padding)
        S = S + fkb[:, :, :n_out].transpose(-1, -2) @ vb[:, :, :n_out]
        z = z + fkb[:, :, :n_out].sum(2)
        kb, vb, fkb, mb = kb[:, :, n_out:], vb[:, :, n_out:], fkb[:, :, n_out:], mb[:, n_out:]
    num = (fq[:, :, None] @ S)[:, :, 0]  # [B, H, Dv]
    den = (fq * z).sum(-1)  # [B, H]
    if (window > 0 and kb.shape[2] > 0) or n:
        ka, va, ma = torch.cat([kb, sink_k], 2), torch.cat([vb, sink_v], 2), torch.cat([mb, sink_mask], 1)
        a = (ka @ q[..., None])[..., 0] * scale  # [B, H, L + n]
        a = a.masked_fill(~ma[:, None, :], float("-inf"))
        m = a.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = gamma.float()[None, :, None] * torch.exp(a - m)
        num = num + (e[:, :, None] @ va)[:, :, 0]
        den = den + e.sum(-1)
    y = num / den.clamp_min(_TINY)[..., None]
    state = HybridState(S=S, z=z, k=kb, v=vb, fk=fkb, mask=mb, sink_k=sink_k, sink_v=sink_v, sink_mask=sink_mask)
    return y, state


def recurrent_hybrid_attention(q, k, v, fq, fk, gamma, window, scale, key_mask=None, state=None, sinks=0):
    """Token-by-token form (a loop of :func:`hybrid_step`). Returns ``(y [B,H,T,Dv], state)``."""
    _check_sinks(sinks, gamma, state)
    B, H, T, Dk = q.shape
    key_mask = _mask_or_ones(key_mask, B, T, q.device)
    if state is None:
        state = HybridState.empty(B, H, Dk, v.shape[-1], fq.shape[-1], q.device, sinks)
    ys = []
    for t in range(T):
        y, state = hybrid_step(
            q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], gamma, window, scale, key_mask[:, t], state
        )
        ys.append(y)
    return torch.stack(ys, 2), state
