"""Helpers of scripts/plan_comparison.sh: the baselines' layer choices, and held-out perplexity
and KL to the teacher of converted models, on a recipe's evaluation text.

    python scripts/plan_comparison.py layers PLAN_DIR plan             # the layers to convert, as YAML
    python scripts/plan_comparison.py layers PLAN_DIR every
    python scripts/plan_comparison.py layers PLAN_DIR random --seed 1
    python scripts/plan_comparison.py heldout --recipe smoke --out table.md NAME=DIR [NAME=DIR ...]

The baselines keep as many layers softmax as the plan's budget allows with the recipe's own
settings on every other layer: every k-th layer (evenly spread, ``floor((j + 1/2) L / m)``), or a
random choice from a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path


def uniform_softmax_count(plan: dict) -> int:
    """The most softmax layers the plan's budget allows with the recipe's own settings elsewhere."""
    costs = plan["costs"]
    own = next((k for k, o in enumerate(plan["options"]) if o["kind"] is not None and not o["overrides"]), None)
    if own is None:
        raise SystemExit("the plan's candidates do not include the recipe's own settings: add them to --candidates")
    L = len(costs["cost"])
    fits = [m for m in range(L + 1)
            if sum(costs["cost"][i][0] for i in range(m)) + sum(costs["cost"][i][own] for i in range(m, L)) <= costs["capacity"]]
    return max(fits)


def baseline_softmax_layers(plan: dict, method: str, seed: int) -> list[int]:
    L, m = len(plan["choice"]), uniform_softmax_count(plan)
    if method == "every":
        return sorted({math.floor((j + 0.5) * L / m) for j in range(m)}) if m else []
    return sorted(random.Random(seed).sample(range(L), m))


def _layers(args) -> int:
    """Print what to convert: the layer list (for ``--set students.layers=...``), or, for a plan
    with per-layer settings, the path of its recipe."""
    plan = json.loads((Path(args.plan) / "plan.json").read_text())
    if args.method == "plan":
        print(Path(args.plan) / "recipe.yaml" if plan["per_layer"] else json.dumps(plan["converted_layers"]))
        return 0
    softmax = baseline_softmax_layers(plan, args.method, args.seed)
    print(json.dumps([i for i in range(len(plan["choice"])) if i not in softmax]))
    return 0


def _heldout(args) -> int:
    import torch

    import linearize
    from linearize.convert import attention_mode
    from linearize.data import build_blocks
    from linearize.eval.perplexity import next_token_kl, next_token_nll
    from linearize.models import load_teacher
    from linearize.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    dtype = args.dtype or recipe.precision
    teacher, tokenizer, source = load_teacher(args.model or recipe.model, dtype=dtype, device=args.device)
    blocks = build_blocks(recipe.eval.data, tokenizer, recipe.eval.seq_len, teacher, source.reference)[: recipe.eval.max_blocks]
    rows = []

    @torch.no_grad()
    def score(model):
        nll = kl = 0.0
        count = 0
        for start in range(0, len(blocks), args.batch_size):
            batch = blocks[start : start + args.batch_size].to(args.device)
            with attention_mode(teacher, "teacher"):
                t = teacher(**batch.model_inputs(), use_cache=False).logits
            s = model(**batch.model_inputs(), use_cache=False).logits
            part, n = next_token_nll(s, batch.input_ids, batch.attention_mask)
            nll, count = nll + float(part), count + n
            kl += next_token_kl(t, s, batch.attention_mask)[0]
        return math.exp(nll / count), kl / blocks.tokens()

    ppl_teacher, _ = score(teacher)
    for entry in args.models:
        name, _, folder = entry.partition("=")
        model = linearize.load(folder, device=args.device, dtype=dtype)
        report = json.loads((Path(folder) / "report.json").read_text())
        ppl, kl = score(model)
        rows.append({"name": name, "softmax_layers": [i for i in range(teacher.config.num_hidden_layers)
                                                      if i not in report["converted_layers"]],
                     "perplexity": ppl, "kl": kl})
        del model
    lines = [f"held-out text: {blocks.tokens()} tokens; teacher perplexity {ppl_teacher:.3f}", "",
             "| plan | softmax layers | perplexity | KL to the teacher (nats/token) |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['softmax_layers']} | {r['perplexity']:.3f} | {r['kl']:.4f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"teacher_perplexity": ppl_teacher, "rows": rows}, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("layers")
    q.add_argument("plan")
    q.add_argument("method", choices=["plan", "every", "random"])
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_layers)
    q = sub.add_parser("heldout")
    q.add_argument("models", nargs="+", metavar="NAME=DIR")
    q.add_argument("--recipe", required=True)
    q.add_argument("--model", default=None)
    q.add_argument("--out", default=None)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default=None, help="float32, bfloat16 (default: the recipe's precision)")
    q.add_argument("--batch-size", type=int, default=4)
    q.set_defaults(func=_heldout)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
