"""``linearize plan``: choose, layer by layer, softmax or a student with its settings, from
measurements, under a budget the user states.

1. Options (:mod:`.budget`). Each layer may stay softmax or become the recipe's student with one
   of the candidate settings (``--candidates window_size=16,64,256``; several keys make a grid;
   without candidates, the recipe's own settings).
2. Measure (:mod:`.measure`). For each student option, every layer is converted to it and fitted
   by a short joint attention transfer on the recipe's own data; on held-back blocks each layer
   gets its attention-transfer error (the default signal) and, for ``--signal kl``, the KL
   divergence of the model's next-token distribution, with only that layer converted, from the
   teacher's. Each option's
   decode state is measured too.
3. Cost (:mod:`.budget`). Under the budget every option of every layer has an integer cost
   (softmax layers, bytes of decode cache, or prefill FLOPs) and the budget a capacity.
4. Choose (:mod:`.choose`). One option per layer minimising the total predicted error (the
   chosen signal summed over layers; softmax adds none) with the total cost within the
   capacity: a multiple-choice knapsack, solved exactly by dynamic programming over Pareto
   frontiers.
5. Write (:mod:`.report`). A recipe (``students.layers``, ``students.per_layer``) whose header
   shows every measurement and the reason for each choice; ``plan.json``, ``plan.md``,
   ``plan.png``.

Summing per-layer signals assumes the layers' errors add up; the README's comparison measures
how well each signal's plan does once converted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .budget import (
    SOFTMAX,
    Budget,
    BudgetError,
    Costs,
    Option,
    PlanError,
    Shapes,
    budget_costs,
    describe_cost,
    describe_limit,
    parse_budget,
    parse_candidates,
    softmax_layer_limit,
)
from .choose import Solution, cheapest_choice, solve
from .measure import (
    default_calibration,
    layer_signals,
    layer_kl_reference,
    measure_option,
    option_state_bytes,
    split_calibration,
    transfer_stage,
)
from .report import plan_table, planned_recipe, reasons, write_plan

SIGNAL_NAMES = ("kl", "transfer")
# The transfer error: on the bundled teacher its plans came closer to the teacher once converted
# than the KL signal's at 2 and 4 softmax layers (README, "Planning"), and it costs a fraction of the KL.
DEFAULT_SIGNAL = "transfer"

__all__ = [
    "Budget", "BudgetError", "Costs", "Option", "PlanError", "SIGNAL_NAMES", "Shapes", "Solution", "budget_costs",
    "cheapest_choice", "default_calibration", "layer_kl_reference", "layer_signals", "make_plan", "parse_budget",
    "parse_candidates", "plan_table", "planned_recipe", "reasons", "run_plan", "softmax_layer_limit", "solve",
]


def _describe_choice(options: list[Option], choice: list[int]) -> str:
    names = [options[o].name for o in choice]
    if len(set(names)) == 1:
        return f"every layer {names[0]}"
    groups = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    return "; ".join(f"{n} on layers {ls}" for n, ls in groups.items())


def check_feasible(budget: Budget, shapes: Shapes, options: list[Option], costs: Costs) -> None:
    """Raise :class:`BudgetError` naming the limit and the cheapest plan when even that exceeds it."""
    cheapest = cheapest_choice(costs)
    least = costs.total(cheapest)
    if least > costs.capacity:
        raise BudgetError(
            f"{describe_limit(budget, shapes, costs.capacity)} is below the cheapest plan's "
            f"{describe_cost(budget, shapes, least)} ({_describe_choice(options, cheapest)})"
        )


def make_plan(budget: Budget, shapes: Shapes, options: list[Option], measured: dict, signal: str) -> dict:
    """Cost every option, solve the knapsack on ``measured[signal]`` and describe the plan.

    ``measured``: ``{"transfer" | "kl": [layer][option] errors (softmax 0), "state_bytes":
    [layer][option] (softmax None)}``. Returns the plan as a JSON-ready dict."""
    if signal not in SIGNAL_NAMES:
        raise PlanError(f"--signal {signal!r}: choose one of {', '.join(SIGNAL_NAMES)}")
    costs = budget_costs(budget, shapes, options, measured["state_bytes"])
    check_feasible(budget, shapes, options, costs)
    solution = solve(costs, measured[signal])
    choice = solution.choice
    softmax = [i for i, o in enumerate(choice) if options[o].is_softmax]
    return {
        "budget": dataclasses.asdict(budget) | {"text": budget.describe()},
        "signal": signal,
        "student": next(o.kind for o in options if not o.is_softmax),
        "options": [dataclasses.asdict(o) for o in options],
        "measured": measured,
        "costs": {"cost": costs.cost, "capacity": costs.capacity, "unit": costs.unit},
        "choice": choice,
        "best_with": [[None if v == float("inf") else v for v in row] for row in solution.best_with],
        "predicted_error": solution.error,
        "cost": solution.cost,
        "cost_text": describe_cost(budget, shapes, solution.cost),
        "limit_text": describe_limit(budget, shapes, costs.capacity),
        "softmax_layers": softmax,
        "converted_layers": [i for i in range(len(choice)) if i not in softmax],
        "per_layer": {i: options[o].overrides for i, o in enumerate(choice) if not options[o].is_softmax and options[o].overrides},
    }


# ---------------------------------------------------------------------------------- the command
def _measured_with(model_reference: str, recipe, options: list[Option], steps, signal_blocks) -> dict:
    """What the measurements depend on: a plan may reuse another's only if all of it is equal."""
    stage = transfer_stage(recipe)
    return {"model": model_reference, "seed": recipe.seed, "precision": recipe.precision,
            "students": {"kind": recipe.students.kind, **recipe.students.settings},
            "stage": json.loads(json.dumps(dataclasses.asdict(stage))), "calibration_steps": steps,
            "signal_blocks": signal_blocks, "options": [o.name for o in options]}


