"""Recipes: YAML in, typed and validated objects out.

Every error names the file, the key path (``stages.0.lr``) and what is allowed, before anything
heavy runs. A recipe is a built-in name (``linearize recipes`` lists them) or a YAML file;
``--set KEY=VALUE`` overrides any key (the value is read as YAML: ``--set stages.0.steps=200``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import yaml

from .models import DEFAULT_MODEL

RECIPE_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the key and the fix."""


# ---------------------------------------------------------------------------------- the schema
@dataclass
class DataSpec:
    """Where a stage's text comes from.

    ``teacher``: text the teacher writes itself, answering built-in prompts (or the prompts in
    ``path``: one per line, JSON lines with an ``instruction`` field, or an Alpaca-style JSON
    array), sampled and cached; ``text`` / ``jsonl`` / ``parquet``: local files or folders read
    through ``datasets`` (``field`` names the text column); ``hub``: a Hub data set id in
    ``path``; ``passkey``: synthetic passkey-retrieval samples of ``length`` tokens with the
    answer (the key at a random depth of repeated filler), one block each, as LAWCAT trains on.

    A path may name environment variables (``$LINEARIZE_DATA/alpaca/...``). A stage's ``data``
    is one such mapping or a list of them: the mix, each source packed on its own.
    """

    source: Literal["teacher", "text", "jsonl", "parquet", "hub", "passkey"]
    path: str | None = None
    field: str = "text"
    split: str = "train"
    samples: int = 32  # teacher: how many texts to generate
    max_new_tokens: int = 256  # teacher: tokens per generated text
    temperature: float = 0.8  # teacher: sampling temperature
    seed: int = 0  # teacher: sampling seed (and which prompts)
    chat_template: bool = True  # format prompts/instructions with the tokenizer's chat template
    format: Literal["text", "alpaca", "messages"] = "text"  # files/hub: plain text, instruction rows, or chat turns
    max_documents: int | None = None
    batch_size: int = 16  # teacher: prompts answered together
    length: int | None = None  # passkey: tokens per sample (default: the stage's seq_len)


@dataclass
class StudentsSpec:
    """Which layers become which student. Other keys are the student's own settings."""

    kind: str = "lolcats"
    layers: Union[Literal["all"], list[int], dict] = "all"
    settings: dict = field(default_factory=dict)
    per_layer: dict = field(default_factory=dict)  # {layer: {setting: value, optionally kind}}


@dataclass
class StageSpec:
    """What every training stage shares: data, batches, length, optimiser, schedule, checkpoints."""

    stage: str
    data: Union[DataSpec, list[DataSpec]]
    seq_len: int = 1024
    batch_size: int = 8  # blocks per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    steps: int | None = None  # optimiser steps; or give `tokens` instead
    tokens: int | None = None  # token budget: steps = ceil(tokens / (batch_size * grad_accum * seq_len))
    lr: float = 1e-2
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # linear/cosine decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0
    precision: Literal["model", "bfloat16", "float16", "float32"] = "model"  # autocast dtype ("model": none)
    seed: int | None = None  # data order; default: the recipe's seed
    val_blocks: int = 4  # held-out blocks of the stage's data for picking the best checkpoint
    eval_every: int = 0  # validate every N steps (0: at the end only); the best is kept
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps (and always at the end)


@dataclass
class AttentionTransferStage(StageSpec):
    """Train the students to reproduce each layer's teacher attention output."""

    stage: Literal["attention_transfer"]
    mse_weight: float = 1000.0  # loss = mse_weight * MSE + ce_weight * attention CE, mean over layers
    ce_weight: float = 0.0


@dataclass
class LoraStage(StageSpec):
    """LoRA adapters (peft) trained on next-token cross-entropy or KL to the teacher."""

    stage: Literal["lora"]
    lr: float = 1e-4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    loss: Literal["ce", "kl"] = "ce"
    kl_temperature: float = 1.0
    train_students: bool = False  # also train the students' own parameters
    merge: bool = False  # save the adapters merged into the weights instead of separately


