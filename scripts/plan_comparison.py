"""Helpers of scripts/plan_comparison.sh: the baselines' layer choices, and held-out perplexity
and KL to the teacher of converted models, on a recipe's evaluation text.

    python scripts/plan_comparison.py layers PLAN_DIR plan             # the layers to convert, as YAML
    python scripts/plan_comparison.py layers PLAN_DIR every
    python scripts/plan_comparison.py layers PLAN_DIR random --seed 1
    python scripts/plan_comparison.py key PLAN_DIR                     # what the plan converts, as one string
    python scripts/plan_comparison.py heldout --recipe smoke --out table.md NAME=DIR [NAME=DIR ...]
    python scripts/plan_comparison.py report OUT BUDGET [BUDGET ...]   # OUT/comparison.md, .json, .png

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


def plan_key(plan_dir) -> str:
    """What a plan converts, as one string: two plans (by different signals) that chose the same
    layers and settings have the same key, and their comparison converts it once."""
    plan = json.loads((Path(plan_dir) / "plan.json").read_text())
    return json.dumps([plan["converted_layers"], plan["per_layer"]], sort_keys=True, separators=(",", ":"))


def _key(args) -> int:
    print(plan_key(args.plan))
    return 0


def _heldout(args) -> int:
    import torch

    import linearize
    from linearize.convert import attention_mode
    from linearize.data import build_blocks
    from linearize.eval.perplexity import next_token_kl, next_token_nll
    from linearize.models import load_teacher
    from linearize.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
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


FEW_SHOT = [("arc_challenge", 25), ("hellaswag", 10), ("winogrande", 5)]
PLAN = "transfer"  # the plan `linearize plan` makes by default; "kl" is the same measurements, the other signal
MEASURES = [  # (key, title, higher is better)
    ("few_shot_average", "few-shot average", True),
    ("passkey_average", "passkey average", True),
    ("perplexity", "held-out perplexity", False),
    ("kl", "KL to the teacher", False),
]
ITEM_SCORES = {"few_shot_average": "few_shot_items", "passkey_average": "passkey_items"}  # a measure's per-item scores


def budget_dir(out: Path, budget: str) -> Path:
    return out / budget.replace("=", "-").replace("@", "_")


def _method_of(model: str, folder: Path) -> str:
    """A converted model of this budget by its method's name (its folder's), anything else the teacher.
    By the budget folder's name, not its full path: the reports stay readable once moved (to results/)."""
    path = Path(model)
    return path.name if path.parent == folder or path.parent.name == folder.name else "teacher"


def _suite(folder: Path, name: str) -> dict:
    path = folder / name / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {"models": {}}


def _scores(folder: Path) -> dict[str, dict]:
    """The few-shot accuracies and passkey accuracy by length that one budget's evaluations gave, a
    method (or the teacher) each."""
    from linearize.eval.report import primary_metric

    scores: dict[str, dict] = {}
    for task, shots in FEW_SHOT:
        for entry in _suite(folder, f"eval-{task}-{shots}shot")["models"].values():
            s = scores.setdefault(_method_of(entry["model"], folder), {})
            metric = primary_metric(entry["tasks"][task]["metrics"], task) if entry.get("status") == "ok" and task in entry["tasks"] else None
            s.setdefault("few_shot", {})[f"{task} {shots}-shot"] = metric[1] if metric else None
            if metric:  # each item's score, for the paired comparison of two methods on the same items
                s.setdefault("few_shot_items", {})[f"{task} {shots}-shot"] = {
                    str(x["doc_id"]): float(x[metric[0]]) for x in entry["tasks"][task].get("samples", []) if metric[0] in x}
    for entry in _suite(folder, "eval-passkey")["models"].values():
        ok = entry.get("status") == "ok"
        by = entry["tasks"].get("passkey", {}).get("metrics", {}).get("by", {}).get("length", {}) if ok else {}
        s = scores.setdefault(_method_of(entry["model"], folder), {})
        s["passkey"] = {int(n): v for n, v in by.items()}
        items: dict[str, dict] = {}
        for x in entry["tasks"].get("passkey", {}).get("results", []) if ok else []:
            items.setdefault(str(x["length"]), {})[f"{x['depth']}/{x['index']}"] = float(x["correct"])
        if items:
            s["passkey_items"] = items
    return scores


