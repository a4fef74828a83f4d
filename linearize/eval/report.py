"""The report files of ``linearize eval``: ``report.json``, ``report.md`` and PNG plots
(matplotlib; skipped with a note when it is not installed)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

PRIMARY = ("accuracy", "acc", "ppl", "exact_match")
# The metric the literature reports for these lm-eval tasks (length-normalised accuracy, as in
# the LoLCATs and Hedgehog tables).
PREFERRED = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}


def primary_metric(metrics: dict, task: str | None = None) -> tuple[str, float] | None:
    for key in (PREFERRED.get(task),) + PRIMARY:
        if key in metrics and isinstance(metrics[key], (int, float)):
            return key, metrics[key]
    return None


def _all_metrics_table(report: dict, tasks: list[str]) -> list[str]:
    """lm-eval: every metric of every task (``value ± stderr``), one row a model."""
    columns = []
    for t in tasks:
        for entry in report["models"].values():
            for k in entry.get("tasks", {}).get(t, {}).get("metrics", {}):
                if not k.endswith("_stderr") and k != "sample_len" and (t, k) not in columns:
                    columns.append((t, k))
    lines = ["", "### every metric", "", "| " + " | ".join(["model"] + [f"{t} {k}" for t, k in columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for label, entry in report["models"].items():
        cells = []
        for t, k in columns:
            m = entry.get("tasks", {}).get(t, {}).get("metrics", {})
            value, err = m.get(k), m.get(f"{k}_stderr")
            cells.append("n/a" if value is None else _fmt(k, value) + (f" ± {_fmt(k, err)}" if isinstance(err, (int, float)) else ""))
        lines.append("| " + " | ".join([label] + cells) + " |")
    return lines


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if "perplexity" in name or name == "ppl" else f"{value:.3f}"


def tasks_of(report: dict) -> list[str]:
    tasks: list[str] = []
    for entry in report["models"].values():
        for t in entry["tasks"]:
            if t not in tasks:
                tasks.append(t)
    return tasks


def _by_length(metrics: dict) -> dict[int, float]:
    """A task's accuracy by context length, keyed by the length as a number: a report read back from
    JSON has string keys, which would sort as text (1024, 16384, 2048, ...)."""
    return {int(n): v for n, v in metrics.get("by", {}).get("length", {}).items()}


def markdown(report: dict) -> str:
    tasks = tasks_of(report)
    metric_names = {}
    for entry in report["models"].values():
        for t, r in entry["tasks"].items():
            p = primary_metric(r["metrics"], t)
            if p:
                metric_names.setdefault(t, p[0])
    head = ["model"] + [f"{t} ({metric_names.get(t, '')})" if metric_names.get(t) else t for t in tasks]
    accuracies = [t for t in tasks if metric_names.get(t) not in (None, "ppl")]
    average = report["suite"] == "lm-eval" and len(accuracies) > 1
    if average:
        head.append("average")
    lines = [f"## linearize eval: {report['suite']}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for label, entry in report["models"].items():
        if entry["status"] != "ok":
            cells = ["failed"] * (len(tasks) + average)
        else:
            cells, values = [], []
            for t in tasks:
                p = primary_metric(entry["tasks"][t]["metrics"], t) if t in entry["tasks"] else None
                cells.append(_fmt(p[0], p[1]) if p else "n/a")
                if t in accuracies:
                    values.append(p[1] if p else None)
            if average:  # over the accuracy tasks, only when the model has them all
                cells.append(_fmt("acc", sum(values) / len(values)) if None not in values else "n/a")
        lines.append("| " + " | ".join([label] + cells) + " |")
    if report["suite"] == "lm-eval":
        lines += _all_metrics_table(report, tasks)
    for label, entry in report["models"].items():
        if entry["status"] != "ok":
            lines += ["", f"**{label}** failed: {entry['error']}"]
    for t in tasks:  # accuracy by length, where a task has lengths
        lengths = sorted({v for e in report["models"].values() if t in e["tasks"]
                          for v in _by_length(e["tasks"][t]["metrics"])})
        if not lengths:
            continue
        lines += ["", f"### {t}: accuracy by length (tokens)", "",
                  "| model | " + " | ".join(str(n) for n in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
        for label, e in report["models"].items():
            by = _by_length(e["tasks"].get(t, {}).get("metrics", {}))
            lines.append("| " + " | ".join([label] + [_fmt("accuracy", by.get(n)) for n in lengths]) + " |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(report: dict, out) -> None:
    from .runner import jsonable

    out = Path(out)
    _atomic_write(out / "report.json", json.dumps(jsonable(report), indent=1) + "\n")
    _atomic_write(out / "report.md", markdown(report))
    try:
        import matplotlib
    except ImportError:
        print("linearize eval: matplotlib is not installed, no plots (pip install 'linearize[eval]')", file=sys.stderr)
        return
    matplotlib.use("Agg")
    plot_heatmaps(report, out)
    plot_perplexity(report, out)


def plot_heatmaps(report: dict, out: Path) -> list[Path]:
    """One PNG a task: accuracy over length x depth, one panel a model."""
    import matplotlib.pyplot as plt

    written = []
    for t in tasks_of(report):
        grids = {}
        for label, e in report["models"].items():
            rows = e["tasks"].get(t, {}).get("results", [])
            if not rows or not all("length" in r and "depth" in r and "correct" in r for r in rows):
                continue
            cells: dict = {}
            for r in rows:
                cells.setdefault((r["depth"], r["length"]), []).append(r["correct"])
            grids[label] = cells
        if not grids:
            continue
        fig, axes = plt.subplots(1, len(grids), figsize=(1.2 + 3.2 * len(grids), 3.2), squeeze=False)
        for ax, (label, cells) in zip(axes[0], grids.items()):
            depths = sorted({d for d, _ in cells})
            lengths = sorted({n for _, n in cells})
            grid = [[sum(cells[(d, n)]) / len(cells[(d, n)]) if (d, n) in cells else float("nan") for n in lengths]
                    for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("depth")
            ax.set_title(label if len(label) < 40 else "..." + label[-37:], fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
        fig.suptitle(t)
        path = out / f"{t}_heatmap.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def plot_perplexity(report: dict, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    series = {}
    for label, e in report["models"].items():
        rows = [r for t in e["tasks"].values() for r in t.get("results", []) if "ppl" in r and r.get("chunks")]
        if rows:
            series[label] = sorted(rows, key=lambda r: r["length"])
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, rows in series.items():
        line, = ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=f"{label} (all tokens)")
        ax.plot([r["length"] for r in rows], [r["ppl_last_quarter"] for r in rows], marker="x", linestyle="--",
                color=line.get_color(), label=f"{label} (last quarter)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # a model that breaks down past some length would flatten every other line
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=7)
    path = out / "ppl_by_length.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def merge_reports(reports: list[dict], labels: dict[str, str] | None = None) -> dict:
    """One report of a suite from several runs of it (e.g. the teacher scored in one process and
    the students in another): the models side by side, relabelled by ``labels`` (old -> new).
    The runs must share the suite and every option but the batch size, device and prefill chunk, which do not
    change a score; otherwise the scores would not compare and this raises ``ValueError``."""
    if not reports:
        raise ValueError("no reports to merge")
    labels = labels or {}
    loose = ("batch_size", "device", "prefill_chunk")
    first = reports[0]
    merged = {"suite": first["suite"], "options": dict(first["options"]), "models": {}}
    for r in reports:
        if r["suite"] != first["suite"]:
            raise ValueError(f"cannot merge a {r['suite']!r} report with a {first['suite']!r} one")
        a = {k: v for k, v in r["options"].items() if k not in loose}
        b = {k: v for k, v in first["options"].items() if k not in loose}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"{first['suite']} reports ran with different options ({', '.join(diff)}): "
                             "their scores do not compare")
        for label, entry in r["models"].items():
            new = labels.get(label, label)
            if new in merged["models"]:
                raise ValueError(f"model {new!r} is in two {first['suite']} reports")
            merged["models"][new] = entry
    return merged