STAGES = {"attention_transfer": AttentionTransferStage, "lora": LoraStage}


@dataclass
class EvalSpec:
    """Held-out perplexity of teacher and student, side by side, after the stages."""

    data: Union[DataSpec, list[DataSpec]]
    seq_len: int = 256
    max_blocks: int = 16


@dataclass
class Recipe:
    students: StudentsSpec
    stages: list
    model: str = DEFAULT_MODEL
    description: str = ""
    seed: int = 0
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval: EvalSpec | None = None
    source: str = "<dict>"  # the file it came from (set by the loader)
    overrides: list = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        out["students"] = {"kind": self.students.kind, "layers": self.students.layers, **self.students.settings}
        if self.students.per_layer:
            out["students"]["per_layer"] = {i: dict(v) for i, v in sorted(self.students.per_layer.items())}
        return out


# ---------------------------------------------------------------------------------- validation
def _fail(file: str, path: str, message: str):
    where = f"key '{path}'" if path else "top level"
    raise RecipeError(f"recipe {file}: {where}: {message}")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):  # Optional[X] reads as X: null is the default, not a choice
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        args = typing.get_args(tp)
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(args[0], _type_name(args[0]))}" if args else "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value, tp, file: str, path: str):
    """Check ``value`` against the annotation ``tp`` and return it (numbers are coerced)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, file, path)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        (arg,) = typing.get_args(tp) or (typing.Any,)
        return [_check(v, arg, file, f"{path}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError
        return parse_dataclass(tp, value, file, path)
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if tp in (dict, list):
        if isinstance(value, tp):
            return value
        raise TypeError
    raise TypeError


def _check(value, tp, file, path):
    try:
        return _convert(value, tp, file, path)
    except TypeError:
        _fail(file, path, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unknown_key(file, path, key, allowed):
    hint = difflib.get_close_matches(key, allowed, n=1)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    _fail(file, f"{path}.{key}" if path else key, f"unknown key.{did_you_mean} Allowed here: {', '.join(sorted(allowed))}")


def parse_dataclass(cls, data: dict, file: str, path: str = ""):
    hints = typing.get_type_hints(cls)
    internal = ("source", "overrides") if cls is Recipe else ()  # set by the loader, not by the file
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in internal}
    for key in data:
        if key not in fields:
            _unknown_key(file, path, key, list(fields))
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _check(data[name], hints[name], file, sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(file, sub, f"missing; it is required ({_type_name(hints[name])})")
    return cls(**kwargs)


_POSITIVE = ("seq_len", "batch_size", "grad_accum", "steps", "tokens", "samples", "max_new_tokens", "max_blocks", "rank", "length")
_NON_NEGATIVE = ("val_blocks", "eval_every", "checkpoint_every", "warmup_steps", "mse_weight", "ce_weight",
                 "weight_decay", "max_grad_norm")


def _check_ranges(obj, file, path):
    for f in dataclasses.fields(obj):
        value, sub = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if value is None or isinstance(value, bool):
            continue
        if f.name in _POSITIVE and isinstance(value, int) and value < 1:
            _fail(file, sub, f"must be >= 1, got {value}")
        if f.name in _NON_NEGATIVE and value < 0:
            _fail(file, sub, f"must be >= 0, got {value}")
        if f.name in ("lr", "temperature", "alpha", "kl_temperature") and value <= 0:
            _fail(file, sub, f"must be > 0, got {value}")
        if f.name in ("min_lr_ratio", "dropout") and not 0 <= value <= (1 if f.name == "min_lr_ratio" else 0.999):
            _fail(file, sub, f"must lie in [0, 1{']' if f.name == 'min_lr_ratio' else ')'}, got {value}")


def _parse_students(data, file):
    from .students import STUDENTS

    if not isinstance(data, dict):
        _fail(file, "students", f"expected a mapping with 'kind', 'layers' and the student's settings, got {data!r}")
    data = dict(data)
    kind = data.pop("kind", "lolcats")
    if kind not in STUDENTS:
        hint = difflib.get_close_matches(str(kind), STUDENTS, n=1)
        _fail(
            file,
            "students.kind",
            f"unknown student {kind!r}." + (f" Did you mean '{hint[0]}'?" if hint else "") + f" Choose one of {', '.join(sorted(STUDENTS))}",
        )
    layers = data.pop("layers", "all")
    if not (layers == "all" or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
        if isinstance(layers, dict):
            for key in layers:
                if key not in ("every", "offset"):
                    _unknown_key(file, "students.layers", key, ["every", "offset"])
            if not isinstance(layers.get("every"), int) or layers["every"] < 1:
                _fail(file, "students.layers.every", f"expected an integer >= 1, got {layers.get('every')!r}")
        else:
            _fail(file, "students.layers", f"expected 'all', a list of layer indices or {{every: k}}, got {layers!r}")
    per_layer_raw = data.pop("per_layer", None) or {}
    config = _parse_student_settings(STUDENTS[kind].Config, data, file, "students")
    if not isinstance(per_layer_raw, dict):
        _fail(file, "students.per_layer", f"expected a mapping of layer index to settings, got {per_layer_raw!r}")
    per_layer = {}
    for idx, own in per_layer_raw.items():
        sub = f"students.per_layer.{idx}"
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            _fail(file, sub, f"expected a layer index (an integer >= 0) as the key, got {idx!r}")
        if not isinstance(own, dict):
            _fail(file, sub, f"expected a mapping of settings, got {own!r}")
        own = dict(own)
        own_kind = own.pop("kind", kind)
        if own_kind not in STUDENTS:
            _fail(file, f"{sub}.kind", f"unknown student {own_kind!r}; choose one of {', '.join(sorted(STUDENTS))}")
        merged = {**data, **own} if own_kind == kind else own
        _parse_student_settings(STUDENTS[own_kind].Config, merged, file, sub)
        per_layer[idx] = ({"kind": own_kind} if own_kind != kind else {}) | own
    if per_layer and isinstance(layers, list):
        stray = sorted(set(per_layer) - set(layers))
        if stray:
            _fail(file, "students.per_layer", f"settings for layer(s) {stray}, which 'layers' does not convert ({layers})")
    return StudentsSpec(kind=kind, layers=layers, settings=dataclasses.asdict(config), per_layer=per_layer)


def _parse_student_settings(config_cls, data: dict, file, path):
    """A student's settings, checked: known keys, types, ranges and the feature map."""
    from .feature_maps import FEATURE_MAPS

    config = parse_dataclass(config_cls, data, file, path)
    if getattr(config, "window_size", 1) < 1:
        _fail(file, f"{path}.window_size", f"must be >= 1, got {config.window_size}")
    if getattr(config, "sink_size", 0) < 0:
        _fail(file, f"{path}.sink_size", f"must be >= 0, got {config.sink_size}")
    if hasattr(config, "validate"):  # a student's own checks of how its settings fit together
        try:
            config.validate()
        except ValueError as err:
            _fail(file, path, str(err))
    if config.feature_map not in FEATURE_MAPS:
        _fail(file, f"{path}.feature_map", f"unknown feature map {config.feature_map!r}; choose one of {', '.join(sorted(FEATURE_MAPS))}")
    return config


