"""Writing a plan: the recipe (with the measurements in its header), plan.json, plan.md, plan.png."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

SIGNALS = {
    "kl": "KL(teacher || model with only this layer converted), nats per token",
    "transfer": "attention-transfer error ||y_student - y_teacher|| / ||y_teacher|| of the layer",
}


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _cost_cell(result: dict, value: int) -> str:
    unit = result["costs"]["unit"]
    if unit == "bytes":
        return f"{value / 2**20:.4g} MiB"
    if unit == "flops":
        return f"{value / 1e9:.4g} GFLOP"
    return f"{value} softmax layer" + ("" if value == 1 else "s")


def _uniform_costs(result: dict) -> bool:
    costs = result["costs"]["cost"]
    return all(row == costs[0] for row in costs)


def cost_line(result: dict) -> str:
    """Each option's cost per layer under the budget (when every layer's are the same)."""
    if not _uniform_costs(result):
        return "Cost per layer and option: in the table."
    row = result["costs"]["cost"][0]
    return "Cost per layer: " + ", ".join(f"{o['name']} {_cost_cell(result, row[k])}" for k, o in enumerate(result["options"])) + "."


def reasons(result: dict) -> list[str]:
    """Why each layer got its option: what the best plan *without* that choice there adds to the
    total predicted error (from the knapsack's per-layer, per-option optimum)."""
    out, names = [], [o["name"] for o in result["options"]]
    for i, o in enumerate(result["choice"]):
        row = result["best_with"][i]
        others = [(row[k], k) for k in range(len(row)) if k != o and row[k] is not None]
        if not others:
            out.append("the only option within the budget")
            continue
        value, k = min(others)
        out.append(f"next best: {names[k]}, +{value - row[o]:.3g} {result['signal']} in total")
    return out


def measured_signals(result: dict) -> list[str]:
    """The signals the plan's measurements hold (``kl`` is measured only for a plan that asks for it)."""
    return [signal for signal in SIGNALS if result["measured"].get(signal) is not None]


def plan_table(result: dict) -> str:
    """Per layer: each student option's signals (``kl / transfer``, or ``transfer`` alone), the choice and its reason
    (and each option's cost, where the layers' costs differ: else :func:`cost_line` says them)."""
    options = result["options"]
    students = [k for k, o in enumerate(options) if o["kind"] is not None]
    costs = result["costs"]["cost"]
    uniform = _uniform_costs(result)
    signals = measured_signals(result)
    head = ["layer"] + [f"{options[k]['name']}: {' / '.join(signals)}" for k in students] + ["choice", "reason"]
    rows = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    why = reasons(result)
    for i, o in enumerate(result["choice"]):
        cells = [str(i)]
        for k in students:
            cell = " / ".join(_num(result["measured"][signal][i][k]) for signal in signals)
            cells.append(cell if uniform else f"{cell} ({_cost_cell(result, costs[i][k])})")
        cells += [options[o]["name"] + ("" if uniform else f" ({_cost_cell(result, costs[i][o])})"), why[i]]
        rows.append(" | ".join(cells))
    return "\n".join(rows)


def summary(result: dict) -> str:
    c = result["calibration"]
    return (f"Budget: {result['budget']['text']}; this plan: {result['cost_text']}. "
            f"Chosen by {result['signal']}: predicted total {result['predicted_error']:.4g}. "
            f"Softmax layers: {result['softmax_layers']}. Measured after {c['steps']} attention-transfer steps "
            f"per option on {c['fit_blocks']} blocks of {c['seq_len']} tokens, on {c['signal_blocks']} held-back "
            f"blocks. {cost_line(result)}")


def planned_recipe(base: dict, result: dict) -> str:
    """The base recipe with ``students.layers`` (the layers to convert) and ``students.per_layer``
    (only where a layer's option differs from the recipe's own settings) set, as YAML with a
    header that shows the measurements and the reasons."""
    out = copy.deepcopy(base)
    out.pop("overrides", None)
    out["students"]["layers"] = result["converted_layers"]
    out["students"].pop("per_layer", None)
    if result["per_layer"]:
        out["students"]["per_layer"] = {int(i): dict(v) for i, v in result["per_layer"].items()}
    out["description"] = f"planned: {result['budget']['text']}; softmax layers {result['softmax_layers']}"
    header = [
        "# Written by `linearize plan`. Edit freely: students.layers lists the layers to convert (the others",
        "# keep softmax attention); students.per_layer gives a layer settings of its own.",
        *(f"# {line}" for line in _wrap(summary(result), 98)),
        *(f"# {signal}: {SIGNALS[signal]}." for signal in measured_signals(result)),
        "# reason: how much more predicted error the best plan without this layer's choice has.",
    ]
    header += [f"#   {line}" for line in plan_table(result).splitlines()]
    return "\n".join(header) + "\n" + yaml.safe_dump(out, sort_keys=False, default_flow_style=None, width=100)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def write_plan(out_dir, base: dict, result: dict) -> Path:
    """``recipe.yaml``, ``plan.json``, ``plan.md`` and ``plan.png`` in ``out_dir`` (atomically)."""
    from ..io import atomic_folder

    def write(tmp: Path):
        (tmp / "recipe.yaml").write_text(planned_recipe(base, result))
        (tmp / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
        table = "\n".join(f"| {line} |" for line in plan_table(result).splitlines())
        (tmp / "plan.md").write_text(f"# linearize plan\n\n{summary(result)}\n\n{table}\n\n![plan](plan.png)\n")
        plot(tmp / "plan.png", result)

    return atomic_folder(Path(out_dir), write)


def plot(path: Path, result: dict) -> None:
    """Each measured signal per layer and student option (log scale), the chosen option outlined, the
    layers kept softmax shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    options = result["options"]
    students = [k for k, o in enumerate(options) if o["kind"] is not None]
    L = len(result["choice"])
    width = 0.8 / len(students)
    signals = measured_signals(result)
    fig, axes = plt.subplots(len(signals), 1, figsize=(max(7, L * 0.35), 3 * len(signals)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, signal in zip(axes, signals):
        for i, o in enumerate(result["choice"]):
            if options[o]["kind"] is None:
                ax.axvspan(i - 0.45, i + 0.45, color="tab:red", alpha=0.12, lw=0)
        for n, k in enumerate(students):
            xs = [i - 0.4 + width * (n + 0.5) for i in range(L)]
            ys = [result["measured"][signal][i][k] for i in range(L)]
            edges = ["black" if result["choice"][i] == k else "none" for i in range(L)]
            ax.bar(xs, ys, width, label=options[k]["name"], edgecolor=edges, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_ylabel({"kl": "KL, nats/token", "transfer": "transfer error"}[signal]
                      + (" (chosen by)" if signal == result["signal"] else ""))
    axes[-1].set_xticks(range(L))
    axes[-1].set_xlabel("layer (shaded: kept softmax; outlined: the chosen option)")
    axes[0].legend(fontsize=8, ncol=min(4, len(students)))
    axes[0].set_title(f"plan: {result['budget']['text']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
