"""One report of a headline run: the evaluation suites of every part of the run merged, model by
model, into one set of tables (zero-shot, few-shot, WikiText-2 perplexity by length, retrieval by
length, the conversions' stages), a plot of retrieval accuracy against context length, and the
same figures as JSON.

    python scripts/headline_report.py runs/headline [--teacher-label teacher]

Reads ``OUT/*/eval-SUITE/report.json`` (``scripts/headline.sh`` writes each part of a run, e.g. the
teacher scored in one process and the students in another, under ``OUT/PART/``) and the
conversions' ``OUT/NAME/report.json``; writes the merged ``OUT/eval-SUITE/`` reports and
``OUT/headline.md``, ``OUT/headline.json``, ``OUT/accuracy_by_length.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.eval.report import merge_reports, primary_metric, write_report  # noqa: E402

ZERO_SHOT = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai"]
FEW_SHOT = [("arc_challenge", 25), ("hellaswag", 10), ("winogrande", 5)]


def label_of(name: str, out: Path, teacher_label: str) -> str:
    """A conversion of this run (``OUT/NAME/``) by its folder's name; anything else is the teacher."""
    folder = out / Path(name).name
    return folder.name if (folder / "linearize.json").is_file() or (folder / "report.json").is_file() else teacher_label


def merged_suites(out: Path, teacher_label: str) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*/eval-*/report.json")):
        groups.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    merged = {}
    for folder, reports in groups.items():
        names = {label: entry["model"] for r in reports for label, entry in r["models"].items()}
        report = merge_reports(reports, {label: label_of(name, out, teacher_label) for label, name in names.items()})
        report["models"] = dict(sorted(report["models"].items(), key=lambda kv: kv[0] != teacher_label))  # teacher first
        merged[folder] = report
    return merged


def metric(report: dict | None, model: str, task: str, key: str | None = None):
    entry = (report or {}).get("models", {}).get(model)
    if not entry or entry.get("status") != "ok" or task not in entry["tasks"]:
        return None
    metrics = entry["tasks"][task]["metrics"]
    if key:
        return metrics.get(key)
    p = primary_metric(metrics, task)
    return p[1] if p else None


def by_length(report: dict | None, model: str, tasks: list[str]) -> dict[int, float]:
    """Accuracy by context length, averaged over ``tasks`` (the needle tasks)."""
    entry = (report or {}).get("models", {}).get(model)
    if not entry or entry.get("status") != "ok":
        return {}
    cells: dict[int, list[float]] = {}
    for t in tasks:
        for n, acc in entry["tasks"].get(t, {}).get("metrics", {}).get("by", {}).get("length", {}).items():
            cells.setdefault(int(n), []).append(acc)
    return {n: sum(v) / len(v) for n, v in sorted(cells.items()) if len(v) == len(tasks)}


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def ratio(x, ref):
    return None if x is None or not ref else x / ref


def validation_layer_mse(conversion: dict) -> dict:
    """Each layer's attention-output MSE on the validation blocks of the last attention-transfer
    stage, before and after it (empty where the run had no validation blocks)."""
    stages = [s for s in conversion.get("stages", []) if s.get("stage") == "attention_transfer"]
    if not stages:
        return {}
    last = stages[-1]
    return {w: {int(i): v for i, v in ((last.get(w) or {}).get("mse") or {}).items()} for w in ("before", "after")}


def layer_ratios(mse: dict) -> list[tuple[float, int]]:
    """(after / before, layer) for every layer measured both times, smallest first."""
    return sorted((mse["after"][n] / mse["before"][n], n) for n in mse.get("after", {}) if mse.get("before", {}).get(n))


