"""``linearize plan``: choose which layers to convert, from measurements, under a budget.

1. Measure. Every layer is converted to the recipe's student and fitted by a short attention
   transfer on calibration blocks (the recipe's first stage data); each layer's attention-transfer
   error ``||y_student - y_teacher|| / ||y_teacher||`` on held-back blocks is what converting it
   would cost. Layers train independently in attention transfer (each sees teacher inputs), so
   one joint fit measures them all.
2. Budget. How many layers may stay softmax:

   * ``softmax-layers=N`` (or ``=25%``): exactly that many;
   * ``kv-memory=SIZE@CONTEXT`` (``64MiB@32768``): the decode cache of one sequence at CONTEXT
     tokens must fit SIZE; a softmax layer holds ``2 x CONTEXT x kv_heads x head_dim`` values, a
     student layer its fixed state (measured on the converted model);
   * ``prefill=RATIO@CONTEXT`` (``0.5@16384``): the prefill cost at CONTEXT tokens, relative to
     the teacher, must stay within RATIO. Cost is counted in FLOPs from the model's shapes
     (projections, MLP, causal softmax attention ``2 T^2 H d``, the student's feature maps,
     window and linear state), not timed, so a plan is deterministic.

3. Choose. The layers with the largest error stay softmax, as many as the budget allows (ties
   go to the lower index). The plan is a recipe: the base recipe with ``students.layers`` set
   to the layers to convert, and a header that shows the measurements and the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml


class BudgetError(ValueError):
    """A budget that cannot be parsed or cannot be met (the message names the limit)."""


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass
class Budget:
    kind: str  # softmax_layers | kv_memory | prefill
    value: float  # layers (count, or fraction when fraction=True) | bytes | ratio
    context: int | None = None
    fraction: bool = False

    def describe(self) -> str:
        if self.kind == "softmax_layers":
            return f"{self.value:.0%} of the layers softmax" if self.fraction else f"{int(self.value)} softmax layers"
        if self.kind == "kv_memory":
            return f"decode cache <= {self.value / 2**20:.1f} MiB at {self.context} tokens"
        return f"prefill cost <= {self.value:g}x the teacher's at {self.context} tokens"


def parse_budget(text: str) -> Budget:
    """``softmax-layers=4`` | ``softmax-layers=25%`` | ``kv-memory=64MiB@32768`` | ``prefill=0.5@16384``."""
    m = re.fullmatch(r"\s*([a-z-]+)\s*=\s*([^@]+?)\s*(?:@\s*(\d+))?\s*", text or "")
    usage = "softmax-layers=N (or N%), kv-memory=SIZE@CONTEXT (e.g. 64MiB@32768), prefill=RATIO@CONTEXT (e.g. 0.5@16384)"
    if not m:
        raise BudgetError(f"cannot read budget {text!r}; use {usage}")
    kind, value, context = m.group(1), m.group(2), m.group(3)
    if kind == "softmax-layers":
        if context:
            raise BudgetError(f"budget {text!r}: softmax-layers takes no @CONTEXT")
        if value.endswith("%"):
            return Budget("softmax_layers", _number(value[:-1], text) / 100, fraction=True)
        v = _number(value, text)
        if v < 0:
            raise BudgetError(f"budget {text!r}: the number of softmax layers must be >= 0")
        return Budget("softmax_layers", v, fraction=not float(v).is_integer() and v < 1)
    if kind in ("kv-memory", "prefill"):
        if not context:
            raise BudgetError(f"budget {text!r} needs the context length it applies at: {kind}=...@CONTEXT")
        if kind == "kv-memory":
            u = re.fullmatch(r"([0-9.]+)\s*([a-zA-Z]*)", value)
            if not u or u.group(2).lower() not in _UNITS:
                raise BudgetError(f"budget {text!r}: size like 64MiB, 1.5GB or 300000 (bytes)")
            return Budget("kv_memory", float(u.group(1)) * _UNITS[u.group(2).lower()], int(context))
        return Budget("prefill", _number(value, text), int(context))
    raise BudgetError(f"unknown budget kind {kind!r}; use {usage}")


def _number(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise BudgetError(f"budget {text!r}: {value!r} is not a number") from None


# ---------------------------------------------------------------------------------- cost models
@dataclass
class LayerCosts:
    """What one layer costs as softmax and as a student (all layers of these models share shapes)."""

    num_layers: int
    kv_bytes_per_token: float  # softmax layer: keys + values of one token
    student_state_bytes: float  # student layer: its whole decode state
    flops_other: callable  # T -> projections + MLP of one layer
    flops_softmax: callable  # T -> causal softmax attention of one layer
    flops_student: callable  # T -> the student's attention of one layer


def layer_costs(model, spec, student_state_bytes: float) -> LayerCosts:
    c = model.config
    d, H, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or d // H
    ffn = c.intermediate_size
    bytes_per = torch.finfo(next(model.parameters()).dtype).bits // 8
    settings = spec.student_config()
    F = 2 * (getattr(settings, "feature_dim", None) or hd)  # Hedgehog/NP-Map: [softmax(xW), softmax(-xW)]
    W = getattr(settings, "window_size", 0) if spec.kind == "lolcats" else 0

    def other(T):
        return 2 * T * (d * H * hd + 2 * d * kv * hd + H * hd * d) + 2 * T * 3 * d * ffn

    def softmax(T):
        return 2 * T * T * H * hd  # QK^T and AV over the causal half

    def student(T):
        maps = 2 * 2 * T * H * hd * (F // 2)  # q and k feature maps
        linear = 2 * 2 * T * H * F * hd  # state update and read-out
        window = 2 * 2 * T * min(W, T) * H * hd
        return maps + linear + window

    return LayerCosts(c.num_hidden_layers, 2 * kv * hd * bytes_per, student_state_bytes, other, softmax, student)


def max_softmax_layers(budget: Budget, costs: LayerCosts) -> int:
    """The most layers that may stay softmax under ``budget`` (raises if none fits)."""
    L = costs.num_layers
    if budget.kind == "softmax_layers":
        m = round(budget.value * L) if budget.fraction else int(budget.value)
        if m > L:
            raise BudgetError(f"budget of {m} softmax layers exceeds the model's {L} layers")
        return m
    if budget.kind == "kv_memory":
        per_softmax = costs.kv_bytes_per_token * budget.context
        floor = L * costs.student_state_bytes
        if budget.value < floor:
            raise BudgetError(
                f"kv-memory limit {budget.value / 2**20:.2f} MiB is below what converting every layer needs: "
                f"{floor / 2**20:.2f} MiB of student state"
            )
        if per_softmax <= costs.student_state_bytes:
            return L
        return min(L, int((budget.value - floor) // (per_softmax - costs.student_state_bytes)))
    T = budget.context
    soft, stud, other = costs.flops_softmax(T), costs.flops_student(T), costs.flops_other(T)
    teacher = L * (other + soft)
    lowest = L * (other + stud) / teacher
    if budget.value < min(lowest, 1.0) - 1e-12:
        raise BudgetError(
            f"prefill ratio {budget.value:g} at {T} tokens is below the cheapest plan's {min(lowest, 1.0):.3f} "
            f"(every layer {'converted' if lowest < 1 else 'softmax'})"
        )
    if soft <= stud:  # at this length softmax is the cheaper layer
        return L
    return min(L, int(math.floor((budget.value * teacher - L * (other + stud)) / (soft - stud) + 1e-9)))


def plan_cost(softmax_layers: int, budget: Budget, costs: LayerCosts) -> float:
    """The budgeted quantity of a plan with ``softmax_layers`` softmax layers."""
    L, m = costs.num_layers, softmax_layers
    if budget.kind == "softmax_layers":
        return m
    if budget.kind == "kv_memory":
        return m * costs.kv_bytes_per_token * budget.context + (L - m) * costs.student_state_bytes
    T = budget.context
    soft, stud, other = costs.flops_softmax(T), costs.flops_student(T), costs.flops_other(T)
    return (L * other + m * soft + (L - m) * stud) / (L * (other + soft))


def choose_layers(errors: dict[int, float], m: int) -> list[int]:
    """The ``m`` layers with the largest error (ties: lower index first), sorted."""
    order = sorted(errors, key=lambda i: (-errors[i], i))
    return sorted(order[:m])


# ---------------------------------------------------------------------------------- measuring
def transfer_stage(recipe):
    """The recipe's first attention_transfer stage: its data and settings calibrate the plan."""
    stage = next((s for s in recipe.stages if s.stage == "attention_transfer"), None)
    if stage is None:
        raise ValueError("planning needs a recipe with an attention_transfer stage (its data and settings)")
    return stage


