"""Attention transfer: train every student to reproduce its layer's teacher attention output.

LoLCATs (arXiv 2410.10254, Sec. 3.1, "Stage 1"): the loss of layer ``l`` is the MSE between
the student's and the teacher's per-head attention outputs (before ``o_proj``), times 1000,
plus optionally Hedgehog's cross-entropy between the attention weights (Hedgehog, Sec. 4.2);
the loss is averaged over layers. All layers train in one forward pass: each student passes
the *teacher's* output on, so every layer sees teacher activations and trains on its own.
Only the students' parameters (feature maps, window factors) receive gradients.

The loop (batches, optimiser, schedule, validation, best checkpoint, resume) is
:class:`linearize.training.TrainingStage`.
"""

from __future__ import annotations

import math

import torch

from ..convert import attention_mode, students
from ..data import Blocks, as_blocks
from ..training import NonFiniteLossError, TrainingStage

__all__ = ["AttentionTransfer", "NonFiniteLossError", "measure_transfer", "transfer_forward"]


def _sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transfer_forward(model, adapter, batch, mse_weight: float, ce_weight: float):
    """One forward in transfer mode on ``batch`` (:class:`Blocks` or token ids).
    Returns ``(loss, per-layer records)``."""
    batch = as_blocks(batch)
    with attention_mode(model, "transfer", attention_ce=ce_weight > 0):
        if _sharded(model):  # FSDP runs from its root module: enter there (logits of one position only)
            model(**batch.model_inputs(), use_cache=False, logits_to_keep=1)
        else:  # the decoder stack alone: no LM head
            adapter.decoder(model)(**batch.model_inputs(), use_cache=False)
    records = {i: s.transfer_record for i, s in students(model).items()}
    terms = [mse_weight * r.mse + (ce_weight * r.ce if r.ce is not None else 0.0) for r in records.values()]
    return torch.stack(terms).mean(), records


@torch.no_grad()
def measure_transfer(model, adapter, blocks, batch_size: int, mse_weight=1000.0) -> dict:
    """Per-layer relative error ``||y_s - y_t|| / ||y_t||`` and MSE over ``blocks`` (no training)."""
    blocks = as_blocks(blocks)
    device = next(model.parameters()).device
    sq_err, sq_ref, mse, n = {}, {}, {}, 0
    for start in range(0, len(blocks), batch_size):
        _, records = transfer_forward(model, adapter, blocks[start : start + batch_size].to(device), mse_weight, 0.0)
        n += 1
        for i, r in records.items():
            sq_err[i] = sq_err.get(i, 0.0) + r.sq_err
            sq_ref[i] = sq_ref.get(i, 0.0) + r.sq_ref
            mse[i] = mse.get(i, 0.0) + float(r.mse)
    rel = {i: math.sqrt(sq_err[i] / max(sq_ref[i], 1e-30)) for i in sq_err}
    mse = {i: v / n for i, v in mse.items()}
    return {
        "relative_error": rel,
        "mse": mse,
        "mean_relative_error": sum(rel.values()) / len(rel),
        "loss": mse_weight * sum(mse.values()) / len(mse),
    }


class AttentionTransfer(TrainingStage):
    """The ``attention_transfer`` stage: only the students' own parameters train."""

    name = "attention_transfer"

    def __init__(self, spec, model, adapter, blocks: Blocks, **kwargs):
        if not students(model):
            raise ValueError("attention transfer needs a converted model (no student layers found)")
        super().__init__(spec, model, adapter, blocks, **kwargs)

    def trainable(self):
        return [(f"layers.{i}.{n}", p) for i, s in students(self.model).items() for n, p in s.student_parameters()]

    def loss(self, batch: Blocks):
        loss, records = transfer_forward(self.model, self.adapter, batch, self.spec.mse_weight, self.spec.ce_weight)

        def bad_layers():
            return [i for i, r in records.items() if not torch.isfinite(r.mse)]

        return loss, {"bad_layers": bad_layers}

    def evaluate(self, blocks: Blocks) -> dict:
        return measure_transfer(self.model, self.adapter, blocks, self.spec.batch_size, self.spec.mse_weight)
