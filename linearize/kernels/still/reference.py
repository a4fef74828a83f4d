"""STILL's token-selecting hybrid attention, in plain PyTorch.

The real tokens of a sequence are cut into chunks of ``C`` (padding is skipped: chunk ``n``
holds the real tokens of rank ``nC .. nC + C - 1``, so a left-padded row is split exactly as
the unpadded one). For a query ``t`` in chunk ``n``:

    exact keys    E_t = {s <= t in chunks n-1 and n}  U  {the selected tokens visible to chunk n}
    linear keys   every other real key s < t (chunks <= n-2, not selected or evicted)
    m_t = max_{s in E_t} a_ts,   a_ts = q_t . k_s / sqrt(d)
    y_t = (sum_{E_t} exp(a_ts - m_t) v_s + g_t * sum_lin phi(q_t).phi(k_s) v_s)
        / (sum_{E_t} exp(a_ts - m_t)     +       sum_lin phi(q_t).phi(k_s))

``g_t`` (``[Dv]``, in (0, 1)) gates the linear numerator channel by channel; the denominator
is shared and ungated.

Selection. When chunk ``n`` is complete its tokens are scored by self-saliency: with
``p_s`` the softmax attention of token ``s`` over its sliding window (itself and the ``C - 1``
real tokens before it), and ``p_s'`` the same without the term of ``s`` itself,

    score_s = KL(p_s' || p_s) = -log(1 - p_s[s]) = logsumexp_{window} a_s. - logsumexp_{window \\ s} a_s.

(``+inf`` for the first real token, whose window holds only itself). This is the exact
closed form of one direction of the KL divergence between the window's attention with and
without the self term; the public STILL code (ZacharyMeng/STILL, ``modeling_still.py``) takes
the other direction, ``KL(p_s || p_s')`` smoothed with ``eps = 1e-8``. Both increase with
``p_s[s]`` (the code's up to its smoothing), so they rank a chunk's tokens alike except near
ties (see :mod:`linearize.students.still`).

When chunk ``n + 1`` is complete as well, chunk ``n`` is split (delayed selection): its ``K``
highest-scoring tokens (ties to the lower index) join the selected set, the others fold into
``S = sum phi(k) v^T``, ``z = sum phi(k)``. Queries of chunk ``n + 2`` and later see the split.

The selected set holds at most ``M`` tokens per head (the budget; ``M / K`` chunks' worth) in
``M / K`` groups of ``K`` slots: chunk ``n`` writes group ``n mod (M / K)``, and the ``K``
tokens it replaces (those of chunk ``n - M / K``, the oldest) fold into ``S, z`` at that moment.
Eviction is a fixed function of the chunk index, so the two forms below evict the same tokens
at the same step. ``M = 0`` folds every token of a chunk when it is split.

Two forms of one function, both in fp32, sharing :class:`StillState`:

* :func:`chunk_still_attention`: the whole call at once, chunk by chunk in parallel; the
  state's partial chunk and last complete chunk are put in front of the new tokens (their
  queries are dummies), so chunk boundaries and splits line up with the recurrent form;
* :func:`recurrent_still_attention`: one token at a time (:func:`still_step`), the decode path.

Shapes: ``q, k: [B, H, T, Dk]``, ``v, g: [B, H, T, Dv]``, ``fq, fk: [B, H, T, F]``,
``key_mask: [B, T]`` bool. Padding tokens (``key_mask`` False) are never scored, selected or
stored; their outputs are zeros.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch

# Denominators are clamped here; only a query with no valid key at all gets near it.
_TINY = 1e-30
_NEG = float("-inf")


@dataclass
class StillState:
    """What a STILL layer carries from one call to the next. Rows of a batch may stand at
    different points of their chunks (``count`` differs after left padding)."""

    count: torch.Tensor  # [B] long: real tokens seen
    S: torch.Tensor  # [B, H, F, Dv] fp32: sum phi(k) v^T of the folded tokens
    z: torch.Tensor  # [B, H, F]
    prev_k: torch.Tensor  # [B, H, C, Dk]: the last complete chunk (not split yet)
    prev_v: torch.Tensor  # [B, H, C, Dv]
    prev_fk: torch.Tensor  # [B, H, C, F]
    prev_score: torch.Tensor  # [B, H, C]: its self-saliency scores (-inf where empty)
    prev_mask: torch.Tensor  # [B, C] bool: whether that chunk exists
    cur_q: torch.Tensor  # [B, H, C, Dk]: the chunk being filled (queries kept to score it)
    cur_k: torch.Tensor  # [B, H, C, Dk]
    cur_v: torch.Tensor  # [B, H, C, Dv]
    cur_fk: torch.Tensor  # [B, H, C, F]
    cur_mask: torch.Tensor  # [B, C] bool: the first count % C slots are filled
    sel_k: torch.Tensor  # [B, H, M, Dk]: the selected tokens, in M / K groups of K slots
    sel_v: torch.Tensor  # [B, H, M, Dv]
    sel_fk: torch.Tensor  # [B, H, M, F]
    sel_pos: torch.Tensor  # [B, H, M] long: the rank (real-token index) of each, -1 if empty

    @classmethod
    def empty(cls, batch, heads, dk, dv, features, chunk_size, budget, device=None) -> "StillState":
        B, H, C, M = batch, heads, chunk_size, budget
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            count=torch.zeros(B, dtype=torch.long, device=device),
            S=torch.zeros(B, H, features, dv, **f32),
            z=torch.zeros(B, H, features, **f32),
            prev_k=torch.zeros(B, H, C, dk, **f32),
            prev_v=torch.zeros(B, H, C, dv, **f32),
            prev_fk=torch.zeros(B, H, C, features, **f32),
            prev_score=torch.full((B, H, C), _NEG, **f32),
            prev_mask=torch.zeros(B, C, dtype=torch.bool, device=device),
            cur_q=torch.zeros(B, H, C, dk, **f32),
            cur_k=torch.zeros(B, H, C, dk, **f32),
            cur_v=torch.zeros(B, H, C, dv, **f32),
            cur_fk=torch.zeros(B, H, C, features, **f32),
            cur_mask=torch.zeros(B, C, dtype=torch.bool, device=device),
            sel_k=torch.zeros(B, H, M, dk, **f32),
            sel_v=torch.zeros(B, H, M, dv, **f32),
            sel_fk=torch.zeros(B, H, M, features, **f32),
            sel_pos=torch.full((B, H, M), -1, dtype=torch.long, device=device),
        )

    @property
    def chunk_size(self) -> int:
        return self.prev_mask.shape[1]

    @property
    def budget(self) -> int:
        return self.sel_pos.shape[2]

    def map(self, fn) -> "StillState":
        """A new state with ``fn`` applied to every tensor (all have the batch first)."""
        return StillState(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


def check_settings(chunk_size: int, tokens_per_chunk: int, budget: int) -> None:
    """Raise ``ValueError`` naming the setting unless ``1 <= K <= C`` and ``M`` is a multiple of ``K``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 1 <= tokens_per_chunk <= chunk_size:
        raise ValueError(f"tokens_per_chunk must lie in 1..chunk_size ({chunk_size}), got {tokens_per_chunk}")
    if budget < 0 or budget % tokens_per_chunk:
        raise ValueError(
            f"selected_budget must be a multiple of tokens_per_chunk ({tokens_per_chunk}) and >= 0, got {budget}"
        )


