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

LOCAL_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai")

# the harness's own task file (under lm_eval/tasks/) and the split it scores
_HARNESS_YAML = {
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
}


class LmEvalMissing(RuntimeError):
    pass


def _require():
    try:
        import lm_eval
    except ImportError:
        raise LmEvalMissing("the lm-eval suite needs lm-eval: pip install 'linearize[eval]'") from None
    return lm_eval


def _need(path: Path, task: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"local {task} needs {path} ({what} in DATA_DIR/{path.parent.name}/)")
    return path


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return rows


def _piqa_rows(data_dir: Path, task: str = "piqa") -> list[dict]:
    what = "PIQA's valid.jsonl and valid-labels.lst"
    docs = _need(data_dir / "piqa" / "valid.jsonl", task, what)
    labels = _need(data_dir / "piqa" / "valid-labels.lst", task, what)
    rows = _jsonl(docs)
    gold = [int(x) for x in labels.read_text().split()]
    if len(rows) != len(gold):
        raise ValueError(f"{docs} has {len(rows)} rows but {labels} has {len(gold)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": g} for r, g in zip(rows, gold)]


def _arc_rows(data_dir: Path, task: str) -> list[dict]:
    """llm-foundry's ARC rows ``{"query": "Question: Q", "choices": [...], "gold": i}`` as ai2_arc rows
    ``{"question": Q, "choices": {"text": [...], "label": ["A", ...]}, "answerKey": letter}``. The
    harness's prompt ``"Question: {{question}}\\nAnswer:"`` then equals llm-foundry's query plus
    ``"\\nAnswer:"``, as it does for the original rows. llm-foundry dropped ARC's ids and its labels
    (a few questions are labelled 1-4 instead of A-D); neither reaches the prompt, the choices or the
    target index. Its files hold 4 choices for every question, so the few ARC questions with 3 or 5
    options may differ from the original (SOURCES.md, note 3)."""
    path = _need(data_dir / "arc" / f"{task}.jsonl", task,
                 'llm-foundry\'s ARC rows {"query": "Question: ...", "choices": [...], "gold": i}')
    rows = []
    for n, r in enumerate(_jsonl(path), 1):
        query, choices, gold = r["query"], r["choices"], int(r["gold"])
        if not query.startswith("Question: "):
            raise ValueError(f"{path} row {n}: the query does not start with 'Question: '")
        if not 0 <= gold < len(choices):
            raise ValueError(f"{path} row {n}: gold {gold} but {len(choices)} choices")
        question = query[len("Question: "):].removesuffix("\nAnswer:")
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        rows.append({"id": f"{task}-{n}", "question": question, "choices": {"text": list(choices), "label": labels},
                     "answerKey": labels[gold]})
    return rows