def paired_difference(mine: dict, theirs: dict) -> tuple[float, float, int] | None:
    """``(difference, standard error, items)`` of an average over groups (tasks, or passkey
    lengths) of per-item scores, method ``mine`` minus ``theirs``, on the items both scored:
    ``mine, theirs: {group: {item: score}}``. The mean of the groups' mean differences; its error
    from each group's paired differences (``var / n``, summed over the groups, over groups^2).
    None when a group has fewer than two shared items."""
    groups = sorted(set(mine) & set(theirs))
    if not groups or set(mine) != set(theirs):
        return None
    means, variances, n_items = [], [], 0
    for g in groups:
        shared = sorted(set(mine[g]) & set(theirs[g]))
        if len(shared) < 2:
            return None
        d = [mine[g][i] - theirs[g][i] for i in shared]
        mean = sum(d) / len(d)
        means.append(mean)
        variances.append(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        n_items += len(d)
    return sum(means) / len(groups), math.sqrt(sum(variances)) / len(groups), n_items


def budget_rows(out: Path, budget: str) -> list[dict]:
    """One row a method (and the teacher) of one budget: softmax layers, held-out perplexity and
    KL, few-shot accuracies and their average, passkey accuracy by length and its average."""
    folder = budget_dir(out, budget)
    rows: dict[str, dict] = {}
    heldout = folder / "heldout.json"
    if heldout.is_file():
        h = json.loads(heldout.read_text())
        rows["teacher"] = {"method": "teacher", "softmax_layers": None, "perplexity": h["teacher_perplexity"], "kl": 0.0}
        for r in h["rows"]:
            rows[r["name"]] = {"method": r["name"], "softmax_layers": r["softmax_layers"], "perplexity": r["perplexity"], "kl": r["kl"]}

    def row(method):
        return rows.setdefault(method, {"method": method, "softmax_layers": None, "perplexity": None, "kl": None})

    scored = _scores(folder)
    for method, scores in scored.items():
        row(method).update(scores)
    # a method that chose what an earlier one did is a link to its model, scored once under the target's name
    for link in sorted(p for p in folder.iterdir() if p.is_symlink() and (p / "linearize.json").is_file()):
        for key, value in scored.get(link.resolve().name, {}).items():
            row(link.name).setdefault(key, value)
    # the teacher is scored once, with the first budget's models
    if "teacher" in rows and not ({"few_shot", "passkey"} & set(rows["teacher"])):
        for other in sorted(p for p in out.iterdir() if p.is_dir() and p != folder):
            teacher = _scores(other).get("teacher")
            if teacher:
                rows["teacher"].update(teacher)
                break
    # an average only over every task (every length) this budget measured: one over fewer would not compare
    tasks = {t for r in rows.values() for t in (r.get("few_shot") or {})}
    lengths = {n for r in rows.values() for n in (r.get("passkey") or {})}
    for r in rows.values():
        few = [(r.get("few_shot") or {}).get(t) for t in sorted(tasks)]
        r["few_shot_average"] = sum(few) / len(few) if few and None not in few else None
        pk = [(r.get("passkey") or {}).get(n) for n in sorted(lengths)]
        r["passkey_average"] = sum(pk) / len(pk) if pk and None not in pk else None
    order = ["teacher", PLAN, "kl", "every"]
    return sorted(rows.values(), key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["method"]))


def verdicts(rows: list[dict]) -> list[dict]:
    """For each measure: the plan's value, the baselines' (every k-th layer, each random seed), and
    whether the plan beats every one of them (a tie is not a win)."""
    by = {r["method"]: r for r in rows}
    plan = by.get(PLAN)
    baselines = [r for r in rows if r["method"] == "every" or r["method"].startswith("random")]
    out = []
    for key, title, higher in MEASURES:
        mine = plan.get(key) if plan else None
        theirs = [(r["method"], r.get(key)) for r in baselines if r.get(key) is not None]
        if mine is None and not theirs:
            continue  # a measure this budget did not take at all
        best = (max(theirs, key=lambda x: x[1]) if higher else min(theirs, key=lambda x: x[1])) if theirs else (None, None)
        # beating the baselines that happened to be measured is not a win (None: not known); losing to one is a loss
        wins = None if mine is None else all((mine > v) if higher else (mine < v) for _, v in theirs)
        if wins and len(theirs) < len(baselines):
            wins = None
        verdict = {"measure": title, "plan": mine, "best_baseline": best[0], "best_baseline_value": best[1],
                   "baselines_measured": len(theirs), "baselines": len(baselines), "plan_wins": wins,
                   "difference": None, "standard_error": None, "clear": None}
        items = ITEM_SCORES.get(key)
        if items and plan and best[0] is not None and plan.get(items) and by[best[0]].get(items):
            paired = paired_difference(plan[items], by[best[0]][items])
            if paired:
                # plan minus the best baseline on the same items; "clear": beyond two standard errors
                verdict.update(difference=paired[0], standard_error=paired[1],
                               clear=abs(paired[0]) > 2 * paired[1] if paired[1] > 0 else paired[0] != 0)
        out.append(verdict)
    return out


def _verdict(v: dict) -> str:
    if v["plan"] is None:
        return "not known: the plan not measured"
    if v["plan_wins"] is None:
        return f"not known: {v['baselines_measured']} of {v['baselines']} baselines measured"
    text = "yes" if v["plan_wins"] else "**no**"
    if not v["plan_wins"] and v["plan"] == v["best_baseline_value"]:
        return text + " (a tie)"  # e.g. every model scoring 0: no difference to be within noise of
    if v.get("difference") is not None and not v["clear"]:
        text += " (within noise)"
    return text


