"""Model-level speed and memory: a converted model against its teacher, measured in the same run.

    python benchmarks/model.py --out runs/bench/model.json          # the full grid, on a GPU
    python benchmarks/model.py --quick                              # a small grid (also on a CPU)

Both models are the same checkpoint (default: the embedded SmolLM2-135M-Instruct), the teacher
with SDPA attention (FlashAttention-2 or cuDNN on an H100, whichever SDPA picks), the student
with every layer converted (``--student``, default LoLCATs: 64-token window, 4 sinks, Hedgehog
maps of 64 features per sign; untrained maps: speed does not depend on their values). Attention
kernels: whatever ``LINEARIZE_KERNELS`` selects (see ``linearize.kernels``).

* prefill: one forward over ``B x T`` prompt tokens that also fills the cache (only the last
  position's logits are computed), tokens/s = ``B * T / time``;
* decode: after a prefill of ``B x context`` tokens, ``--decode-tokens`` greedy steps of one
  token per sequence through the cache, tokens/s = ``B * steps / time``; the cache's size (the
  teacher's keys and values grow with the context, a student's state does not) and the peak
  memory of the decode on a GPU. ``--decode-path`` picks how the student decodes: ``generate``
  (default) the ordinary forward loop with the cache that ``generate()`` runs, as the teacher;
  ``static`` :class:`linearize.StaticDecoder`, whose step has fixed shapes and addresses and is
  captured once as a CUDA graph and replayed (on CUDA only; eagerly on a CPU). The static path
  prefills once, untimed, then times ``--decode-tokens`` steps per repeat, each repeat going on
  from where the last one stopped (the state's size, hence the step's cost, does not change);
  the graph is captured during the untimed warm-up run;

Times are medians over ``--repeats`` runs after a warm-up. Every row prints the teacher, the
student and their ratio; a configuration that runs out of memory is reported as such.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDENTS = {
    "lolcats": {"window_size": 64, "sink_size": 4, "feature_dim": 64},
    "hedgehog": {"feature_dim": 64},
    "lawcat": {"feature_dim": 32},
    "still": {},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cache_argument(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


@torch.no_grad()
def prefill(model, ids):
    """One forward filling a fresh cache; returns ``(cache, next token ids [B, 1])``."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return returned_cache(out), out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token, steps: int):
    name = cache_argument(model)
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
    return token


@torch.no_grad()
def static_decode(decoder, token, steps: int):
    for _ in range(steps):
        token = decoder.step(token).argmax(-1)
    return token


def measure(model, device, batch: int, length: int, decode_steps: int, repeats: int, vocab: int,
            decode_path: str = "generate") -> dict:
    from linearize.cache import cache_nbytes

    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    row = {}
    try:
        row["prefill_s"] = timed(lambda: prefill(model, ids), device, repeats)
        row["prefill_tok_s"] = batch * length / row["prefill_s"]
        if decode_steps:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            cache, token = prefill(model, ids)
            row["cache_bytes"] = cache_nbytes(cache)
            if decode_path == "static":
                from linearize import StaticDecoder

                del cache
                decoder = StaticDecoder(model, batch)
                first = decoder.prefill(ids).argmax(-1)
                if device.type == "cuda":  # the peak of the decode, not of this second prefill
                    torch.cuda.reset_peak_memory_stats(device)
                row["decode_path"] = "static-cuda-graph" if decoder.cuda_graph else "static-eager"

                def steps():  # each repeat goes on from the last one's state (same size, same cost)
                    static_decode(decoder, first, decode_steps)
            else:
                def steps():  # each repeat decodes from a copy of the prompt's cache
                    decode(model, copy.deepcopy(cache), token, decode_steps)

            row["decode_s"] = timed(steps, device, repeats)
            row["decode_tok_s"] = batch * decode_steps / row["decode_s"]
            if device.type == "cuda":
                row["decode_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def ratio(student, teacher, key, invert=False):
    if key not in student or key not in teacher:
        return None
    return teacher[key] / student[key] if invert else student[key] / teacher[key]


def fmt(x, scale=1.0, digits=0):
    return "-" if x is None else f"{x / scale:,.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ("| B | T | prefill tok/s teacher | student | ratio | decode tok/s teacher | student | ratio "
            "| cache MiB teacher | student |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, s = r["teacher"], r["student"]
        lines.append("| " + " | ".join([
            str(r["batch"]), str(r["length"]),
            t.get("error") or fmt(t.get("prefill_tok_s")), s.get("error") or fmt(s.get("prefill_tok_s")),
            fmt(ratio(s, t, "prefill_tok_s"), digits=2),
            fmt(t.get("decode_tok_s")), fmt(s.get("decode_tok_s")), fmt(ratio(s, t, "decode_tok_s"), digits=2),
            fmt(t.get("cache_bytes"), 2**20, 1), fmt(s.get("cache_bytes"), 2**20, 1),
        ]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", type=Path,
                        help="a config.json: the same architecture with random weights instead of --model's "
                             "(speed and memory do not depend on the weights' values)")
    parser.add_argument("--student", default="lolcats", choices=sorted(STUDENTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefill-lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--decode-contexts", default="1024,4096,16384,32768")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-path", default="generate", choices=("generate", "static"),
                        help="how the student decodes: the forward loop with the cache (as the teacher), or "
                             "linearize.StaticDecoder (one CUDA graph a step on CUDA)")
    parser.add_argument("--quick", action="store_true", help="prefill 512 and 1024, decode at 512, batch 1 and 2")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prefill_lengths, args.decode_contexts, args.batch_sizes = "512,1024", "512", "1,2"
        args.decode_tokens, args.repeats = 8, 1

    from linearize import ConversionSpec, convert_model
    from linearize.kernels import kernel_choice
    from linearize.models import load_teacher

    device = torch.device(args.device)
    if args.config:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(args.config)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).to(device)
        args.model = f"{args.config} (random weights)"
    else:
        teacher, _, _ = load_teacher(args.model, dtype=args.dtype, device=str(device), attn_implementation="sdpa")
    teacher.eval()
    student = copy.deepcopy(teacher)
    convert_model(student, ConversionSpec(args.student, settings=STUDENTS[args.student]))
    student.requires_grad_(False)
    vocab = teacher.config.vocab_size

    rows = []
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prefill_lengths = [int(t) for t in args.prefill_lengths.split(",")]
    contexts = [int(t) for t in args.decode_contexts.split(",")]
    for batch in batches:
        for length in sorted(set(prefill_lengths) | set(contexts)):
            steps = args.decode_tokens if length in contexts else 0
            row = {"batch": batch, "length": length}
            for name, model in (("teacher", teacher), ("student", student)):
                path = args.decode_path if name == "student" else "generate"
                row[name] = measure(model, device, batch, length, steps, args.repeats, vocab, path)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)

    print("\n" + table(rows))
    info = {
        "model": args.model, "student": args.student, "settings": STUDENTS[args.student], "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": args.dtype, "kernels": kernel_choice(), "torch": torch.__version__, "decode_tokens": args.decode_tokens,
        "decode_path": args.decode_path, "repeats": args.repeats, "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
