"""Several processes (``accelerate launch``): data parallel over the global batch.

Every process holds the whole model (the teacher is frozen; only small student/LoRA
parameters train) and starts from the same weights and seed. Each optimiser step's global
batch (``batch_size x grad_accum`` blocks, the same blocks as a single-process run) is split
by rows across the processes; after the backward passes the gradients of the trained
parameters are averaged, so every process takes the same step and the parameters stay equal
without being broadcast. Only the main process writes files, logs and shows progress bars.

Outside ``accelerate launch`` (or ``torchrun``) everything here is a no-op single process.
"""

from __future__ import annotations

import contextlib
import os

import torch


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def _nothing():
    yield


class Distributed:
    """Rank, world size and the few collectives the training loop needs."""

    def __init__(self):
        self.state = None
        if _launched():
            from accelerate import PartialState

            # sets up torch.distributed: nccl over GPUs, gloo over CPU processes
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def world_size(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> str:
        """Each process on its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if self.state and name == "cuda":
            return f"cuda:{self.state.local_process_index}"
        return name

    def main_process_first(self):
        return self.state.main_process_first() if self.state else _nothing()

    def barrier(self) -> None:
        if self.state:
            self.state.wait_for_everyone()

    def average_gradients(self, params) -> None:
        if self.world_size == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad.div_(self.world_size)

    def sum(self, value: float, device) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return float(t.item())


_CURRENT: Distributed | None = None


def current() -> Distributed:
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Distributed()
    return _CURRENT
