"""Measuring: what each option would cost in quality, on every layer.

For each student option (the recipe's student with one candidate's settings) every layer is
converted to it and the students are fitted by a short joint attention transfer on the
calibration blocks (the recipe's first ``attention_transfer`` stage: its data, batch size,
sequence length and learning rate; only the step count is the planner's). Layers train
independently in attention transfer (each sees the teacher's inputs and passes the teacher's
output on), so one joint fit measures every layer under that option. Then, on held-back
blocks (the first of the stage's ``val_blocks``, which the conversion validates on and never
trains on; how many: :func:`default_calibration`), two signals per layer (``kl`` only when a
plan asks for it: it costs most of the measuring):

* ``transfer``: the attention-transfer error ``||y_s - y_t|| / ||y_t||`` of the layer's output
  (before ``o_proj``), every layer at once in transfer mode;
* ``kl``: the end-to-end effect, ``KL(p_teacher || p_i)`` of the next-token distributions in
  nats per real token, where ``p_i`` is the model with *only layer i* in student mode and every
  other layer in teacher mode (:func:`layer_signals`; :func:`layer_kl_reference` is the same by
  full forward passes).

And the decode state of each student layer, from one forward through the cache at a length
past which the state stops growing (:func:`linearize.plan.budget.state_probe_tokens`).

The teacher's attention modules are put back after each option, so the options are measured
on the same teacher, each from the same seed: the order of the candidates does not matter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time

import torch

from ..convert import ConversionSpec, attention_mode, convert_model, students
from ..data import Blocks
from ..eval.perplexity import next_token_kl
from .budget import Option, state_probe_tokens


def transfer_stage(recipe):
    """The recipe's first attention_transfer stage: its data and settings calibrate the plan."""
    stage = next((s for s in recipe.stages if s.stage == "attention_transfer"), None)
    if stage is None:
        raise ValueError("planning needs a recipe with an attention_transfer stage (its data and settings)")
    return stage


