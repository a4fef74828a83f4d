"""Budgets, the options a layer can take, and what each option costs under a budget.

A layer's options are ``softmax`` (the teacher's attention, kept) and one student per candidate
setting (the recipe's student with the candidate's settings). A budget turns every option of
every layer into a cost and gives the capacity the plan's total cost must not exceed:

* ``softmax-layers=N`` (or ``=25%``): a softmax layer costs 1, a student 0; capacity N (a share
  is rounded to whole layers). Student settings are free under this budget.
* ``kv-memory=SIZE@CONTEXT`` (``48MiB@32768``): the decode cache of one sequence at CONTEXT
  tokens. A softmax layer holds ``2 x CONTEXT x kv_heads x head_dim`` values (keys and values,
  in the model's dtype); a student layer its decode state, *measured* on the converted model
  (:func:`linearize.plan.measure.state_bytes`), which grows with the window.
* ``prefill=RATIO@CONTEXT`` (``0.5@16384``): the prefill FLOPs of one sequence of CONTEXT
  tokens relative to the teacher's. FLOPs are counted from the model's shapes (below), not
  timed, so a plan is deterministic; the projections and the MLP cost the same under every
  option, so only the attention enters the per-layer costs.

Costs are integers (layers, bytes, FLOPs), so sums are exact and "within the budget" is an
exact comparison.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from fractions import Fraction

import yaml


class PlanError(ValueError):
    """A planning request that cannot be served (the message names the argument and the fix)."""


class BudgetError(PlanError):
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
            return f"decode cache <= {self.value / 2**20:.4g} MiB at {self.context} tokens"
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


# ---------------------------------------------------------------------------------- options
@dataclass
class Option:
    """One choice for a layer: softmax (``kind`` None), or a student with its full settings.
    ``overrides`` is what differs from the recipe's own settings (what ``per_layer`` records)."""

    name: str
    kind: str | None
    settings: dict = dataclasses.field(default_factory=dict)
    overrides: dict = dataclasses.field(default_factory=dict)

    @property
    def is_softmax(self) -> bool:
        return self.kind is None


SOFTMAX = Option("softmax", None)


def parse_candidates(texts, kind: str, settings: dict) -> list[Option]:
    """The student options from ``--candidates`` texts, each ``KEY=V1,V2,...``; several keys make
    a grid (their product, in the order given). Values are read as YAML (``16``, ``null``,
    ``npmap``). Without texts, the recipe's own settings are the one option.

    >>> [o.name for o in parse_candidates(["window_size=16,64"], "lolcats", {"window_size": 64})]
    ['window_size=16', 'window_size=64']
    """
    from ..recipe import RecipeError, _parse_student_settings
    from ..students import STUDENTS

    config_cls = STUDENTS[kind].Config
    allowed = [f.name for f in dataclasses.fields(config_cls)]
    axes: dict[str, list] = {}
    for text in texts or []:
        key, sep, values = str(text).partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise PlanError(f"--candidates {text!r}: expected KEY=V1,V2,..., e.g. window_size=16,64,256")
        if key not in allowed:
            raise PlanError(f"--candidates {text!r}: {kind} has no setting {key!r}; its settings are {', '.join(allowed)}")
        if key in axes:
            raise PlanError(f"--candidates: {key!r} is given twice; list all its values once: {key}=V1,V2,...")
        parsed = [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]
        if len(set(map(repr, parsed))) != len(parsed):
            raise PlanError(f"--candidates {text!r}: a value is listed twice")
        axes[key] = parsed
    options = []
    for values in itertools.product(*axes.values()):
        overrides = {k: v for k, v in zip(axes, values) if settings.get(k) != v}
        merged = {**settings, **dict(zip(axes, values))}
        name = " ".join(f"{k}={v}" for k, v in zip(axes, values)) or kind
        try:
            config = _parse_student_settings(config_cls, merged, "--candidates", "students")
        except RecipeError as err:  # "recipe --candidates: key 'students.window_size': must be >= 1, got 0"
            raise PlanError(f"--candidates option {name!r}: {str(err).split(': ', 1)[1]}") from None
        options.append(Option(name, kind, dataclasses.asdict(config), overrides))
    return options