def _check_state(state: StillState, chunk_size: int, budget: int) -> None:
    if state.chunk_size != chunk_size or state.budget != budget:
        raise ValueError(
            f"the state was made with chunk_size={state.chunk_size}, selected_budget={state.budget}; "
            f"got chunk_size={chunk_size}, selected_budget={budget}"
        )


@torch.no_grad()
def self_saliency(q, k, mask, scale):
    """Self-saliency of each token of a chunk. ``q: [B, H, N, C, Dk]`` the chunk's queries,
    ``k: [B, H, N, 2C, Dk]`` the keys of the chunk before it and of the chunk, ``mask: [B, N, 2C]``
    which of those are real. Returns ``[B, H, N, C]``: ``-log(1 - p_self)`` over the window of
    the token and the ``C - 1`` keys before it; ``-inf`` for padding."""
    C = q.shape[-2]
    a = torch.einsum("bhncd,bhnjd->bhncj", q, k) * scale  # [B, H, N, C, 2C]
    i = torch.arange(C, device=q.device)[:, None]
    j = torch.arange(2 * C, device=q.device)[None, :]
    allowed = (j <= i + C) & (j > i) & mask[:, None, :, None, :]
    a = a.masked_fill(~allowed, _NEG)
    with_self = torch.logsumexp(a, -1)
    without = torch.logsumexp(a.masked_fill(j == i + C, _NEG), -1)
    return torch.where(mask[:, None, :, C:], with_self - without, _NEG)