def _parse_stages(data, file):
    if not isinstance(data, list) or not data:
        _fail(file, "stages", f"expected a non-empty list of stages, got {data!r}")
    stages = []
    for i, raw in enumerate(data):
        path = f"stages.{i}"
        if not isinstance(raw, dict):
            _fail(file, path, f"expected a mapping, got {raw!r}")
        name = raw.get("stage")
        if name not in STAGES:
            hint = difflib.get_close_matches(str(name), STAGES, n=1)
            _fail(
                file,
                f"{path}.stage",
                f"unknown stage {name!r}." + (f" Did you mean '{hint[0]}'?" if hint else "") + f" Choose one of {', '.join(STAGES)}",
            )
        stage = parse_dataclass(STAGES[name], raw, file, path)
        if (stage.steps is None) == (stage.tokens is None):
            _fail(file, path, "give exactly one of 'steps' (optimiser steps) and 'tokens' (a token budget)")
        if len(stage.betas) != 2:
            _fail(file, f"{path}.betas", f"expected two numbers, got {stage.betas!r}")
        _check_ranges(stage, file, path)
        _check_data_specs(stage.data, file, f"{path}.data", stage.seq_len)
        stages.append(stage)
    return stages


def _check_data_specs(data, file, path, seq_len: int):
    specs = data if isinstance(data, list) else [data]
    if not specs:
        _fail(file, path, "an empty list: give at least one data source")
    for i, spec in enumerate(specs):
        sub = f"{path}.{i}" if isinstance(data, list) else path
        _check_ranges(spec, file, sub)
        _check_data(spec, file, sub)
        if spec.source == "passkey" and spec.length is not None and spec.length > seq_len:
            _fail(file, f"{sub}.length", f"a passkey sample is one block: length {spec.length} exceeds seq_len {seq_len}")