def split_calibration(stage, blocks: Blocks) -> tuple[Blocks, Blocks]:
    """``(fit blocks, held-back blocks)``: the stage's first ``val_blocks`` blocks are held back
    (at most a quarter of them, at least one), as the conversion holds them back."""
    held = max(1, min(stage.val_blocks or 4, len(blocks) // 4))
    return blocks[held:], blocks[:held]


def default_calibration(recipe, num_layers: int, options: int, held_blocks: int, share: float = 0.1) -> tuple[int, int]:
    """``(fit steps, signal blocks)`` for each of ``options`` student options, scaled to the
    conversion so that the plan costs about ``share`` of it: the fit gets ``share`` of the
    recipe's first attention-transfer stage's steps, split over the options (at least 3); the
    signals, whose cost is about a forward pass of their tokens per layer, get at most
    ``share`` of the recipe's training tokens over ``layers x options`` (at least one block,
    at most the ``held_blocks`` held back)."""
    from ..training import total_steps

    stage = transfer_stage(recipe)
    steps = max(3, round(share * total_steps(stage) / max(options, 1)))
    trained = sum(total_steps(s) * s.batch_size * s.grad_accum * s.seq_len for s in recipe.stages)
    blocks = int(share * trained / (num_layers * max(options, 1) * stage.seq_len))
    return steps, max(1, min(held_blocks, blocks))


@contextlib.contextmanager
def converted(model, spec: ConversionSpec):
    """``model`` with the students of ``spec`` in place inside the block; afterwards the
    teacher's own attention modules are back and every parameter's ``requires_grad`` as before."""
    from ..architectures import adapter_for

    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    originals = [adapter.attention(layer) for layer in layers]
    grad = [(p, p.requires_grad) for p in model.parameters()]
    convert_model(model, spec)
    try:
        yield model
    finally:
        for layer, attn in zip(layers, originals):
            adapter.set_attention(layer, attn)
        for p, flag in grad:
            p.requires_grad_(flag)
        model.__dict__.pop("linearize_spec", None)


# ---------------------------------------------------------------------------------- the signals
def _layer_inputs(model, adapter, batch: Blocks, mode: str = "teacher"):
    """The teacher's logits on ``batch`` and, per decoder layer, the ``(args, kwargs)`` it was
    called with (its input hidden states, the mask and position embeddings it received).
    ``mode``: ``teacher``, or ``transfer`` (the same outputs, and every student records its
    attention-transfer error)."""
    captured = {}

    def hook(index):
        def capture(module, args, kwargs):
            captured[index] = (args, kwargs)

        return capture

    handles = [layer.register_forward_pre_hook(hook(j), with_kwargs=True) for j, layer in enumerate(adapter.layers(model))]
    try:
        with attention_mode(model, mode):
            logits = model(**batch.model_inputs(), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, captured


def _logits_from(model, adapter, captured: dict, start: int) -> torch.Tensor:
    """The logits of the decoder run from layer ``start`` on, from that layer's captured input:
    the same calls the decoder makes (each layer with its own captured mask and position
    embeddings), then the final norm and the LM head. The layers before ``start`` are skipped:
    they ran in teacher mode, which is what they would compute again."""
    layers = adapter.layers(model)
    args, kwargs = captured[start]
    hidden = args[0] if args else kwargs["hidden_states"]
    for j in range(start, len(layers)):
        args, kwargs = captured[j]
        out = layers[j](hidden, *args[1:], **kwargs) if args else layers[j](**{**kwargs, "hidden_states": hidden})
        hidden = out[0] if isinstance(out, tuple) else out
    return model.get_output_embeddings()(adapter.decoder(model).norm(hidden))


class TeacherDistribution:
    """The teacher's next-token distributions at the real positions of one batch, kept for many
    KL computations against it: ``p`` in float64, and ``sum_v p log p`` per row.

    ``KL(p || q) = sum_v p_v log p_v - sum_v p_v z_v + logsumexp(z)`` for the other model's
    logits ``z`` (``log q = z - logsumexp(z)``): per comparison one pass for the dot product and
    one for the log-sum-exp, in float64 (a small KL is the difference of terms far larger than
    itself, which float32 loses). On the CPU the rows go a few at a time (``CPU_CHUNK``
    elements), so that their float64 copies stay in the cache instead of a new ``[N, V]``
    float64 tensor each time: the same values, in under a third of the time (a 49,152-token
    vocabulary, one thread)."""

    CPU_CHUNK = 2**18  # float64 elements a chunk on the CPU (2 MiB); on an accelerator, all rows at once

    def __init__(self, logits: torch.Tensor, attention_mask: torch.Tensor):
        self.real = attention_mask.bool()
        self.all_real = bool(self.real.all())
        rows = self._rows(logits)  # [N, V]
        self.p = torch.empty(rows.shape, dtype=torch.float64, device=rows.device)
        self.neg_entropy = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)  # [N]
        for a, b in self._chunks(rows):
            log_p = torch.log_softmax(rows[a:b].double(), -1)
            self.p[a:b] = log_p.exp()
            self.neg_entropy[a:b] = (self.p[a:b] * log_p).sum(-1)
        self.tokens = int(self.real.sum())

    def _rows(self, logits: torch.Tensor) -> torch.Tensor:
        """The real positions' logits as ``[N, V]`` (a view when every position is real)."""
        return logits.reshape(-1, logits.shape[-1]) if self.all_real else logits[self.real]

    def _chunks(self, rows: torch.Tensor):
        n, v = rows.shape
        step = max(1, n if rows.device.type != "cpu" else self.CPU_CHUNK // max(v, 1))
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def kl_sum(self, logits: torch.Tensor) -> float:
        """``sum_t KL(p_t || q_t)`` over the real positions; ``logits: [B, T, V]``."""
        rows = self._rows(logits)
        per_row = torch.empty_like(self.neg_entropy)
        for a, b in self._chunks(rows):
            z = rows[a:b].double()
            per_row[a:b] = self.neg_entropy[a:b] - torch.einsum("nv,nv->n", self.p[a:b], z) + torch.logsumexp(z, -1)
        return float(per_row.sum())


def signal_batch_size(stage) -> int:
    """Blocks a batch for the signals: the stage's batch size, at most 2048 tokens (the teacher's
    distributions are kept in float64 for a whole batch)."""
    return max(1, min(stage.batch_size, 2048 // stage.seq_len))


@torch.no_grad()
def layer_signals(model, adapter, blocks: Blocks, batch_size: int, kl: bool = True) -> tuple[dict, dict | None, float]:
    """The signals of every student layer over ``blocks``: ``(transfer, kl, teacher_seconds)``;
    ``kl`` is None with ``kl=False`` (the transfer-mode forwards alone, most of whose cost the KL is).

    ``transfer[i] = ||y_s - y_t|| / ||y_t||`` of layer i's attention output, every layer at
    once in transfer mode (which passes the teacher's outputs on, so that forward also gives the
    teacher's logits and each layer's teacher input). ``kl[i] = KL(p_teacher || p_i)`` in nats
    per real token, where ``p_i`` has only layer i in student mode: it runs from layer i on, from
    the captured input (the layers before it would compute the teacher's values again), so a
    layer costs ``(L - i) / L`` of a forward. ``teacher_seconds``: the transfer-mode forwards'
    time (a measure of the model's forward speed)."""
    device = next(model.parameters()).device
    layers = sorted(students(model))
    want_kl = kl
    sq_err, sq_ref, kl = ({i: 0.0 for i in layers} for _ in range(3))
    tokens, teacher_seconds = 0, 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        began = time.perf_counter()
        logits, captured = _layer_inputs(model, adapter, batch, mode="transfer")
        teacher_seconds += time.perf_counter() - began
        for i, s in students(model).items():
            sq_err[i] += s.transfer_record.sq_err
            sq_ref[i] += s.transfer_record.sq_ref
        if not want_kl:
            del logits, captured
            continue
        teacher = TeacherDistribution(logits, batch.attention_mask)
        del logits
        for i in layers:
            with attention_mode(model, "teacher"):
                students(model)[i].mode = "student"
                kl[i] += teacher.kl_sum(_logits_from(model, adapter, captured, i))
        tokens += teacher.tokens
        del teacher, captured
    transfer = {i: math.sqrt(sq_err[i] / max(sq_ref[i], 1e-30)) for i in layers}
    return transfer, ({i: kl[i] / max(tokens, 1) for i in layers} if want_kl else None), teacher_seconds


@torch.no_grad()
def layer_kl_reference(model, blocks: Blocks, batch_size: int) -> dict[int, float]:
    """The KL of :func:`layer_signals` by full forward passes: the teacher once, then the whole
    model once per layer with only that layer in student mode, and :func:`next_token_kl`."""
    device = next(model.parameters()).device
    layers = sorted(students(model))
    total, count = {i: 0.0 for i in layers}, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        with attention_mode(model, "teacher"):
            teacher = model(**batch.model_inputs(), use_cache=False).logits
        for i in layers:
            with attention_mode(model, "teacher"):
                students(model)[i].mode = "student"
                logits = model(**batch.model_inputs(), use_cache=False).logits
            total[i] += float(next_token_kl(teacher, logits, batch.attention_mask)[0])
        count += batch.tokens()
    return {i: total[i] / max(count, 1) for i in layers}


@torch.no_grad()
def state_bytes(model, tokens: torch.Tensor, length: int) -> dict[int, int]:
    """``{layer: bytes}`` of each student layer's decode state after ``length`` tokens (one
    sequence, through the cache in student mode). ``tokens``: any 1-D token ids, repeated as
    needed (the state's size does not depend on them)."""
    from transformers import DynamicCache

    from ..cache import student_cache_layer

    ids = tokens.reshape(-1).repeat(math.ceil(length / tokens.numel()))[:length].view(1, -1)
    cache = DynamicCache(config=model.config)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.2x
    with attention_mode(model, "student"):
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=True, **{key: cache})
    return {i: student_cache_layer(cache, i).nbytes() for i in sorted(students(model))}


# ---------------------------------------------------------------------------------- one option
def fit(model, adapter, stage, blocks: Blocks, steps: int, seed: int, log) -> float:
    """``steps`` of the stage's attention transfer on ``blocks`` (no validation, no checkpoints);
    returns the seconds it took."""
    from ..stages.attention_transfer import AttentionTransfer

    spec = dataclasses.replace(stage, steps=steps, tokens=None, val_blocks=0, eval_every=0, checkpoint_every=0)
    began = time.perf_counter()
    AttentionTransfer(spec, model, adapter, blocks, seed=seed, log=log).run()
    return time.perf_counter() - began


def measure_option(model, adapter, recipe, option: Option, fit_blocks: Blocks, held: Blocks, steps: int,
                   log=print, kl: bool = True) -> dict:
    """Convert every layer to ``option``, fit ``steps``, and measure the signals (``kl=False``: the
    transfer error only). Returns ``{"transfer": {layer: error}, "kl": {layer: nats} or None, "seconds": {...}}``."""
    from ..pipeline import seed_everything

    stage = transfer_stage(recipe)
    seed_everything(recipe.seed)  # the same start for every option
    with converted(model, ConversionSpec(option.kind, "all", option.settings)):
        fit_seconds = fit(model, adapter, stage, fit_blocks, steps, recipe.seed, log)
        began = time.perf_counter()
        transfer, kl, teacher_seconds = layer_signals(model, adapter, held, signal_batch_size(stage), kl=kl)
        signal_seconds = time.perf_counter() - began
    return {"transfer": transfer, "kl": kl,
            "seconds": {"fit": fit_seconds, "signals": signal_seconds, "teacher_forward": teacher_seconds}}


def option_state_bytes(model, option: Option, tokens: torch.Tensor) -> dict[int, int]:
    """The decode state of each layer under ``option``, measured before any fit (its size does
    not depend on the weights), so that an impossible memory budget stops the plan at once."""
    with converted(model, ConversionSpec(option.kind, "all", option.settings)):
        return state_bytes(model, tokens, state_probe_tokens(option))
