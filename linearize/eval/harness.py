"""lm-evaluation-harness (``pip install lm-eval``, 0.4.x) for converted models and teachers.

* :func:`evaluate_lm_eval` scores a model already in memory through ``lm_eval.simple_evaluate``
  with ``HFLM(pretrained=model, tokenizer=tokenizer)``: the harness's own requests, batching and
  metrics. A converted model answers the harness's forward calls through its own attention
  (its recurrent students, with their fixed-size cache).
* Offline data: with ``data_dir``, tasks listed in :data:`LOCAL_TASKS` read their rows from that
  folder. A generated task YAML ``include``s the harness's own task file (so its prompt,
  choices, target and metrics are used as they are) and swaps the Hub data set for
  ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``. Its task name is
  ``<task>_local``; results are reported under the plain name.
* The harness's CLI: :func:`register` adds the model type ``linearize``
  (``model_args: path=DIR_OR_MODEL``, plus any ``HFLM`` argument such as ``batch_size``).
  lm-eval has no plugin mechanism for models, so run its CLI through ``linearize-lm-eval``, which
  registers the type and then hands every argument to ``lm_eval`` unchanged::

      linearize-lm-eval --model linearize --model_args path=runs/smoke --tasks piqa --device cpu
"""

from __future__ import annotations

import json
from pathlib import Path

LOCAL_TASKS = ("piqa",)


class LmEvalMissing(RuntimeError):
    pass


def _require():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LmEvalMissing("the lm-eval suite needs lm-eval: pip install 'linearize[eval]'") from None


def _piqa_rows(data_dir: Path) -> list[dict]:
    folder = data_dir / "piqa"
    docs, labels = folder / "valid.jsonl", folder / "valid-labels.lst"
    for f in (docs, labels):
        if not f.is_file():
            raise FileNotFoundError(f"local piqa needs {f} (PIQA's valid.jsonl and valid-labels.lst in DATA_DIR/piqa/)")
    rows = [json.loads(line) for line in docs.read_text(encoding="utf-8").splitlines() if line.strip()]
    gold = [int(x) for x in labels.read_text().split()]
    if len(rows) != len(gold):
        raise ValueError(f"{docs} has {len(rows)} rows but {labels} has {len(gold)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": g} for r, g in zip(rows, gold)]


def write_local_tasks(data_dir, tasks: list[str], folder) -> dict[str, str]:
    """Write task YAMLs (and the rows they read) for the local ``tasks`` into ``folder``.
    Returns ``{task: harness task name}`` for the tasks it wrote."""
    import lm_eval
    import yaml

    data_dir, folder = Path(data_dir), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        if task not in LOCAL_TASKS:
            continue
        rows = _piqa_rows(data_dir)
        data_file = folder / f"{task}_validation.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        harness_yaml = Path(lm_eval.__file__).parent / "tasks" / task / f"{task}.yaml"
        config = {
            "include": str(harness_yaml),
            "task": f"{task}_local",
            "tag": None,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(data_file)}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
        }
        (folder / f"{task}_local.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names[task] = f"{task}_local"
    return names


def _sample_record(s: dict) -> dict:
    out = {"doc_id": s.get("doc_id"), "target": s.get("target")}
    for key in ("acc", "acc_norm", "exact_match"):
        if key in s:
            out[key] = s[key]
    resps = s.get("filtered_resps")
    if resps is not None:
        out["responses"] = [[float(x) if isinstance(x, (int, float)) else str(x) for x in (r if isinstance(r, (list, tuple)) else [r])]
                            for r in resps]
    return out


def evaluate_lm_eval(model, tokenizer, tasks: list[str], limit=None, num_fewshot=None, data_dir=None,
                     batch_size: int = 8, workdir=None, max_length: int | None = None) -> dict:
    """Score ``model`` on ``tasks`` with the harness. Returns ``{task: {"metrics": {...},
    "samples": [...]}}``; metrics as the harness names them (``acc``, ``acc_norm``, ...,
    ``*_stderr``)."""
    _require()
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir or tmp) / "lm_eval_tasks"
        names = write_local_tasks(data_dir, tasks, folder) if data_dir else {}
        manager = TaskManager(include_path=str(folder)) if names else TaskManager()
        kwargs = {"max_length": max_length} if max_length else {}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        out = simple_evaluate(model=lm, tasks=[names.get(t, t) for t in tasks], limit=limit, num_fewshot=num_fewshot,
                              task_manager=manager, log_samples=True, bootstrap_iters=1000)
    report = {}
    for task in tasks:
        name = names.get(task, task)
        metrics = {k.split(",")[0]: v for k, v in out["results"][name].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "alias"}
        report[task] = {"metrics": metrics, "samples": [_sample_record(s) for s in out["samples"].get(name, [])]}
    return report


_REGISTERED = False


def register() -> None:
    """Register the ``linearize`` model type with the harness (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _require()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("linearize")
    class LinearizeLM(HFLM):
        """``--model linearize --model_args path=DIR``: a converted model folder (``linearize.load``)
        or anything ``load_teacher`` accepts; other model_args go to ``HFLM``."""

        def __init__(self, path: str, device: str | None = None, dtype: str | None = None, **kwargs):
            from .runner import load_any

            model, tokenizer = load_any(path, device=device, dtype=dtype)
            kwargs.pop("pretrained", None)
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    _REGISTERED = True


def lm_eval_cli() -> None:
    """``linearize-lm-eval``: the harness's own CLI with the ``linearize`` model type registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