def _check_data(data: DataSpec, file, path):
    from .data import DataPathError, resolve_path

    if data.source in ("text", "jsonl", "parquet", "hub") and not data.path:
        _fail(file, f"{path}.path", f"source '{data.source}' needs a path (a file, a folder, or for 'hub' a data set id)")
    if data.path and data.source != "hub":
        try:
            resolved = resolve_path(data.path)
        except DataPathError as err:
            _fail(file, f"{path}.path", str(err))
        if not resolved.exists():
            _fail(file, f"{path}.path", f"data file or folder not found: {resolved}")


def parse_recipe(data, file: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        _fail(file, "", f"a recipe is a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    allowed = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("source", "overrides")]
    for key in data:  # unknown top-level keys first: a typo there explains later errors
        if key not in allowed:
            _unknown_key(file, "", key, allowed)
    students = _parse_students(data.pop("students", {}), file)
    stages = _parse_stages(data.pop("stages", None), file)
    rest = parse_dataclass(Recipe, {**data, "students": {}, "stages": []}, file)
    if rest.eval is not None:
        _check_ranges(rest.eval, file, "eval")
        _check_data_specs(rest.eval.data, file, "eval.data", rest.eval.seq_len)
    return dataclasses.replace(rest, students=students, stages=stages, source=file)


# ---------------------------------------------------------------------------------- loading
def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def describe(path: Path) -> str:
    """A recipe file's one-line summary: its ``description``."""
    try:
        return str((yaml.safe_load(path.read_text()) or {}).get("description", "")).strip().splitlines()[0]
    except (yaml.YAMLError, IndexError):
        return ""


def recipe_path(name_or_file: str) -> Path:
    builtin = builtin_recipes()
    if name_or_file in builtin:
        return builtin[name_or_file]
    path = Path(name_or_file).expanduser()
    if path.is_file():
        return path
    hint = difflib.get_close_matches(name_or_file, builtin, n=1)
    raise RecipeError(
        f"recipe {name_or_file!r} is neither a built-in recipe nor a file."
        + (f" Did you mean '{hint[0]}'?" if hint else "")
        + f" Built-in recipes: {', '.join(builtin)}"
    )


def apply_override(data: dict, assignment: str, file: str) -> None:
    """Apply ``a.b.0.c=value`` to the raw recipe mapping (the value is parsed as YAML)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages.0.steps=200")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: recipe {file} has no item '{where}'")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RecipeError(f"--set {key}: '{where}' is not a mapping or list in recipe {file}")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"--set {key}: recipe {file} has no item '{key}'")
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(name_or_file: str, overrides: list[str] = (), model: str | None = None) -> Recipe:
    """Read, override and validate a recipe. ``model`` (the command line's MODEL) wins over the file's."""
    path = recipe_path(name_or_file)
    file = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe {file}: malformed YAML{line}: {getattr(err, 'problem', err)}") from None
    if data is None:
        raise RecipeError(f"recipe {file}: the file is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {file}: a recipe is a mapping of keys, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment, file)
    if model:
        data["model"] = model
    recipe = parse_recipe(data, file)
    return dataclasses.replace(recipe, overrides=list(overrides))