def _select(score, K):
    """The ``K`` best of each chunk: ``(index [..., K] ascending, real [..., K] bool)``."""
    value, index = score.topk(K, dim=-1)
    index, order = index.sort(-1)
    return index, value.gather(-1, order) > _NEG


def _outer(fk, v):
    """``(sum_s fk_s v_s^T, sum_s fk_s)`` over the slot axis (``-2``)."""
    return fk.transpose(-1, -2) @ v, fk.sum(-2)


# ----------------------------------------------------------------------------- recurrent form
def _complete_chunk(state: StillState, scale, K):
    """The state once its current chunk is complete: score that chunk, split the previous one,
    shift. Computed for all rows, whether or not their chunk completed (the caller keeps the
    result only where it did)."""
    cur_q, cur_k, cur_v, cur_fk, cur_mask = state.cur_q, state.cur_k, state.cur_v, state.cur_fk, state.cur_mask
    B, H, C, _ = cur_k.shape
    M = state.budget
    R = M // K
    score = self_saliency(
        cur_q[:, :, None], torch.cat([state.prev_k, cur_k], 2)[:, :, None],
        torch.cat([state.prev_mask, cur_mask], 1)[:, None], scale,
    )[:, :, 0]
    index, real = _select(state.prev_score, K)  # [B, H, K]
    chosen = torch.zeros(B, H, C, dtype=torch.bool, device=cur_k.device).scatter(-1, index, real)
    fold = state.prev_mask[:, None, :] & (~chosen if R else torch.ones_like(chosen))
    S_add, z_add = _outer(state.prev_fk * fold[..., None], state.prev_v)
    S, z = state.S + S_add, state.z + z_add
    sel_k, sel_v, sel_fk, sel_pos = state.sel_k, state.sel_v, state.sel_fk, state.sel_pos
    if R:
        chunk = state.count // C - 2  # the chunk being split (-1: none yet)
        slots = (torch.remainder(chunk, R)[:, None] * K + torch.arange(K, device=cur_k.device))[:, None, :]
        slots = slots.expand(B, H, K)  # [B, H, K]

        def take(x, idx):
            return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))

        out = (sel_pos.gather(2, slots) >= 0)[..., None]  # the group's previous tokens fold now
        S_out, z_out = _outer(take(sel_fk, slots) * out, take(sel_v, slots))
        S, z = S + S_out, z + z_out

        def put(buf, x):
            return buf.scatter(2, slots[..., None].expand(*slots.shape, buf.shape[-1]), x)

        sel_k, sel_v, sel_fk = put(sel_k, take(state.prev_k, index)), put(sel_v, take(state.prev_v, index)), put(sel_fk, take(state.prev_fk, index))
        sel_pos = sel_pos.scatter(2, slots, torch.where(real, chunk[:, None, None] * C + index, -1))
    zeros = torch.zeros_like
    return StillState(
        count=state.count, S=S, z=z,
        prev_k=cur_k, prev_v=cur_v, prev_fk=cur_fk, prev_score=score, prev_mask=cur_mask,
        cur_q=zeros(cur_q), cur_k=zeros(cur_k), cur_v=zeros(cur_v), cur_fk=zeros(cur_fk), cur_mask=zeros(cur_mask),
        sel_k=sel_k, sel_v=sel_v, sel_fk=sel_fk, sel_pos=sel_pos,
    )


