"""Gated (data-dependent decay) normalised linear attention, in plain PyTorch.

For a query at position ``t``, with per-channel decays ``alpha_s in (0, 1]^F`` (given as
``g_s = log alpha_s <= 0``):

    S_t = diag(alpha_t) S_{t-1} + phi(k_t) [v_t, 1]^T          (S: [F, Dv + 1])
    o_t = phi(q_t)^T S_t
    y_t = o_t[:Dv] / o_t[Dv]

i.e. the gated recurrence of GLA (Yang et al., "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML 2024, arXiv 2312.06635: ``S_t = (alpha_t^T 1) * S_{t-1} +
k_t^T v_t``; its section number was not checked against the text) carried for the values and,
through the appended ones column, for the normaliser: numerator and denominator decay alike, so
``y_t`` is a convex combination of the values of the tokens seen. This is how LAWCAT's code
normalises (arXiv 2509.18467; ``GLASlidingWindowAttention``: a ones column appended to ``v``
before flash-linear-attention's ``chunk_gla``, then ``o[:Dv] / (o[Dv] + 1e-10)``); we clamp the
denominator instead of adding an epsilon.
Unrolled, with ``b_t = sum_{r<=t} g_r``:

    y_t = sum_{s<=t} w_ts v_s / sum_{s<=t} w_ts,   w_ts = sum_f phi(q_t)_f phi(k_s)_f exp(b_t,f - b_s,f)

Keys whose ``key_mask`` is False (padding) are no-ops: zero features, zero values and no decay
(``g = 0``), so a left-padded prompt leaves the state exactly as the prompt alone would.

Three forms, all in fp32: :func:`naive_gated_attention` (quadratic; also returns the weights),
:func:`chunk_gated_attention` (chunks of ``C`` tokens: pairwise decays inside a chunk, a
carried state between chunks; every exponent is ``<= 0``, so nothing overflows however strong
the decay) and :func:`recurrent_gated_attention` (a loop of :func:`gated_step`, the decode path).
Shapes: ``fq, fk, g: [B, H, T, F]``, ``v: [B, H, T, Dv]``, ``key_mask: [B, T]`` bool.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.utils.checkpoint

_TINY = 1e-30  # denominators are clamped here; only a prefix with no valid key gets near it


@dataclass
class GatedState:
    """What a gated linear attention layer carries: ``S = [sum decayed phi(k) v^T | sum decayed phi(k)]``."""

    S: torch.Tensor  # [B, H, F, Dv + 1] fp32; the last column is the normaliser

    @classmethod
    def empty(cls, batch: int, heads: int, features: int, dv: int, device=None) -> "GatedState":
        return cls(S=torch.zeros(batch, heads, features, dv + 1, dtype=torch.float32, device=device))

    def map(self, fn) -> "GatedState":
        """A new state with ``fn`` applied to every tensor (all have the batch first)."""
        return GatedState(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


def _prepare(fq, fk, v, g, key_mask):
    """fp32 inputs (float64 ones stay float64, for tests' exact values) with padding keys made
    no-ops, and ``v`` with the ones column appended."""
    fq, fk, v, g = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (fq, fk, v, g))
    B, H, T, _ = fk.shape
    ones = v.new_ones(B, H, T, 1)
    v1 = torch.cat([v, ones], -1)
    if key_mask is not None:
        pad = ~key_mask.bool()[:, None, :, None]
        fk = fk.masked_fill(pad, 0.0)
        v1 = v1.masked_fill(pad, 0.0)
        g = g.masked_fill(pad, 0.0)
    return fq, fk, v1, g


def _normalise(o):
    return o[..., :-1] / o[..., -1:].clamp_min(_TINY)


def naive_gated_attention(fq, fk, v, g, key_mask=None):
    """Quadratic reference with no carried state. Returns ``(y [B,H,T,Dv], weights [B,H,T,T])``;
    rows of ``weights`` sum to 1 over the valid keys."""
    fq, fk, v1, g = _prepare(fq, fk, v, g, key_mask)
    T = fq.shape[2]
    b = g.cumsum(2)
    causal = torch.ones(T, T, dtype=torch.bool, device=fq.device).tril()
    diff = (b[:, :, :, None, :] - b[:, :, None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    w = torch.einsum("bhtf,bhsf,bhtsf->bhts", fq, fk, diff.exp())  # [B, H, T, T]
    o = w @ v1
    den = o[..., -1:].clamp_min(_TINY)
    return o[..., :-1] / den, w / den


def _intra_chunk(fqc, fkc, b):
    """``A_ij = sum_f fq_if fk_jf exp(b_if - b_jf)`` for ``j <= i`` inside each chunk, else 0."""
    C = b.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    diff = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    return torch.einsum("bhnif,bhnjf,bhnijf->bhnij", fqc, fkc, diff.exp())


def chunk_gated_attention(fq, fk, v, g, key_mask=None, state: GatedState | None = None, chunk_size=16, output_state=True):
    """Chunked form. Returns ``(y [B,H,T,Dv] fp32, new_state or None)``.

    The pairwise decays inside each chunk take ``O(B H T C F)`` memory (hence the small default
    ``C``); under autograd they are recomputed in backward rather than kept. The chunks are
    walked in order, carrying ``S``.
    """
    fq, fk, v1, g = _prepare(fq, fk, v, g, key_mask)
    B, H, T, F = fq.shape
    D1 = v1.shape[-1]
    if state is None:
        state = GatedState.empty(B, H, F, D1 - 1, fq.device)
    if T == 0:
        return v1.new_zeros(B, H, 0, D1 - 1), (state if output_state else None)
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    if pad:  # padded tail: zero features, values and decays, so the state is untouched
        fq, fk, v1, g = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v1, g))
    fqc, fkc, gc = (x.reshape(B, H, N, C, F) for x in (fq, fk, g))
    vc = v1.reshape(B, H, N, C, D1)
    b = gc.cumsum(3)  # [B, H, N, C, F]: decay from the chunk start through token i (inclusive)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (fqc, fkc, b)):
        # recomputed in backward: the pairwise decays are C times larger than the inputs
        A = torch.utils.checkpoint.checkpoint(_intra_chunk, fqc, fkc, b, use_reentrant=False)
    else:
        A = _intra_chunk(fqc, fkc, b)  # [B, H, N, C, C]
    o_local = A @ vc  # [B, H, N, C, D1]
    q_in = fqc * b.exp()  # query against the state at the chunk start
    b_last = b[..., -1:, :]  # [B, H, N, 1, F]
    k_out = fkc * (b_last - b).exp()  # key as it stands at the chunk end
    decay_all = b_last[..., 0, :].exp()  # [B, H, N, F]
    S = state.S
    outs = []
    for n in range(N):
        outs.append(o_local[:, :, n] + q_in[:, :, n] @ S)
        S = decay_all[:, :, n, :, None] * S + k_out[:, :, n].transpose(-1, -2) @ vc[:, :, n]
    o = torch.stack(outs, 2).reshape(B, H, N * C, D1)[:, :, :T]
    return _normalise(o), (GatedState(S=S) if output_state else None)


def gated_step(fq, fk, v, g, key_mask, state: GatedState):
    """One token: ``fq, fk, g: [B, H, F]``, ``v: [B, H, Dv]``, ``key_mask: [B]`` bool (or None).
    Returns ``(y [B, H, Dv] fp32, new_state)``."""
    fq, fk, v1, g = _prepare(fq[:, :, None], fk[:, :, None], v[:, :, None], g[:, :, None],
                             None if key_mask is None else key_mask[:, None])
    S = g[:, :, 0, :, None].exp() * state.S + fk[:, :, 0, :, None] * v1[:, :, 0, None, :]
    o = (fq[:, :, 0, None, :] @ S)[:, :, 0]
    return _normalise(o), GatedState(S=S)


def recurrent_gated_attention(fq, fk, v, g, key_mask=None, state: GatedState | None = None):
    """Token-by-token form. Returns ``(y [B,H,T,Dv], state)``."""
    B, H, T, F = fq.shape
    if state is None:
        state = GatedState.empty(B, H, F, v.shape[-1], fq.device)
    ys = []
    for t in range(T):
        y, state = gated_step(
            fq[:, :, t], fk[:, :, t], v[:, :, t], g[:, :, t], None if key_mask is None else key_mask[:, t], state
        )
        ys.append(y)
    if not ys:
        return v.new_zeros(B, H, 0, v.shape[-1]).float(), state
    return torch.stack(ys, 2), state
