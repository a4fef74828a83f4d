"""The training loop every stage shares, and the checkpoints that let a run survive interruption.

A stage (``stages/attention_transfer.py``, ``stages/lora.py``) says what trains and what the
loss is; :class:`TrainingStage` does the rest the same way for all of them:

* batches: ``batch_size`` blocks per micro-batch, ``grad_accum`` micro-batches per optimiser
  step, drawn by :func:`linearize.data.batch_indices` (every block once per epoch; batch ``n``
  depends only on ``n`` and the seed, so resuming needs only the step);
* optimiser (AdamW, Adam or SGD) and learning-rate schedule (constant, linear or cosine decay
  after a linear warm-up), optional mixed precision through ``torch.autocast``;
* a validation loss on held-back blocks before training and every ``eval_every`` steps; the
  best parameters by that loss are what the stage ends with;
* a stop on a non-finite loss that names the stage, the step and (where the stage knows) the
  layers;
* a progress bar with the loss and tokens/s;
* a checkpoint every ``checkpoint_every`` steps (and on Ctrl-C) through a callback: trained
  parameters, optimiser, scheduler, step, best-so-far, history and RNG states.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import ClassVar

import torch

from .data import Blocks, as_blocks, batch_indices
from .distributed import current as current_distributed


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class StageOutOfMemoryError(RuntimeError):
    """A stage ran out of memory (the message names the recipe keys to lower)."""


# ---------------------------------------------------------------------------------- schedule
def lr_factor(schedule: str, update: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of optimiser update ``update`` (0-based) out of ``total``."""
    if warmup and update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose constant, linear or cosine")


def build_optimizer(spec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=tuple(spec.betas))
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=tuple(spec.betas))
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.betas[0])
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose adamw, adam or sgd")


def total_steps(spec) -> int:
    """Optimiser steps of a stage: ``steps``, or ``tokens`` divided by the tokens of one step."""
    if spec.steps is not None:
        return spec.steps
    return max(1, math.ceil(spec.tokens / (spec.batch_size * spec.grad_accum * spec.seq_len)))