# ---------------------------------------------------------------------------------- shapes, FLOPs
@dataclass(frozen=True)
class Shapes:
    """What the cost models read from a model: every decoder layer has these shapes."""

    num_layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    bytes_per_value: int  # of the model's dtype: softmax keys and values are stored in it

    @classmethod
    def of(cls, model) -> "Shapes":
        import torch

        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        bits = torch.finfo(next(model.parameters()).dtype).bits
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim,
                   c.intermediate_size, bits // 8)

    def softmax_kv_bytes(self, T: int) -> int:
        """Keys and values of one softmax layer after ``T`` tokens: ``2 T kv_heads head_dim`` values."""
        return 2 * T * self.kv_heads * self.head_dim * self.bytes_per_value

    def shared_flops(self, T: int) -> int:
        """Projections (q, k, v, o) and the MLP of one layer over ``T`` tokens: the same under every option."""
        d, H, kv, D = self.hidden_size, self.heads, self.kv_heads, self.head_dim
        return 2 * T * (d * H * D + 2 * d * kv * D + H * D * d) + 2 * T * 3 * d * self.intermediate_size

    def softmax_flops(self, T: int) -> int:
        """Causal softmax attention over ``T`` tokens: ``QK^T`` and ``AV`` on the causal half, ``2 T^2 H D``."""
        return 2 * T * T * self.heads * self.head_dim

    def student_flops(self, option: Option, T: int) -> int:
        """A student's attention over ``T`` tokens, from its settings: the learned q and k feature
        maps (``2 x 2 T H D F``), the linear state's update and read-out (``2 x 2 T H Phi D`` with
        ``Phi`` features), and exact softmax terms over ``E`` keys a query (``2 x 2 T E H D``):
        LoLCATs' window and sinks ``E = min(W + n, T)``, STILL's two local chunks and selected
        tokens ``E = min(2 C + M, T)``; LAWCAT adds its q/k convolutions and decay projection,
        STILL its gate."""
        s, H, D, d = option.settings, self.heads, self.head_dim, self.hidden_size
        F = s.get("feature_dim") or D
        learned = s.get("feature_map", "hedgehog") in ("hedgehog", "npmap")
        phi = 2 * F if learned else D
        flops = (2 * 2 * T * H * D * F if learned else 0) + 2 * 2 * T * H * phi * D
        if option.kind == "lolcats":
            flops += 2 * 2 * T * min(s["window_size"] + s.get("sink_size", 0), T) * H * D
        elif option.kind == "still":
            flops += 2 * 2 * T * min(2 * s["chunk_size"] + s["selected_budget"], T) * H * D + 2 * T * d * H * D
        elif option.kind == "lawcat":
            flops += 2 * 2 * T * H * D * s["conv_size"] + 2 * T * (d * s["decay_rank"] + s["decay_rank"] * H * phi)
        return flops

    def attention_flops(self, option: Option, T: int) -> int:
        return self.softmax_flops(T) if option.is_softmax else self.student_flops(option, T)


def state_probe_tokens(option: Option) -> int:
    """A length after which the student's decode state no longer grows: LoLCATs' window and
    sinks, STILL's selected groups (``M / K`` chunks, plus the delay and the local chunks),
    LAWCAT's convolution history; plain linear attention from the first token."""
    s = option.settings
    if option.kind == "lolcats":
        return s["window_size"] + s.get("sink_size", 0) + 8
    if option.kind == "still":
        return (s["selected_budget"] // s["tokens_per_chunk"] + 3) * s["chunk_size"]
    if option.kind == "lawcat":
        return s["conv_size"] + 8
    return 8


# ---------------------------------------------------------------------------------- costs
@dataclass
class Costs:
    """``cost[layer][option]`` (integers) and the capacity the chosen costs must not exceed."""

    cost: list[list[int]]
    capacity: int
    unit: str  # layers | bytes | flops

    def total(self, choice: list[int]) -> int:
        return sum(self.cost[i][o] for i, o in enumerate(choice))


def softmax_layer_limit(budget: Budget, num_layers: int) -> int:
    """How many layers a ``softmax-layers`` budget keeps softmax (a share rounds to whole layers)."""
    m = round(budget.value * num_layers) if budget.fraction else int(budget.value)
    if m > num_layers:
        raise BudgetError(f"budget of {m} softmax layers exceeds the model's {num_layers} layers")
    return m


def budget_costs(budget: Budget, shapes: Shapes, options: list[Option], state_bytes: list[list[int]]) -> Costs:
    """Every option's cost on every layer under ``budget``. ``state_bytes[layer][option]`` is the
    measured decode state of each student option (ignored for softmax and other budgets)."""
    L = shapes.num_layers
    if budget.kind == "softmax_layers":
        row = [1 if o.is_softmax else 0 for o in options]
        return Costs([list(row) for _ in range(L)], softmax_layer_limit(budget, L), "layers")
    if budget.kind == "kv_memory":
        T = budget.context
        cost = [[shapes.softmax_kv_bytes(T) if o.is_softmax else int(state_bytes[i][j]) for j, o in enumerate(options)]
                for i in range(L)]
        return Costs(cost, math.floor(budget.value), "bytes")
    T = budget.context
    row = [shapes.attention_flops(o, T) for o in options]
    teacher = L * (shapes.shared_flops(T) + shapes.softmax_flops(T))
    # sum(attention) + L * shared <= ratio * teacher, exactly (the ratio as the decimal it was written as)
    capacity = math.floor(Fraction(str(budget.value)) * teacher) - L * shapes.shared_flops(T)
    return Costs([list(row) for _ in range(L)], capacity, "flops")


def prefill_ratio(budget: Budget, shapes: Shapes, attention_flops: int) -> float:
    """A plan's prefill FLOPs relative to the teacher's, from the sum of its layers' attention FLOPs."""
    T, L = budget.context, shapes.num_layers
    return (L * shapes.shared_flops(T) + attention_flops) / (L * (shapes.shared_flops(T) + shapes.softmax_flops(T)))


def _mib(size: float) -> str:
    return f"{size / 2**20:.4g} MiB"


def describe_cost(budget: Budget, shapes: Shapes, total: int) -> str:
    """A plan's total cost in the budget's own terms."""
    if budget.kind == "softmax_layers":
        return f"{total} softmax layers"
    if budget.kind == "kv_memory":
        return f"{_mib(total)} of decode cache"
    return f"{prefill_ratio(budget, shapes, total):.4g}x the teacher's prefill FLOPs"


def describe_limit(budget: Budget, shapes: Shapes, capacity: int) -> str:
    """The budget's limit, for messages: ``kv-memory limit 48 MiB at 32768 tokens``."""
    if budget.kind == "softmax_layers":
        return f"a limit of {capacity} softmax layers"
    if budget.kind == "kv_memory":
        return f"kv-memory limit {_mib(budget.value)} at {budget.context} tokens"
    return f"prefill ratio {budget.value:g} at {budget.context} tokens"