def _hellaswag_rows(data_dir: Path, task: str = "hellaswag") -> list[dict]:
    """HellaSwag items as 6 lines (``activity_label + ": " + ctx``, gold label, 4 endings) as rows in the
    Hub's fields. The harness's ``process_docs`` builds the query as
    ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``; the rows carry the whole
    ``ctx`` as ``ctx_a`` and an empty ``ctx_b``, so the query is ``preprocess`` of the first line
    whatever the split between label and context (split here at the first ``": "``; a label with
    ``": "`` in it would only move text between the two fields). The endings go through its
    ``preprocess`` as they are.

    Known differences from the harness on the original ``hellaswag_val.jsonl`` (SOURCES.md, note 2):

    * the file's ``ctx`` is ``ctx_a + " " + ctx_b``, while the harness uses ``ctx_b.capitalize()``:
      where ``ctx_b`` is not empty (mostly the ActivityNet items, whose context ends in a lower-case
      sentence start such as ``"... on a roof. he"``; about 3,200 of the 10,042) the harness's query
      starts that fragment with a capital (``"He"``) and lower-cases the rest of it, this one keeps the
      text as the file has it. The split point is not in the file, so this cannot be undone.
    * the file's tag removal is narrower than the harness's ``re.sub(r"\\[.*?\\]", "", ...)``; since the
      harness runs its ``preprocess`` again on these rows, the bracketed text left in the file (one
      ``[portrait]`` tag, a dozen literal brackets) is removed as the harness would remove it from the
      original. Where the file keeps a double space, the harness's single ``"  " -> " "`` pass may give
      a different spacing from the original.

    Few-shot examples (``num_fewshot``) come from this split: the training split is not local."""
    path = _need(data_dir / "hellaswag" / "hellaswag_val_full.txt", task,
                 "HellaSwag validation, 6 lines an item: activity label + ': ' + context, gold label, 4 endings")
    lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6 (header, label, 4 endings an item)")
    rows = []
    for i in range(0, len(lines), 6):
        header, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        activity_label, sep, ctx = header.partition(": ")
        if not sep:
            raise ValueError(f"{path}:{i + 1}: no ': ' between activity label and context")
        if label not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 2}: label {label!r} is not 0-3")
        rows.append({"ind": i // 6, "activity_label": activity_label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": endings, "label": label})
    return rows


def _winogrande_rows(data_dir: Path, task: str = "winogrande") -> list[dict]:
    """llm-foundry's WinoGrande rows ``{"context_options": [s + option1, s + option2], "continuation":
    rest, "gold": 0/1}`` as the Hub's ``{"sentence": s + "_ " + rest, "option1", "option2",
    "answer": "1"/"2"}``. The harness's partial scoring gives back ``context_options`` as its choices
    (``sentence[:idx] + option``) and ``rest`` as its target (``sentence[idx + 1:].strip()``; the
    request's continuation is ``" " + rest``). ``s`` is the two contexts' common prefix, cut back to
    the last whitespace so that options that begin alike ("the pen" / "the pencil") stay whole
    words; the contexts come back the same wherever it is cut. No space is put after the ``_`` when the
    continuation starts with punctuation (``"_'s"``, ``"_."``); that only changes ``sentence``, which
    the harness strips after the blank anyway."""
    path = _need(data_dir / "winogrande" / "winogrande.jsonl", task,
                 'llm-foundry\'s WinoGrande rows {"context_options": [2 strings], "continuation": ..., "gold": 0/1}')
    rows = []
    for n, r in enumerate(_jsonl(path), 1):
        options, rest, gold = r["context_options"], r["continuation"], int(r["gold"])
        if len(options) != 2 or gold not in (0, 1):
            raise ValueError(f"{path} row {n}: needs 2 context_options and gold 0 or 1")
        a, b = options
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        while k > 0 and not a[k - 1].isspace():
            k -= 1
        if "_" in a[:k]:
            raise ValueError(f"{path} row {n}: the context has a '_', which the harness takes for the blank")
        gap = "" if rest[:1] in tuple(".,;:!?'\")") else " "
        rows.append({"sentence": a[:k] + "_" + gap + rest, "option1": a[k:], "option2": b[k:], "answer": str(gold + 1)})
    return rows


def _lambada_rows(data_dir: Path, task: str = "lambada_openai") -> list[dict]:
    path = _need(data_dir / "lambada_openai" / "lambada_test.jsonl", task,
                 "OpenAI's LAMBADA test file lambada_test.jsonl, {\"text\": passage} a line")
    rows = _jsonl(path)
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("text"), str):
            raise ValueError(f"{path} row {n}: no 'text' string")
    return [{"text": r["text"]} for r in rows]


_READERS = {"piqa": _piqa_rows, "arc_easy": _arc_rows, "arc_challenge": _arc_rows, "hellaswag": _hellaswag_rows,
            "winogrande": _winogrande_rows, "lambada_openai": _lambada_rows}


def local_rows(data_dir, task: str) -> list[dict]:
    """The rows of local ``task`` (one of :data:`LOCAL_TASKS`) in the fields its harness task reads."""
    return _READERS[task](Path(data_dir), task)


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
        harness_yaml, split = _HARNESS_YAML[task]
        rows = local_rows(data_dir, task)
        data_file = folder / f"{task}_{split}.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config = {
            "include": str(Path(lm_eval.__file__).parent / "tasks" / harness_yaml),
            "task": f"{task}_local",
            "tag": None,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data_file)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
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
