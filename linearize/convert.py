"""The walk: which layers become which student, swapped in place, everything else frozen."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import adapter_for
from .masks import IMPLEMENTATION
from .students import MODES, STUDENTS, Student


@dataclass
class ConversionSpec:
    """Which layers become which student, with the student's settings.

    ``layers`` is ``"all"``, a list of layer indices, or ``{"every": k}`` (layers 0, k, 2k, ...)
    optionally with ``"offset"``; the other layers keep softmax attention.

    ``per_layer`` maps a converted layer's index to its own settings: ``{5: {"window_size": 128}}``
    changes some of ``settings`` for layer 5; ``{7: {"kind": "hedgehog", ...}}`` gives layer 7
    another student, with only the settings given there (and that student's defaults).
    """

    kind: str = "lolcats"
    layers: object = "all"
    settings: dict = field(default_factory=dict)
    per_layer: dict = field(default_factory=dict)

    def __post_init__(self):  # JSON object keys are strings
        self.per_layer = {int(i): dict(v) for i, v in (self.per_layer or {}).items()}

    def layer_student(self, idx: int) -> tuple[str, dict]:
        """The student kind and settings of layer ``idx``."""
        own = dict(self.per_layer.get(idx, {}))
        kind = own.pop("kind", self.kind)
        return kind, ({**self.settings, **own} if kind == self.kind else own)

    def student_class(self) -> type[Student]:
        if self.kind not in STUDENTS:
            raise ValueError(f"unknown student {self.kind!r}; choose one of {sorted(STUDENTS)}")
        return STUDENTS[self.kind]

    def student_config(self):
        return self.student_class().Config(**self.settings)

    def layer_indices(self, num_layers: int) -> list[int]:
        return resolve_layers(self.layers, num_layers)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "layers": self.layers, "settings": dict(self.settings)}
        if self.per_layer:
            out["per_layer"] = {i: dict(v) for i, v in sorted(self.per_layer.items())}
        return out


def resolve_layers(layers, num_layers: int) -> list[int]:
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, dict):
        every, offset = int(layers.get("every", 1)), int(layers.get("offset", 0))
        if every < 1:
            raise ValueError(f"layers.every must be >= 1, got {every}")
        return list(range(offset, num_layers, every))
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    return out


def convert_model(model: nn.Module, spec: ConversionSpec) -> nn.Module:
    """Replace the chosen attention modules of ``model`` by students, in place, and freeze
    everything but the students' own parameters. Returns ``model``.

    When no softmax layer is left, the model switches to the attention implementation of
    :mod:`linearize.masks`, whose masks hold only which keys are padding (no ``T x T`` mask)."""
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    chosen = spec.layer_indices(len(layers))
    stray = sorted(set(spec.per_layer) - set(chosen))
    if stray:
        raise ValueError(f"per-layer settings for layer(s) {stray}, which are not converted (layers: {spec.layers})")
    built = {}
    for idx in chosen:
        kind, settings = spec.layer_student(idx)
        if kind not in STUDENTS:
            raise ValueError(f"layer {idx}: unknown student {kind!r}; choose one of {sorted(STUDENTS)}")
        built[idx] = (STUDENTS[kind], STUDENTS[kind].Config(**settings))
    for p in model.parameters():
        p.requires_grad_(False)
    for idx, (cls, config) in built.items():
        attn = adapter.attention(layers[idx])
        if isinstance(attn, Student):
            raise ValueError(f"layer {idx} is already a {attn.kind} student")
        adapter.set_attention(layers[idx], cls.from_teacher(attn, config, adapter, idx))
    if len(students(model)) == len(layers):  # no softmax layer left: padding masks only (see masks.py)
        model.config._attn_implementation = IMPLEMENTATION
    model.linearize_spec = spec
    return model


def students(model: nn.Module) -> dict[int, Student]:
    """The student modules of a converted model, by layer index."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, Student)}


def student_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for s in students(model).values() for _, p in s.student_parameters()]


def student_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parts, keyed ``layers.{i}.{name}``."""
    return {f"layers.{i}.{n}": t for i, s in students(model).items() for n, t in s.student_state_dict().items()}


def load_student_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = student_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"student weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = {f"layers.{i}.{n}": p for i, s in students(model).items() for n, p in s.student_parameters()}
    with torch.no_grad():
        for key, p in params.items():
            if p.shape != state[key].shape:
                raise ValueError(f"student weight {key} has shape {tuple(state[key].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[key])


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str, **options):
    """Run every student of ``model`` in ``mode`` (student | teacher | transfer) inside the block.

    ``options`` set other student attributes for the block, e.g. ``form="recurrent"`` or
    ``attention_ce=True``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    saved = []
    for s in students(model).values():
        saved.append((s, {k: getattr(s, k) for k in ("mode", *options)}))
        s.mode = mode
        for k, v in options.items():
            setattr(s, k, v)
    try:
        yield model
    finally:
        for s, attrs in saved:
            for k, v in attrs.items():
                setattr(s, k, v)


def replace_settings(spec: ConversionSpec, **settings) -> ConversionSpec:
    return dataclasses.replace(spec, settings={**spec.settings, **settings})
