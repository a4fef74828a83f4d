"""Attention transfer: train every student to reproduce its layer's teacher attention output.

LoLCATs (arXiv 2410.10254, Sec. 3.1, "Stage 1"): the loss of layer ``l`` is the MSE between
the student's and the teacher's per-head attention outputs (before ``o_proj``), times 1000,
plus optionally Hedgehog's cross-entropy between the attention weights (Hedgehog, Sec. 4.2);
the loss is averaged over layers. All layers train in one forward pass: each student passes
the *teacher's* output on, so every layer sees teacher activations and trains on its own.
Only the students' parameters (feature maps, window factors) receive gradients.

The stage holds back ``val_blocks`` blocks of its data, measures them before training and every
``eval_every`` steps, and keeps the best students by validation loss.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ..convert import attention_mode, load_student_state_dict, student_parameters, student_state_dict, students


class NonFiniteLossError(RuntimeError):
    pass


def transfer_forward(model, adapter, input_ids, mse_weight: float, ce_weight: float):
    """One forward in transfer mode. Returns ``(loss, per-layer records)``."""
    with attention_mode(model, "transfer", attention_ce=ce_weight > 0):
        adapter.decoder(model)(input_ids=input_ids, use_cache=False)
    records = {i: s.transfer_record for i, s in students(model).items()}
    terms = [mse_weight * r.mse + (ce_weight * r.ce if r.ce is not None else 0.0) for r in records.values()]
    return torch.stack(terms).mean(), records


@torch.no_grad()
def measure_transfer(model, adapter, blocks: torch.Tensor, batch_size: int, mse_weight=1000.0) -> dict:
    """Per-layer relative error ``||y_s - y_t|| / ||y_t||`` and MSE over ``blocks`` (no training)."""
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


class AttentionTransfer:
    """The ``attention_transfer`` stage: validate, set up, train, keep the best."""

    def __init__(self, stage, model, adapter, blocks: torch.Tensor, log=print):
        if not students(model):
            raise ValueError("attention transfer needs a converted model (no student layers found)")
        if len(blocks) <= stage.val_blocks:
            raise ValueError(
                f"attention_transfer: the data gives {len(blocks)} blocks of {stage.seq_len} tokens, not more than "
                f"val_blocks={stage.val_blocks}; add data or lower seq_len/val_blocks"
            )
        self.stage, self.model, self.adapter, self.log = stage, model, adapter, log
        self.val = blocks[: stage.val_blocks]
        self.train_blocks = blocks[stage.val_blocks :]
        self.params = student_parameters(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=stage.lr, weight_decay=stage.weight_decay)
        self.device = next(model.parameters()).device

    def batches(self, generator: torch.Generator):
        """Endless shuffled passes over the training blocks."""
        bs = self.stage.batch_size
        while True:
            order = torch.randperm(len(self.train_blocks), generator=generator)
            for start in range(0, len(order) - bs + 1 if len(order) >= bs else 1, bs):
                yield self.train_blocks[order[start : start + bs]]

    def validate(self) -> dict:
        self.model.eval()
        return measure_transfer(self.model, self.adapter, self.val, self.stage.batch_size, self.stage.mse_weight)

    def run(self, seed: int = 0) -> dict:
        from tqdm.auto import tqdm

        stage = self.stage
        before = self.validate() if len(self.val) else None
        best = (before["loss"] if before else math.inf, copy.deepcopy(student_state_dict(self.model)), 0)
        generator = torch.Generator().manual_seed(seed)
        batches = self.batches(generator)
        history, tokens, started = [], 0, time.perf_counter()
        bar = tqdm(range(1, stage.steps + 1), desc="attention transfer", unit="step")
        for step in bar:
            self.model.train()
            input_ids = next(batches).to(self.device)
            loss, records = transfer_forward(self.model, self.adapter, input_ids, stage.mse_weight, stage.ce_weight)
            if not torch.isfinite(loss):
                bad = [i for i, r in records.items() if not torch.isfinite(r.mse)]
                raise NonFiniteLossError(
                    f"attention_transfer: the loss became {loss.item()} at step {step} (layers {bad or 'unknown'}); "
                    "the last good students are kept in memory. Lower stages.N.lr or check the data."
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if stage.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, stage.max_grad_norm)
            self.optimizer.step()
            tokens += input_ids.numel()
            elapsed = time.perf_counter() - started
            history.append({"step": step, "loss": loss.item(), "tokens": tokens})
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens / elapsed:.0f}", refresh=False)
            if len(self.val) and ((stage.eval_every and step % stage.eval_every == 0) or step == stage.steps):
                val = self.validate()
                history[-1]["val_loss"] = val["loss"]
                if val["loss"] < best[0]:
                    best = (val["loss"], copy.deepcopy(student_state_dict(self.model)), step)
        load_student_state_dict(self.model, best[1])
        after = self.validate() if len(self.val) else None
        self.model.eval()
        return {
            "stage": "attention_transfer",
            "steps": stage.steps,
            "tokens": tokens,
            "seconds": time.perf_counter() - started,
            "best_step": best[2],
            "before": before,
            "after": after,
            "history": history,
        }