def still_step(q, k, v, fq, fk, g, scale, key_mask, state: StillState, tokens_per_chunk: int, branch_free=False):
    """One token: ``q, k: [B, H, Dk]``, ``v, g: [B, H, Dv]``, ``fq, fk: [B, H, F]``,
    ``key_mask: [B]`` bool or None. Returns ``(y [B, H, Dv] fp32, new_state)``.

    ``branch_free``: complete the chunk (score, split, shift) at every step and keep the result
    only in the rows whose chunk did complete, instead of asking the device whether any did. The
    result is the same; the step then never reads a tensor's value on the host, so it can be
    captured in a CUDA graph (:mod:`linearize.generation`)."""
    q, k, v, fq, fk, g = (x.float() for x in (q, k, v, fq, fk, g))
    B, H, C = q.shape[0], q.shape[1], state.chunk_size
    keep = torch.ones(B, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    hot = (torch.arange(C, device=q.device) == (state.count % C)[:, None]) & keep[:, None]  # [B, C]

    def put(buf, x):
        return torch.where(hot[:, None, :, None], x[:, :, None], buf)

    cur = (put(state.cur_q, q), put(state.cur_k, k), put(state.cur_v, v), put(state.cur_fk, fk), state.cur_mask | hot)
    # exact terms: the previous chunk, the current one, the selected tokens
    ka = torch.cat([state.prev_k, cur[1], state.sel_k], 2)
    va = torch.cat([state.prev_v, cur[2], state.sel_v], 2)
    ma = torch.cat([state.prev_mask[:, None].expand(B, H, C), cur[4][:, None].expand(B, H, C), state.sel_pos >= 0], 2)
    a = ((ka @ q[..., None])[..., 0] * scale).masked_fill(~ma, _NEG)  # [B, H, L]
    m = a.amax(-1, keepdim=True)
    e = torch.exp(a - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    num = (e[:, :, None] @ va)[:, :, 0] + g * (fq[:, :, None] @ state.S)[:, :, 0]
    den = e.sum(-1) + (fq * state.z).sum(-1)
    y = (num / den.clamp_min(_TINY)[..., None]).masked_fill(~keep[:, None, None], 0.0)

    state = dataclasses.replace(
        state, count=state.count + keep.long(), cur_q=cur[0], cur_k=cur[1], cur_v=cur[2], cur_fk=cur[3], cur_mask=cur[4]
    )
    done = keep & (state.count % C == 0)
    if branch_free or bool(done.any()):
        completed = _complete_chunk(state, scale, tokens_per_chunk)

        def pick(new, old):
            return torch.where(done.view(B, *[1] * (old.dim() - 1)), new, old)

        state = StillState(**{f.name: pick(getattr(completed, f.name), getattr(state, f.name)) for f in fields(state)})
    return y, state


def recurrent_still_attention(
    q, k, v, fq, fk, g, scale, key_mask=None, state=None, chunk_size=64, tokens_per_chunk=4, budget=64,
    branch_free=False,
):
    """Token-by-token form. Returns ``(y [B, H, T, Dv] fp32, state)``; ``branch_free`` as for
    :func:`still_step`."""
    check_settings(chunk_size, tokens_per_chunk, budget)
    B, H, T, Dk = q.shape
    if state is None:
        state = StillState.empty(B, H, Dk, v.shape[-1], fq.shape[-1], chunk_size, budget, q.device)
    _check_state(state, chunk_size, budget)
    ys = []
    for t in range(T):
        y, state = still_step(
            q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], g[:, :, t], scale,
            None if key_mask is None else key_mask[:, t], state, tokens_per_chunk, branch_free,
        )
        ys.append(y)
    if not ys:
        return v.new_zeros(B, H, 0, v.shape[-1]).float(), state
    return torch.stack(ys, 2), state


# ----------------------------------------------------------------------------- chunked form
def _shift(x: torch.Tensor, by: int, dim: int = 2) -> torch.Tensor:
    """``x`` moved ``by`` places along ``dim`` (zeros in front, the tail dropped)."""
    n = x.shape[dim]
    if by >= n:
        return torch.zeros_like(x)
    first = torch.zeros_like(x.narrow(dim, 0, by))
    return torch.cat([first, x.narrow(dim, 0, n - by)], dim=dim)


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, :, index[b]]`` for ``x: [B, H, N, ...]``, ``index: [B]`` (or ``[B, R]``: then
    ``[B, H, R, ...]``)."""
    idx = index if index.dim() == 2 else index[:, None]
    shape = (x.shape[0], x.shape[1], idx.shape[1], *x.shape[3:])
    out = x.gather(2, idx.view(idx.shape[0], 1, idx.shape[1], *[1] * (x.dim() - 3)).expand(shape))
    return out if index.dim() == 2 else out[:, :, 0]


def chunk_still_attention(
    q, k, v, fq, fk, g, scale, key_mask=None, state=None, chunk_size=64, tokens_per_chunk=4, budget=64,
    output_state=True,
):
    """Chunked form. Returns ``(y [B, H, T, Dv] fp32, new_state or None)``."""
    check_settings(chunk_size, tokens_per_chunk, budget)
    q, k, v, fq, fk, g = (x.float() for x in (q, k, v, fq, fk, g))
    B, H, T, Dk = q.shape
    Dv, F, dev = v.shape[-1], fq.shape[-1], q.device
    C, K, M = chunk_size, tokens_per_chunk, budget
    R = M // K
    if state is None:
        state = StillState.empty(B, H, Dk, Dv, F, C, M, dev)
    _check_state(state, C, M)
    if T == 0:
        return v.new_zeros(B, H, 0, Dv), (state if output_state else None)
    key_mask = torch.ones(B, T, dtype=torch.bool, device=dev) if key_mask is None else key_mask.bool()

    # The virtual sequence of each row: the state's last complete chunk (virtual chunk 0, real
    # chunk c - 1), its partial chunk, then this call's real tokens in order, then padding.
    count = state.count
    c, o = count // C, count % C
    n_new = key_mask.long().sum(1)
    N = int((C + o + n_new).max()) // C + 1  # one chunk more than the longest row fills
    P = N * C
    p = torch.arange(P, device=dev)[None]  # [1, P]
    order = torch.argsort((~key_mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    rank = p - C - o[:, None]  # [B, P]: which new real token sits at p
    from_new = rank >= 0
    src = order.gather(1, rank.clamp(0, T - 1))
    valid = torch.where(
        from_new, rank < n_new[:, None], torch.cat([state.prev_mask, state.cur_mask], 1).gather(1, p.clamp(max=2 * C - 1).expand(B, P))
    )

    def place(prev, cur, new):  # [B, H, C, X], [B, H, C, X], [B, H, T, X] -> [B, H, N, C, X]
        X = new.shape[-1]
        old = torch.cat([prev, cur], 2).gather(2, p.clamp(max=2 * C - 1)[:, None, :, None].expand(B, H, P, X))
        fresh = new.gather(2, src[:, None, :, None].expand(B, H, P, X))
        out = torch.where(from_new[:, None, :, None], fresh, old).masked_fill(~valid[:, None, :, None], 0.0)
        return out.view(B, H, N, C, X)

    zq, zf, zg = (torch.zeros(B, H, C, d, device=dev) for d in (Dk, F, Dv))
    qc = place(zq, state.cur_q, q)
    kc = place(state.prev_k, state.cur_k, k)
    vc = place(state.prev_v, state.cur_v, v)
    fkc = place(state.prev_fk, state.cur_fk, fk)
    fqc, gc = place(zf, zf, fq), place(zg, zg, g)  # dummy queries for the state's tokens
    mc = valid.view(B, N, C)

    # Local keys of chunk n: chunks n-1 and n.
    k_loc = torch.cat([_shift(kc, 1), kc], 3)  # [B, H, N, 2C, Dk]
    v_loc = torch.cat([_shift(vc, 1), vc], 3)
    m_loc = torch.cat([_shift(mc, 1, 1), mc], 2)  # [B, N, 2C]

    # Scores (chunk 0's were computed when it completed) and the split of every chunk.
    score = torch.cat([state.prev_score[:, :, None], self_saliency(qc, k_loc, m_loc, scale)[:, :, 1:]], 2)
    index, real = _select(score.masked_fill(~mc[:, None], _NEG), K)  # [B, H, N, K]
    chosen = torch.zeros(B, H, N, C, dtype=torch.bool, device=dev).scatter(-1, index, real)

    def take(x):  # [B, H, N, C, X] -> the chosen tokens [B, H, N, K, X]
        return x.gather(3, index[..., None].expand(*index.shape, x.shape[-1]))

    sk, sv, sfk = take(kc), take(vc), take(fkc) * real[..., None]
    chunk_of = torch.arange(N, device=dev)[None, :] + c[:, None] - 1  # [B, N]: real chunk index
    spos = torch.where(real, chunk_of[:, None, :, None] * C + index, -1)

    # What folds into S, z when chunk j is split: its unchosen tokens, and the group it evicts.
    fold = mc[:, None] & ~chosen
    D_S, D_z = _outer(fkc * fold[..., None], vc)  # [B, H, N, F, Dv], [B, H, N, F]
    sel_S, sel_z = _outer(sfk, sv)
    if R == 0:
        D_S, D_z = D_S + sel_S, D_z + sel_z
    else:
        D_S, D_z = D_S + _shift(sel_S, R), D_z + _shift(sel_z, R)  # chunk j evicts chunk j - R,
    has_held = bool((state.sel_pos >= 0).any())
    if R and has_held:
        held = state.sel_fk * (state.sel_pos >= 0)[..., None]
        st_S, st_z = _outer(held.view(B, H, R, K, F), state.sel_v.view(B, H, R, K, Dv))  # [B, H, R, F, Dv]
        from_state = (torch.arange(N, device=dev) < R)[None, :] & (chunk_of >= 0)  # or, for j < R, a group the state holds
        group = torch.remainder(chunk_of, R)
        D_S = D_S + _pick(st_S, group) * from_state[:, None, :, None, None]
        D_z = D_z + _pick(st_z, group) * from_state[:, None, :, None]
    S_cum, z_cum = D_S.cumsum(2), D_z.cumsum(2)
    S_seen = state.S[:, :, None] + _shift(S_cum, 2)  # chunk n sees the splits of chunks <= n-2
    z_seen = state.z[:, :, None] + _shift(z_cum, 2)

    # Exact terms: local keys (causal), and the selected tokens visible to each chunk.
    i = torch.arange(C, device=dev)[:, None]
    j = torch.arange(2 * C, device=dev)[None, :]
    a_loc = torch.einsum("bhncd,bhnjd->bhncj", qc, k_loc) * scale
    a_loc = a_loc.masked_fill(~((j <= i + C) & m_loc[:, None, :, None, :]), _NEG)
    n_idx = torch.arange(N, device=dev)
    split = n_idx[None, :] <= n_idx[:, None] - 2  # [query chunk, key chunk]
    visible = split & (n_idx[None, :] > n_idx[:, None] - 2 - R)
    vis = visible[None, None, :, :, None] & real[:, :, None]  # [B, H, N, N, K]
    keys, values, vis = [sk.flatten(2, 3)], [sv.flatten(2, 3)], [vis.flatten(3, 4)]
    if has_held:
        alive = state.sel_pos // C + R - c[:, None, None] + 1  # [B, H, M]: virtual chunk that evicts it
        keys.append(state.sel_k)
        values.append(state.sel_v)
        vis.append((state.sel_pos >= 0)[:, :, None] & (alive[:, :, None] > n_idx[None, None, :, None] - 2))
    k_sel, v_sel, vis = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(vis, 3)  # [B, H, S, *], [B, H, N, S]
    a_sel = torch.einsum("bhncd,bhsd->bhncs", qc, k_sel) * scale
    a_sel = a_sel.masked_fill(~vis[:, :, :, None, :], _NEG)
    m = torch.maximum(a_loc.amax(-1, keepdim=True), a_sel.amax(-1, keepdim=True))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e_loc, e_sel = torch.exp(a_loc - m), torch.exp(a_sel - m)
    num = e_loc @ v_loc + torch.einsum("bhncs,bhsd->bhncd", e_sel, v_sel)
    num = num + gc * torch.einsum("bhncf,bhnfd->bhncd", fqc, S_seen)
    den = e_loc.sum(-1) + e_sel.sum(-1) + torch.einsum("bhncf,bhnf->bhnc", fqc, z_seen)
    y_all = (num / den.clamp_min(_TINY)[..., None]).reshape(B, H, P, Dv)
    at = (C + o[:, None] + key_mask.long().cumsum(1) - 1).clamp(0, P - 1)  # [B, T]: where each new token sits
    y = y_all.gather(2, at[:, None, :, None].expand(B, H, T, Dv)).masked_fill(~key_mask[:, None, :, None], 0.0)
    if not output_state:
        return y, None

    # New state: virtual chunk c' - c is the last complete one, c' - c + 1 the partial one.
    new_count = count + n_new
    last = new_count // C - c  # [B]
    S_new = state.S + _pick(torch.cat([torch.zeros_like(S_cum[:, :, :1]), S_cum], 2), last)
    z_new = state.z + _pick(torch.cat([torch.zeros_like(z_cum[:, :, :1]), z_cum], 2), last)
    sel_k, sel_v, sel_fk, sel_pos = state.sel_k, state.sel_v, state.sel_fk, state.sel_pos
    if R:
        # group r holds the latest split chunk J = r (mod R): from this call if J >= c - 1
        top = (new_count // C - 2)[:, None]
        J = top - torch.remainder(top - torch.arange(R, device=dev)[None], R)  # [B, R]
        jv = J - c[:, None] + 1
        here = (jv >= 0)[:, None, :, None]  # [B, 1, R, 1]

        def regroup(call, held):  # [B, H, N, K, X], [B, H, M, X] -> [B, H, M, X]
            X = held.shape[-1]
            fresh = _pick(call, jv.clamp(min=0))  # [B, H, R, K, X]
            return torch.where(here[..., None], fresh, held.view(B, H, R, K, X)).view(B, H, M, X)

        sel_k, sel_v, sel_fk = regroup(sk, sel_k), regroup(sv, sel_v), regroup(sfk, sel_fk)
        sel_pos = regroup(spos[..., None], sel_pos[..., None])[..., 0]
    nxt = last + 1
    return y, StillState(
        count=new_count, S=S_new, z=z_new,
        prev_k=_pick(kc, last), prev_v=_pick(vc, last), prev_fk=_pick(fkc, last),
        prev_score=_pick(score.masked_fill(~mc[:, None], _NEG), last), prev_mask=mc.gather(1, last[:, None, None].expand(B, 1, C))[:, 0],
        cur_q=_pick(qc, nxt), cur_k=_pick(kc, nxt), cur_v=_pick(vc, nxt), cur_fk=_pick(fkc, nxt),
        cur_mask=mc.gather(1, nxt[:, None, None].expand(B, 1, C))[:, 0],
        sel_k=sel_k, sel_v=sel_v, sel_fk=sel_fk, sel_pos=sel_pos,
    )
