"""Several processes (``accelerate launch``): data parallel over the global batch.

Every process holds the whole model (the teacher is frozen; only small student/LoRA
parameters train) and starts from the same weights and seed. Each optimiser step's global
batch (``batch_size x grad_accum`` blocks, the same blocks as a single-process run) is split
by rows across the processes; after the backward passes the gradients of the trained
parameters are averaged, so every process takes the same step and the parameters stay equal
without being broadcast. Only the main process writes files, logs and shows progress bars.

With FSDP (``accelerate launch --config_file examples/accelerate/fsdp.yaml``, or ``linearize
convert --accelerate-config FILE``) the teacher's frozen weights are sharded as well: after the
teacher is loaded (on the CPU) and the data prepared, :meth:`Distributed.shard` hands the model to
accelerate's FSDP2 preparation (``fully_shard`` on every decoder layer, the embeddings, the head
and the root), so each process keeps ``1/N`` of the teacher and gathers one layer at a time.
Everything built afterwards (the students, the LoRA adapters) is not sharded: those are the
parameters that train, a fraction of a percent of the model, kept whole on every process and
averaged exactly as in data parallel, so the gradient and token accounting, the checkpoints and
the saved files are the same code with and without FSDP.

Outside ``accelerate launch`` (or ``torchrun``) everything here is a no-op single process.
"""

from __future__ import annotations

import contextlib
import os

import torch


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _fsdp_requested() -> bool:
    """``accelerate launch`` with ``distributed_type: FSDP`` sets this for every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


class _AcceleratorView:
    """What ``accelerate.utils.fsdp_utils.fsdp2_prepare_model`` reads of an ``Accelerator``.

    accelerate's ``Accelerator`` turns FSDP on only for GPU-like devices (a CPU run becomes plain
    MULTI_CPU data parallel); this view lets the same preparation, with the plugin read from the
    launch configuration, run on CPU processes (gloo) too, so CPU runs test the GPU code path."""

    torch_device_mesh = None
    parallelism_config = None
    mixed_precision = "no"  # the recipe's precision sets the dtype; FSDP keeps it

    def __init__(self, plugin, state):
        self.state = type("FSDPState", (), {"fsdp_plugin": plugin})()
        self.is_main_process = state.is_main_process
        self.device = state.device


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
        self.fsdp = self.state is not None and _fsdp_requested()

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

    def shard(self, model):
        """Under FSDP: shard ``model`` (in place) with accelerate's FSDP2 preparation and the
        plugin settings of the launch configuration (``fsdp_config`` of the accelerate config
        file, passed on as ``FSDP_*`` variables). Otherwise: ``model`` as it is."""
        if not self.fsdp:
            return model
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise ValueError(
                f"the accelerate config asks for fsdp_version {plugin.fsdp_version}; linearize shards with FSDP2: "
                "set fsdp_version: 2 (see examples/accelerate/fsdp.yaml)"
            )
        return fsdp2_prepare_model(_AcceleratorView(plugin, self.state), model)

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


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter whole: FSDP's shards gathered from every process (a collective: every process
    must call it), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_parameter_bytes(model) -> int:
    """Bytes of ``model``'s parameters this process holds (under FSDP: its shards)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