def _difference(v: dict) -> str:
    if v.get("difference") is None:
        return ""
    return f"{v['difference']:+.3f} ± {v['standard_error']:.3f}"


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _report(args) -> int:
    out = Path(args.out)
    result = {"budgets": {}}
    lines = ["# The plan against every k-th layer and random layers, at equal budgets", "",
             f"`{PLAN}`: the plan `linearize plan` makes (its default signal, the attention-transfer error); "
             + ("`kl`: the same measurements, the KL signal; " if any((budget_dir(out, b) / "plan-kl").is_dir()
                                                                      for b in args.budgets) else "")
             + "`every`: the softmax layers evenly spread; `randomN`: a random choice "
             "from seed N. Each baseline keeps as many layers softmax as the budget allows at the recipe's settings.", ""]
    wins_lines = ["## Does the plan win?", "",
                  "`plan - best`: the plan's score minus the best baseline's on the same items, ± its standard "
                  "error (from the paired per-item differences); a win or loss within two standard errors is "
                  "marked *within noise*. Held-out perplexity and KL are over the same held-out tokens for every method "
                  "and carry no per-item error here.", "",
                  "| budget | measure | plan | best baseline | plan - best | plan wins |", "|---|---|---|---|---|---|"]
    for budget in args.budgets:
        rows = budget_rows(out, budget)
        if not rows:
            continue
        result["budgets"][budget] = {"rows": rows, "verdicts": verdicts(rows)}
        tasks = sorted({t for r in rows for t in (r.get("few_shot") or {})})
        lengths = sorted({n for r in rows for n in (r.get("passkey") or {})})
        head = ["method", "softmax layers", "held-out ppl", "KL"]
        head += tasks + ["few-shot avg"] if tasks else []
        head += [f"passkey {n}" for n in lengths] + ["passkey avg"] if lengths else []
        lines += [f"## {budget}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["method"], "" if r["softmax_layers"] is None else str(r["softmax_layers"]),
                     _fmt(r["perplexity"]), _fmt(r["kl"], 4)]
            if tasks:
                cells += [_fmt((r.get("few_shot") or {}).get(t)) for t in tasks] + [_fmt(r["few_shot_average"])]
            if lengths:
                cells += [_fmt((r.get("passkey") or {}).get(n), 2) for n in lengths] + [_fmt(r["passkey_average"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for v in result["budgets"][budget]["verdicts"]:
            wins_lines.append(f"| {budget} | {v['measure']} | {_fmt(v['plan'], 4)} | {v['best_baseline'] or ''} "
                              f"{_fmt(v['best_baseline_value'], 4)} | {_difference(v)} | {_verdict(v)} |")
    text = "\n".join(lines + wins_lines) + "\n"
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, out / "comparison.png")
    print(text)
    return 0


def _plot(result: dict, path: Path) -> None:
    """Per budget, each method's score on every measure that was taken (few-shot and passkey averages,
    held-out perplexity and KL), as bars; a method not scored has no bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [(k, t) for k, t, _ in MEASURES
            if any(r.get(k) is not None for b in result["budgets"].values() for r in b["rows"])]
    if not keys:
        return
    budgets = list(result["budgets"])
    methods = []
    for b in result["budgets"].values():
        methods += [r["method"] for r in b["rows"] if r["method"] not in methods]
    cols = min(2, len(keys))
    rows_ = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6.5 * cols, 3.6 * rows_), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    width = 0.8 / max(len(methods), 1)
    for ax, (key, title) in zip(axes.flat, keys):
        for j, m in enumerate(methods):
            values = [next((r.get(key) for r in result["budgets"][b]["rows"] if r["method"] == m), None) for b in budgets]
            ax.bar([i + j * width for i in range(len(budgets))], [v if v is not None else float("nan") for v in values], width,
                   label=m, color=f"C{j % 10}")
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(budgets))], budgets, fontsize=8)
        higher = next(h for k, _, h in MEASURES if k == key)
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        if key == "perplexity":  # every model lies within a few tenths of the teacher: show the differences
            scored = [r[key] for b in result["budgets"].values() for r in b["rows"] if r.get(key) is not None]
            ax.set_ylim(0.95 * min(scored), 1.02 * max(scored))
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("layers")
    q.add_argument("plan")
    q.add_argument("method", choices=["plan", "every", "random"])
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_layers)
    q = sub.add_parser("key")
    q.add_argument("plan")
    q.set_defaults(func=_key)
    q = sub.add_parser("heldout")
    q.add_argument("models", nargs="+", metavar="NAME=DIR")
    q.add_argument("--recipe", required=True)
    q.add_argument("--model", default=None)
    q.add_argument("--out", default=None)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default=None, help="float32, bfloat16 (default: the recipe's precision)")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the recipe")
    q.set_defaults(func=_heldout)
    q = sub.add_parser("report")
    q.add_argument("out")
    q.add_argument("budgets", nargs="+")
    q.set_defaults(func=_report)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
