"""``linearize eval``: run one suite on several models side by side and write the report.

For each model in turn: load it (a converted folder through :func:`linearize.load`, anything
else through :func:`~linearize.models.load_teacher`), run the suite, then rewrite the report
files in ``out``: ``report.json`` (options and every per-sample result), ``report.md`` (a
models x tasks table, then per-length tables) and the plots. A model whose run fails is recorded
with its error and the others go on; what finished before is already on disk.
"""

from __future__ import annotations

import math
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SUITES = ("passkey", "niah", "task-file", "ppl-by-length", "lm-eval")


@dataclass
class EvalOptions:
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    samples: int = 3
    seed: int = 0
    max_new_tokens: int | None = None  # per suite default: passkey 10, niah 32 (uuids), task files 32
    haystack: str | None = None
    niah_tasks: list[str] = field(default_factory=lambda: ["niah_single_1", "niah_single_2", "niah_single_3"])
    task_files: list[str] = field(default_factory=list)
    text: str | None = None
    max_chunks: int = 4
    segment: int = 512
    tasks: list[str] = field(default_factory=lambda: ["piqa"])
    limit: int | None = None
    num_fewshot: int | None = None
    data_dir: str | None = None
    batch_size: int = 8
    prefill_chunk: int | None = None  # generation suites: prompt tokens a forward while prefilling
    device: str | None = None
    dtype: str | None = None


class EvalError(ValueError):
    """A bad ``linearize eval`` call (unknown suite, missing option, unreadable model folder)."""


def load_any(name: str, device: str | None = None, dtype: str | None = None):
    """``(model, tokenizer)`` for a converted-model folder or anything ``load_teacher`` accepts."""
    from ..io import CONFIG_NAME, load
    from ..models import load_teacher

    path = Path(name).expanduser()
    check_model(name)
    if (path / CONFIG_NAME).is_file():
        return load(path, device=device, dtype=dtype, return_tokenizer=True)
    model, tokenizer, _ = load_teacher(name, dtype=dtype or "float32", device=device)
    return model, tokenizer


def check_model(name: str) -> None:
    """Fail early, before any model is run, on a model name that cannot be loaded."""
    from ..io import CONFIG_NAME
    from ..models import resolve_model

    path = Path(name).expanduser()
    if (path / CONFIG_NAME).is_file():
        return
    if path.is_dir() and not (path / "config.json").is_file():
        raise EvalError(f"{name} is a folder but neither a converted model (no {CONFIG_NAME}) "
                        "nor a transformers model folder (no config.json)")
    resolve_model(name)


def check_options(suite: str, opts: EvalOptions) -> None:
    if suite not in SUITES:
        raise EvalError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if opts.prefill_chunk is not None and opts.prefill_chunk < 1:
        raise EvalError(f"--prefill-chunk must be a positive number of tokens, not {opts.prefill_chunk}")
    if suite == "task-file":
        if not opts.task_files:
            raise EvalError("--suite task-file needs --task-file PATH (one or more)")
        from .task_file import load_task_file

        for f in opts.task_files:
            load_task_file(f)  # fail before loading any model
    if suite == "ppl-by-length" and not opts.text:
        raise EvalError("--suite ppl-by-length needs --text PATH (a plain text file)")
    if suite == "niah":
        from .niah import TASKS

        unknown = [t for t in opts.niah_tasks if t not in TASKS]
        if unknown:
            raise EvalError(f"unknown needle task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")


def _generation_task(samples, generate, max_new_tokens, desc, progress, batch_size=1) -> dict:
    from .generation import score_samples, summarize

    results = score_samples(samples, generate, max_new_tokens, progress=progress, desc=desc, batch_size=batch_size)
    return {"metrics": summarize(results), "results": results}


