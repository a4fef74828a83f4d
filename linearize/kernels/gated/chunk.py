"""Chunked gated (per-channel decayed) normalised linear attention in Triton, forward and backward.

With ``g = log alpha <= 0`` (per token and feature) and ``v1 = [v, 1]``:

    S_t = diag(exp(g_t)) S_{t-1} + fk_t v1_t^T        S: [F, Dv + 1], S_{-1} = [S0 | z0]
    o_t = fq_t^T S_t,   y_t = o_t[:Dv] / max(o_t[Dv], 1e-30)

The oracle is :func:`linearize.kernels.gated.chunk_gated_attention` (see its module for the math
and the citation); the state is kept here as ``S [F, Dv]`` and ``z [F]`` (the ones column).

Chunks, sub-chunks, and why no exponent overflows. The kernels walk the sequence ``C``
tokens a step (``chunk_size``: 64, the default, or 16), a chunk being ``C / 16`` sub-chunks of 16
tokens. Write ``c_i`` for the running sum of ``g`` from the start of ``i``'s sub-chunk through
``i`` (inclusive), ``G_M`` for sub-chunk ``M``'s total and ``b_i`` for the sum from the chunk
start. For a query ``i`` in sub-chunk ``I``:

    o_i = (fq_i * exp(b_i)) S_start + sum_{j <= i in the chunk} A_ij v1_j
    A_ij = sum_f fq_if fk_jf exp(c_if - c_jf)                                  j in I (diagonal block)
    A_ij = sum_f (fq_if exp(c_if)) (fk_jf exp((G_Jf - c_jf) + sum_{J<M<I} G_Mf))   j in J < I
    S_end = diag(exp(b_last)) S_start + sum_j (fk_j * exp(b_last - b_j)) v1_j^T

Where the decay is strong, the diagonal 16 x 16 blocks are formed pairwise (a ``[16, 16, F]``
product, the exponent set to ``-inf`` above the diagonal before it is exponentiated), not as
``(fq exp(b)) (fk exp(-b))^T``, whose second factor overflows fp32 once a sub-chunk's decay
passes ``e^-88`` (5.5 a token on average). Where it is not (the factored blocks below), they are
that product. An off-diagonal block (the 6 pairs ``J < I`` of a 64-token chunk) is one matrix product
of the queries decayed from the start of ``I`` and the keys decayed to it: the decay
``exp(b_i - b_j)`` factored at ``r``, the running decay at the boundary before ``I``, as
``exp(b_i - r) exp(r - b_j)``; ``b`` does not increase, so both factors are ``<= 1``
(flash-linear-attention's ``chunk_gla`` also cuts 64-token chunks into 16-token sub-chunks and
factors an off-diagonal pair's decay at a boundary between them). The read-out's
``exp(b_i)`` and the update's ``exp(b_last - b_j)`` are ``<= 1`` likewise. So nothing overflows
however strong the decay. The only differences ever taken are ``c_i - c_j`` and ``G_J - c_j``,
inside one sub-chunk, exactly as the 16-token scheme and the reference's chunk form take them;
what spans sub-chunks is a sum of terms ``<= 0`` (``b_i`` is a running sum over the chunk) or a
product of factors ``<= 1``, so the rounding of a long running sum never enters a decay as a
cancellation. (The backward's ``dg`` depends on this: its terms cancel, and a forward that took
``b_last - b_j`` in another way than the backward showed there, at 1e-5 relative.) With ``C = 16``
every chunk is one sub-chunk: the kernels are the 16-token ones as they were before 64-token
steps existed (the forward's loop body verbatim).

Factored blocks (:data:`FACTOR_LIMIT`, 40). A chunk whose decay stays above ``e^-40`` in every
feature (``min_f sum of its g > -40``) takes its pairs as one product, ``A_ij = (fq_i exp(b_i)) .
(fk_j exp(-b_j))`` masked to ``i >= j``: the first factor is ``<= 1``, the second at most
``e^40`` (about 2^58, far inside fp32's and bf16's range, whose hi/lo halves stay normal), and the
pairwise form's ``16 F`` exponentials a token become ``2 F``. A chunk that decays more takes its
sub-chunks one at a time: a sub-chunk that decays less than ``e^-40`` forms its diagonal block as
the same product over its own 16 tokens (``exp(c_i)``, ``exp(-c_j)``), one that decays more
pairwise. The backward's sub-chunk kernel does the same for ``dfq`` and ``dfk``. The product's
fp32 operands are split into bf16 halves, as the off-diagonal blocks' are (about 2^-16 relative
each term, where the pairwise form is fp32 elementwise work); ``b`` is summed as the output pass
sums it, and ``|b| <= 40`` keeps its rounding near 2^-24 x 40. The strong decays the tests use
exceed the limit, so they still take the pairwise form, and ``FACTOR_LIMIT = 0`` takes it
everywhere.

How the work is split. Every walk takes the chunks of one (batch, head) in order (or in reverse)
with the running state in fp32 registers; no per-chunk state goes through memory, except in the
chunk-parallel passes below, which store each chunk's starting state (and the backward its adjoint).

* forward, first: ``_cumsum_kernel`` writes ``c``, the running sums of ``g`` inside each 16-token
  sub-chunk, fp32 ``[B, H, T', F]`` (``T`` rounded up to whole chunks; a sub-chunk's total
  ``G_M`` is its last row), and ``_intra_kernel``, grid ``(T / C, B * H)``, one program per
  chunk, forms its rows of ``A`` from them: a factored chunk in one product, ``INTRA_BK``
  features a step; any other chunk a sub-chunk at a time (its diagonal block a product or a key
  at a time, ``[16, F]`` elementwise work a key, then its off-diagonal products). It writes
  them, fp32 ``[B, H, T, C]`` (row ``t``: ``A[t, j]`` for the ``j``-th token of ``t``'s chunk; a
  factored chunk writes zeros after the diagonal, the others never write the blocks after
  ``t``'s sub-chunk, and readers mask them). ``A`` is kept for the backward. Then one
  of two forwards:
* the walk (``parallel=False``): ``_fwd_kernel``, grid ``(Dv / BV, B * H)``, walks the chunks:
  per chunk one read-out of all ``C`` queries at once (``[C, F]`` tiles against the chunk-start
  ``S, z``, plus ``A v1``), which writes ``y`` and the denominators ``d``, then the state takes
  the chunk's keys a sub-chunk ``J`` at a time, ``S <- diag(exp(G_J)) S + (fk_j exp(G_J -
  c_j))^T v1_j``. Its read-outs, the bulk of its products, run on ``B * H * Dv / BV`` programs,
  one chunk after another;
* chunk-parallel (``parallel=True``, or :data:`PARALLEL_FORWARD`), the structure of
  flash-linear-attention's ``chunk_gla`` (Yang et al. 2024, arXiv 2312.06635): ``_par_states_kernel``,
  grid ``(F / BK, Dv / BV, B * H)`` (a feature's row of the state evolves on its own, so the
  features split too), walks the chunks doing only the update, a whole chunk in one ``[BK, C] x
  [C, BV]`` product of keys decayed to the chunk end by ``exp((G_J - c_j) + sum_{M > J} G_M)``,
  and stores each chunk's starting state ``h_c`` and ``z_c`` in fp32 (``[B, H, T / C, F, Dv]``,
  ``[B, H, T / C, F]``) and the final state; then ``_par_output_kernel``, grid ``(Dv / BV, T / C,
  B * H)``, reads every chunk out at once against its ``h_c``: ``o = (fq exp(b)) h_c + A v1`` with
  ``b_i = c_i + sum_{M < I} G_M``, the normaliser division, ``y`` (and its fp32 copy) and ``d``.
  The same read-out as the walk's (``fq exp(b)`` rounded once for numerator and normaliser, ``h``
  and ``A`` split), the same ``A``; only the decays are rounded in another order (a sum of
  sub-chunk totals in one exponential where the walk multiplies by each in turn), so its outputs
  are the walk's to fp32 rounding and the backward is shared. A sequence of more than
  ``MAX_GRID_Y`` chunks (CUDA's limit on the grid's second axis) takes the walk.

  Every exponent is still ``<= 0`` and the only differences taken are inside one sub-chunk:
  ``G_J - c_j`` and ``c_i - c_j``; everything spanning sub-chunks is a sum of terms ``<= 0``.

* backward, with ``dn_t = dy_t / d_t``, ``dd_t = -(dy_t . y_t) / d_t`` (the gradient of
  ``o_t = [n_t, d_t]``) and ``P_ij = dn_i . v_j + dd_i`` (``= do_i . v1_j``):

      dfq_i = exp(b_i) * (S_start do_i) + sum_{j<=i} P_ij fk_j * exp(b_i - b_j)
      dfk_j = exp(b_last - b_j) * (dH_end v1_j) + sum_{i>=j} P_ij fq_i * exp(b_i - b_j)
      dv_j  = dH_end[:, :Dv]^T (fk_j * exp(b_last - b_j)) + sum_{i>=j} A_ij dn_i

  where ``dH`` is the adjoint state, ``dH_start = diag(exp(b_last)) dH_end + sum_i (fq_i exp(b_i))
  do_i^T``, seeded with the final state's gradient; after the first chunk it is the initial
  state's gradient. The pairwise sums inside a sub-chunk are ``[16, 16, F]`` products as in the
  forward; a sub-chunk's pairs with the chunk's other sub-chunks are products of ``P``'s block
  with the keys (``dfq``) or queries (``dfk``) decayed to the boundary between the two, ``dv``
  takes them through ``A``. Two backwards compute this, with the same gradients up to fp32
  rounding:
* chunk-parallel (the default, :data:`PARALLEL_BACKWARD`, or ``parallel=True``): the chunks'
  starting states again (``_cumsum_kernel``, ``_par_states_kernel``: a recomputation, cheaper
  than keeping ``[B, H, T / C, F, Dv]`` fp32 from the forward); ``_par_bwd_states_kernel``, grid
  ``(F / BK, Dv / BV, B * H)``, walks the chunks in reverse doing only the adjoint's update
  (a whole chunk in one product of the decayed queries against ``dn``) and stores each chunk's
  adjoint at its end, ``dh_c``, ``dhz_c`` (and ``dS0``, ``dz0``); ``_bwd_inter_kernel``, grid
  ``(F / BK + Dv / BV, T / C, B * H)``, what the states give every token, all chunks at once
  (``exp(b_i) (dn_i h_c^T + dd_i hz_c)`` for ``dfq``, ``exp(b_last - b_j) (v_j dh_c^T + dhz_c)``
  for ``dfk``, ``(fk_j exp(b_last - b_j)) dh_c`` for ``dv``; fp32 ``[B, H, T, F]`` and ``[B, H, T,
  Dv]``); then ``_bwd_sub_kernel``, grid ``(T / 16, B * H)``, one program per 16-token sub-chunk
  with every feature and value column, adds the pairs inside the chunk: the diagonal block as
  two products where the sub-chunk is factored, else a token at a time with one exponential for
  ``dfq`` and ``dfk`` both; the off-diagonal blocks as products; ``A``'s blocks transposed
  against ``dn`` for ``dv``. With :data:`CHUNK_BACKWARD` (off) ``_bwd_chunk_kernel``, grid ``(F /
  BK + Dv / BV, T / C, B * H)``, takes a factored chunk whole instead (``P``'s ``[C, C]`` block
  against the keys grown back to the chunk start), and the sub-chunk programs of such a chunk
  return at once. Compiled on an H200 (Triton 3.6) it gave wrong ``dfq`` and ``dfk`` with bf16
  inputs at 12 features (right under the interpreter and in the GPU tests at 64-256 features);
  the cause is not found, so it stays off;
* the walk (``parallel=False``): one launch with three kinds of program, all at once,
  ``dfq`` forward over the chunks and ``dfk`` in reverse (``BK`` features each), ``dv`` in reverse
  (``BV`` value columns). Each loops over a chunk's sub-chunks (in reverse for ``dfk`` and
  ``dv``), all against the state (adjoint) at the chunk's start (end), and adds the chunk's
  increment to it once per chunk; the increment is summed over the sub-chunks as ``U <-
  diag(exp(G_M)) U + ...``, so each token's decay is a product of factors ``<= 1``.
* the decays: ``g_r`` enters every ``b`` from token ``r`` on, and ``d L / d b_t = fq_t dfq_t -
  fk_t dfk_t`` (query side minus key side of every pairwise decay ``exp(b_t - b_s)`` and of the
  initial state's ``exp(b_t)``), plus ``rowsum(dS_T * S_T)`` at the last token for the final state.
  So ``dg_r = sum_{t >= r} (fq_t dfq_t - fk_t dfk_t)`` + that term: the ``dfq``/``dfk`` programs
  write ``fq dfq`` and ``fk dfk`` in fp32 (not the rounded gradients), and ``_dg_kernel`` takes
  the suffix sums. A token's pair with itself (decay 1) adds the same ``fq_t fk_t P_tt`` to both
  terms, so it is left out of both (it still goes into ``dfq`` and ``dfk``): otherwise, with
  strong decays, where little else remains, ``dg`` would be the rounding left over from that
  cancellation.

Speed, measured on an H200 (Triton 3.6; ``benchmarks/kernel_breakdown.py``, kernel time, B = 1,
32 heads, F = Dv = 128, bf16, LAWCAT-like decays, ``results/h200-kernels/README.md``). With the
chunks factored, the forward takes 4.16 ms at T = 32K against fla ``chunk_gla``'s 4.78 in the
same run (1.15x fla), 9.18 ms pairwise:
- the states pass 1.84;
- the output pass 1.41;
- the intra kernel 0.72 with 4 warps (0.63 with 2, now its setting);
- the sums 0.20.

So the states and output passes bound the forward now, as fla's do (1.19 and 1.10 ms). Forward +
backward took 20.5 ms with the sub-chunks factored (when the intra kernel took 2.12 ms), against
24.7 pairwise; the sub-chunk kernel 6.58 ms of it with 4 warps. With :data:`CHUNK_BACKWARD` it
took 16.3 ms, the chunk kernel 3.55 of it. In wall time (``benchmarks/attention.py``) the
forward is 4.14 ms at 32K against cuDNN softmax's 14.1 (3.4x) and SDPA flash's 24.8 (6.0x), and
2.09 against 3.60 and 6.31 at 16K.

Before the chunks were factored, at T = 32K the chunk-parallel forward took 6.25 ms:
- the intra kernel 2.81 (45%; 3.57 with the 8 warps it had before, 1 now);
- the states pass 1.85;
- the output pass 1.39;
- the sums 0.20.

fla's ``chunk_gla`` on the same math took 4.75 ms in the same run (0.76x fla): its intra-chunk
kernels 1.43, its states 1.19, its output 1.10, PyTorch ops for the ones column 0.72. The
sequential walk took 15.5 ms with 16-token steps (12.9 of them the walk) and 29.5 with 64-token
ones. So the intra kernel bounds the forward now. Its pairwise decays cost ``16 F`` exponentials
a token (2048 at ``F = 128``), about 2.1e9 at that shape: some 0.6 ms of an H100's
special-function units (16 a clock per multiprocessor). The rest of its time is the per-key
loop's ``[16, F]`` elementwise work and reductions.

A forward + backward takes 23.6 ms of kernel time at 32K with the chunk-parallel backward,
against 127.7 with the walks (5.4x). Most of it is the sub-chunk kernel's 8.9 ms, then:
- the chunks' starting states, 3.6 (formed in the forward and again in the backward);
- the intra kernel, 2.8;
- their adjoints, 2.1;
- the state products, 2.0;
- the output pass, 1.5;
- ``dg``, 1.1.

In wall time (``benchmarks/attention.py``) it is 23.6 ms against cuDNN softmax's 52.9 at 32K
(2.25x), and 11.9 against 13.4 at 16K; the forward 6.21 against 13.6 (2.20x). The sub-chunk
kernel is bound by its ``[16, F]`` fp32 tiles: with 2 warps, the fastest setting, they spill
(1.4 KB a thread at ``F = 128``).

Registers, compiled for sm_90a (Triton 3.9, ptxas 13.4; ``benchmarks/gated_registers.py``), bf16
inputs, F = 128, the launchers' tiles: every kernel runs at 166-255 registers; spills in bytes a
thread (16-token -> 64-token): forward 20 -> 64 at BV = 16 and 144 -> 40 at BV = 32 (64-token
steps take 8 warps; with 4 their ``[64, F]`` tiles spill 0.8 KB), intra 0 -> 0, the walking backward's
``dfq``/``dfk`` 0 -> 0 at Dv = 64 and 0 -> 16/80 at Dv = 128, ``dv`` 0 -> 8-16. Worse with 64-token
steps: the forward at F = 256 (256 -> 656), ``dfq``/``dfk`` at Dv = 256 (140/0 -> 600/590), the
forward with fp32 inputs (144 -> 816); ``chunk_size=16`` keeps the old figures there. The
chunk-parallel backward's kernels at the launchers' settings (``linearize.kernels.resources``,
bf16, F = Dv = 64 / 128 / 256): the sub-chunk kernel spills 124 / 636 / 4214 bytes (2 / 4 / 4
warps, its factored branch compiled in; 88 / 1410 / 3198 with 2 / 2 / 4 before it), the state
products 0 / 372 / 2272, the adjoint walk 84 at every size; the states walk none; the intra
kernel, a program a chunk with 2 / 2 / 4 warps, 96 / 512 / 1836 (both of its branches are
compiled in: the factored chunk's ``[64, 32]`` steps and the sub-chunks' ``[16, F]`` tiles).

Precision, as in :mod:`linearize.kernels.linear.chunk`: state and accumulation in fp32; with fp32
(or fp16) inputs every product is fp32 (``ieee``); with bf16 inputs the products run on bf16
tensor cores, and an fp32 operand whose product cancels later is split into bf16 ``hi + lo``
halves (:func:`~linearize.kernels.linear.chunk._dot_split`, about 2^-16 relative). Here that is
the running state and its adjoint (``S``, ``z``, ``dH``), ``A`` in ``A v``, ``dn`` where it meets
``v``, the decayed keys ``fk exp(b_last - b)`` that build the state and the decayed queries
``fq exp(b)`` that build the adjoint, and both (decayed) operands of the off-diagonal products
(``A``'s blocks; ``P`` or ``Q`` against decayed keys or queries), so ``A`` and the pairwise sums
stay at about 2^-16 as where they are formed elementwise. ``fq exp(b)`` against the state is
rounded once to bf16 and used for numerator and normaliser alike, so ``y`` stays an exact convex
combination under slightly perturbed weights (which does not amplify a common offset of the
values); everything in ``dv`` and ``dS0`` takes plain 16-bit operands, as in the linear kernel.
The diagonal blocks of ``A`` and the pairwise sums are fp32 elementwise work, and ``fq dfq``,
``fk dfk`` (what ``dg`` sums) are formed in fp32. The backward reads ``y`` in fp32.

Triton 3.4-3.7 miscompiles, on Hopper, ``tl.trans`` of a ``tl.dot`` result cast to bf16/fp16 and
fed to another ``tl.dot``. Nothing here calls ``tl.trans`` (the chunk-parallel forward's kernels
included): every operand needed transposed
(``fk^T``, ``g^T``, ``fq^T``, ``v^T``, ``dy^T``, ``y^T``, ``A^T``, blocks of ``S0^T`` and ``dS^T``)
is loaded transposed from memory, and the running states are kept in the layout their products
need.

Limits: ``F <= 256`` and ``Dv <= 256``; ``g`` finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear.chunk import (
    _DOT_DTYPES,
    MAX_FEATURES,
    MAX_GRID_Y,
    MAX_VALUE_DIM,
    TINY,
    _dot,
    _dot_config,
    _dot_split,
    _inverse_den,
    _pow2,
    _sms,
    compute_dtype,
)

_TINY = tl.constexpr(TINY)
SUB_CHUNK = 16  # tokens of a sub-chunk: exact pairwise decays inside
CHUNK_SIZES = (16, 64)  # tokens a sequential step takes: one sub-chunk, or four
CHUNK = 64  # the default
DG_CHUNK = 64  # tokens a step of the decay-gradient suffix sum takes
# the chunk-parallel forward (_par_states_kernel, then _par_output_kernel) rather than the sequential walk
# (_fwd_kernel): 4.1x faster on an H200 at B=1, 32 heads, F=Dv=128, T=8K (1.80 ms against 7.33)
PARALLEL_FORWARD = True
# the backward chunk-parallel too (each chunk's starting and adjoint states, what they give every
# token, then every 16-token sub-chunk at once, _bwd_sub_kernel) rather than walking the chunks: forward
# + backward 5.4x faster on an H200 at B=1, 32 heads, F=Dv=128, T=32K (23.6 ms of kernels against 127.7)
PARALLEL_BACKWARD = True
OUT_STAGES = 2  # pipelining stages of the chunk-parallel output pass
# a chunk (_intra_kernel) or 16-token sub-chunk (_intra_kernel, _bwd_sub_kernel) whose decay stays above
# e^-FACTOR_LIMIT in every feature takes its pairs inside as products of decayed queries and keys, each
# factor within e^+-FACTOR_LIMIT, rather than one exponential a pair and feature; 0 takes the pairwise
# form always. On an H200 at 32K (B=1, 32 heads, F=Dv=128, LAWCAT-like decays), the forward took 4.15 ms
# against 9.18 pairwise (results/h200-kernels/gated-factored-knobs-2.log)
FACTOR_LIMIT = 40.0
# warps of _intra_kernel (a program a chunk), by features (a power of 2). On an H200 at 32K (B=1, 32 heads,
# every chunk factored, results/h200-kernels/gated-factored-knobs-2.log): 0.63 ms with 2 warps against
# 0.72 (4) and 1.23 (8) at 128 features; 0.28 (2) against 0.41 (4) at 64, the outputs the same to the bit
# as with 4 (the setting the GPU tests ran); 1.62 (4) against 2.20 (8) at 256. 16 and 32 features keep 4
# (not timed). 64-feature steps (INTRA_BK) took 0.54 ms with 4 warps at 128, 1.69 with 2, but round
# otherwise (2.8e-3 apart in bf16 outputs) and have not been through the GPU tests
INTRA_WARPS = {16: 4, 32: 4, 64: 2, 128: 2, 256: 4}
INTRA_STAGES = 3
INTRA_BK = 32  # features a step of a factored chunk's product takes (_intra_kernel)
# warps of the states walks (_par_states_kernel, _par_bwd_states_kernel) with 64 x 64 state blocks;
# smaller blocks take 4 (4 for the big blocks too timed the same at 128 features, forward and backward)
STATES_WARPS = 8
DG_BK = 16  # features a program of the decay-gradient suffix sums takes (1.07 ms at 32K, 1.15 with 32)
# warps and pipelining stages of the chunk-parallel backward's sub-chunk programs, by features (a power
# of 2 up to 256). On an H200 at 32K (B=1, 32 heads, Dv=F), the sub-chunk kernel took 3.9 ms with 2 warps
# against 5.4 with 4 at 64 features; 8.9 (2 warps, 1 stage) against 11.8 (4) and 17.6 (8) at 128, though
# 2 warps spill the most there (ptxas: 1.4 KB a thread with 1 stage, 1.9 with 3, 0.6 with 4 warps); 38.7
# (4) against 49.4 (8) at 256. The programs are many and short, and more of them in flight is what pays.
# 16 and 32 features take 64's (not timed)
# With the sub-chunks factored (FACTOR_LIMIT, LAWCAT-like decays): 6.58 ms with 4 warps against 7.27 (2)
# and 9.93 (8) at 128 features; 2.46 (2) against 3.28 (4) at 64 (results/h200-kernels/gated_factored_knobs.py)
SUB_WARPS = {16: 2, 32: 2, 64: 2, 128: 4, 256: 4}
SUB_STAGES = 1
# features, value columns and warps of its state products' programs (bf16): at 128 features, 2.0 ms at
# 32K against 2.3 with (64, 64, 4), 3.0 with (32, 64, 4), 4.4 with (32, 32, 4), 5.7 with (128, 64, 4)
INTER_BLOCKS = (64, 128, 4)
# the chunk-parallel backward takes a chunk whose decay stays above e^-FACTOR_LIMIT whole
# (_bwd_chunk_kernel) rather than a sub-chunk at a time (_bwd_sub_kernel). Off: compiled on an H200
# (Triton 3.6) it gave wrong dfq and dfk with bf16 inputs at 12 features (0.5 relative against the
# walk, results/h200-kernels/gated-chunk-backward-diag.log; right under the interpreter and at 64-256
# features), the cause not found. On, it took 3.55 ms at 32K against the sub-chunk kernel's 6.58.
# What the failures share: a product whose first operand is another product's result ([C, C], P) and
# whose other side is narrower than 64 (the 12 features then took 16-feature blocks and gave wrong
# values; 32-feature blocks faulted at 128 features; 64 passed). So a program now takes 64 features
# however few there are (padded); that has not been compiled on a GPU yet
CHUNK_BACKWARD = False
# features, value columns and warps of the programs of _bwd_chunk_kernel (a factored chunk's gradients)
CHUNK_BLOCKS = (64, 64, 4)


@triton.jit
def _fwd_kernel(
    fq, fk, v, g, A, y, y32, den, s0, z0, s_out, z_out,
    T, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_Y32: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(Dv / BV, B * H)``: value columns ``[i_v * BV, (i_v + 1) * BV)`` of one head,
    chunks of ``C`` in order, ``S [BF, BV]`` and ``z`` in registers. A chunk's queries are read
    out at once against the state at the chunk start (``[C, BF]`` tiles); then the state takes
    the chunk's keys, a sub-chunk at a time."""
    NS: tl.constexpr = C // SC
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, SC)
    o_C = tl.arange(0, C)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_f = o_f < F
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    fq += i_bh * T * F
    fk += i_bh * T * F
    g += i_bh * T * F
    v += i_bh * T * DV
    y += i_bh * T * DV
    A += i_bh * T * C
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]  # [BF, BV]
    # z is column 0 of a [BF, SC] matrix, so that fq . z is a (small) matrix product, as in the
    # linear kernel; its update is a plain fp32 row sum.
    first = o_c[None, :] == 0
    if HAS_INIT:
        S = tl.load(s0 + p_s, mask=m_fv, other=0.0).to(tl.float32)
        z = tl.load(z0 + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
        Z = tl.where(first, z[:, None], 0.0)  # [BF, SC]
    else:
        S = tl.zeros([BF, BV], dtype=tl.float32)
        Z = tl.zeros([BF, SC], dtype=tl.float32)
    blocks = (o_C[:, None] // SC) >= (o_C[None, :] // SC)  # [C, C]: A's blocks that are written
    last_col = o_c[None, :] == SC - 1
    for i_t in range(0, tl.cdiv(T, C)):
        t = i_t * C + o_C
        m_t = t < T
        m_tf = m_t[:, None] & m_f[None, :]
        m_ft = m_f[:, None] & m_t[None, :]
        if C == SC:
            # 16 tokens a step: read-out against the state, then the state takes the chunk
            b_fq = tl.load(fq + t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0).to(tl.float32)  # [C, BF]
            b = tl.cumsum(tl.load(g + t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0).to(tl.float32), 0)
            # keys and decays loaded transposed, [BF, C] (no tl.trans)
            b_fkT = tl.load(fk + t[None, :] * F + o_f[:, None], mask=m_ft, other=0.0).to(tl.float32)
            bT = tl.cumsum(tl.load(g + t[None, :] * F + o_f[:, None], mask=m_ft, other=0.0).to(tl.float32), 1)
            b_last = tl.sum(tl.where(last_col, bT, 0.0), 1)  # [BF]: the decay over the whole chunk
            b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [C, BV]
            b_A = tl.load(A + t[:, None] * C + o_C[None, :], mask=m_t[:, None], other=0.0)  # [C, C]
            q_in = b_fq * tl.exp(b)  # queries against the state at the chunk start
            k_outT = b_fkT * tl.exp(b_last[:, None] - bT)  # keys as they stand at the chunk end
            o = _dot_split(q_in, S, DT, PREC, EMULATE, False, True)
            o += _dot_split(b_A, b_v, DT, PREC, EMULATE, True, False)
            d = tl.sum(_dot_split(q_in, Z, DT, PREC, EMULATE, False, True) + b_A, 1)  # [C]
            o = o / tl.maximum(d, _TINY)[:, None]
            tl.store(y + t[:, None] * DV + o_v[None, :], o.to(y.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
            if STORE_Y32:  # the backward's copy of y, in fp32
                tl.store(y32 + i_bh * T * DV + t[:, None] * DV + o_v[None, :], o, mask=m_t[:, None] & m_v[None, :])
            if i_v == 0:
                tl.store(den + i_bh * T + t, d, mask=m_t)
            decay = tl.exp(b_last)[:, None]  # [BF, 1]
            S = S * decay + _dot_split(k_outT, b_v, DT, PREC, EMULATE, True, False)
            Z = Z * decay + tl.where(first, tl.sum(k_outT, 1)[:, None], 0.0)
        else:
            m_tv = m_t[:, None] & m_v[None, :]
            # read-out: queries decayed from the chunk start (a running sum of g <= 0: no difference
            # is taken), against the state at the chunk start, plus the chunk's own keys through A
            b_fq = tl.load(fq + t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0).to(tl.float32)  # [C, BF]
            b = tl.cumsum(tl.load(g + t[:, None] * F + o_f[None, :], mask=m_tf, other=0.0).to(tl.float32), 0)
            b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)  # [C, BV]
            b_A = tl.load(A + t[:, None] * C + o_C[None, :], mask=m_t[:, None] & blocks, other=0.0)  # [C, C]
            q_in = b_fq * tl.exp(b)
            o = _dot_split(q_in, S, DT, PREC, EMULATE, False, True)
            o += _dot_split(b_A, b_v, DT, PREC, EMULATE, True, False)
            d = tl.sum(_dot_split(q_in, Z, DT, PREC, EMULATE, False, True), 1) + tl.sum(b_A, 1)  # [C]
            o = o / tl.maximum(d, _TINY)[:, None]
            tl.store(y + t[:, None] * DV + o_v[None, :], o.to(y.dtype.element_ty), mask=m_tv)
            if STORE_Y32:  # the backward's copy of y, in fp32
                tl.store(y32 + i_bh * T * DV + t[:, None] * DV + o_v[None, :], o, mask=m_tv)
            if i_v == 0:
                tl.store(den + i_bh * T + t, d, mask=m_t)
            # update, a sub-chunk J at a time as the 16-token scheme does it (S <- exp(G_J) S +
            # (fk_j exp(G_J - c_j))^T v1_j, with c the running sum of g inside J and G_J its total)
            for J in range(0, tl.minimum(tl.cdiv(T - i_t * C, SC), NS)):  # the sub-chunks that hold tokens
                t_J = i_t * C + J * SC + o_c
                m_J = t_J < T
                m_fJ = m_f[:, None] & m_J[None, :]
                # keys and decays loaded transposed, [BF, SC] (no tl.trans)
                b_fkT = tl.load(fk + t_J[None, :] * F + o_f[:, None], mask=m_fJ, other=0.0).to(tl.float32)
                cT = tl.cumsum(tl.load(g + t_J[None, :] * F + o_f[:, None], mask=m_fJ, other=0.0).to(tl.float32), 1)
                G_J = tl.sum(tl.where(last_col, cT, 0.0), 1)  # [BF]
                k_outT = b_fkT * tl.exp(G_J[:, None] - cT)  # keys as they stand at the sub-chunk end
                b_v_J = tl.load(v + t_J[:, None] * DV + o_v[None, :], mask=m_J[:, None] & m_v[None, :], other=0.0)
                decay = tl.exp(G_J)[:, None]  # [BF, 1]
                S = S * decay + _dot_split(k_outT, b_v_J, DT, PREC, EMULATE, True, False)
                Z = Z * decay + tl.where(first, tl.sum(k_outT, 1)[:, None], 0.0)
    if STORE_FINAL:
        tl.store(s_out + p_s, S, mask=m_fv)
        if i_v == 0:
            tl.store(z_out + i_bh * F + o_f, tl.sum(Z, 1), mask=m_f)


@triton.jit
def _cumsum_kernel(g, c, T, TP, F, SC: tl.constexpr, NS: tl.constexpr, BF: tl.constexpr):
    """``c[t] = sum of g from the start of t's 16-token sub-chunk through t`` (fp32), for the
    chunk-parallel forward. Grid ``(TP / (NS SC), B * H)``, a program per chunk of ``NS``
    sub-chunks; ``c`` has ``TP`` rows (``T`` rounded up to whole chunks): past ``T`` the running sum
    goes on with ``g = 0``, so a sub-chunk's total is always its last row."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, SC)
    o_f = tl.arange(0, BF)
    m_f = o_f < F
    for J in range(0, NS):
        t = (i_n * NS + J) * SC + o_c
        x = tl.load(g + i_bh * T * F + t[:, None] * F + o_f[None, :], mask=(t < T)[:, None] & m_f[None, :], other=0.0)
        tl.store(c + i_bh * TP * F + t[:, None] * F + o_f[None, :], tl.cumsum(x.to(tl.float32), 0), mask=m_f[None, :])


@triton.jit
def _chunk_decay(c, i_t, F, C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr):
    """Chunk ``i_t``'s total decay by feature, ``[BF]`` (the sum of its sub-chunks' last rows of
    ``c``, one head's; 0 past ``F``): above ``-LIMIT`` everywhere, the chunk is factored."""
    o_f = tl.arange(0, BF)
    total = tl.zeros([BF], dtype=tl.float32)
    for M in tl.static_range(0, C // SC):
        total += tl.load(c + (i_t * C + M * SC + SC - 1) * F + o_f, mask=o_f < F, other=0.0)
    return total


@triton.jit
def _intra_kernel(fq, fk, c, A, T, TP, F, LIMIT, C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr,
                  BK: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """``A[t, j] = sum_f fq_tf fk_jf exp(b_tf - b_jf)`` for the keys ``j`` of ``t``'s chunk up to
    ``t``, from the sub-chunk sums ``c`` of :func:`_cumsum_kernel`; grid ``(T / C, B * H)``, a
    program per chunk.

    A chunk whose decay stays above ``e^-LIMIT`` in every feature (:data:`FACTOR_LIMIT`) is one
    product, ``BK`` features at a time, of its queries decayed from the chunk start and its keys
    decayed back to it, ``(fq_i exp(b_i)) . (fk_j exp(-b_j))`` with ``b_i = c_i + sum_{M < I}
    G_M`` (a sum of terms ``<= 0``, as the output pass takes it), masked to ``i >= j``: the
    second factor is at most ``e^LIMIT``, so nothing overflows. Its whole ``[C, C]`` block is
    written, zeros above the diagonal. Any other chunk takes its sub-chunks one after another
    (:func:`_intra_sub`), whose blocks after a row's sub-chunk are not written (the kernels that
    read ``A`` mask them)."""
    NS: tl.constexpr = C // SC
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_C = tl.arange(0, C)
    t = i_t * C + o_C
    m_t = t < T
    sub = o_C // SC
    total = _chunk_decay(c + i_bh * TP * F, i_t, F, C, SC, BF)
    if tl.min(total, 0) > -LIMIT:
        acc = tl.zeros([C, C], dtype=tl.float32)
        for i_k in tl.static_range(0, BF // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < F
            p_c = c + i_bh * TP * F
            b = tl.load(p_c + t[:, None] * F + o_k[None, :], mask=m_k[None, :], other=0.0)  # [C, BK], rows < TP
            bT = tl.load(p_c + t[None, :] * F + o_k[:, None], mask=m_k[:, None], other=0.0)  # [BK, C]
            for M in tl.static_range(0, NS - 1):
                G_M = tl.load(p_c + (i_t * C + M * SC + SC - 1) * F + o_k, mask=m_k, other=0.0)
                b += tl.where((sub > M)[:, None], G_M[None, :], 0.0)
                bT += tl.where((sub > M)[None, :], G_M[:, None], 0.0)
            q_dec = tl.load(fq + i_bh * T * F + t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                            other=0.0).to(tl.float32) * tl.exp(b)  # <= fq
            k_upT = tl.load(fk + i_bh * T * F + t[None, :] * F + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                            other=0.0).to(tl.float32) * tl.exp(-bT)  # <= fk e^LIMIT, loaded transposed
            acc += _dot_split(q_dec, k_upT, DT, PREC, EMULATE, True, True)
        acc = tl.where(o_C[:, None] >= o_C[None, :], acc, 0.0)
        tl.store(A + (i_bh * T + t[:, None]) * C + o_C[None, :], acc, mask=m_t[:, None])
    else:
        for I in range(0, tl.minimum(tl.cdiv(T - i_t * C, SC), NS)):  # the sub-chunks that hold tokens
            _intra_sub(i_t * NS + I, i_bh, fq, fk, c, A, T, TP, F, LIMIT, C, SC, BF, DT, PREC, EMULATE)


@triton.jit
def _intra_sub(i_s, i_bh, fq, fk, c, A, T, TP, F, LIMIT, C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    """The rows of sub-chunk ``i_s`` of ``A`` (of a chunk that decays too much to be one
    product), every feature at once: its blocks up to its own.

    The diagonal block a key ``j`` at a time (a column of ``A``): ``A_ij = sum_f fq_if fk_jf
    exp(c_if - c_jf)`` for ``i >= j``, the exponent set to ``-inf`` above the diagonal before it is
    exponentiated; so ``[SC, F]`` elementwise work a key rather than one ``[SC, SC, F]`` product.
    The earlier sub-chunks ``J`` of the chunk: one product of the queries decayed from the start
    of ``I`` and the keys decayed to it, ``(fq_i exp(c_i)) . (fk_j exp((G_J - c_j) + sum_{J<M<I}
    G_M))``, both factors ``<= 1``.

    A sub-chunk whose decay stays above ``e^-LIMIT`` in every feature (``G_I > -LIMIT``, see
    :data:`FACTOR_LIMIT`) forms its diagonal block as one product too, ``(fq_i exp(c_i)) .
    (fk_j exp(-c_j))``, masked to ``i >= j``: the second factor is at most ``e^LIMIT``, so
    nothing overflows, with ``SC`` times fewer exponentials."""
    o_c = tl.arange(0, SC)
    o_f = tl.arange(0, BF)
    m_f = o_f < F
    t = i_s * SC + o_c
    m_t = t < T
    m = m_t[:, None] & m_f[None, :]
    fq += i_bh * T * F
    fk += i_bh * T * F
    c += i_bh * TP * F
    p_row = A + (i_bh * T + t[:, None]) * C  # [SC, 1]: the rows of A
    b_fq = tl.load(fq + t[:, None] * F + o_f[None, :], mask=m, other=0.0).to(tl.float32)  # [SC, BF]
    b_c = tl.load(c + t[:, None] * F + o_f[None, :], mask=m_f[None, :], other=0.0)  # rows < TP
    G_I = tl.load(c + (i_s * SC + SC - 1) * F + o_f, mask=m_f, other=0.0)  # [BF]: the sub-chunk's decay
    q_loc = b_fq * tl.exp(b_c)  # [SC, BF]: decayed from the start of I
    if tl.min(G_I, 0) > -LIMIT:
        p_T = t[None, :] * F + o_f[:, None]  # [BF, SC]: I's keys loaded transposed
        k_upT = tl.load(fk + p_T, mask=m_f[:, None] & m_t[None, :], other=0.0).to(tl.float32) * tl.exp(
            -tl.load(c + p_T, mask=m_f[:, None], other=0.0)
        )  # [BF, SC]: decayed back to the start of I, <= e^LIMIT
        acc = tl.where(o_c[:, None] >= o_c[None, :], _dot_split(q_loc, k_upT, DT, PREC, EMULATE, True, True), 0.0)
    else:
        acc = tl.zeros([SC, SC], dtype=tl.float32)
        for j in range(0, SC):
            t_j = i_s * SC + j
            k_j = tl.load(fk + t_j * F + o_f, mask=m_f & (o_f * 0 + t_j < T), other=0.0).to(tl.float32)  # [BF]
            c_j = tl.load(c + t_j * F + o_f, mask=m_f, other=0.0)
            e = tl.where(o_c[:, None] >= j, b_c - c_j[None, :], float("-inf"))  # <= 0 on and below the diagonal
            a = tl.sum(b_fq * k_j[None, :] * tl.exp(e), 1)  # [SC]
            acc = tl.where(o_c[None, :] == j, a[:, None], acc)
    I = i_s % (C // SC)
    tl.store(p_row + I * SC + o_c[None, :], acc, mask=m_t[:, None])
    if C > SC:
        between = tl.zeros([BF], dtype=tl.float32)  # the decay of the sub-chunks strictly between J and I
        for jj in range(0, I):
            J = I - 1 - jj
            t_J = (i_s - I + J) * SC + o_c  # all < T
            p_J = t_J[None, :] * F + o_f[:, None]  # [BF, SC]: keys loaded transposed
            cT = tl.load(c + p_J, mask=m_f[:, None], other=0.0)
            G_J = tl.load(c + ((i_s - I + J) * SC + SC - 1) * F + o_f, mask=m_f, other=0.0)  # [BF]
            k_locT = tl.load(fk + p_J, mask=m_f[:, None], other=0.0).to(tl.float32) * tl.exp(
                (G_J[:, None] - cT) + between[:, None]
            )  # [BF, SC]: decayed to the start of I
            a = _dot_split(q_loc, k_locT, DT, PREC, EMULATE, True, True)
            tl.store(p_row + J * SC + o_c[None, :], a, mask=m_t[:, None])
            between += G_J


@triton.jit
def _par_states_kernel(
    fk, v, c, s0, z0, h, hz, s_out, z_out,
    T, TP, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """The chunk-parallel forward's first pass: each chunk's starting state. Grid ``(F / BK, Dv /
    BV, B * H)`` (a feature's row of the state evolves on its own), chunks of ``C`` in order,
    ``S [BK, BV]`` and ``z [BK]`` in fp32 registers. Before a chunk's keys enter, the state is
    stored, fp32, as ``h[b, h, chunk] [F, Dv]`` (``z`` as ``hz[b, h, chunk] [F]``, by the
    ``i_v == 0`` programs); then the whole chunk enters in one ``[BK, C] x [C, BV]`` product:

        S <- diag(exp(G)) S + (fk_j exp(b_last - b_j))^T v_j,   b_last - b_j = (G_J - c_j) + sum_{M > J} G_M

    with ``G_M`` the total of sub-chunk ``M`` (``c`` at its last row) and ``G`` the chunk's: the
    only difference taken is ``G_J - c_j`` inside ``j``'s sub-chunk; the rest is a sum of terms
    ``<= 0``, so nothing overflows and no long running sum cancels."""
    NS: tl.constexpr = C // SC
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    o_C = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < F
    m_v = o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    fk += i_bh * T * F
    c += i_bh * TP * F
    v += i_bh * T * DV
    n_t = tl.cdiv(T, C)
    sub = o_C // SC  # [C]: each column's sub-chunk
    p_s = i_bh * F * DV + o_k[:, None] * DV + o_v[None, :]  # [BK, BV]
    if HAS_INIT:
        S = tl.load(s0 + p_s, mask=m_kv, other=0.0).to(tl.float32)
        z = tl.load(z0 + i_bh * F + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    for i_t in range(0, n_t):
        p_h = (i_bh * n_t + i_t) * F * DV + o_k[:, None] * DV + o_v[None, :]
        tl.store(h + p_h, S, mask=m_kv)
        if i_v == 0:
            tl.store(hz + (i_bh * n_t + i_t) * F + o_k, z, mask=m_k)
        t = i_t * C + o_C
        m_t = t < T
        # keys and sums loaded transposed, [BK, C]: no tl.trans (Triton 3.4-3.7 miscompiles, on Hopper,
        # tl.trans of a dot result cast to bf16 feeding another dot; see the module docstring)
        b_fkT = tl.load(fk + t[None, :] * F + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0).to(tl.float32)
        cT = tl.load(c + t[None, :] * F + o_k[:, None], mask=m_k[:, None], other=0.0)  # rows < TP
        own = tl.zeros([BK, C], dtype=tl.float32)  # G_J of each column's sub-chunk
        later = tl.zeros([BK, C], dtype=tl.float32)  # sum of G_M over the sub-chunks after it
        total = tl.zeros([BK], dtype=tl.float32)
        for M in tl.static_range(0, NS):
            G_M = tl.load(c + (i_t * C + M * SC + SC - 1) * F + o_k, mask=m_k, other=0.0)  # [BK]
            own = tl.where((sub == M)[None, :], G_M[:, None], own)
            later += tl.where((sub < M)[None, :], G_M[:, None], 0.0)
            total += G_M
        k_outT = b_fkT * tl.exp((own - cT) + later)  # keys as they stand at the chunk end
        b_v = tl.load(v + t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [C, BV]
        decay = tl.exp(total)
        S = S * decay[:, None] + _dot_split(k_outT, b_v, DT, PREC, EMULATE, True, False)
        z = z * decay + tl.sum(k_outT, 1)
    if STORE_FINAL:
        tl.store(s_out + p_s, S, mask=m_kv)
        if i_v == 0:
            tl.store(z_out + i_bh * F + o_k, z, mask=m_k)


@triton.jit
def _par_bwd_states_kernel(
    fq, c, dy, den, dd, ds_final, dz_final, dh, dhz, ds0, dz0,
    T, TP, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """The chunk-parallel backward's adjoint states: for each chunk, the gradient of the state at
    its end, ``dH``. Grid ``(F / BK, Dv / BV, B * H)``, the chunks in reverse, ``dS [BK, BV]`` and
    ``dz [BK]`` in fp32 registers. Before a chunk's queries enter, ``dS`` is stored, fp32, as
    ``dh[b, h, chunk]`` and ``dz`` as ``dhz[b, h, chunk]`` (by the ``i_v == 0`` programs); then

        dS <- diag(exp(G)) dS + (fq_i exp(b_i))^T dn_i,   dz <- exp(G) dz + sum_i fq_i exp(b_i) dd_i

    with ``b_i = c_i + sum_{M < I} G_M`` from the chunk start (a sum of terms ``<= 0``), ``G`` the
    chunk's total, ``dn = dy / d`` and ``dd [B, H, T] = -(dy . y) / d`` (computed before the launch).
    After the first chunk they are the initial state's gradient. The decayed queries are split into
    bf16 halves, as where they build the adjoint in ``_bwd_dv``."""
    NS: tl.constexpr = C // SC
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    o_C = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < F
    m_v = o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    fq += i_bh * T * F
    c += i_bh * TP * F
    n_t = tl.cdiv(T, C)
    sub = o_C // SC
    p_s = i_bh * F * DV + o_k[:, None] * DV + o_v[None, :]  # [BK, BV]
    if HAS_DFINAL:
        dS = tl.load(ds_final + p_s, mask=m_kv, other=0.0).to(tl.float32)
        dz = tl.load(dz_final + i_bh * F + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
    for i_r in range(0, n_t):
        i_t = n_t - 1 - i_r
        p_h = (i_bh * n_t + i_t) * F * DV + o_k[:, None] * DV + o_v[None, :]
        tl.store(dh + p_h, dS, mask=m_kv)
        if i_v == 0:
            tl.store(dhz + (i_bh * n_t + i_t) * F + o_k, dz, mask=m_k)
        t = i_t * C + o_C
        m_t = t < T
        # queries and sums loaded transposed, [BK, C]: no tl.trans (see the module docstring)
        b_fqT = tl.load(fq + t[None, :] * F + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0).to(tl.float32)
        bT = tl.load(c + t[None, :] * F + o_k[:, None], mask=m_k[:, None], other=0.0)  # rows < TP
        total = tl.zeros([BK], dtype=tl.float32)
        for M in tl.static_range(0, NS):
            G_M = tl.load(c + (i_t * C + M * SC + SC - 1) * F + o_k, mask=m_k, other=0.0)  # [BK]
            bT += tl.where((sub > M)[None, :], G_M[:, None], 0.0)
            total += G_M
        q_inT = b_fqT * tl.exp(bT)  # [BK, C]: decayed from the chunk start
        inv = _inverse_den(den, i_bh, t, m_t, T)
        b_dn = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32) * inv[:, None]  # [C, BV]
        b_dd = tl.load(dd + i_bh * T + t, mask=m_t, other=0.0)  # [C]
        decay = tl.exp(total)
        dS = dS * decay[:, None] + _dot_split(q_inT, b_dn, DT, PREC, EMULATE, True, True)
        dz = dz * decay + tl.sum(q_inT * b_dd[None, :], 1)
    if STORE_DINIT:
        tl.store(ds0 + p_s, dS, mask=m_kv)
        if i_v == 0:
            tl.store(dz0 + i_bh * F + o_k, dz, mask=m_k)


@triton.jit
def _bwd_inter_kernel(
    fk, v, c, den, dy, dd, h, hz, dh, dhz, dqi, dki, dvs,
    T, TP, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, ND: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """What the states contribute to the chunk-parallel backward's gradients, every chunk at once:
    grid ``(NK + NV, T / C, B * H)``. The first ``NK`` programs of a chunk take ``BK`` features:

        dqi_i = exp(b_i) (dn_i h^T + dd_i hz),   dki_j = exp(b_last - b_j) (v_j dh^T + dhz)

    (``[C, BV] x [BV, BK]`` products over the value columns, ``BV`` at a time, against the chunk's
    starting state ``h`` and its adjoint at the chunk end ``dh``, both loaded transposed); the
    other ``NV`` take ``BV`` value columns: ``dvs_j = (fk_j exp(b_last - b_j)) dh[:, cols]``, the
    features ``BK`` at a time. ``b_i = c_i + sum_{M < I} G_M`` and ``b_last - b_j = (G_J - c_j) +
    sum_{M > J} G_M``, sums of terms ``<= 0``. All fp32, the state operands split into bf16
    halves."""
    NS: tl.constexpr = C // SC
    i_p = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    n_t = tl.cdiv(T, C)
    o_C = tl.arange(0, C)
    t = i_t * C + o_C
    m_t = t < T
    sub = o_C // SC
    c += i_bh * TP * F
    h += (i_bh * n_t + i_t) * F * DV
    dh += (i_bh * n_t + i_t) * F * DV
    if i_p < NK:
        o_k = i_p * BK + tl.arange(0, BK)
        m_k = o_k < F
        b_c = tl.load(c + t[:, None] * F + o_k[None, :], mask=m_k[None, :], other=0.0)  # [C, BK], rows < TP
        pre = tl.zeros([C, BK], dtype=tl.float32)  # the sub-chunks before each row's
        own = tl.zeros([C, BK], dtype=tl.float32)  # its own sub-chunk's total
        post = tl.zeros([C, BK], dtype=tl.float32)  # the sub-chunks after it
        for M in tl.static_range(0, NS):
            G_M = tl.load(c + (i_t * C + M * SC + SC - 1) * F + o_k, mask=m_k, other=0.0)[None, :]
            pre += tl.where((sub > M)[:, None], G_M, 0.0)
            own = tl.where((sub == M)[:, None], G_M, own)
            post += tl.where((sub < M)[:, None], G_M, 0.0)
        inv = _inverse_den(den, i_bh, t, m_t, T)
        acc_q = tl.zeros([C, BK], dtype=tl.float32)
        acc_k = tl.zeros([C, BK], dtype=tl.float32)
        for i_d in tl.static_range(0, ND):
            o_e = i_d * BV + tl.arange(0, BV)
            m_e = o_e < DV
            m_te = m_t[:, None] & m_e[None, :]
            dn_e = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_e[None, :], mask=m_te,
                           other=0.0).to(tl.float32) * inv[:, None]  # [C, BV]
            m_ek = m_e[:, None] & m_k[None, :]
            hT = tl.load(h + o_k[None, :] * DV + o_e[:, None], mask=m_ek, other=0.0)  # [BV, BK], transposed
            acc_q += _dot_split(dn_e, hT, DT, PREC, EMULATE, True, True)
            v_e = tl.load(v + i_bh * T * DV + t[:, None] * DV + o_e[None, :], mask=m_te, other=0.0)
            dhT = tl.load(dh + o_k[None, :] * DV + o_e[:, None], mask=m_ek, other=0.0)
            acc_k += _dot_split(v_e, dhT, DT, PREC, EMULATE, False, True)
        b_dd = tl.load(dd + i_bh * T + t, mask=m_t, other=0.0)
        b_hz = tl.load(hz + (i_bh * n_t + i_t) * F + o_k, mask=m_k, other=0.0)
        b_dhz = tl.load(dhz + (i_bh * n_t + i_t) * F + o_k, mask=m_k, other=0.0)
        p = i_bh * T * F + t[:, None] * F + o_k[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        tl.store(dqi + p, (acc_q + b_dd[:, None] * b_hz[None, :]) * tl.exp(b_c + pre), mask=m_tk)
        tl.store(dki + p, (acc_k + b_dhz[None, :]) * tl.exp((own - b_c) + post), mask=m_tk)
    else:
        o_v = (i_p - NK) * BV + tl.arange(0, BV)
        m_v = o_v < DV
        acc = tl.zeros([C, BV], dtype=tl.float32)
        for i_k in tl.static_range(0, NK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < F
            b_c = tl.load(c + t[:, None] * F + o_k[None, :], mask=m_k[None, :], other=0.0)
            own = tl.zeros([C, BK], dtype=tl.float32)
            post = tl.zeros([C, BK], dtype=tl.float32)
            for M in tl.static_range(0, NS):
                G_M = tl.load(c + (i_t * C + M * SC + SC - 1) * F + o_k, mask=m_k, other=0.0)[None, :]
                own = tl.where((sub == M)[:, None], G_M, own)
                post += tl.where((sub < M)[:, None], G_M, 0.0)
            k_out = tl.load(fk + i_bh * T * F + t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                            other=0.0).to(tl.float32) * tl.exp((own - b_c) + post)  # [C, BK]
            b_dh = tl.load(dh + o_k[:, None] * DV + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
            acc += _dot_split(k_out, b_dh, DT, PREC, EMULATE, True, True)
        tl.store(dvs + i_bh * T * DV + t[:, None] * DV + o_v[None, :], acc, mask=m_t[:, None] & m_v[None, :])

@triton.jit
def _bwd_chunk_kernel(
    fq, fk, v, c, A, den, dy, dd, dqi, dki, dvs, dfq, dfk, dv, dgq, dgk,
    T, TP, F, DV, LIMIT,
    C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NK: tl.constexpr, ND: tl.constexpr, STORE_DG: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """The chunk-parallel backward's gradients of the chunks whose decay stays above ``e^-LIMIT``
    in every feature (:data:`FACTOR_LIMIT`; any other chunk is left to :func:`_bwd_sub_kernel`):
    grid ``(NK + ND, T / C, B * H)``, the pairs inside a chunk as products of its ``[C, C]`` block
    of ``P_ij = dn_i . v_j + dd_i``, with ``b`` the running decay from the chunk start (``b_i =
    c_i + sum_{M < I} G_M``):

        dfq_i = dqi_i + exp(b_i) sum_{j < i} P_ij (fk_j exp(-b_j)) + P_ii fk_i
        dfk_j = dki_j + exp(-b_j) sum_{i > j} P_ij (fq_i exp(b_i)) + P_jj fq_j
        dv_j  = dvs_j + sum_{i >= j} A_ij dn_i

    (``exp(-b) <= e^LIMIT``). The first ``NK`` programs of a chunk take ``BK`` features (``P``
    and its transpose formed over the value columns, ``BV`` at a time), the other ``ND`` take
    ``BV`` value columns (``A``'s block loaded transposed). ``fq dfq`` and ``fk dfk`` are stored
    for ``dg`` before a token's pair with itself is added, as in :func:`_bwd_sub_kernel`."""
    NS: tl.constexpr = C // SC
    i_p = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    c += i_bh * TP * F
    if tl.min(_chunk_decay(c, i_t, F, C, SC, BF), 0) <= -LIMIT:
        return
    o_C = tl.arange(0, C)
    t = i_t * C + o_C
    m_t = t < T
    sub = o_C // SC
    inv = _inverse_den(den, i_bh, t, m_t, T)
    dy += i_bh * T * DV
    if i_p < NK:
        o_k = i_p * BK + tl.arange(0, BK)
        m_k = o_k < F
        m_tk = m_t[:, None] & m_k[None, :]
        b = tl.load(c + t[:, None] * F + o_k[None, :], mask=m_k[None, :], other=0.0)  # [C, BK], rows < TP
        for M in tl.static_range(0, NS - 1):
            G_M = tl.load(c + (i_t * C + M * SC + SC - 1) * F + o_k, mask=m_k, other=0.0)
            b += tl.where((sub > M)[:, None], G_M[None, :], 0.0)
        b_dd = tl.load(dd + i_bh * T + t, mask=m_t, other=0.0)
        P = tl.zeros([C, C], dtype=tl.float32)  # [C i, C j]: P_ij
        PT = tl.zeros([C, C], dtype=tl.float32)  # [C j, C i]: P_ij
        for i_d in tl.static_range(0, ND):
            o_e = i_d * BV + tl.arange(0, BV)
            m_e = o_e < DV
            dn_e = tl.load(dy + t[:, None] * DV + o_e[None, :], mask=m_t[:, None] & m_e[None, :],
                           other=0.0).to(tl.float32) * inv[:, None]  # [C, BV]
            vT_e = tl.load(v + i_bh * T * DV + t[None, :] * DV + o_e[:, None], mask=m_e[:, None] & m_t[None, :],
                           other=0.0)  # [BV, C], loaded transposed (no tl.trans, see the module docstring)
            P += _dot_split(dn_e, vT_e, DT, PREC, EMULATE, True, False)
            v_e = tl.load(v + i_bh * T * DV + t[:, None] * DV + o_e[None, :], mask=m_t[:, None] & m_e[None, :],
                          other=0.0)
            dnT_e = tl.load(dy + t[None, :] * DV + o_e[:, None], mask=m_e[:, None] & m_t[None, :],
                            other=0.0).to(tl.float32) * inv[None, :]  # [BV, C]
            PT += _dot_split(v_e, dnT_e, DT, PREC, EMULATE, False, True)
        P += b_dd[:, None]
        PT += b_dd[None, :]
        p = i_bh * T * F + t[:, None] * F + o_k[None, :]
        b_fq = tl.load(fq + p, mask=m_tk, other=0.0).to(tl.float32)
        b_fk = tl.load(fk + p, mask=m_tk, other=0.0).to(tl.float32)
        E = tl.exp(b)  # <= 1
        E_up = tl.exp(-b)  # <= e^LIMIT
        dq = _dot_split(tl.where(o_C[:, None] > o_C[None, :], P, 0.0), b_fk * E_up, DT, PREC, EMULATE, True, True)
        dq = dq * E + tl.load(dqi + p, mask=m_tk, other=0.0)
        dk = _dot_split(tl.where(o_C[:, None] < o_C[None, :], PT, 0.0), b_fq * E, DT, PREC, EMULATE, True, True)
        dk = dk * E_up + tl.load(dki + p, mask=m_tk, other=0.0)
        if STORE_DG:
            tl.store(dgq + p, b_fq * dq, mask=m_tk)
            tl.store(dgk + p, b_fk * dk, mask=m_tk)
        P_self = tl.sum(tl.where(o_C[:, None] == o_C[None, :], P, 0.0), 1)  # [C]: P_ii, decay 1
        tl.store(dfq + p, (dq + P_self[:, None] * b_fk).to(dfq.dtype.element_ty), mask=m_tk)
        tl.store(dfk + p, (dk + P_self[:, None] * b_fq).to(dfk.dtype.element_ty), mask=m_tk)
    else:
        o_v = (i_p - NK) * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < DV)[None, :]
        blocks = (sub[:, None] <= sub[None, :]) & m_t[None, :]  # [C j, C i]: A's blocks that are written
        AT = tl.load(A + (i_bh * T + t[None, :]) * C + o_C[:, None], mask=blocks, other=0.0)  # [C j, C i]
        dn = tl.load(dy + t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32) * inv[:, None]
        p_v = i_bh * T * DV + t[:, None] * DV + o_v[None, :]  # (a name of its own: one taken in both branches
        # must have one type in both)
        b_dv = tl.load(dvs + p_v, mask=m_tv, other=0.0) + _dot_split(AT, dn, DT, PREC, EMULATE, True, True)
        tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)



@triton.jit
def _bwd_sub_kernel(
    fq, fk, v, c, A, den, dy, dd, dqi, dki, dvs, dfq, dfk, dv, dgq, dgk,
    T, TP, F, DV, LIMIT, CHUNK_LIMIT,
    C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr,
    STORE_DG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """The chunk-parallel backward's gradients: grid ``(T / SC, B * H)``, a program per 16-token
    sub-chunk ``I`` (every feature and value column at once), from the forward's ``A``, the
    sub-chunk sums ``c`` and what the states contribute, ``dqi, dki, dvs`` (fp32, from
    :func:`_bwd_inter_kernel`). With
    ``P_ij = dn_i . v_j + dd_i``, ``b`` the running decay from the chunk start and ``b_last`` its
    end:

        dfq_i = exp(b_i) (h do_i) + sum_{j <= i} P_ij fk_j exp(b_i - b_j)
        dfk_j = exp(b_last - b_j) (dh v1_j) + sum_{i >= j} P_ij fq_i exp(b_i - b_j)
        dv_j  = dh[:, :Dv]^T (fk_j exp(b_last - b_j)) + sum_{i >= j} A_ij dn_i

    The pairs inside ``I`` a token ``r`` at a time, ``[SC, F]`` elementwise work each: key ``r``
    for the later queries' ``dfq`` (``exp(c_i - c_r)``) and query ``r`` for the earlier keys'
    ``dfk`` (``exp(c_r - c_j)``), one exponential for both; or, where ``I``'s decay stays above
    ``e^-LIMIT`` in every feature (:data:`FACTOR_LIMIT`), two products: ``P`` (strictly below its
    diagonal) against the keys decayed back to the start of ``I`` (``fk_j exp(-c_j)``, at most
    ``e^LIMIT``) for ``dfq``, then times ``exp(c_i)``; ``P^T`` against the queries decayed from
    it (``fq_i exp(c_i)``) for ``dfk``, then times ``exp(-c_j)``. The pairs with the chunk's other
    sub-chunks: one product each, ``P``'s block against the keys of an earlier ``J`` decayed to
    the start of ``I`` (``dfq``), or its transpose against the queries of a later ``I'`` decayed
    from the end of ``I`` (``dfk``), both factors ``<= 1`` as in :func:`_intra_kernel`; ``dv``
    takes ``A``'s blocks transposed against ``dn``. ``fq dfq`` and ``fk dfk`` are stored for
    ``dg`` before a token's pair with itself is added (see the module docstring)."""
    NS: tl.constexpr = C // SC
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    n_t = tl.cdiv(T, C)
    i_t = i_s // NS
    I = i_s % NS
    o_c = tl.arange(0, SC)
    o_f = tl.arange(0, BF)
    o_d = tl.arange(0, BDV)
    m_f = o_f < F
    m_d = o_d < DV
    t = i_s * SC + o_c
    m_t = t < T
    m_tf = m_t[:, None] & m_f[None, :]
    m_td = m_t[:, None] & m_d[None, :]
    fq += i_bh * T * F
    fk += i_bh * T * F
    c += i_bh * TP * F
    v += i_bh * T * DV
    dy += i_bh * T * DV
    dd += i_bh * T
    A += i_bh * T * C
    if tl.min(_chunk_decay(c, i_t, F, C, SC, BF), 0) > -CHUNK_LIMIT:  # _bwd_chunk_kernel's
        return
    p_tf = t[:, None] * F + o_f[None, :]
    b_fq = tl.load(fq + p_tf, mask=m_tf, other=0.0).to(tl.float32)  # [SC, BF]
    b_fk = tl.load(fk + p_tf, mask=m_tf, other=0.0).to(tl.float32)
    b_c = tl.load(c + p_tf, mask=m_f[None, :], other=0.0)  # rows < TP
    G_I = tl.load(c + (i_s * SC + SC - 1) * F + o_f, mask=m_f, other=0.0)
    inv = _inverse_den(den, i_bh, t, m_t, T)
    b_dn = tl.load(dy + t[:, None] * DV + o_d[None, :], mask=m_td, other=0.0).to(tl.float32) * inv[:, None]
    b_dd = tl.load(dd + t, mask=m_t, other=0.0)  # [SC]
    b_v = tl.load(v + t[:, None] * DV + o_d[None, :], mask=m_td, other=0.0)  # [SC, BDV]
    # v^T [BDV, SC], loaded transposed (no tl.trans, see the module docstring)
    b_vT = tl.load(v + t[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
    causal = o_c[:, None] >= o_c[None, :]
    P = tl.where(causal, _dot_split(b_dn, b_vT, DT, PREC, EMULATE, True, False) + b_dd[:, None], 0.0)  # [SC, SC]
    if tl.min(G_I, 0) > -LIMIT:  # the pairs inside I as products (the pair of a token with itself apart)
        strict = o_c[:, None] > o_c[None, :]
        E = tl.exp(b_c)  # [SC, BF]: exp(c), <= 1
        E_up = tl.exp(-b_c)  # <= e^LIMIT
        dq = _dot_split(tl.where(strict, P, 0.0), b_fk * E_up, DT, PREC, EMULATE, True, True) * E
        dnT = tl.load(dy + t[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_t[None, :],
                      other=0.0).to(tl.float32) * inv[None, :]  # [BDV, SC], loaded transposed
        PT = _dot_split(b_v, dnT, DT, PREC, EMULATE, False, True) + b_dd[None, :]  # [SC j, SC i]: P_ij
        dk = _dot_split(tl.where(o_c[:, None] < o_c[None, :], PT, 0.0), b_fq * E, DT, PREC, EMULATE, True, True) * E_up
    else:
        dq = tl.zeros([SC, BF], dtype=tl.float32)
        dk = tl.zeros([SC, BF], dtype=tl.float32)
        for r in range(0, SC):  # the pairs inside I, the token r on one side of each
            t_r = i_s * SC + r
            m_r = m_f & (o_f * 0 + t_r < T)
            q_r = tl.load(fq + t_r * F + o_f, mask=m_r, other=0.0).to(tl.float32)  # [BF]
            k_r = tl.load(fk + t_r * F + o_f, mask=m_r, other=0.0).to(tl.float32)
            c_r = tl.load(c + t_r * F + o_f, mask=m_f, other=0.0)
            after = o_c[:, None] > r
            e = b_c - c_r[None, :]
            E = tl.exp(tl.where(after, e, -e))  # <= 1: exp(c_i - c_r) below r, exp(c_r - c_j) above
            P_col = tl.sum(tl.where(o_c[None, :] == r, P, 0.0), 1)  # [SC]: P_ir
            P_row = tl.sum(tl.where(o_c[:, None] == r, P, 0.0), 0)  # [SC]: P_rj
            dq += tl.where(after, P_col[:, None] * k_r[None, :] * E, 0.0)
            dk += tl.where(o_c[:, None] < r, P_row[:, None] * q_r[None, :] * E, 0.0)
    n_sub = tl.minimum(tl.cdiv(T - i_t * C, SC), NS)  # the chunk's sub-chunks that hold tokens
    if NS > 1:
        # earlier sub-chunks J as keys of I's queries, decayed to the start of I
        acc = tl.zeros([SC, BF], dtype=tl.float32)
        between = tl.zeros([BF], dtype=tl.float32)  # the decay of the sub-chunks strictly between J and I
        for jj in range(0, I):
            s_J = i_s - 1 - jj
            t_J = s_J * SC + o_c  # all < T
            vT_J = tl.load(v + t_J[None, :] * DV + o_d[:, None], mask=m_d[:, None], other=0.0)  # [BDV, SC]
            P_J = _dot_split(b_dn, vT_J, DT, PREC, EMULATE, True, False) + b_dd[:, None]  # [SC, SC]
            p_J = t_J[:, None] * F + o_f[None, :]
            G_J = tl.load(c + (s_J * SC + SC - 1) * F + o_f, mask=m_f, other=0.0)
            k_loc = tl.load(fk + p_J, mask=m_f[None, :], other=0.0).to(tl.float32) * tl.exp(
                (G_J[None, :] - tl.load(c + p_J, mask=m_f[None, :], other=0.0)) + between[None, :]
            )
            acc += _dot_split(P_J, k_loc, DT, PREC, EMULATE, True, True)
            between += G_J
        dq += acc * tl.exp(b_c)
        # later sub-chunks I2 as queries of I's keys, decayed from the end of I
        acc = tl.zeros([SC, BF], dtype=tl.float32)
        between = tl.zeros([BF], dtype=tl.float32)
        for I2 in range(I + 1, n_sub):
            s2 = i_t * NS + I2
            t2 = s2 * SC + o_c
            m2 = t2 < T
            inv2 = _inverse_den(den, i_bh, t2, m2, T)
            dnT2 = tl.load(dy + t2[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m2[None, :],
                           other=0.0).to(tl.float32) * inv2[None, :]  # [BDV, SC], loaded transposed
            PT = _dot_split(b_v, dnT2, DT, PREC, EMULATE, False, True) + tl.load(dd + t2, mask=m2, other=0.0)[None, :]
            p2 = t2[:, None] * F + o_f[None, :]
            q_loc = tl.load(fq + p2, mask=m2[:, None] & m_f[None, :], other=0.0).to(tl.float32) * tl.exp(
                tl.load(c + p2, mask=m_f[None, :], other=0.0) + between[None, :]
            )
            acc += _dot_split(PT, q_loc, DT, PREC, EMULATE, True, True)
            between += tl.load(c + (s2 * SC + SC - 1) * F + o_f, mask=m_f, other=0.0)
        dk += acc * tl.exp(G_I[None, :] - b_c)
    # dv: A's pairs with the queries of I and of the chunk's later sub-chunks, plus the adjoint's part
    b_dv = tl.load(dvs + i_bh * T * DV + t[:, None] * DV + o_d[None, :], mask=m_td, other=0.0)
    for I2 in range(I, n_sub):
        t2 = (i_t * NS + I2) * SC + o_c
        m2 = t2 < T
        AT = tl.load(A + t2[None, :] * C + (I * SC + o_c)[:, None], mask=m2[None, :], other=0.0)  # [SC j, SC i]
        inv2 = _inverse_den(den, i_bh, t2, m2, T)
        dn2 = tl.load(dy + t2[:, None] * DV + o_d[None, :], mask=m2[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32) * inv2[:, None]
        b_dv += _dot_split(AT, dn2, DT, PREC, EMULATE, True, True)
    tl.store(dv + i_bh * T * DV + t[:, None] * DV + o_d[None, :], b_dv.to(dv.dtype.element_ty), mask=m_td)
    # the states' parts (_bwd_inter_kernel)
    dq += tl.load(dqi + i_bh * T * F + p_tf, mask=m_tf, other=0.0)
    dk += tl.load(dki + i_bh * T * F + p_tf, mask=m_tf, other=0.0)
    if STORE_DG:
        tl.store(dgq + i_bh * T * F + p_tf, b_fq * dq, mask=m_tf)
        tl.store(dgk + i_bh * T * F + p_tf, b_fk * dk, mask=m_tf)
    P_self = tl.sum(tl.where(o_c[:, None] == o_c[None, :], P, 0.0), 1)  # [SC]: P_ii, decay 1
    dq += P_self[:, None] * b_fk
    dk += P_self[:, None] * b_fq
    tl.store(dfq + i_bh * T * F + p_tf, dq.to(dfq.dtype.element_ty), mask=m_tf)
    tl.store(dfk + i_bh * T * F + p_tf, dk.to(dfk.dtype.element_ty), mask=m_tf)


@triton.jit
def _par_output_kernel(
    fq, v, c, A, h, hz, y, y32, den,
    T, TP, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
    STORE_Y32: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """The chunk-parallel forward's second pass: every chunk's output at once. Grid ``(Dv / BV,
    T / C, B * H)``. A chunk's queries are decayed from the chunk start, ``b_i = c_i + sum_{M < I}
    G_M`` (a sum of terms ``<= 0``), and read out against its starting state ``h`` (the features
    ``BK`` at a time), plus the chunk's own keys through ``A``:

        o = (fq exp(b)) h + A [v | 1],   y = o[:Dv] / max(o[Dv], 1e-30)

    the same read-out as the walk's (``fq exp(b)`` rounded once for numerator and normaliser,
    ``h`` and ``A`` split into bf16 halves), writing ``y``, its fp32 copy and the denominators
    (by the ``i_v == 0`` programs)."""
    NS: tl.constexpr = C // SC
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    n_t = tl.cdiv(T, C)
    o_C = tl.arange(0, C)
    o_c = tl.arange(0, SC)
    o_v = i_v * BV + tl.arange(0, BV)
    t = i_t * C + o_C
    m_t = t < T
    m_v = o_v < DV
    m_tv = m_t[:, None] & m_v[None, :]
    sub = o_C // SC
    first = o_c[None, :] == 0
    fq += i_bh * T * F
    c += i_bh * TP * F
    h += (i_bh * n_t + i_t) * F * DV
    hz += (i_bh * n_t + i_t) * F
    o = tl.zeros([C, BV], dtype=tl.float32)
    dz = tl.zeros([C, SC], dtype=tl.float32)
    for i_k in tl.static_range(0, NK):  # NK = F / BK feature blocks, unrolled
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < F
        b_fq = tl.load(fq + t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b = tl.load(c + t[:, None] * F + o_k[None, :], mask=m_k[None, :], other=0.0)  # [C, BK], rows < TP
        for M in tl.static_range(0, NS - 1):
            G_M = tl.load(c + (i_t * C + M * SC + SC - 1) * F + o_k, mask=m_k, other=0.0)
            b += tl.where((sub > M)[:, None], G_M[None, :], 0.0)
        q_in = b_fq * tl.exp(b)  # queries against the state at the chunk start
        b_h = tl.load(h + o_k[:, None] * DV + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)  # [BK, BV]
        Z = tl.where(first, tl.load(hz + o_k, mask=m_k, other=0.0)[:, None], 0.0)  # [BK, SC]: z in column 0
        o += _dot_split(q_in, b_h, DT, PREC, EMULATE, False, True)
        dz += _dot_split(q_in, Z, DT, PREC, EMULATE, False, True)
    blocks = (o_C[:, None] // SC) >= (o_C[None, :] // SC)  # [C, C]: A's blocks that are written
    b_A = tl.load(A + (i_bh * T + t[:, None]) * C + o_C[None, :], mask=m_t[:, None] & blocks, other=0.0)
    b_v = tl.load(v + i_bh * T * DV + t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0)
    o += _dot_split(b_A, b_v, DT, PREC, EMULATE, True, False)
    d = tl.sum(dz, 1) + tl.sum(b_A, 1)  # [C]
    o = o / tl.maximum(d, _TINY)[:, None]
    tl.store(y + i_bh * T * DV + t[:, None] * DV + o_v[None, :], o.to(y.dtype.element_ty), mask=m_tv)
    if STORE_Y32:  # the backward's copy of y, in fp32
        tl.store(y32 + i_bh * T * DV + t[:, None] * DV + o_v[None, :], o, mask=m_tv)
    if i_v == 0:
        tl.store(den + i_bh * T + t, d, mask=m_t)


@triton.jit
def _bwd_dq(
    i_k, i_bh, fq, fk, v, g, y, den, dy, s0, z0, dfq, dgq, T, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, HAS_INIT: tl.constexpr,
    STORE_DG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfq`` (and ``fq dfq`` for ``dg``) for features ``[i_k * BK, (i_k + 1) * BK)``, chunks
    in order, each a sub-chunk at a time against the state at the chunk start."""
    NS: tl.constexpr = C // SC
    o_c = tl.arange(0, SC)
    o_k = i_k * BK + tl.arange(0, BK)
    o_d = tl.arange(0, BDV)
    m_k = o_k < F
    m_d = o_d < DV
    # S^T restricted to this block of features, [BDV, BK], loaded transposed from S0 [F, DV].
    if HAS_INIT:
        ST = tl.load(s0 + i_bh * F * DV + o_k[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_k[None, :], other=0.0)
        z = tl.load(z0 + i_bh * F + o_k, mask=m_k, other=0.0)
    else:
        ST = tl.zeros([BDV, BK], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    causal = o_c[:, None] >= o_c[None, :]
    strict3 = (o_c[:, None] > o_c[None, :])[:, :, None]  # [i, j, 1]: j < i
    diagonal = o_c[:, None] == o_c[None, :]
    last = o_c[:, None] == SC - 1
    for i_t in range(0, tl.cdiv(T, C)):
        before = tl.zeros([BK], dtype=tl.float32)  # the decay of the chunk's earlier sub-chunks
        U = tl.zeros([BDV, BK], dtype=tl.float32)  # the chunk's increment of S^T, and of z
        u = tl.zeros([BK], dtype=tl.float32)
        for I in range(0, tl.minimum(tl.cdiv(T - i_t * C, SC), NS)):  # the sub-chunks that hold tokens
            t = i_t * C + I * SC + o_c
            m_t = t < T
            m_td = m_t[:, None] & m_d[None, :]
            m_tk = m_t[:, None] & m_k[None, :]
            inv = _inverse_den(den, i_bh, t, m_t, T)
            b_dy = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
            b_y = tl.load(y + i_bh * T * DV + t[:, None] * DV + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
            b_dn = b_dy * inv[:, None]  # [SC, BDV]
            b_dd = -tl.sum(b_dy * b_y, 1) * inv  # [SC]
            # v^T [BDV, SC], loaded transposed (no tl.trans)
            b_vT = tl.load(v + i_bh * T * DV + t[None, :] * DV + o_d[:, None], mask=m_d[:, None] & m_t[None, :],
                           other=0.0)
            p_k = i_bh * T * F + t[:, None] * F + o_k[None, :]
            b_fk = tl.load(fk + p_k, mask=m_tk, other=0.0).to(tl.float32)  # [SC, BK]
            b = tl.cumsum(tl.load(g + p_k, mask=m_tk, other=0.0).to(tl.float32), 0)  # from the sub-chunk start
            b_last = tl.sum(tl.where(last, b, 0.0), 0)  # [BK]
            P = tl.where(causal, _dot_split(b_dn, b_vT, DT, PREC, EMULATE, True, False) + b_dd[:, None], 0.0)  # [SC,SC]
            # fp32 operands: this term and the next cancel in part
            b_dq = (_dot_split(b_dn, ST, DT, PREC, EMULATE, True, True) + b_dd[:, None] * z[None, :]) * tl.exp(
                b + before[None, :]
            )
            # pairs j < i; the diagonal pair (decay 1) is added after, and left out of fq dfq (see dg)
            decay = tl.exp(tl.where(strict3, b[:, None, :] - b[None, :, :], float("-inf")))  # [SC, SC, BK]
            b_dq += tl.sum(P[:, :, None] * b_fk[None, :, :] * decay, 1)
            if NS > 1:
                # keys of the earlier sub-chunks J, decayed to this one's start (r): a product each
                acc = tl.zeros([SC, BK], dtype=tl.float32)
                between = tl.zeros([BK], dtype=tl.float32)  # the decay of the sub-chunks between J and I
                for jj in range(0, I):
                    t_J = i_t * C + (I - 1 - jj) * SC + o_c
                    m_J = t_J < T  # (always true: J comes before I, which holds tokens)
                    p_J = i_bh * T * F + t_J[:, None] * F + o_k[None, :]
                    m_Jk = m_J[:, None] & m_k[None, :]
                    b_vT_J = tl.load(v + i_bh * T * DV + t_J[None, :] * DV + o_d[:, None],
                                     mask=m_d[:, None] & m_J[None, :], other=0.0)
                    b_J = tl.cumsum(tl.load(g + p_J, mask=m_Jk, other=0.0).to(tl.float32), 0)
                    G_J = tl.sum(tl.where(last, b_J, 0.0), 0)
                    k_loc = tl.load(fk + p_J, mask=m_Jk, other=0.0).to(tl.float32) * tl.exp(
                        (G_J[None, :] - b_J) + between[None, :]
                    )  # [SC, BK], decayed to r
                    P_J = _dot_split(b_dn, b_vT_J, DT, PREC, EMULATE, True, False) + b_dd[:, None]  # [SC, SC]
                    acc += _dot_split(P_J, k_loc, DT, PREC, EMULATE, True, True)
                    between += G_J
                b_dq += acc * tl.exp(b)  # queries decayed from r
            if STORE_DG:
                b_fq = tl.load(fq + p_k, mask=m_tk, other=0.0).to(tl.float32)
                tl.store(dgq + p_k, b_fq * b_dq, mask=m_tk)
            b_dq += tl.sum(tl.where(diagonal, P, 0.0), 1)[:, None] * b_fk
            tl.store(dfq + p_k, b_dq.to(dfq.dtype.element_ty), mask=m_tk)
            # the state's increment, summed over the sub-chunks as U <- exp(G_I) U + ..., so that
            # each key's exp(b_end - b_j) is a product of factors <= 1
            k_out = b_fk * tl.exp(b_last[None, :] - b)  # [SC, BK], decayed to the sub-chunk end
            sub_decay = tl.exp(b_last)
            U = U * sub_decay[None, :] + _dot_split(b_vT, k_out, DT, PREC, EMULATE, False, True)
            u = u * sub_decay + tl.sum(k_out, 0)
            before += b_last
        chunk_decay = tl.exp(before)
        ST = ST * chunk_decay[None, :] + U
        z = z * chunk_decay + u


@triton.jit
def _bwd_dk(
    i_k, i_bh, fq, fk, v, g, y, den, dy, ds_final, dz_final, dfk, dgk, dz0, T, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_DINIT: tl.constexpr, STORE_DG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dfk`` (and ``fk dfk`` for ``dg``) for features ``[i_k * BK, (i_k + 1) * BK)`` and the
    initial ``z``'s gradient, chunks in reverse, each a sub-chunk at a time (in reverse) against
    the adjoint at the chunk end."""
    NS: tl.constexpr = C // SC
    o_c = tl.arange(0, SC)
    o_k = i_k * BK + tl.arange(0, BK)
    o_d = tl.arange(0, BDV)
    m_k = o_k < F
    m_d = o_d < DV
    # the adjoint dH^T restricted to this block of features, [BDV, BK] (loaded transposed from
    # dS_final [F, DV]), and its normaliser column
    if HAS_DFINAL:
        p = ds_final + i_bh * F * DV + o_k[None, :] * DV + o_d[:, None]
        dST = tl.load(p, mask=m_d[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        dz = tl.load(dz_final + i_bh * F + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        dST = tl.zeros([BDV, BK], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
    later = o_c[:, None] <= o_c[None, :]  # [key j, query i]: i >= j
    strict3 = (o_c[:, None] < o_c[None, :])[:, :, None]  # [j, i, 1]: i > j
    diagonal = o_c[:, None] == o_c[None, :]
    last = o_c[:, None] == SC - 1
    n_t = tl.cdiv(T, C)
    for i_r in range(0, n_t):
        after = tl.zeros([BK], dtype=tl.float32)  # the decay of the chunk's later sub-chunks
        U = tl.zeros([BDV, BK], dtype=tl.float32)  # the chunk's increment of dH^T, and of dz
        u = tl.zeros([BK], dtype=tl.float32)
        n_sub = tl.minimum(tl.cdiv(T - (n_t - 1 - i_r) * C, SC), NS)  # the sub-chunks that hold tokens
        for jj in range(NS - n_sub, NS):  # key sub-chunk J = NS - 1 - jj
            t = (n_t - 1 - i_r) * C + (NS - 1 - jj) * SC + o_c
            m_t = t < T
            m_dt = m_d[:, None] & m_t[None, :]
            m_tk = m_t[:, None] & m_k[None, :]
            inv = _inverse_den(den, i_bh, t, m_t, T)
            # dy^T and y^T [BDV, SC], loaded transposed (no tl.trans)
            b_dyT = tl.load(dy + i_bh * T * DV + t[None, :] * DV + o_d[:, None], mask=m_dt, other=0.0).to(tl.float32)
            b_yT = tl.load(y + i_bh * T * DV + t[None, :] * DV + o_d[:, None], mask=m_dt, other=0.0).to(tl.float32)
            b_dnT = b_dyT * inv[None, :]  # [BDV, SC]
            b_dd = -tl.sum(b_dyT * b_yT, 0) * inv  # [SC]
            b_v = tl.load(v + i_bh * T * DV + t[:, None] * DV + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                          other=0.0)
            p_k = i_bh * T * F + t[:, None] * F + o_k[None, :]
            b_fq = tl.load(fq + p_k, mask=m_tk, other=0.0).to(tl.float32)  # [SC, BK]
            b = tl.cumsum(tl.load(g + p_k, mask=m_tk, other=0.0).to(tl.float32), 0)  # from the sub-chunk start
            b_last = tl.sum(tl.where(last, b, 0.0), 0)  # [BK]
            Q = tl.where(later, _dot_split(b_v, b_dnT, DT, PREC, EMULATE, False, True) + b_dd[None, :], 0.0)  # [SC, SC]
            k_decay = tl.exp(b_last[None, :] - b)  # [SC, BK]: to the sub-chunk end (r)
            # fp32 operands: this term and the next cancel in part
            b_dk = (_dot_split(b_v, dST, DT, PREC, EMULATE, False, True) + dz[None, :]) * (
                k_decay * tl.exp(after)[None, :]
            )
            # pairs i > j; the diagonal pair after, and left out of fk dfk (see dg)
            decay = tl.exp(tl.where(strict3, b[None, :, :] - b[:, None, :], float("-inf")))  # [j, i, BK]: b_i - b_j
            b_dk += tl.sum(Q[:, :, None] * b_fq[None, :, :] * decay, 1)
            if NS > 1:
                # queries of the later sub-chunks I, decayed from this one's end (r): a product each
                acc = tl.zeros([SC, BK], dtype=tl.float32)
                between = tl.zeros([BK], dtype=tl.float32)  # the decay of the sub-chunks between J and I
                for ii in range(NS - jj, n_sub):
                    t_I = (n_t - 1 - i_r) * C + ii * SC + o_c
                    m_I = t_I < T
                    inv_I = _inverse_den(den, i_bh, t_I, m_I, T)
                    m_dI = m_d[:, None] & m_I[None, :]
                    b_dyT_I = tl.load(dy + i_bh * T * DV + t_I[None, :] * DV + o_d[:, None], mask=m_dI, other=0.0)
                    b_yT_I = tl.load(y + i_bh * T * DV + t_I[None, :] * DV + o_d[:, None], mask=m_dI, other=0.0)
                    b_dyT_I = b_dyT_I.to(tl.float32)
                    b_dd_I = -tl.sum(b_dyT_I * b_yT_I.to(tl.float32), 0) * inv_I
                    p_I = i_bh * T * F + t_I[:, None] * F + o_k[None, :]
                    m_Ik = m_I[:, None] & m_k[None, :]
                    b_I = tl.cumsum(tl.load(g + p_I, mask=m_Ik, other=0.0).to(tl.float32), 0)
                    G_I = tl.sum(tl.where(last, b_I, 0.0), 0)
                    q_loc = tl.load(fq + p_I, mask=m_Ik, other=0.0).to(tl.float32) * tl.exp(b_I + between[None, :])
                    Q_I = _dot_split(b_v, b_dyT_I * inv_I[None, :], DT, PREC, EMULATE, False, True) + b_dd_I[None, :]
                    acc += _dot_split(Q_I, q_loc, DT, PREC, EMULATE, True, True)
                    between += G_I
                b_dk += acc * k_decay
            if STORE_DG:
                b_fk = tl.load(fk + p_k, mask=m_tk, other=0.0).to(tl.float32)
                tl.store(dgk + p_k, b_fk * b_dk, mask=m_tk)
            b_dk += tl.sum(tl.where(diagonal, Q, 0.0), 1)[:, None] * b_fq
            tl.store(dfk + p_k, b_dk.to(dfk.dtype.element_ty), mask=m_tk)
            # the adjoint's increment, summed over the sub-chunks (in reverse) as
            # U <- exp(G_J) U + ..., each query's exp(b_i) a product of factors <= 1
            q_in = b_fq * tl.exp(b)  # [SC, BK], decayed from the sub-chunk start
            sub_decay = tl.exp(b_last)
            U = U * sub_decay[None, :] + _dot_split(b_dnT, q_in, DT, PREC, EMULATE, True, True)
            u = u * sub_decay + tl.sum(q_in * b_dd[:, None], 0)
            after += b_last
        chunk_decay = tl.exp(after)
        dST = dST * chunk_decay[None, :] + U
        dz = dz * chunk_decay + u
    if STORE_DINIT:
        tl.store(dz0 + i_bh * F + o_k, dz, mask=m_k)


@triton.jit
def _bwd_dv(
    i_v, i_bh, fq, fk, g, A, den, dy, ds_final, dv, ds0, T, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr,
    STORE_DINIT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """``dv`` for values ``[i_v * BV, (i_v + 1) * BV)`` and that block of the initial ``S``'s
    gradient, chunks in reverse, each a sub-chunk at a time (in reverse) against the adjoint at
    the chunk end."""
    NS: tl.constexpr = C // SC
    o_c = tl.arange(0, SC)
    o_C = tl.arange(0, C)
    o_f = tl.arange(0, BF)
    o_v = i_v * BV + tl.arange(0, BV)
    m_f = o_f < F
    m_v = o_v < DV
    m_fv = m_f[:, None] & m_v[None, :]
    p_s = i_bh * F * DV + o_f[:, None] * DV + o_v[None, :]  # [BF, BV]
    if HAS_DFINAL:
        dS = tl.load(ds_final + p_s, mask=m_fv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BF, BV], dtype=tl.float32)
    last_row = o_c[:, None] == SC - 1  # [SC, 1]
    last_col = o_c[None, :] == SC - 1  # [1, SC]
    n_t = tl.cdiv(T, C)
    for i_r in range(0, n_t):
        if NS > 1:
            t_C = (n_t - 1 - i_r) * C + o_C
            m_C = t_C < T
            inv_C = _inverse_den(den, i_bh, t_C, m_C, T)
            b_dn_C = tl.load(dy + i_bh * T * DV + t_C[:, None] * DV + o_v[None, :], mask=m_C[:, None] & m_v[None, :],
                             other=0.0).to(tl.float32) * inv_C[:, None]  # [C, BV]
            after = tl.zeros([BF], dtype=tl.float32)  # the decay of the chunk's later sub-chunks
            chunk_total = tl.zeros([BF], dtype=tl.float32)  # the same, kept in the adjoint's layout
            U = tl.zeros([BF, BV], dtype=tl.float32)  # the chunk's increment of the adjoint
        n_sub = tl.minimum(tl.cdiv(T - (n_t - 1 - i_r) * C, SC), NS)  # the sub-chunks that hold tokens
        for jj in range(NS - n_sub, NS):  # key sub-chunk J = NS - 1 - jj
            t = (n_t - 1 - i_r) * C + (NS - 1 - jj) * SC + o_c
            m_t = t < T
            m_tv = m_t[:, None] & m_v[None, :]
            m_tf = m_t[:, None] & m_f[None, :]
            m_ft = m_f[:, None] & m_t[None, :]
            inv = _inverse_den(den, i_bh, t, m_t, T)
            b_dn = tl.load(dy + i_bh * T * DV + t[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
            b_dn = b_dn * inv[:, None]  # [SC, BV]
            p_f = i_bh * T * F + t[:, None] * F + o_f[None, :]
            b_fk = tl.load(fk + p_f, mask=m_tf, other=0.0).to(tl.float32)  # [SC, BF]
            b = tl.cumsum(tl.load(g + p_f, mask=m_tf, other=0.0).to(tl.float32), 0)
            b_last = tl.sum(tl.where(last_row, b, 0.0), 0)  # [BF]
            # queries, decays and A loaded transposed (no tl.trans)
            p_fT = i_bh * T * F + t[None, :] * F + o_f[:, None]
            b_fqT = tl.load(fq + p_fT, mask=m_ft, other=0.0).to(tl.float32)  # [BF, SC]
            bT = tl.cumsum(tl.load(g + p_fT, mask=m_ft, other=0.0).to(tl.float32), 1)
            q_inT = b_fqT * tl.exp(bT)  # from the sub-chunk start
            if NS == 1:
                k_out = b_fk * tl.exp(b_last[None, :] - b)
                b_AT = tl.load(A + (i_bh * T + t[None, :]) * C + o_c[:, None], mask=m_t[None, :], other=0.0)  # [j, i]
                b_dv = _dot(k_out, dS, DT, PREC, EMULATE) + _dot(b_AT, b_dn, DT, PREC, EMULATE)
                dS = dS * tl.exp(b_last)[:, None] + _dot(q_inT, b_dn, DT, PREC, EMULATE)
            else:
                k_out = b_fk * tl.exp((b_last[None, :] - b) + after[None, :])  # to the chunk end
                # A^T's rows for these keys: the queries of this and the later sub-chunks
                b_AT = tl.load(A + (i_bh * T + t_C[None, :]) * C + (NS - 1 - jj) * SC + o_c[:, None],
                               mask=m_C[None, :] & (o_C[None, :] >= (NS - 1 - jj) * SC), other=0.0)  # [SC, C]
                b_dv = _dot(k_out, dS, DT, PREC, EMULATE) + _dot(b_AT, b_dn_C, DT, PREC, EMULATE)
                # the increment, summed over the sub-chunks (in reverse) as U <- exp(G_J) U + ...
                sub_decayT = tl.sum(tl.where(last_col, bT, 0.0), 1)  # [BF], in the adjoint's layout
                U = U * tl.exp(sub_decayT)[:, None] + _dot(q_inT, b_dn, DT, PREC, EMULATE)
                after += b_last
                chunk_total += sub_decayT
            tl.store(dv + i_bh * T * DV + t[:, None] * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        if NS > 1:
            dS = dS * tl.exp(chunk_total)[:, None] + U
    if STORE_DINIT:
        tl.store(ds0 + p_s, dS, mask=m_fv)


@triton.jit
def _bwd_kernel(
    fq, fk, v, g, A, y, den, dy, s0, z0, ds_final, dz_final, dfq, dfk, dv, dgq, dgk, ds0, dz0,
    T, F, DV,
    C: tl.constexpr, SC: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDV: tl.constexpr,
    NK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr,
    STORE_DG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """Grid ``(2 * NK + NV, B * H)``: the first ``NK`` programs of a head compute ``dfq``, the next
    ``NK`` ``dfk`` (and ``dz0``), the last ``NV`` ``dv`` (and ``dS0``); all run at once."""
    i_p = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    if i_p < NK:
        _bwd_dq(
            i_p, i_bh, fq, fk, v, g, y, den, dy, s0, z0, dfq, dgq, T, F, DV,
            C, SC, BK, BDV, HAS_INIT, STORE_DG, DT, PREC, EMULATE,
        )
    elif i_p < 2 * NK:
        _bwd_dk(
            i_p - NK, i_bh, fq, fk, v, g, y, den, dy, ds_final, dz_final, dfk, dgk, dz0, T, F, DV,
            C, SC, BK, BDV, HAS_DFINAL, STORE_DINIT, STORE_DG, DT, PREC, EMULATE,
        )
    else:
        _bwd_dv(
            i_p - 2 * NK, i_bh, fq, fk, g, A, den, dy, ds_final, dv, ds0, T, F, DV,
            C, SC, BF, BV, HAS_DFINAL, STORE_DINIT, DT, PREC, EMULATE,
        )


@triton.jit
def _dg_kernel(dgq, dgk, dg_last, dg, T, F, C: tl.constexpr, BK: tl.constexpr, HAS_LAST: tl.constexpr):
    """``dg_r = dg_last + sum_{t >= r} (dgq_t - dgk_t)``: grid ``(F / BK, B * H)``, chunks of ``C``
    in reverse with the running suffix sum in registers."""
    i_k = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < F
    if HAS_LAST:
        acc = tl.load(dg_last + i_bh * F + o_k, mask=m_k, other=0.0)
    else:
        acc = tl.zeros([BK], dtype=tl.float32)
    n_t = tl.cdiv(T, C)
    for i_r in range(0, n_t):
        t = (n_t - 1 - i_r) * C + o_c
        m = (t < T)[:, None] & m_k[None, :]
        p = i_bh * T * F + t[:, None] * F + o_k[None, :]
        x = tl.load(dgq + p, mask=m, other=0.0) - tl.load(dgk + p, mask=m, other=0.0)  # [C, BK]
        tl.store(dg + p, (tl.cumsum(x, 0, reverse=True) + acc[None, :]).to(dg.dtype.element_ty), mask=m)
        acc += tl.sum(x, 0)


# ----------------------------------------------------------------------------- launchers


def _fwd_config(F: int, DV: int, heads: int, dtype=torch.bfloat16, C: int = CHUNK):
    """``(BF, BV, num_warps)`` of the forward (and of the backward's ``dv`` programs). ``BV``
    keeps a program's tiles (``[C, BF]`` inputs and exponentials, the ``[BF, BV]`` state) in
    registers (checked by compiling for sm_90a, see ``benchmarks/gated_registers.py``: at most
    about 150 bytes a thread spilled at F = 128), then shrinks while ``B * H`` programs per block
    would leave multiprocessors idle; fp32 products take the smallest tiles. 64-token chunks need
    8 warps (with 4, their ``[64, BF]`` tiles spill about 0.8 KB a thread). (Not yet tuned on a
    GPU.)"""
    BF = _pow2(F)
    if dtype == torch.float32:
        return BF, 16, _fwd_warps(BF, 16, C, dtype)
    if C == SUB_CHUNK:
        BV = min(_pow2(DV), 64 if BF <= 128 else 32)
    else:
        # 64-token chunks take 16 value columns a program, the blocks the B=2 GPU tests compile and
        # pass with: with 32 (kept at B=16 x 9 heads, F=64 and F=128, Dv=64) the backward faulted on
        # an H200 with Triton 3.6 (illegal memory access), as the hybrid kernel's forward did
        BV = min(_pow2(DV), 16)
    sms = _sms()
    while sms and BV > 16 and heads * triton.cdiv(DV, BV) < sms:
        BV //= 2
    return BF, BV, _fwd_warps(BF, BV, C, dtype)


def _fwd_warps(BF: int, BV: int, C: int, dtype=torch.bfloat16) -> int:
    if C > SUB_CHUNK:
        return 8
    return 8 if (BF >= 128 if dtype == torch.float32 else BF * BV >= 8192) else 4


def _bwd_config(F: int, DV: int, heads: int, dtype=torch.bfloat16, C: int = CHUNK):
    """``(BF, BK, BV, BDV)`` of the backward (8 warps): ``dfq``/``dfk`` programs take ``BK``
    features and every value column (their pairwise sums are ``[16, 16, BK]``), ``dv`` programs
    ``BV`` columns and every feature."""
    BF, BV, _ = _fwd_config(F, DV, heads, dtype, C)
    return BF, min(BF, 32), BV, _pow2(DV)


def _par_config(F: int, DV: int, heads: int, dtype=torch.bfloat16, C: int = CHUNK):
    """``(BK, BV)`` of the chunk-parallel forward's states pass (``[BK, BV]`` fp32 state, ``[BK, C]``
    keys): 64 x 64 blocks, halving ``BV``, then ``BK`` (to 32 and 16), while ``B * H`` heads times
    its blocks would leave multiprocessors idle: its programs are the only sequential work left,
    so it wants many of them. (The output pass takes :func:`_out_config`'s.)"""
    BF = _pow2(F)
    fp32 = dtype == torch.float32
    BK = min(BF, 32 if fp32 else 64)
    BV = min(_pow2(DV), 32 if fp32 else 64)
    sms = _sms()
    while sms and heads * triton.cdiv(F, BK) * triton.cdiv(DV, BV) < sms and max(BK, BV) > 16:
        if BV >= BK and BV > 16:
            BV //= 2
        else:
            BK //= 2
    return BK, BV


def _states_warps(BK: int, BV: int) -> int:
    """Warps of the states walks for ``[BK, BV]`` state blocks (:data:`STATES_WARPS` for 64 x 64)."""
    return STATES_WARPS if BK * BV >= 4096 else 4


def _out_config(F: int, DV: int, dtype=torch.bfloat16, C: int = CHUNK):
    """``(BK, BV, num_warps)`` of the chunk-parallel forward's output pass: ``[C, BK]`` query
    tiles against ``[BK, BV]`` blocks of the starting state, the features summed ``BK`` at a time.
    Its programs are many (``T / C`` a head and block of value columns), so the blocks need no
    shrinking to fill the GPU. Compiled on an H200 (Triton 3.6, bf16,
    ``results/h200-kernels/gated_output_variants.py``), 64-feature blocks with 32 or 64 value
    columns fault (illegal memory access, 4 or 8 warps, 1 or 2 stages); 16 columns, or 32
    features with 64 columns, are right, the latter the fastest (1.80 ms for the whole forward at
    B=1, 32 heads, F=Dv=128, T=8K, against 2.05 with 64 x 16 blocks)."""
    if dtype == torch.float32:
        return min(_pow2(F), 32), 16, 4
    return min(_pow2(F), 32), min(_pow2(DV), 64), 4


def _inter_config(F: int, DV: int, dtype=torch.bfloat16):
    """``(BK, BV, num_warps)`` of :func:`_bwd_inter_kernel`: ``[C, BK]`` gradient tiles against
    ``[BV, BK]`` blocks of the states (its programs are many, ``T / C`` a head, so no shrinking)."""
    if dtype == torch.float32:
        return min(_pow2(F), 32), min(_pow2(DV), 16), 4
    BK, BV, warps = INTER_BLOCKS
    return min(_pow2(F), BK), min(_pow2(DV), BV), warps


def gated_attention_fwd(fq, fk, v, g, S0=None, z0=None, output_final_state=False, output_dtype=None,
                        keep_fp32_output=False, chunk_size=CHUNK, parallel=None):
    """Launch the forward kernels on contiguous ``fq, fk, g: [B, H, T, F]``, ``v: [B, H, T, Dv]``,
    ``chunk_size`` (``C``) tokens a step.

    Returns ``(y [B, H, T, Dv], y32, d [B, H, T] fp32, A [B, H, T, C] fp32, S [B, H, F, Dv] fp32
    or None, z [B, H, F] fp32 or None)``; ``y32`` is ``y`` in fp32 when ``keep_fp32_output`` (the
    same tensor when ``y`` is fp32), else None. ``parallel``: the chunk-parallel forward
    (``_par_states_kernel``, then ``_par_output_kernel``) instead of the sequential walk
    (``_fwd_kernel``); None takes :data:`PARALLEL_FORWARD`. Both give the same ``A`` and the same
    tensors up to fp32 rounding (their decays are rounded in other orders)."""
    B, H, T, F = fq.shape
    DV = v.shape[-1]
    C = chunk_size
    dtype = compute_dtype(fq, fk, v)
    DT, PREC, EMULATE = _dot_config(dtype)
    dev = v.device
    y = torch.empty(B, H, T, DV, device=dev, dtype=output_dtype or torch.promote_types(fq.dtype, v.dtype))
    d = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    A = torch.empty(B, H, T, C, device=dev, dtype=torch.float32)
    S = torch.empty(B, H, F, DV, device=dev, dtype=torch.float32) if output_final_state else None
    z = torch.empty(B, H, F, device=dev, dtype=torch.float32) if output_final_state else None
    store_y32 = keep_fp32_output and y.dtype != torch.float32
    y32 = torch.empty(B, H, T, DV, device=dev, dtype=torch.float32) if store_y32 else None
    N = triton.cdiv(T, C)
    TP = N * C
    c = torch.empty(B, H, TP, F, device=dev, dtype=torch.float32)  # the sums of g inside each sub-chunk
    _cumsum_kernel[(N, B * H)](g, c, T, TP, F, SC=SUB_CHUNK, NS=C // SUB_CHUNK, BF=_pow2(F), num_warps=4)
    _intra_kernel[(N, B * H)](
        fq, fk, c, A, T, TP, F, float(FACTOR_LIMIT), C=C, SC=SUB_CHUNK, BF=_pow2(F), BK=min(_pow2(F), INTRA_BK),
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=INTRA_WARPS[_pow2(F)], num_stages=INTRA_STAGES,
    )
    if (PARALLEL_FORWARD if parallel is None else parallel) and N <= MAX_GRID_Y:
        BKs, BVs = _par_config(F, DV, B * H, dtype, C)
        h = torch.empty(B, H, N, F, DV, device=dev, dtype=torch.float32)  # each chunk's starting state
        hz = torch.empty(B, H, N, F, device=dev, dtype=torch.float32)
        _par_states_kernel[(triton.cdiv(F, BKs), triton.cdiv(DV, BVs), B * H)](
            fk, v, c, S0, z0, h, hz, S, z, T, TP, F, DV,
            C=C, SC=SUB_CHUNK, BK=BKs, BV=BVs, HAS_INIT=S0 is not None, STORE_FINAL=output_final_state,
            DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=_states_warps(BKs, BVs), num_stages=2,
        )
        BK, BV, num_warps = _out_config(F, DV, dtype, C)
        _par_output_kernel[(triton.cdiv(DV, BV), N, B * H)](
            fq, v, c, A, h, hz, y, y32, d, T, TP, F, DV,
            C=C, SC=SUB_CHUNK, BK=BK, BV=BV, NK=triton.cdiv(F, BK), STORE_Y32=store_y32, DT=DT, PREC=PREC,
            EMULATE=EMULATE, num_warps=num_warps, num_stages=OUT_STAGES,
        )
    else:
        BF, BV, num_warps = _fwd_config(F, DV, B * H, dtype, C)
        _fwd_kernel[(triton.cdiv(DV, BV), B * H)](
            fq, fk, v, g, A, y, y32, d, S0, z0, S, z, T, F, DV,
            C=C, SC=SUB_CHUNK, BF=BF, BV=BV, HAS_INIT=S0 is not None, STORE_FINAL=output_final_state,
            STORE_Y32=store_y32, DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=num_warps,
            num_stages=2,
        )
    if keep_fp32_output and not store_y32:
        y32 = y
    return y, y32, d, A, S, z


def gated_attention_bwd(fq, fk, v, g, A, y, d, dy, S0=None, z0=None, S=None, z=None, dS=None, dz=None,
                        want_dinit=True, want_dg=True, parallel=None):
    """Launch the backward kernels. ``A``: the forward's intra-chunk weights (its last dimension
    is the chunk size); ``y``: the forward's output in fp32; ``S, z``: the final state (needed
    with ``dS``/``dz``, its gradients, for ``dg``). Returns ``(dfq, dfk, dv, dg, dS0, dz0)``;
    ``dg`` is None unless ``want_dg``, the last two None without an initial state or when
    ``want_dinit`` is False. ``parallel``: the chunk-parallel backward (:func:`_parallel_bwd`)
    instead of the walks; None takes :data:`PARALLEL_BACKWARD`. The same gradients up to fp32
    rounding."""
    B, H, T, F = fq.shape
    DV = v.shape[-1]
    C = A.shape[-1]
    dtype = compute_dtype(fq, fk, v)
    DT, PREC, EMULATE = _dot_config(dtype)
    dev = v.device
    has_init = S0 is not None
    has_dfinal = dS is not None or dz is not None
    if has_dfinal:
        dS = torch.zeros(B, H, F, DV, device=dev, dtype=torch.float32) if dS is None else dS.float().contiguous()
        dz = torch.zeros(B, H, F, device=dev, dtype=torch.float32) if dz is None else dz.float().contiguous()
    dfq, dfk, dv = torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(v)
    dgq = torch.empty(B, H, T, F, device=dev, dtype=torch.float32) if want_dg else None
    dgk = torch.empty(B, H, T, F, device=dev, dtype=torch.float32) if want_dg else None
    want_dinit = want_dinit and has_init
    dS0 = torch.empty(B, H, F, DV, device=dev, dtype=torch.float32) if want_dinit else None
    dz0 = torch.empty(B, H, F, device=dev, dtype=torch.float32) if want_dinit else None
    if PARALLEL_BACKWARD if parallel is None else parallel:
        dfq, dfk, dv, dgq, dgk = _parallel_bwd(
            fq, fk, v, g, A, y, d, dy, S0, z0, dS, dz, dS0, dz0, want_dg, has_dfinal, dtype, C
        )
    else:
        BF, BK, BV, BDV = _bwd_config(F, DV, B * H, dtype, C)
        NK, NV = triton.cdiv(F, BK), triton.cdiv(DV, BV)
        _bwd_kernel[(2 * NK + NV, B * H)](
            fq, fk, v, g, A, y, d, dy, S0, z0, dS, dz, dfq, dfk, dv, dgq, dgk, dS0, dz0, T, F, DV,
            C=C, SC=SUB_CHUNK, BF=BF, BK=BK, BV=BV, BDV=BDV, NK=NK,
            HAS_INIT=has_init, HAS_DFINAL=has_dfinal, STORE_DINIT=want_dinit, STORE_DG=want_dg,
            DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=8, num_stages=2,
        )
    dg = None
    if want_dg:
        # the final state's own term: d L / d b_{T-1} += rowsum(dS_T * S_T) (normaliser column included)
        dg_last = ((dS * S).sum(-1) + dz * z).contiguous() if has_dfinal else None
        dg = torch.empty_like(g)
        BKg = min(_pow2(F), DG_BK)
        _dg_kernel[(triton.cdiv(F, BKg), B * H)](
            dgq, dgk, dg_last, dg, T, F, C=DG_CHUNK, BK=BKg, HAS_LAST=has_dfinal, num_warps=4,
        )
    return dfq, dfk, dv, dg, dS0, dz0


def _parallel_bwd(fq, fk, v, g, A, y, d, dy, S0, z0, dS, dz, dS0, dz0, want_dg, has_dfinal, dtype, C):
    """The chunk-parallel backward: every chunk's starting state (``_cumsum_kernel`` and
    ``_par_states_kernel``, as in the forward) and every chunk's adjoint state
    (``_par_bwd_states_kernel``, which also writes ``dS0``/``dz0`` when they are given), fp32
    ``[B, H, T / C, F, Dv]`` each; then what the states contribute (``_bwd_inter_kernel``, every
    chunk at once, fp32 ``[B, H, T, F]`` and ``[B, H, T, Dv]``), and ``_bwd_sub_kernel``, a
    program per 16-token sub-chunk, all at once, for the pairs inside each chunk. A token's
    ``fq dfq`` and ``fk dfk`` are the same as the
    walk's (its chunk's states are what the walk carries there), so ``dg``'s suffix sums run over
    them as before. Returns ``(dfq, dfk, dv, dgq, dgk)``, the last two None unless ``want_dg``."""
    B, H, T, F = fq.shape
    DV = v.shape[-1]
    DT, PREC, EMULATE = _dot_config(dtype)
    dev = v.device
    N = triton.cdiv(T, C)
    TP = N * C
    c = torch.empty(B, H, TP, F, device=dev, dtype=torch.float32)
    _cumsum_kernel[(N, B * H)](g, c, T, TP, F, SC=SUB_CHUNK, NS=C // SUB_CHUNK, BF=_pow2(F), num_warps=4)
    BKs, BVs = _par_config(F, DV, B * H, dtype, C)
    grid = (triton.cdiv(F, BKs), triton.cdiv(DV, BVs), B * H)
    h = torch.empty(B, H, N, F, DV, device=dev, dtype=torch.float32)
    hz = torch.empty(B, H, N, F, device=dev, dtype=torch.float32)
    _par_states_kernel[grid](
        fk, v, c, S0, z0, h, hz, None, None, T, TP, F, DV,
        C=C, SC=SUB_CHUNK, BK=BKs, BV=BVs, HAS_INIT=S0 is not None, STORE_FINAL=False,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=_states_warps(BKs, BVs), num_stages=2,
    )
    inv = torch.where(d >= TINY, 1.0 / torch.where(d >= TINY, d, 1.0), 0.0)
    dd = (-(dy.float() * y).sum(-1) * inv).contiguous()  # [B, H, T]: d L / d (the normaliser)
    dh = torch.empty(B, H, N, F, DV, device=dev, dtype=torch.float32)
    dhz = torch.empty(B, H, N, F, device=dev, dtype=torch.float32)
    _par_bwd_states_kernel[grid](
        fq, c, dy, d, dd, dS, dz, dh, dhz, dS0, dz0, T, TP, F, DV,
        C=C, SC=SUB_CHUNK, BK=BKs, BV=BVs, HAS_DFINAL=has_dfinal, STORE_DINIT=dS0 is not None,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=_states_warps(BKs, BVs), num_stages=2,
    )
    dfq, dfk, dv = torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(v)
    dgq = torch.empty(B, H, T, F, device=dev, dtype=torch.float32) if want_dg else None
    dgk = torch.empty(B, H, T, F, device=dev, dtype=torch.float32) if want_dg else None
    dqi = torch.empty(B, H, T, F, device=dev, dtype=torch.float32)  # the states' parts of dfq, dfk, dv
    dki = torch.empty(B, H, T, F, device=dev, dtype=torch.float32)
    dvs = torch.empty(B, H, T, DV, device=dev, dtype=torch.float32)
    BKi, BVi, warps_i = _inter_config(F, DV, dtype)
    NKi, NVi = triton.cdiv(F, BKi), triton.cdiv(DV, BVi)
    _bwd_inter_kernel[(NKi + NVi, N, B * H)](
        fk, v, c, d, dy, dd, h, hz, dh, dhz, dqi, dki, dvs, T, TP, F, DV,
        C=C, SC=SUB_CHUNK, BK=BKi, BV=BVi, NK=NKi, ND=NVi, DT=DT, PREC=PREC, EMULATE=EMULATE,
        num_warps=warps_i, num_stages=2,
    )
    chunk_limit = float(FACTOR_LIMIT) if CHUNK_BACKWARD else 0.0  # 0: every chunk to _bwd_sub_kernel
    if CHUNK_BACKWARD:
        # features never fewer than CHUNK_BLOCKS' a program, padded (see CHUNK_BACKWARD)
        BKc, BVc, warps_c = CHUNK_BLOCKS
        BVc = min(_pow2(DV), BVc)
        NKc, NVc = triton.cdiv(F, BKc), triton.cdiv(DV, BVc)
        _bwd_chunk_kernel[(NKc + NVc, N, B * H)](
            fq, fk, v, c, A, d, dy, dd, dqi, dki, dvs, dfq, dfk, dv, dgq, dgk, T, TP, F, DV, chunk_limit,
            C=C, SC=SUB_CHUNK, BF=_pow2(F), BK=BKc, BV=BVc, NK=NKc, ND=NVc, STORE_DG=want_dg,
            DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=warps_c, num_stages=2,
        )
    _bwd_sub_kernel[(triton.cdiv(T, SUB_CHUNK), B * H)](
        fq, fk, v, c, A, d, dy, dd, dqi, dki, dvs, dfq, dfk, dv, dgq, dgk, T, TP, F, DV, float(FACTOR_LIMIT),
        chunk_limit,
        C=C, SC=SUB_CHUNK, BF=_pow2(F), BDV=_pow2(DV), STORE_DG=want_dg,
        DT=DT, PREC=PREC, EMULATE=EMULATE, num_warps=SUB_WARPS[_pow2(F)], num_stages=SUB_STAGES,
    )
    return dfq, dfk, dv, dgq, dgk


class ChunkGatedAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: inputs ``fq, fk, v, g, S0, z0`` (the last two may be None)."""

    @staticmethod
    def forward(ctx, fq, fk, v, g, S0, z0, output_final_state, output_dtype, chunk_size, parallel=None):
        fq, fk, v, g = fq.contiguous(), fk.contiguous(), v.contiguous(), g.contiguous()
        if S0 is not None:
            S0, z0 = S0.float().contiguous(), z0.float().contiguous()
        keep = any(ctx.needs_input_grad[:6])
        y, y32, d, A, S, z = gated_attention_fwd(
            fq, fk, v, g, S0, z0, output_final_state, output_dtype, keep_fp32_output=keep, chunk_size=chunk_size,
            parallel=parallel,
        )
        ctx.save_for_backward(fq, fk, v, g, S0, z0, y32, d, A, S, z)
        ctx.parallel = parallel
        ctx.set_materialize_grads(False)
        return y, S, z

    @staticmethod
    def backward(ctx, dy, dS, dz):
        fq, fk, v, g, S0, z0, y, d, A, S, z = ctx.saved_tensors  # y in fp32
        if dy is None:
            dy = torch.zeros_like(y)
        dfq, dfk, dv, dg, dS0, dz0 = gated_attention_bwd(
            fq, fk, v, g, A, y, d, dy.contiguous(), S0, z0, S, z, dS, dz,
            want_dinit=ctx.needs_input_grad[4] or ctx.needs_input_grad[5], want_dg=ctx.needs_input_grad[3],
            parallel=ctx.parallel,
        )
        return dfq, dfk, dv, dg, dS0, dz0, None, None, None, None


def triton_chunk_gated_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    key_mask: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    chunk_size: int = CHUNK,
    parallel: bool | None = None,
):
    """Causal normalised linear attention with a per-channel data-dependent decay, chunked, in
    Triton (forward and backward).

    ``y_t = sum_{s<=t} w_ts v_s / sum_{s<=t} w_ts`` with ``w_ts = sum_f fq_tf fk_sf exp(sum_{s<r<=t}
    g_rf)``, plus what a carried state contributes (``S0 = sum w v^T``, ``z0 = sum w`` over earlier
    tokens, decayed like the rest). The same function as
    :func:`linearize.kernels.gated.chunk_gated_attention` (whose ``GatedState.S`` is ``[S0 | z0]``).

    Args:
        fq: query features ``[B, H, T, F]`` (non-negative), fp32, bf16 or fp16.
        fk: key features ``[B, H, T, F]``.
        v: values ``[B, H, T, Dv]``.
        g: log decays ``log alpha <= 0``, ``[B, H, T, F]``, finite (any float dtype; used in fp32).
        initial_state: ``(S0 [B, H, F, Dv], z0 [B, H, F])`` (fp32) or None (zeros).
        output_final_state: also return the state after the last token.
        key_mask: ``[B, T]`` bool, False for padding keys. Their ``fk``, ``v`` and ``g`` are set
            to zero (``masked_fill``, before the kernels), so they neither add to the state nor
            decay it; a query that sees no valid key at all gets ``y = 0``.
        output_dtype: dtype of ``y``; default the promoted dtype of ``fq`` and ``v``.
        chunk_size: tokens a sequential step takes, 64 (four 16-token sub-chunks; the default)
            or 16; the result is the same up to rounding (see the module docstring for the two).
        parallel: the chunk-parallel forward (each chunk's starting state, then every chunk's
            output at once) or, False, one sequential walk; the same ``A``, the same result up to
            fp32 rounding and the same backward. None (the default) takes the module's
            :data:`PARALLEL_FORWARD` (True: 4.1x the walk's speed on an H200).

    Returns:
        ``(y [B, H, T, Dv], (S [B, H, F, Dv] fp32, z [B, H, F] fp32) or None)``.

    Gradients flow to ``fq``, ``fk``, ``v``, ``g`` and the initial state. Products take fp32
    operands unless an input is bf16; then bf16 operands, with the fp32 operands whose products
    cancel later split into two bf16 halves (see the module docstring). The kernels take
    ``chunk_size`` tokens a step: exact pairwise decays inside each 16-token sub-chunk, decays
    factored at a boundary (both factors ``<= 1``) between sub-chunks, so nothing overflows however
    strong the decay. ``F <= 256`` and ``Dv <= 256``. Denominators are clamped at 1e-30 as in the
    reference.

    Example::

        fq = torch.rand(2, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
        fk = torch.rand_like(fq)
        g = torch.nn.functional.logsigmoid(torch.randn_like(fq, dtype=torch.float32)) / 16
        v = torch.randn(2, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
        y, (S, z) = triton_chunk_gated_attention(fq, fk, v, g, output_final_state=True)
    """
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}; got {chunk_size!r}")
    if fq.dim() != 4 or fk.shape != fq.shape or g.shape != fq.shape:
        raise ValueError(
            f"fq, fk and g must all be [B, H, T, F]; got {tuple(fq.shape)}, {tuple(fk.shape)} and {tuple(g.shape)}"
        )
    B, H, T, F = fq.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be [B, H, T, Dv] = [{B}, {H}, {T}, Dv]; got {tuple(v.shape)}")
    DV = v.shape[-1]
    if F > MAX_FEATURES or DV > MAX_VALUE_DIM:
        raise ValueError(f"at most {MAX_FEATURES} features and {MAX_VALUE_DIM} value channels; got F={F}, Dv={DV}")
    for name, x in (("fq", fq), ("fk", fk), ("v", v), ("g", g)):
        if x.dtype not in _DOT_DTYPES:
            raise ValueError(f"{name} must be fp32, bf16 or fp16; got {x.dtype}")
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = initial_state
        if S0.shape != (B, H, F, DV) or z0.shape != (B, H, F):
            raise ValueError(
                f"initial_state must be (S [B, H, F, Dv], z [B, H, F]) = ([{B}, {H}, {F}, {DV}], "
                f"[{B}, {H}, {F}]); got ({tuple(S0.shape)}, {tuple(z0.shape)})"
            )
    if key_mask is not None:
        if key_mask.shape != (B, T):
            raise ValueError(f"key_mask must be [B, T] = [{B}, {T}]; got {tuple(key_mask.shape)}")
        pad = ~key_mask.bool()[:, None, :, None]
        fk, v, g = fk.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0), g.masked_fill(pad, 0.0)
    if T == 0:
        y = v.new_zeros(B, H, 0, DV, dtype=output_dtype or torch.promote_types(fq.dtype, v.dtype))
        if not output_final_state:
            return y, None
        if S0 is None:
            S0, z0 = fq.new_zeros(B, H, F, DV, dtype=torch.float32), fq.new_zeros(B, H, F, dtype=torch.float32)
        return y, (S0.float(), z0.float())
    y, S, z = ChunkGatedAttentionFunction.apply(
        fq, fk, v, g, S0, z0, output_final_state, output_dtype, chunk_size, parallel
    )
    return y, ((S, z) if output_final_state else None)