def side_by_side(summary: dict, teacher_label: str) -> list[str]:
    """One row a model: attention transfer (per-layer MSE after over before), held-out perplexity
    and passkey accuracy by length."""
    models = summary["models"]
    converted = {m: r["conversion"] for m, r in models.items() if "conversion" in r}
    if not converted:
        return []
    lengths = sorted({n for r in models.values() for n in r["passkey"]})
    lines = ["## Side by side", "",
             "Per-layer MSE: each layer's attention-output MSE after attention transfer over before it, on the "
             "blocks that stage held back from training (median and worst layer; layers at or under 0.2 of "
             "their initial MSE). Held-out perplexity: teacher-written text the training never saw.", "",
             "| model | per-layer MSE after / before: median | worst (layer) | layers <= 0.2 | held-out ppl | vs teacher | "
             + " | ".join(f"passkey {n}" for n in lengths) + " |",
             "|" + "---|" * (6 + len(lengths))]
    teacher_ppl = next((c["teacher_perplexity"] for c in converted.values() if c.get("teacher_perplexity")), None)
    for m, r in models.items():
        pk = [fmt(r["passkey"].get(n), 2) for n in lengths]
        if m not in converted:
            lines.append("| " + " | ".join([m, "", "", "", fmt(teacher_ppl) if m == teacher_label else "n/a", ""] + pk) + " |")
            continue
        c = converted[m]
        ratios = layer_ratios(c.get("validation_layer_mse") or {})
        med = f"{ratios[len(ratios) // 2][0]:.3f}" if ratios else "n/a"
        worst = f"{ratios[-1][0]:.3f} ({ratios[-1][1]})" if ratios else "n/a"
        under = f"{sum(x <= 0.2 for x, _ in ratios)} / {len(ratios)}" if ratios else "n/a"
        sp, tp = c.get("student_perplexity"), c.get("teacher_perplexity")
        rel = ratio(sp, tp)
        lines.append("| " + " | ".join([m, med, worst, under, fmt(sp), "n/a" if rel is None else f"{rel:.3f}x"] + pk) + " |")
    return lines + [""]