def run_suite(suite: str, model, tokenizer, opts: EvalOptions, progress: bool = False, generate=None) -> dict:
    """``{task: {"metrics": {...}, "results": [...]}}`` for one model. ``generate`` replaces the
    model's greedy generation (tests drive the scoring with it)."""
    from .generation import ModelGenerator

    generate = generate or (ModelGenerator(model, tokenizer, opts.batch_size, opts.prefill_chunk) if model is not None else None)
    if suite == "passkey":
        from .passkey import passkey_samples

        samples = passkey_samples(tokenizer, opts.lengths, opts.depths, opts.samples, opts.seed)
        return {"passkey": _generation_task(samples, generate, opts.max_new_tokens or 10, "passkey", progress,
                                            opts.batch_size)}
    if suite == "niah":
        from .niah import niah_samples

        return {
            task: _generation_task(
                niah_samples(tokenizer, task, opts.lengths, opts.depths, opts.samples, opts.seed, opts.haystack),
                generate, opts.max_new_tokens or 32, task, progress, opts.batch_size)
            for task in opts.niah_tasks
        }
    if suite == "task-file":
        from .task_file import load_task_file

        return {Path(f).stem: _generation_task(load_task_file(f), generate, opts.max_new_tokens or 32, Path(f).stem, progress,
                                                 opts.batch_size)
                for f in opts.task_files}
    if suite == "ppl-by-length":
        from .ppl_by_length import ppl_by_length, text_tokens

        rows = ppl_by_length(model, text_tokens(tokenizer, opts.text), opts.lengths, opts.max_chunks, opts.segment, progress)
        return {f"ppl@{r['length']}": {"metrics": {k: r[k] for k in ("ppl", "ppl_last_quarter", "chunks", "tokens")},
                                       "results": [r]} for r in rows}
    if suite == "lm-eval":
        from .harness import evaluate_lm_eval

        return evaluate_lm_eval(model, tokenizer, opts.tasks, limit=opts.limit, num_fewshot=opts.num_fewshot,
                                data_dir=opts.data_dir, batch_size=opts.batch_size)
    raise EvalError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")


def _labels(models: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for m in models:
        seen[m] = seen.get(m, 0) + 1
        out.append(m if seen[m] == 1 else f"{m} #{seen[m]}")
    return out


def _finished(out: Path, suite: str, opts: EvalOptions) -> dict:
    """``--resume``: the models the report in ``out`` finished (status ok), by label. A report of
    another suite or other options is not resumed from: mixing them would compare unlike runs."""
    import json

    path = out / "report.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EvalError(f"--resume: cannot read {path} ({err}); move it away to start afresh") from err
    if old.get("suite") != suite:
        raise EvalError(f"--resume: {path} is a {old.get('suite')!r} report, not {suite!r}; use another --out")
    mine, theirs = jsonable(asdict(opts)), old.get("options", {})
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        raise EvalError(f"--resume: {path} was run with other options ({', '.join(differ)}); "
                        "use the same options or another --out")
    return {label: entry for label, entry in old.get("models", {}).items() if entry.get("status") == "ok"}


def run_eval(models: list[str], suite: str, out, opts: EvalOptions | None = None, loader=None,
             progress: bool = True, echo: bool = True, resume: bool = False) -> dict:
    """Evaluate every model on ``suite``; write the report into ``out`` after each model.
    ``loader(name) -> (model, tokenizer)`` defaults to :func:`load_any`. ``resume``: a model the
    report already in ``out`` finished with the same suite and options is kept, not run again."""
    from .report import write_report

    opts = opts or EvalOptions()
    check_options(suite, opts)
    if loader is None:
        for name in models:
            check_model(name)
    loader = loader or (lambda name: load_any(name, device=opts.device, dtype=opts.dtype))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"suite": suite, "options": asdict(opts), "models": {}}
    done = _finished(out, suite, opts) if resume else {}
    for label, name in zip(_labels(models), models):
        if label in done and done[label].get("model") == name:
            print(f"linearize eval: {name}: kept from {out / 'report.json'} (--resume)", file=sys.stderr)
            report["models"][label] = done[label]
            continue
        try:
            model, tokenizer = loader(name)
            tasks = run_suite(suite, model, tokenizer, opts, progress=progress)
            report["models"][label] = {"model": name, "status": "ok", "tasks": tasks}
        except KeyboardInterrupt:
            raise
        except Exception as err:
            if isinstance(err, torch.OutOfMemoryError):  # the generation suites hold batch x length tokens at once
                err = type(err)(f"{str(err).splitlines()[0]} Lower --batch-size (now {opts.batch_size}).")
            report["models"][label] = {"model": name, "status": "error", "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc(), "tasks": {}}
            print(f"linearize eval: {name}: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            model = tokenizer = None
        write_report(report, out)
    if echo:
        print((out / "report.md").read_text(encoding="utf-8"))
    return report


def jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
