"""Peak memory per process of attention transfer with and without FSDP, on a randomly
initialised Llama-shaped teacher built from a config (no weights are downloaded).

    python benchmarks/fsdp_memory.py                                   # CPU: llama-3.2-1b shape, 2 processes
    python benchmarks/fsdp_memory.py --shape llama-3-8b --processes 8 --dtype bfloat16 --seq-len 1024
                                                                       # GPUs: one process a GPU
    python benchmarks/fsdp_memory.py --out runs/bench/fsdp_memory.json

Each mode launches ``--processes`` processes the way ``linearize convert`` does: ``ddp`` through
torchrun (every process holds the whole teacher; the students' gradients are all-reduced), ``fsdp``
through ``accelerate launch --config_file examples/accelerate/fsdp.yaml`` (the teacher sharded by
:meth:`linearize.distributed.Distributed.shard`). Under FSDP the teacher is built on the meta
device, sharded, then each process allocates and initialises only its shards
(``to_empty`` + init), so no process ever holds the whole model; without FSDP each process builds
it whole. Then every layer becomes a LoLCATs student and ``--steps`` attention-transfer steps run
(global batch ``--batch`` rows of ``--seq-len`` tokens, split over the processes; AdamW on the
students' parameters), as in ``linearize convert``.

Per process it reports: the teacher's parameter bytes it holds; on GPUs
``torch.cuda.max_memory_allocated`` over the whole run; on CPU the peak resident set size
(``VmHWM``: everything the process touched, the Python runtime and libraries included, about
0.5 GB here) and the resident size after building the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "examples" / "accelerate" / "fsdp.yaml"

SHAPES = {  # Llama shapes (the published configs' sizes), random weights
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False, rope_theta=10000.0),
}


def _status(key: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in bytes (Linux), else 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _init_weights(model, std: float = 0.02) -> None:
    """Llama's initialisation, on whatever each process holds (whole tensors or FSDP shards)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)


def worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from linearize import ConversionSpec, convert_model
    from linearize.architectures import adapter_for
    from linearize.distributed import current, local_parameter_bytes
    from linearize.stages.attention_transfer import transfer_forward

    dist = current()
    cuda = torch.cuda.is_available()
    device = torch.device(dist.device("cuda") if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(args.seq_len, 2048))
    torch.manual_seed(0)
    started = time.perf_counter()
    if dist.fsdp:  # nothing whole: build on meta, shard, then allocate and fill the shards
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model = dist.shard(model)
        model.to_empty(device=device)
        with torch.device(device):  # the rotary embedding's buffers were left on meta
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _init_weights(model)
    for p in model.parameters():
        p.requires_grad_(False)
    built = time.perf_counter() - started
    held = local_parameter_bytes(model)
    rss_built = _status("VmRSS")
    adapter = adapter_for(model.config)
    convert_model(model, ConversionSpec("lolcats", "all", {}))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    share = args.batch // dist.world_size
    g = torch.Generator().manual_seed(1)
    losses, step_times = [], []
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = torch.randint(1, config.vocab_size, (args.batch, args.seq_len), generator=g)
        ids = ids[dist.rank * share : (dist.rank + 1) * share].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = transfer_forward(model, adapter, ids, 1000.0, 0.0)
        loss.backward()
        dist.average_gradients(params)
        optimizer.step()
        losses.append(dist.sum(loss.item(), device) / dist.world_size)
        step_times.append(time.perf_counter() - t0)
    result = {
        "mode": "fsdp" if dist.fsdp else "ddp",
        "rank": dist.rank,
        "processes": dist.world_size,
        "device": str(device),
        "teacher_bytes": held,
        "trained_bytes": sum(p.nbytes for p in params),
        "build_seconds": built,
        "step_seconds": step_times,
        "losses": losses,
        "peak_rss_bytes": _status("VmHWM"),
        "rss_after_build_bytes": rss_built,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    out = Path(args.worker_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['mode']}-{dist.rank}.json").write_text(json.dumps(result))


def launch(args, mode: str, out: Path) -> None:
    here = [str(Path(__file__).resolve()), "--worker", "--worker-out", str(out), "--shape", args.shape,
            "--dtype", args.dtype, "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
    if mode == "fsdp":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", str(args.processes), *here]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}", *here]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("ACCELERATE_USE_FSDP", None)
    subprocess.run(cmd, check=True, env=env)


def table(results: list[dict]) -> str:
    gib = 2**30
    cuda = results[0]["cuda_max_allocated_bytes"] is not None
    head = "mode | rank | teacher held (GiB) | " + ("max allocated (GiB)" if cuda else "peak RSS (GiB) | RSS after build (GiB)")
    rows = [head, "-|-|-|-" + ("" if cuda else "|-")]
    for r in sorted(results, key=lambda r: (r["mode"], r["rank"])):
        mem = (f"{r['cuda_max_allocated_bytes'] / gib:.2f}" if cuda
               else f"{r['peak_rss_bytes'] / gib:.2f} | {r['rss_after_build_bytes'] / gib:.2f}")
        rows.append(f"{r['mode']} | {r['rank']} | {r['teacher_bytes'] / gib:.2f} | {mem}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="default: llama-3-8b on GPUs, llama-3.2-1b on CPU")
    p.add_argument("--processes", type=int, default=None, help="default: the GPUs, or 2 on CPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPUs, float32 on CPU")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=None, help="default: 1024 on GPUs, 128 on CPU")
    p.add_argument("--batch", type=int, default=None, help="global batch rows (default: the processes)")
    p.add_argument("--modes", default="ddp,fsdp")
    p.add_argument("--out", default=None, help="write the per-process results here (JSON)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    gpus = torch.cuda.device_count()
    args.shape = args.shape or ("llama-3-8b" if gpus else "llama-3.2-1b")
    args.processes = args.processes or (gpus if gpus else 2)
    args.dtype = args.dtype or ("bfloat16" if gpus else "float32")
    args.seq_len = args.seq_len or (1024 if gpus else 128)
    args.batch = args.batch or args.processes
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            launch(args, mode, Path(tmp))
            print(f"{mode}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        results = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("*.json"))]
    print(f"{args.shape}, {args.dtype}, {args.processes} processes on {results[0]['device'].split(':')[0]}, "
          f"{args.steps} attention-transfer steps of {args.batch} x {args.seq_len} tokens")
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