def summarise(out: Path, teacher_label: str = "teacher") -> dict:
    suites = merged_suites(out, teacher_label)
    for folder, report in suites.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        write_report(report, out / folder)
    models: list[str] = []
    for report in suites.values():
        for m in report["models"]:
            if m not in models:
                models.append(m)
    models.sort(key=lambda m: (m != teacher_label, m))
    zs = suites.get("eval-zeroshot")
    few = {f"{t}:{k}": suites.get(f"eval-{t}-{k}shot") for t, k in FEW_SHOT}
    wiki, passkey, niah = suites.get("eval-wikitext"), suites.get("eval-passkey"), suites.get("eval-niah")
    niah_tasks = sorted({t for e in (niah or {}).get("models", {}).values() for t in e.get("tasks", {})})
    summary: dict = {"models": {}}
    for m in models:
        row = {"zero_shot": {t: metric(zs, m, t) for t in ZERO_SHOT},
               "lambada_openai_ppl": metric(zs, m, "lambada_openai", "perplexity"),
               "few_shot": {k: metric(r, m, k.split(":")[0]) for k, r in few.items()},
               "wikitext_ppl": {}, "passkey": by_length(passkey, m, ["passkey"]),
               "niah": by_length(niah, m, niah_tasks) if niah_tasks else {}}
        for t, e in ((wiki or {}).get("models", {}).get(m, {}).get("tasks", {})).items():
            row["wikitext_ppl"][int(t.split("@")[1])] = e["metrics"]["ppl"]
        for part in ("zero_shot", "few_shot"):
            values = list(row[part].values())
            row[f"{part}_average"] = None if None in values or not values else sum(values) / len(values)
        convert = out / m / "report.json"
        if convert.is_file():
            c = json.loads(convert.read_text())
            row["conversion"] = {"stages": [{k: s.get(k) for k in ("stage", "steps", "tokens", "seconds", "tokens_per_second",
                                                                   "peak_memory_bytes", "perplexity")} for s in c["stages"]],
                                 "teacher_perplexity": c.get("teacher_perplexity"),
                                 "student_perplexity": c.get("student_perplexity"),
                                 "heldout_relative_error": [c.get("heldout_transfer", {}).get(w, {}).get("mean_relative_error")
                                                            for w in ("before", "after")],
                                 # each converted layer's held-out attention-output MSE, before and after training
                                 "layer_mse": {w: {int(i): v for i, v in c.get("heldout_transfer", {}).get(w, {}).get("mse", {}).items()}
                                               for w in ("before", "after")},
                                 # the same, on the blocks the last attention-transfer stage held back from its training
                                 "validation_layer_mse": validation_layer_mse(c)}
        summary["models"][m] = row
    summary["options"] = {k: r["options"] for k, r in suites.items()}
    (out / "headline.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "headline.md").write_text(markdown(summary, teacher_label))
    plot(summary, out / "accuracy_by_length.png")
    plot_layers(summary, out / "transfer_by_layer.png")
    return summary


def markdown(summary: dict, teacher_label: str) -> str:
    models = summary["models"]
    t = models.get(teacher_label, {})
    lines = side_by_side(summary, teacher_label)
    if any(v is not None for r in models.values() for v in r["zero_shot"].values()):
        lines += zero_shot_table(models, t)
    if any(v is not None for r in models.values() for v in r["few_shot"].values()):
        lines += few_shot_table(models, t)
    if any(r["wikitext_ppl"] for r in models.values()):
        lines += wikitext_table(models, t, teacher_label)
    return lines_after_lm_eval(summary, teacher_label, lines)


def zero_shot_table(models: dict, t: dict) -> list[str]:
    lines = ["## Zero-shot (lm-eval; acc, acc_norm for arc_challenge and hellaswag)", "",
             "| model | " + " | ".join(ZERO_SHOT) + " | lambada ppl | average | vs teacher |", "|" + "---|" * (len(ZERO_SHOT) + 4)]
    for m, r in models.items():
        rel = ratio(r["zero_shot_average"], t.get("zero_shot_average"))
        lines.append("| " + " | ".join([m] + [fmt(r["zero_shot"][k]) for k in ZERO_SHOT]
                                       + [fmt(r["lambada_openai_ppl"], 2), fmt(r["zero_shot_average"]),
                                          "n/a" if rel is None else f"{rel:.1%}"]) + " |")
    return lines + [""]


def few_shot_table(models: dict, t: dict) -> list[str]:
    heads = [f"{k.split(':')[0]} {k.split(':')[1]}-shot" for k in next(iter(models.values()))["few_shot"]] if models else []
    lines = ["## Few-shot (lm-eval)", "", "| model | " + " | ".join(heads) + " | average | vs teacher |",
              "|" + "---|" * (len(heads) + 3)]
    for m, r in models.items():
        rel = ratio(r["few_shot_average"], t.get("few_shot_average"))
        lines.append("| " + " | ".join([m] + [fmt(v) for v in r["few_shot"].values()]
                                       + [fmt(r["few_shot_average"]), "n/a" if rel is None else f"{rel:.1%}"]) + " |")
    return lines + [""]


def wikitext_table(models: dict, t: dict, teacher_label: str) -> list[str]:
    lengths = sorted({n for r in models.values() for n in r["wikitext_ppl"]})
    lines = ["## WikiText-2 (raw test) perplexity by context length", "",
              "| model | " + " | ".join(str(n) for n in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
    for m, r in models.items():
        cells = []
        for n in lengths:
            v, ref = r["wikitext_ppl"].get(n), t.get("wikitext_ppl", {}).get(n)
            cells.append(fmt(v, 2) + (f" ({v / ref:.2f}x)" if v is not None and ref and m != teacher_label else ""))
        lines.append("| " + " | ".join([m] + cells) + " |")
    return lines + [""]


def lines_after_lm_eval(summary: dict, teacher_label: str, lines: list[str]) -> str:
    models = summary["models"]
    if lines and lines[-1] == "":
        lines = lines[:-1]
    for key, title in (("passkey", "Passkey retrieval"), ("niah", "Needle in a haystack (single needle)")):
        lengths = sorted({n for r in models.values() for n in r[key]})
        if not lengths:
            continue
        lines += ["", f"## {title}: accuracy by context length (tokens)", "",
                  "| model | " + " | ".join(str(n) for n in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
        for m, r in models.items():
            lines.append("| " + " | ".join([m] + [fmt(r[key].get(n), 2) for n in lengths]) + " |")
    converted = {m: r["conversion"] for m, r in models.items() if "conversion" in r}
    if converted:
        lines += ["", "## Conversions", "", "| model | stage | steps | tokens | wall time (s) | tokens/s | peak GPU memory (GiB) | held-out ppl after |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, c in converted.items():
            for s in c["stages"]:
                peak = s.get("peak_memory_bytes")
                lines.append(f"| {m} | {s['stage']} | {s['steps']} | {s['tokens']:,} | {fmt(s['seconds'], 0)} | "
                             f"{fmt(s['tokens_per_second'], 0)} | {'n/a' if peak is None else f'{peak / 2**30:.1f}'} | "
                             f"{fmt(s.get('perplexity'))} |")
        lines += ["", "| model | teacher held-out ppl | student held-out ppl | ratio | attention error before -> after |", "|---|---|---|---|---|"]
        for m, c in converted.items():
            tp, sp = c["teacher_perplexity"], c["student_perplexity"]
            before, after = c["heldout_relative_error"]
            lines.append(f"| {m} | {fmt(tp)} | {fmt(sp)} | {fmt(ratio(sp, tp))}x | {fmt(before)} -> {fmt(after)} |")
        layered = {m: c["layer_mse"] for m, c in converted.items() if c.get("layer_mse", {}).get("after")}
        if layered:
            lines += ["", "Held-out attention-output MSE by layer, after training over before "
                      "(min / median / max over the converted layers):", "",
                      "| model | min | median | max | worst layer |", "|---|---|---|---|---|"]
            for m, lm in layered.items():
                r = sorted((lm["after"][n] / lm["before"][n], n) for n in lm["after"] if lm["before"].get(n))
                if r:
                    lines.append(f"| {m} | {r[0][0]:.3f} | {r[len(r) // 2][0]:.3f} | {r[-1][0]:.3f} | {r[-1][1]} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    keys = [k for k in ("passkey", "niah") if any(r[k] for r in summary["models"].values())]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (m, r) in enumerate(summary["models"].items()):  # one colour a model in every panel
            if r[key]:
                ax.plot(list(r[key]), list(r[key].values()), marker="o", label=m, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title({"passkey": "passkey retrieval", "niah": "needle in a haystack"}[key])
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_layers(summary: dict, path: Path) -> None:
    """Each conversion's attention-output MSE by layer, after attention transfer over before, on
    the blocks that stage held back from training (as the side-by-side table)."""
    rows = {m: r["conversion"]["validation_layer_mse"] for m, r in summary["models"].items()
            if (r.get("conversion", {}).get("validation_layer_mse") or {}).get("after")}
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, m in enumerate(summary["models"]):
        if m in rows:
            layers = sorted(rows[m]["after"])
            ax.plot(layers, [rows[m]["after"][n] / rows[m]["before"][n] for n in layers], marker="o", label=m,
                    color=f"C{i % 10}", linestyle="-" if i < 10 else "--")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.axhline(0.2, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel("MSE after / before (held-back blocks)")
    ax.set_title("attention transfer by layer")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--teacher-label", default="teacher", help="the label of the model that is no converted folder")
    args = parser.parse_args(argv)
    summarise(args.out, args.teacher_label)
    print((args.out / "headline.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