# ---------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """A run's checkpoint folder. It holds one ``checkpoint.pt``, replaced atomically (written
    to a temporary file, then renamed), so a kill at any moment leaves the previous one whole."""

    FILE = "checkpoint.pt"
    SUMMARY = "checkpoint.json"  # what the checkpoint holds, for people and scripts

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / self.FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, payload: dict, summary: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._atomic(self.path, lambda f: torch.save(payload, f))
        if summary is not None:
            text = json.dumps(summary, indent=2) + "\n"
            self._atomic(self.folder / self.SUMMARY, lambda f: Path(f).write_text(text))

    def _atomic(self, path: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> dict | None:
        if not self.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def nbytes(self) -> int:
        return self.path.stat().st_size if self.exists() else 0


# ---------------------------------------------------------------------------------- the loop
@contextlib.contextmanager
def _deferred_interrupt():
    """Inside the block a first Ctrl-C (SIGINT) only sets a flag, which the loop reads after
    each complete step; a second one interrupts at once. Yields the flag's reader."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)
        print("\ninterrupt: finishing the current step and saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


class TrainingStage:
    """Base class of a trainable stage. Subclasses set ``name`` and provide :meth:`trainable`,
    :meth:`loss` and :meth:`evaluate` (and :meth:`prepare` if they change the model)."""

    name: ClassVar[str]

    def __init__(self, spec, model, adapter, blocks: Blocks, seed: int = 0, log=print, on_checkpoint=None):
        blocks = as_blocks(blocks)
        if len(blocks) <= spec.val_blocks:
            raise ValueError(
                f"{self.name}: the data gives {len(blocks)} blocks of {spec.seq_len} tokens, not more than "
                f"val_blocks={spec.val_blocks}; add data or lower seq_len/val_blocks"
            )
        self.spec, self.model, self.adapter, self.log = spec, model, adapter, log
        self.seed = spec.seed if getattr(spec, "seed", None) is not None else seed
        self.val = blocks[: spec.val_blocks]
        self.train_blocks = blocks[spec.val_blocks :]
        self.on_checkpoint = on_checkpoint
        self.steps = total_steps(spec)
        self.dist = current_distributed()
        if spec.batch_size % self.dist.world_size:
            raise ValueError(
                f"{self.name}: batch_size {spec.batch_size} does not split over {self.dist.world_size} processes; "
                "make batch_size a multiple of the number of processes (grad_accum keeps the global batch)"
            )

    # -------------------------------------------------------------- what a stage provides
    def prepare(self) -> None:
        """Change the model's structure before training (or before a resume loads weights)."""

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def loss(self, batch: Blocks) -> tuple[torch.Tensor, dict]:
        """``(scalar loss, info)``; ``info`` may hold ``bad_layers()``, a callable naming the
        layers whose own loss is not finite."""
        raise NotImplementedError

    def evaluate(self, blocks: Blocks) -> dict:
        """Validation measures of ``blocks``; must hold ``loss`` (lower is better)."""
        raise NotImplementedError

    # -------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        precision = getattr(self.spec, "precision", "model")
        if precision in ("model", None):
            return nullcontext()
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.trainable())
        if set(params) != set(state):
            raise ValueError(f"{self.name}: saved parameters do not match the model's ({len(state)} vs {len(params)})")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def validate(self) -> dict | None:
        if not len(self.val):
            return None
        self.model.eval()
        with torch.no_grad(), self.autocast():
            return self.evaluate(self.val)

    def _checkpoint(self, step, optimizer, scheduler, best, history, tokens, elapsed) -> None:
        if self.on_checkpoint is None or not self.dist.is_main:
            return
        self.on_checkpoint({
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best": {"loss": best[0], "state": best[1], "step": best[2]},
            "history": history,
            "tokens": tokens,
            "elapsed": elapsed,
            "before": self._before,
            "rng": rng_state(),
        })

    # -------------------------------------------------------------- the loop
    def run(self, resume: dict | None = None) -> dict:
        from tqdm.auto import tqdm

        spec = self.spec
        params = [p for _, p in self.trainable()]
        if not params:
            raise ValueError(f"{self.name}: nothing to train")
        for p in self.model.parameters():  # this stage's parameters train, nothing else
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = build_optimizer(spec, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda u: lr_factor(spec.schedule, u, self.steps, spec.warmup_steps, spec.min_lr_ratio)
        )
        if resume is None:
            self._before = self.validate()
            best = (self._before["loss"] if self._before else math.inf, self.trainable_state(), 0)
            first, history, tokens, elapsed0 = 1, [], 0, 0.0
        else:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            self._before = resume["before"]
            best = (resume["best"]["loss"], resume["best"]["state"], resume["best"]["step"])
            first, history, tokens, elapsed0 = resume["step"] + 1, resume["history"], resume["tokens"], resume["elapsed"]
            set_rng_state(resume["rng"])
            if self.dist.is_main:
                self.log(f"{self.name}: resuming at step {first} of {self.steps}")
        started = time.perf_counter() - elapsed0
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(range(first, self.steps + 1), initial=first - 1, total=self.steps, desc=self.name.replace("_", " "), unit="step",
                   disable=not self.dist.is_main)
        val = None
        with _deferred_interrupt() as interrupted:
            try:
                for step in bar:
                    loss_value, step_tokens = self._train_step(step, optimizer, scheduler)
                    tokens += step_tokens
                    elapsed = time.perf_counter() - started
                    history.append({"step": step, "loss": loss_value, "tokens": tokens, "lr": scheduler.get_last_lr()[0]})
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}", refresh=False)
                    if len(self.val) and ((spec.eval_every and step % spec.eval_every == 0) or step == self.steps):
                        val = self.validate()
                        history[-1]["val_loss"] = val["loss"]
                        if val["loss"] < best[0]:
                            best = (val["loss"], self.trainable_state(), step)
                    if interrupted():  # Ctrl-C: the step is complete; keep it and stop
                        self._checkpoint(step, optimizer, scheduler, best, history, tokens, elapsed)
                        raise KeyboardInterrupt
                    if spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < self.steps:
                        self._checkpoint(step, optimizer, scheduler, best, history, tokens, elapsed)
            finally:
                bar.close()
        last_val = history[-1].get("val_loss") if history else None
        if best[2] == self.steps and last_val is not None:  # the last step is the best: already measured
            after = val
        else:
            if len(self.val):  # end with the best parameters by validation loss (else: the last ones)
                self.load_trainable_state(best[1])
            after = self.validate()
        self.model.eval()
        seconds = time.perf_counter() - started
        return {
            "stage": self.name,
            "steps": self.steps,
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else None,
            "best_step": best[2],
            "before": self._before,
            "after": after,
            "history": history,
        }

    def _train_step(self, step: int, optimizer, scheduler) -> tuple[float, int]:
        """One optimiser step over the global batch (``batch_size x grad_accum`` blocks); under
        several processes each takes its share of every micro-batch's rows."""
        spec, dist = self.spec, self.dist
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        share = spec.batch_size // dist.world_size
        for micro in range(spec.grad_accum):
            index = batch_indices(len(self.train_blocks), spec.batch_size, (step - 1) * spec.grad_accum + micro, self.seed)
            index = index[dist.rank * share : (dist.rank + 1) * share]
            batch = self.train_blocks[index].to(self.device)
            with self.autocast():
                loss, info = self.loss(batch)
            if not torch.isfinite(loss):
                bad = info.get("bad_layers", lambda: None)()
                where = f" (layers {bad})" if bad else ""
                raise NonFiniteLossError(
                    f"{self.name}: the loss became {loss.item()} at step {step}{where}. "
                    "Lower the stage's lr, or check the data; the last checkpoint is kept."
                )
            # losses are means over real tokens: weigh this process's share by its tokens so the
            # averaged gradient is the one of the whole micro-batch, however the padding falls
            share_tokens = batch.tokens()
            weight = share_tokens * dist.world_size / dist.sum(share_tokens, self.device) if dist.world_size > 1 else 1.0
            (loss * (weight / spec.grad_accum)).backward()
            total += loss.item() * weight / spec.grad_accum
            tokens += share_tokens
        params = [p for _, p in self.trainable()]
        dist.average_gradients(params)
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        total = dist.sum(total, self.device) / dist.world_size
        return total, int(dist.sum(tokens, self.device))
