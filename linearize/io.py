"""Saving and loading converted models.

A saved model is a small folder: the trained parts and a record of how to rebuild the rest.

* ``linearize.json``: format version, the base model reference (Hub id, folder, GGUF file or
  the embedded default), its architecture, the conversion spec (student kind, layers, settings),
  the dtype, and the recipe that produced it;
* ``students.safetensors``: the students' own parameters (feature maps, window factors);
* after a LoRA stage, either ``lora.safetensors`` (the adapters, kept separate; peft's key
  names, settings in ``linearize.json``) or ``merged.safetensors`` (the adapted weights with
  the adapters merged in, ``W + alpha/r B A``, for the modules LoRA touched);
* the tokenizer files;
* ``report.json``: what the run measured.

:func:`load` reloads the base model, converts the same layers the same way and puts the trained
parts back. Folders are written to a temporary sibling and renamed into place, so an
interrupted save never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .convert import ConversionSpec, convert_model, load_student_state_dict, student_state_dict

FORMAT_VERSION = 1
CONFIG_NAME = "linearize.json"
WEIGHTS_NAME = "students.safetensors"
LORA_NAME = "lora.safetensors"
MERGED_NAME = "merged.safetensors"


def atomic_folder(out_dir: Path, write) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``out_dir`` in one rename (replacing an
    older folder only once the new one is complete)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save(
    model, out_dir, tokenizer=None, base_model: str | None = None, recipe: dict | None = None,
    report: dict | None = None, extra_files: dict[str, str] | None = None, merge_lora: bool = False,
    merged: dict[str, torch.Tensor] | None = None,
):
    """Save a converted model's trained parts and how to rebuild it. Returns the folder.

    With LoRA adapters, ``merge_lora`` saves them merged into the weights they adapt instead
    of as separate adapters (``merged``: those weights computed already, as a sharded model
    must, on every process together)."""
    from .lora import has_lora, lora_settings, lora_state_dict, merged_weights

    spec: ConversionSpec = model.linearize_spec
    base_model = base_model or getattr(model, "linearize_base", None)
    if not base_model:
        raise ValueError("save() needs base_model: the Hub id, folder or GGUF file the model was converted from")
    config = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "model_type": model.config.model_type,
        "num_hidden_layers": model.config.num_hidden_layers,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "conversion": spec.to_dict(),
        "recipe": recipe,
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in student_state_dict(model).items()}
    lora_files = {}
    if has_lora(model):
        config["lora"] = {**lora_settings(model), "merged": merge_lora}
        if merge_lora:
            lora_files[MERGED_NAME] = merged if merged is not None else merged_weights(model)
        else:
            lora_files[LORA_NAME] = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}

    def write(tmp: Path):
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, tensors in lora_files.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_folder(Path(out_dir), write)


def read_config(path) -> dict:
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} is not a linearize model folder (no {CONFIG_NAME}); make one with `linearize convert`"
        )
    config = json.loads(file.read_text())
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was saved by a newer linearize (format {config['format_version']}); upgrade linearize")
    return config


def resolve_artifact(path) -> Path:
    """A converted-model folder: ``path`` itself, or a Hub repo id downloaded (or read from the
    local Hugging Face cache when offline)."""
    local = Path(path).expanduser()
    if local.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        return local
    from huggingface_hub import snapshot_download

    from .models import ModelLoadError

    try:
        return Path(snapshot_download(str(path), repo_type="model"))
    except Exception as err:
        raise ModelLoadError(
            f"{path} is not a local folder, and the Hub repo could not be fetched ({type(err).__name__}); "
            "offline, only repos already in the local Hugging Face cache load"
        ) from None


def load(path, device: str | None = None, dtype: str | torch.dtype | None = None, return_tokenizer: bool = False,
         base_model: str | None = None):
    """Rebuild a converted model from a folder written by :func:`save` (or a Hub repo id of one).
    ``base_model`` overrides the base the artifact names (a moved folder or GGUF file).

    >>> model = linearize.load("runs/smoke")
    >>> model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)
    """
    from .models import load_teacher

    path = resolve_artifact(path)
    config = read_config(path)
    from .models import ModelLoadError

    base_model = base_model or config["base_model"]
    try:
        model, tokenizer, source = load_teacher(base_model, dtype=dtype or config.get("dtype", "float32"))
    except ModelLoadError as err:
        raise ModelLoadError(
            f"{path} was converted from {base_model!r}, which cannot be loaded here ({err}); "
            "if the base model moved, name it: linearize.load(path, base_model=...)"
        ) from None
    conv = config["conversion"]
    convert_model(model, ConversionSpec(conv["kind"], conv["layers"], conv["settings"], conv.get("per_layer", {})))
    load_student_state_dict(model, load_file(str(Path(path) / WEIGHTS_NAME)))
    lora = config.get("lora")
    if lora:
        from .lora import add_lora, load_lora_state_dict, load_merged_weights

        if lora.get("merged"):
            load_merged_weights(model, load_file(str(Path(path) / MERGED_NAME)))
        else:
            add_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"])
            load_lora_state_dict(model, load_file(str(Path(path) / LORA_NAME)))
    model.linearize_base = base_model
    if device:
        model.to(device)
    model.eval()
    if return_tokenizer:
        if any((Path(path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        return model, tokenizer
    return model