def _reuse(folder, key: dict) -> dict:
    path = Path(folder) / "plan.json"
    if not path.is_file():
        raise PlanError(f"--reuse {folder}: no plan.json there (the folder `linearize plan --out` wrote)")
    old = json.loads(path.read_text())
    differs = sorted(k for k in key if old.get("measured_with", {}).get(k) != key[k])
    if differs:
        raise PlanError(f"--reuse {folder}: its measurements were made with other {', '.join(differs)}; "
                        "plan with the same model, recipe, candidates and calibration steps, or measure anew")
    return old


def _check_base(recipe) -> None:
    if recipe.students.per_layer:
        raise PlanError("the base recipe sets students.per_layer; the planner chooses per-layer settings itself: "
                        "remove it, or give the settings to compare as --candidates")
    transfer_stage(recipe)


def estimate_conversion_seconds(recipe, fit_step_seconds: float, forward_token_seconds: float) -> float:
    """A conversion's time from the plan's own measurements: attention-transfer steps at the
    fit's seconds a step (scaled by tokens a step), a LoRA step as four forward passes of its
    tokens (the teacher's for the KL target, the student's, its backward as two), validations
    and held-out evaluations as forward passes."""
    from ..training import total_steps

    first = transfer_stage(recipe)
    first_tokens = first.batch_size * first.grad_accum * first.seq_len
    seconds = 0.0
    for stage in recipe.stages:
        steps, tokens = total_steps(stage), stage.batch_size * stage.grad_accum * stage.seq_len
        checks = (steps // stage.eval_every if stage.eval_every else 0) + 2 if stage.val_blocks else 0
        val_tokens = checks * stage.val_blocks * stage.seq_len
        if stage.stage == "attention_transfer":
            seconds += steps * fit_step_seconds * tokens / first_tokens + val_tokens * forward_token_seconds
        else:
            kl = getattr(stage, "loss", "ce") == "kl"
            seconds += steps * tokens * forward_token_seconds * (4 if kl else 3) + val_tokens * forward_token_seconds * (2 if kl else 1)
    if recipe.eval is not None:  # the teacher's and each stage's perplexity, the held-out transfer error twice
        seconds += (3 + len(recipe.stages)) * recipe.eval.max_blocks * recipe.eval.seq_len * forward_token_seconds
    return seconds


def run_plan(model_name, base_recipe, budget_text: str, out_dir, candidates=(), signal: str | None = None,
             calibration_steps: int | None = None, signal_blocks: int | None = None, device=None, reuse=None,
             log=print):
    """Measure (or reuse the measurements in ``reuse``), choose and write a plan.
    ``calibration_steps`` (fit steps per option) and ``signal_blocks`` (held-back blocks the
    signals are measured on) default to :func:`default_calibration`. Returns ``(result, recipe_path)``."""
    from ..data import build_blocks
    from ..models import load_teacher
    from ..pipeline import pick_device, seed_everything

    started = time.perf_counter()
    budget = parse_budget(budget_text)
    signal = signal or DEFAULT_SIGNAL
    if signal not in SIGNAL_NAMES:
        raise PlanError(f"--signal {signal!r}: choose one of {', '.join(SIGNAL_NAMES)}")
    _check_base(base_recipe)
    options = [SOFTMAX] + parse_candidates(candidates, base_recipe.students.kind, base_recipe.students.settings)
    for name, value in (("--calibration-steps", calibration_steps), ("--signal-blocks", signal_blocks)):
        if value is not None and value < 1:
            raise PlanError(f"{name} must be >= 1, got {value}")
    seed_everything(base_recipe.seed)
    model, tokenizer, source = load_teacher(model_name or base_recipe.model, dtype=base_recipe.precision,
                                            device=pick_device(device or base_recipe.device))
    shapes = Shapes.of(model)
    if budget.kind == "softmax_layers":
        softmax_layer_limit(budget, shapes.num_layers)  # an impossible count stops here
    stage = transfer_stage(base_recipe)
    blocks = build_blocks(stage.data, tokenizer, stage.seq_len, model, source.reference, log=log)
    fit_blocks, held = split_calibration(stage, blocks)
    steps, default_blocks = default_calibration(base_recipe, shapes.num_layers, len(options) - 1, len(held))
    steps, signal_blocks = calibration_steps or steps, min(len(held), signal_blocks or default_blocks)
    key = _measured_with(source.reference, base_recipe, options, steps, signal_blocks)
    if reuse:
        old = _reuse(reuse, key)
        if old["measured"].get(signal) is None:
            raise PlanError(f"--reuse {reuse}: its measurements have no {signal} signal (that plan chose by "
                            f"{old['signal']}); measure anew with --signal {signal}, which measures both")
        measured, calibration, timing = old["measured"], old["calibration"], dict(old["timing"])
        timing["reused"] = str(reuse)
        check_feasible(budget, shapes, options, budget_costs(budget, shapes, options, measured["state_bytes"]))
    else:
        measured, calibration, timing = _measure(model, base_recipe, budget, shapes, options, fit_blocks,
                                                 held[:signal_blocks], steps, log, kl=signal == "kl")
    result = make_plan(budget, shapes, options, measured, signal)
    result["calibration"], result["measured_with"] = calibration, key
    timing["plan_seconds"] = time.perf_counter() - started
    timing["estimated_conversion_seconds"] = estimate_conversion_seconds(
        base_recipe, timing["fit_step_seconds"], timing["forward_token_seconds"])
    result["timing"] = timing
    base = base_recipe.to_dict()
    if model_name:
        base["model"] = model_name
    folder = write_plan(Path(out_dir), base, result)
    log(plan_table(result))
    log(f"budget: {budget.describe()}; plan: {result['cost_text']}; softmax layers {result['softmax_layers']}; "
        f"predicted {signal} {result['predicted_error']:.4g}")
    log(f"plan written to {folder}/recipe.yaml")
    log(f"plan time {timing['plan_seconds']:.0f}s; the conversion of this recipe takes about "
        f"{timing['estimated_conversion_seconds']:.0f}s (estimated from the plan's step and forward times): "
        f"{timing['plan_seconds'] / timing['estimated_conversion_seconds']:.1%}")
    return result, folder / "recipe.yaml"


def _measure(model, recipe, budget, shapes, options, fit_blocks, held, steps, log, kl: bool = True):
    """State sizes first (an impossible memory budget stops before any fit), then each option's
    fit on ``fit_blocks`` and its signals on ``held`` (the KL only with ``kl``: ``measured["kl"]``
    is None without it). Returns ``(measured, calibration, timing)``."""
    from ..architectures import adapter_for

    adapter = adapter_for(model.config)
    stage = transfer_stage(recipe)
    L, O = shapes.num_layers, len(options)
    state = [[None] * O for _ in range(L)]
    for k, option in enumerate(options):
        if not option.is_softmax:
            for i, b in option_state_bytes(model, option, fit_blocks.input_ids).items():
                state[i][k] = b
    measured = {"transfer": [[0.0] * O for _ in range(L)], "kl": [[0.0] * O for _ in range(L)] if kl else None,
                "state_bytes": state}
    check_feasible(budget, shapes, options, budget_costs(budget, shapes, options, state))
    fit_seconds = forward_seconds = 0.0
    for k, option in enumerate(options):
        if option.is_softmax:
            continue
        what = "both signals" if kl else "the transfer error"
        log(f"measuring {option.name}: {steps} attention-transfer steps, then {what} on {len(held)} held-back blocks")
        m = measure_option(model, adapter, recipe, option, fit_blocks, held, steps, log=log, kl=kl)
        for signal in SIGNAL_NAMES if kl else ("transfer",):
            for i, v in m[signal].items():
                measured[signal][i][k] = v
        fit_seconds += m["seconds"]["fit"]
        forward_seconds += m["seconds"]["teacher_forward"]
    students = O - 1
    calibration = {"steps": steps, "fit_blocks": len(fit_blocks), "signal_blocks": len(held), "seq_len": stage.seq_len,
                   "batch_size": stage.batch_size}
    timing = {"fit_seconds": fit_seconds, "fit_step_seconds": fit_seconds / (steps * students),
              "forward_token_seconds": forward_seconds / (students * held.tokens())}
    return measured, calibration, timing