def measure_layers(model, adapter, recipe, blocks, calibration_steps: int, seed: int = 0, log=print) -> dict:
    """Convert every layer, fit briefly, and measure each layer's held-out transfer error."""
    from .cache import student_cache_layer
    from .convert import ConversionSpec, convert_model
    from .stages.attention_transfer import AttentionTransfer, measure_transfer

    spec = ConversionSpec(recipe.students.kind, "all", recipe.students.settings)
    convert_model(model, spec)
    stage = transfer_stage(recipe)
    held = max(1, min(stage.val_blocks or 4, len(blocks) // 4))
    fit = dataclasses.replace(stage, steps=calibration_steps, tokens=None, val_blocks=0, eval_every=0, checkpoint_every=0)
    before = measure_transfer(model, adapter, blocks[:held], stage.batch_size)
    AttentionTransfer(fit, model, adapter, blocks[held:], seed=seed, log=log).run()
    after = measure_transfer(model, adapter, blocks[:held], stage.batch_size)
    # one student layer's decode state, measured
    from transformers import DynamicCache

    import inspect

    cache = DynamicCache(config=model.config)
    length = getattr(spec.student_config(), "window_size", 0) + 8
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.2x
    with torch.no_grad():
        ids = blocks.input_ids[:1, :length].to(next(model.parameters()).device)
        model(input_ids=ids, use_cache=True, **{key: cache})
    state_bytes = student_cache_layer(cache, 0).nbytes()
    return {"spec": spec, "before": before["relative_error"], "after": after["relative_error"], "state_bytes": state_bytes}


def plan(recipe, budget: Budget, measured: dict, costs: LayerCosts) -> dict:
    errors = measured["after"]
    m = max_softmax_layers(budget, costs)
    softmax = choose_layers(errors, m)
    converted = [i for i in range(costs.num_layers) if i not in softmax]
    return {
        "budget": dataclasses.asdict(budget) | {"text": budget.describe()},
        "student": recipe.students.kind,
        "softmax_layers": softmax,
        "converted_layers": converted,
        "cost": plan_cost(len(softmax), budget, costs),
        "errors_before": {int(k): v for k, v in measured["before"].items()},
        "errors_after": {int(k): v for k, v in errors.items()},
        "student_state_bytes": costs.student_state_bytes,
        "kv_bytes_per_token": costs.kv_bytes_per_token,
    }


def plan_table(result: dict) -> str:
    rows = ["layer | error after fit | choice", "----- | --------------- | ------"]
    for i in sorted(result["errors_after"]):
        choice = "softmax (largest errors)" if i in result["softmax_layers"] else result["student"]
        rows.append(f"{i:>5} | {result['errors_after'][i]:15.4f} | {choice}")
    return "\n".join(rows)


def planned_recipe(base: dict, result: dict) -> str:
    """The base recipe with ``students.layers`` set, as YAML with a header that explains it."""
    out = copy.deepcopy(base)
    out.pop("overrides", None)
    out["students"]["layers"] = result["converted_layers"]
    out["description"] = f"planned: {result['budget']['text']}; softmax layers {result['softmax_layers']}"
    header = [
        "# Written by `linearize plan`. Edit freely: students.layers lists the layers to convert;",
        "# the others keep softmax attention.",
        f"# Budget: {result['budget']['text']}; this plan uses {_cost_text(result)}.",
        "# Per layer, the held-out attention-transfer error after a short fit (largest stay softmax):",
    ]
    header += [f"#   {line}" for line in plan_table(result).splitlines()]
    return "\n".join(header) + "\n" + yaml.safe_dump(out, sort_keys=False)


def _cost_text(result: dict) -> str:
    kind, cost = result["budget"]["kind"], result["cost"]
    if kind == "softmax_layers":
        return f"{int(cost)} softmax layers"
    if kind == "kv_memory":
        return f"{cost / 2**20:.2f} MiB of decode cache"
    return f"{cost:.3f}x the teacher's prefill FLOPs"


def write_plan(out_dir: Path, base: dict, result: dict) -> Path:
    from .io import atomic_folder

    def write(tmp: Path):
        (tmp / "recipe.yaml").write_text(planned_recipe(base, result))
        (tmp / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "plan.md").write_text("# linearize plan\n\n" + f"Budget: {result['budget']['text']} "
                                     f"(this plan: {_cost_text(result)}).\n\n| " +
                                     plan_table(result).replace("\n", " |\n| ") + " |\n")
        _plot(tmp / "plan.png", result)

    return atomic_folder(out_dir, write)


def _plot(path: Path, result: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    layers = sorted(result["errors_after"])
    errs = [result["errors_after"][i] for i in layers]
    colors = ["tab:red" if i in result["softmax_layers"] else "tab:blue" for i in layers]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.3), 3.5))
    ax.bar(layers, errs, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("transfer error after fit")
    ax.set_title(f"plan: red stay softmax ({result['budget']['text']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_plan(model_name, base_recipe, budget_text: str, out_dir, calibration_steps: int = 10, device=None, log=print):
    """Measure, choose and write a plan. Returns ``(result, recipe_path)``."""
    from .architectures import adapter_for
    from .data import build_blocks
    from .models import load_teacher
    from .pipeline import pick_device, seed_everything

    budget = parse_budget(budget_text)
    seed_everything(base_recipe.seed)
    model, tokenizer, source = load_teacher(model_name or base_recipe.model, dtype=base_recipe.precision,
                                            device=pick_device(device or base_recipe.device))
    stage = transfer_stage(base_recipe)
    blocks = build_blocks(stage.data, tokenizer, stage.seq_len, model, source.reference)
    measured = measure_layers(model, adapter_for(model.config), base_recipe, blocks, calibration_steps, base_recipe.seed, log)
    costs = layer_costs(model, measured["spec"], measured["state_bytes"])
    result = plan(base_recipe, budget, measured, costs)
    base = base_recipe.to_dict()
    if model_name:
        base["model"] = model_name
    folder = write_plan(Path(out_dir), base, result)
    log(plan_table(result))
    log(f"budget: {budget.describe()}; plan: {_cost_text(result)}; softmax layers {result['softmax_layers']}")
    log(f"plan written to {folder}/recipe.yaml")
    return result, folder / "recipe.yaml"
