"""linearize eval: exact scoring with fake generators, prompt construction, task-file errors,
report files, a failing model next to a working one, perplexity by length, lm-eval parity."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import WORDS, converted_model, make_base_folder, synthetic_text, tiny_model

from linearize.eval.generation import ModelGenerator, score_samples, summarize
from linearize.eval.runner import EvalError, EvalOptions, load_any, run_eval, run_suite


def fixed(text):
    """A fake generator whose continuation is always ``text``."""
    return lambda prompts, max_new_tokens: [text for _ in prompts]


SAMPLE = {"input": "What is the pass key? The pass key is", "target": "12345", "length": 64, "depth": 0.5}


@pytest.mark.parametrize("output, correct", [
    (" 12345. Remember it.", True),      # right
    (" 54321. Remember it.", False),     # wrong
    ("12345", True),                     # the target is the whole output
    ("12345 and more", True),            # at the very start
    ("the key is 12345", True),          # at the very end
    (" 1234", False),                    # a prefix of the target is not enough
    ("", False),
])
def test_scoring_marks_a_sample_correct_exactly_when_the_output_contains_the_target(output, correct):
    (result,) = score_samples([SAMPLE], fixed(output), max_new_tokens=8)
    assert result["correct"] is correct
    assert result["output"] == output and "input" not in result and result["target"] == "12345"


def test_summary_gives_accuracy_overall_and_per_value_of_each_numeric_field():
    samples = [dict(SAMPLE, length=n, depth=d, index=i) for n in (64, 128) for d in (0.0, 1.0) for i in range(2)]
    answers = iter(["12345" if (s["length"] == 64 or s["depth"] == 0.0) else "no" for s in samples])
    results = score_samples(samples, lambda p, m: [next(answers)], max_new_tokens=4)
    summary = summarize(results)
    assert summary["accuracy"] == 0.75 and summary["samples"] == 8
    assert summary["by"]["length"] == {64: 1.0, 128: 0.5}
    assert summary["by"]["depth"] == {0.0: 1.0, 1.0: 0.5}
    assert "index" not in summary["by"]  # identifiers are not grouped by


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_folder(tmp_path_factory.mktemp("eval") / "base")


@pytest.fixture(scope="module")
def word_tokenizer(base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


class FixedIdsModel(torch.nn.Module):
    """A fake causal LM whose ``generate`` always appends the same token ids."""

    def __init__(self, ids):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.ids = torch.tensor([ids])

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, self.ids[:, :max_new_tokens]], dim=1)


def test_a_target_split_across_tokens_is_found_in_the_decoded_continuation(word_tokenizer):
    target = f"{WORDS[5]} {WORDS[6]}"  # two tokens
    generate = ModelGenerator(FixedIdsModel([4, 5, 6, 7]), word_tokenizer)
    (result,) = score_samples([{"input": f"{WORDS[2]} {WORDS[3]}", "target": target}], generate, max_new_tokens=4)
    assert result["correct"] and result["output"] == f"{WORDS[4]} {WORDS[5]} {WORDS[6]} {WORDS[7]}"
    (cut,) = score_samples([{"input": WORDS[2], "target": target}], generate, max_new_tokens=2)  # only one half
    assert not cut["correct"]


@pytest.mark.parametrize("length", [256, 700])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt_has_the_requested_length_and_the_key_at_the_requested_depth(word_tokenizer, length, depth):
    from linearize.eval.passkey import QUESTION, TASK, key_line, passkey_samples

    (sample,) = passkey_samples(word_tokenizer, [length], [depth], samples=1, seed=3)
    key = sample["target"]
    assert len(key) == 5 and key.isdigit() and sample["input"].endswith(QUESTION)
    # the word-level tokenizer gives one token a whitespace-separated word
    words = sample["input"].split()
    assert sample["tokens"] == len(words)
    assert length - 4 < sample["tokens"] <= length  # shorter by less than one filler sentence (<= 4 words)
    start, end = len(TASK.split()), len(words) - len(QUESTION.split())  # the filler region
    position = words.index(f"{key}.")  # "The pass key is 12345." -> its 5th word
    filler_before = position - 4 - start
    filler_total = end - start - len(key_line(key).split())
    assert abs(filler_before / filler_total - depth) <= 0.02  # within a filler sentence


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3"])
def test_needle_prompt_has_the_requested_length_and_the_needle_at_the_requested_depth(word_tokenizer, task):
    from linearize.eval.niah import needle, niah_samples

    for depth in (0.0, 0.5, 1.0):
        (s,) = niah_samples(word_tokenizer, task, [400], [depth], samples=1)
        words = s["input"].split()
        assert 400 - 20 < len(words) <= 400  # shorter by less than one haystack sentence
        line = needle(s["key"], s["target"], "uuid" if task.endswith("3") else "number").split()
        at = next(i for i in range(len(words)) if words[i:i + len(line)] == line)
        context_start = words.index("afterwards.") + 1
        context_end = max(i for i, w in enumerate(words) if w == "What")
        before, total = at - context_start, context_end - context_start - len(line)
        assert abs(before / total - depth) <= 0.06  # within a haystack sentence
        if task.endswith("3"):
            assert len(s["target"]) == 36 and s["target"].count("-") == 4
        else:
            assert len(s["target"]) == 7 and s["target"].isdigit()


def test_needle_haystack_from_a_user_file(word_tokenizer, tmp_path):
    from linearize.eval.niah import niah_samples

    (tmp_path / "hay.json").write_text(json.dumps({"text": "Alpha beta gamma. Delta epsilon! Zeta eta theta?"}))
    (s,) = niah_samples(word_tokenizer, "niah_single_2", [200], [0.5], samples=1, haystack=str(tmp_path / "hay.json"))
    assert "Delta epsilon!" in s["input"] and "sat" not in s["input"]


def test_task_file_errors_name_the_line_and_the_field(tmp_path):
    from linearize.eval.task_file import TaskFileError, load_task_file

    f = tmp_path / "t.jsonl"
    f.write_text('{"input": "a", "target": "b"}\n\n{"input": "c"}\n')
    with pytest.raises(TaskFileError, match=r"t.jsonl:3: missing field 'target'"):
        load_task_file(f)
    f.write_text('{"target": "b"}\n')
    with pytest.raises(TaskFileError, match=r":1: missing field 'input'"):
        load_task_file(f)
    f.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": 3}\n')
    with pytest.raises(TaskFileError, match=r":2: field 'target' must be a non-empty string"):
        load_task_file(f)
    f.write_text('{"input": "a", "target": "b"}\n{oops\n')
    with pytest.raises(TaskFileError, match=r":2: not valid JSON"):
        load_task_file(f)
    with pytest.raises(FileNotFoundError):
        load_task_file(tmp_path / "missing.jsonl")


def test_task_file_accuracy_overall_and_per_numeric_field(tmp_path):
    from linearize.eval.runner import run_suite

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"input": f"q{i}", "target": "yes" if i % 2 else "no", "length": 10 * (i % 2),
                                     "hops": i % 3}) + "\n" for i in range(6)))
    tasks = run_suite("task-file", None, None, EvalOptions(task_files=[str(f)]), generate=fixed("yes"))
    metrics = tasks["mine"]["metrics"]
    assert metrics["accuracy"] == 0.5 and metrics["by"]["length"] == {0: 0.0, 10: 1.0}
    assert metrics["by"]["hops"] == {0: 0.5, 1: 0.5, 2: 0.5} and "line" not in metrics["by"]


def test_unknown_suite_and_unusable_model_folder_are_clear_errors(tmp_path, capsys):
    from linearize.cli import main

    with pytest.raises(EvalError, match="unknown suite 'bogus'; choose from passkey, niah"):
        run_eval(["x"], "bogus", tmp_path / "out", echo=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="neither a converted model .no linearize.json. nor a transformers model folder"):
        load_any(str(tmp_path / "empty"))
    assert main(["eval", "m", "--suite", "bogus", "--out", str(tmp_path / "o")]) == 2
    assert "unknown suite 'bogus'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "empty"), "--suite", "passkey", "--out", str(tmp_path / "o")]) == 2
    assert "neither a converted model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere.gguf"), "--suite", "passkey", "--out", str(tmp_path / "o")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert main(["eval", "m", "--suite", "task-file", "--out", str(tmp_path / "o")]) == 2
    assert "needs --task-file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def converted_folder(base, tmp_path_factory):
    from linearize import ConversionSpec, convert_model, save
    from linearize.models import load_teacher

    model, tokenizer, source = load_teacher(str(base))
    convert_model(model, ConversionSpec("lolcats", layers=[0, 2], settings={"window_size": 8, "sink_size": 2}))
    return save(model, tmp_path_factory.mktemp("eval") / "converted", tokenizer, source.reference)


OPTS = dict(lengths=[96, 160], depths=[0.0, 1.0], samples=1, max_new_tokens=3)


def test_report_files_exist_and_the_table_lists_every_model_and_task(base, converted_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    opts = EvalOptions(**OPTS, niah_tasks=["niah_single_1", "niah_single_3"])
    report = run_eval([str(base), str(converted_folder)], "niah", out, opts, progress=False)
    table = capsys.readouterr().out
    for name in ("report.json", "report.md", "niah_single_1_heatmap.png", "niah_single_3_heatmap.png"):
        assert (out / name).is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["suite"] == "niah" and set(saved["models"]) == {str(base), str(converted_folder)}
    for entry in saved["models"].values():
        assert entry["status"] == "ok"
        assert len(entry["tasks"]["niah_single_1"]["results"]) == 4  # 2 lengths x 2 depths x 1 sample
        assert all({"output", "correct", "target", "length", "depth"} <= set(r) for r in entry["tasks"]["niah_single_1"]["results"])
    header = table.splitlines()[2]
    assert "niah_single_1" in header and "niah_single_3" in header
    rows = [line for line in table.splitlines() if line.startswith(f"| {base} |") or line.startswith(f"| {converted_folder} |")]
    assert len(rows) >= 2 and all(line.count("|") == 4 for line in rows[:2])
    assert report["models"][str(base)]["tasks"]["niah_single_1"]["metrics"]["samples"] == 4


def test_a_failing_model_is_reported_and_the_others_keep_their_results(base, tmp_path):
    out = tmp_path / "out"

    def loader(name):
        if name == "broken":
            # the first model's results are already on disk when the next one starts
            assert "ok" == json.loads((out / "report.json").read_text())["models"]["first"]["status"]
            raise RuntimeError("boom")
        return load_any(str(base))

    report = run_eval(["first", "broken", "last"], "passkey", out, EvalOptions(**OPTS), loader=loader,
                      progress=False, echo=False)
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"]["broken"]["status"] == "error" and "boom" in saved["models"]["broken"]["error"]
    for name in ("first", "last"):
        assert saved["models"][name]["status"] == "ok" and len(saved["models"][name]["tasks"]["passkey"]["results"]) == 4
    md = (out / "report.md").read_text()
    assert "| broken | failed |" in md and "RuntimeError: boom" in md
    assert report["models"]["last"]["status"] == "ok"


def test_resume_keeps_finished_models_and_runs_failed_and_new_ones(base, tmp_path):
    out, loaded = tmp_path / "out", []

    def loader(name):
        loaded.append(name)
        if name == "broken" and loaded.count("broken") == 1:  # fails in the first run only
            raise RuntimeError("boom")
        return load_any(str(base))

    run_eval(["first", "broken"], "passkey", out, EvalOptions(**OPTS), loader=loader, progress=False, echo=False)
    first = json.loads((out / "report.json").read_text())["models"]["first"]
    report = run_eval(["first", "broken", "third"], "passkey", out, EvalOptions(**OPTS), loader=loader,
                      progress=False, echo=False, resume=True)
    assert loaded == ["first", "broken", "broken", "third"]  # the finished one not loaded again
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"]["first"] == first
    assert [saved["models"][m]["status"] for m in ("first", "broken", "third")] == ["ok", "ok", "ok"]
    assert report["models"]["first"] == first and len(report["models"]["third"]["tasks"]["passkey"]["results"]) == 4
    # without resume everything runs again
    run_eval(["first"], "passkey", out, EvalOptions(**OPTS), loader=loader, progress=False, echo=False)
    assert loaded[-1] == "first"


def test_resume_refuses_a_report_of_other_options_or_another_suite(base, tmp_path):
    out = tmp_path / "out"
    run_eval(["m"], "passkey", out, EvalOptions(**OPTS), loader=lambda n: load_any(str(base)), progress=False, echo=False)
    with pytest.raises(EvalError, match=r"other options \(samples\)"):
        run_eval(["m"], "passkey", out, EvalOptions(**{**OPTS, "samples": 2}), loader=lambda n: load_any(str(base)),
                 progress=False, echo=False, resume=True)
    with pytest.raises(EvalError, match="'passkey' report, not 'niah'"):
        run_eval(["m"], "niah", out, EvalOptions(**OPTS), loader=lambda n: load_any(str(base)),
                 progress=False, echo=False, resume=True)


def _direct_ppl(model, tokens, length, chunks):
    nll, nll_last, n, n_last = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for c in range(chunks):
            x = tokens[c * length:(c + 1) * length][None]
            logits = model(x, use_cache=False).logits[0, :-1]
            per = F.cross_entropy(logits.float(), x[0, 1:], reduction="none")
            nll, n = nll + float(per.sum()), n + per.numel()
            last = per[length - length // 4 - 1:]
            nll_last, n_last = nll_last + float(last.sum()), n_last + last.numel()
    return math.exp(nll / n), math.exp(nll_last / n_last)


@pytest.mark.parametrize("kind", ["teacher", "lolcats"])
def test_ppl_by_length_equals_a_direct_computation(kind):
    from linearize import ConversionSpec
    from linearize.eval.ppl_by_length import ppl_by_length

    model = tiny_model("llama") if kind == "teacher" else converted_model(
        "llama", ConversionSpec("lolcats", layers="all", settings={"window_size": 8, "sink_size": 2}))
    tokens = torch.randint(1, 97, (200,), generator=torch.Generator().manual_seed(0))
    rows = ppl_by_length(model, tokens, [32, 64, 128], max_chunks=2, segment=24)  # segments cut across chunks' middles
    for row, (length, chunks) in zip(rows, [(32, 2), (64, 2), (128, 1)]):
        ppl, ppl_last = _direct_ppl(model, tokens, length, chunks)
        assert row["chunks"] == chunks and row["tokens"] == chunks * (length - 1)
        assert row["ppl"] == pytest.approx(ppl, rel=1e-4) and row["ppl_last_quarter"] == pytest.approx(ppl_last, rel=1e-4)
    assert ppl_by_length(model, tokens, [256])[0]["chunks"] == 0  # too short a text: reported, not an error


def _synthetic_piqa(folder, items=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(2, 97, (n,), generator=g))  # noqa: E731
    (folder / "piqa").mkdir(parents=True)
    rows = [{"goal": words(5), "sol1": words(3), "sol2": words(4)} for _ in range(items)]
    (folder / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "piqa" / "valid-labels.lst").write_text("".join(f"{int(i)}\n" for i in torch.randint(0, 2, (items,), generator=g)))
    return folder


def test_lm_eval_piqa_parity_with_the_harness_hf_model_type(base, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from linearize.eval.harness import evaluate_lm_eval, register, write_local_tasks

    data = _synthetic_piqa(tmp_path / "data")
    model, tokenizer = load_any(str(base))
    ours = evaluate_lm_eval(model, tokenizer, ["piqa"], limit=20, data_dir=data, batch_size=4)["piqa"]
    assert len(ours["samples"]) == 20 and 0.0 <= ours["metrics"]["acc"] <= 1.0

    names = write_local_tasks(data, ["piqa"], tmp_path / "tasks")
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    register()
    for model_type, args in [("hf", f"pretrained={base},dtype=float32"), ("linearize", f"path={base}")]:
        theirs = simple_evaluate(model=model_type, model_args=args, tasks=[names["piqa"]], limit=20, device="cpu",
                                 batch_size=4, task_manager=manager, bootstrap_iters=0)["results"][names["piqa"]]
        assert theirs["acc,none"] == ours["metrics"]["acc"] and theirs["acc_norm,none"] == ours["metrics"]["acc_norm"]
    per_item = [s["acc"] for s in ours["samples"]]
    assert sum(per_item) / 20 == ours["metrics"]["acc"]


# --- lm-eval tasks from local files in the shared data's formats: the harness's own task functions on
# the converted rows give the prompts the harness builds from the original rows (computed by hand here).

ARC_ROWS = [
    {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium", "neon"], "gold": 1},
    {"query": "Question: What is 2 + 2?", "choices": ["3", "4", "5"], "gold": 0},
]
HELLASWAG_ITEMS = [  # header, gold, endings, as hellaswag_val_full.txt has them
    ("Roof shingle removal: A man is sitting on a roof. he", "3",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."]),
    ("Computers and Electronics: How to reboot: a guide. Find the [portrait] button.", "0",
     ["Press it [twice].", "Wait.", "Unplug it.", "Call someone."]),
]
WINOGRANDE_ROWS = [
    {"context_options": ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"],
     "continuation": "always got the easier cases.", "gold": 1},
    {"context_options": ["Bobby used his pen rather than the pencil because the pen", "Bobby used his pen rather than the pencil because the pencil"],
     "continuation": "was full of ink.", "gold": 0},
    {"context_options": ["Anna", "Maria"], "continuation": "'s car broke down.", "gold": 0},
]
LAMBADA_ROWS = [{"text": "He opened the door and saw his old friend Tom"}, {"text": "\"Run,\" she said.\n\nSo they ran home"}]


def _write_shared_formats(folder):
    """A few rows of each task, in the file formats of shared/data (SOURCES.md)."""
    (folder / "arc").mkdir(parents=True)
    for task in ("arc_easy", "arc_challenge"):
        (folder / "arc" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC_ROWS))
    (folder / "hellaswag").mkdir()
    (folder / "hellaswag" / "hellaswag_val_full.txt").write_text(
        "".join("\n".join([header, gold, *endings]) + "\n" for header, gold, endings in HELLASWAG_ITEMS))
    (folder / "winogrande").mkdir()
    (folder / "winogrande" / "winogrande.jsonl").write_text("".join(json.dumps(r) + "\n" for r in WINOGRANDE_ROWS))
    (folder / "lambada_openai").mkdir()
    (folder / "lambada_openai" / "lambada_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LAMBADA_ROWS))
    return folder


NEW_LOCAL = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai"]


@pytest.fixture(scope="module")
def local_harness_tasks(tmp_path_factory):
    """The harness's task objects for the generated YAMLs, and the requests each builds (zero-shot)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from linearize.eval.harness import write_local_tasks

    root = tmp_path_factory.mktemp("lm_eval_local")
    names = write_local_tasks(_write_shared_formats(root / "data"), NEW_LOCAL, root / "tasks")
    assert names == {t: f"{t}_local" for t in NEW_LOCAL}
    loaded = TaskManager(include_path=str(root / "tasks")).load(list(names.values()))["tasks"]
    tasks = {t: loaded[names[t]] for t in NEW_LOCAL}
    for task in tasks.values():
        task.build_all_requests(limit=None)
    return tasks


def _docs(task):
    return list(task.test_docs() if task.has_test_docs() else task.validation_docs())


def _requests(task):
    """[(context, continuation) for each request] per document, in document order."""
    by_doc = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    return [by_doc[i] for i in sorted(by_doc)]


@pytest.mark.parametrize("task, split", [("arc_easy", "test"), ("arc_challenge", "test"), ("hellaswag", "validation"),
                                         ("winogrande", "validation"), ("lambada_openai", "test")])
def test_local_task_reads_the_split_the_harness_scores(local_harness_tasks, task, split):
    t = local_harness_tasks[task]
    assert (t.has_test_docs(), t.has_validation_docs(), t.has_training_docs()) == (split == "test", split == "validation", False)
    assert len(_docs(t)) == {"hellaswag": 2, "winogrande": 3, "lambada_openai": 2}.get(task, 2)


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_local_arc_prompts_equal_the_harness_prompts_for_the_original_rows(local_harness_tasks, task):
    t = local_harness_tasks[task]
    docs = _docs(t)
    assert [t.doc_to_text(d) for d in docs] == ["Question: Which gas do plants take in?\nAnswer:", "Question: What is 2 + 2?\nAnswer:"]
    assert [t.doc_to_choice(d) for d in docs] == [r["choices"] for r in ARC_ROWS]
    assert [t.doc_to_target(d) for d in docs] == [1, 0]
    assert _requests(t)[0] == [("Question: Which gas do plants take in?\nAnswer:", " " + c) for c in ARC_ROWS[0]["choices"]]
    assert docs[1]["choices"]["label"] == ["A", "B", "C"] and docs[1]["answerKey"] == "A"


def test_local_hellaswag_query_and_endings_after_the_harness_processing(local_harness_tasks):
    t = local_harness_tasks["hellaswag"]
    docs = _docs(t)
    # the harness's process_docs puts back ": " between label and context; its preprocess removes what
    # the file's narrower tag removal left in brackets and collapses the double space that leaves
    assert [t.doc_to_text(d) for d in docs] == ["Roof shingle removal: A man is sitting on a roof. he",
                                                "Computers and Electronics: How to reboot: a guide. Find the button."]
    assert t.doc_to_choice(docs[0]) == HELLASWAG_ITEMS[0][2]
    assert t.doc_to_choice(docs[1]) == ["Press it .", "Wait.", "Unplug it.", "Call someone."]
    assert [t.doc_to_target(d) for d in docs] == [3, 0]
    assert docs[1]["activity_label"] == "Computers and Electronics"
    assert _requests(t)[0][3] == ("Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing on a roof.")


def test_local_winogrande_rebuilds_the_partial_scoring_contexts_and_continuation(local_harness_tasks):
    t = local_harness_tasks["winogrande"]
    docs = _docs(t)
    for doc, row, requests in zip(docs, WINOGRANDE_ROWS, _requests(t)):
        assert t.doc_to_choice(doc) == row["context_options"]
        assert t.doc_to_target(doc) == row["continuation"]
        assert t.doc_to_text(doc) == row["gold"]  # partial scoring: the gold is the index of the context
        assert requests == [(c, " " + row["continuation"]) for c in row["context_options"]]
    assert [(d["sentence"], d["option1"], d["option2"], d["answer"]) for d in docs] == [
        ("Sarah was a much better surgeon than Maria so _ always got the easier cases.", "Sarah", "Maria", "2"),
        ("Bobby used his pen rather than the pencil because the _ was full of ink.", "pen", "pencil", "1"),
        ("_'s car broke down.", "Anna", "Maria", "1"),
    ]


def test_local_lambada_context_and_last_word(local_harness_tasks):
    t = local_harness_tasks["lambada_openai"]
    assert _requests(t) == [[("He opened the door and saw his old friend", " Tom")],
                            [("\"Run,\" she said.\n\nSo they ran", " home")]]


@pytest.mark.parametrize("task, missing", [("arc_easy", "arc/arc_easy.jsonl"), ("arc_challenge", "arc/arc_challenge.jsonl"),
                                           ("hellaswag", "hellaswag/hellaswag_val_full.txt"),
                                           ("winogrande", "winogrande/winogrande.jsonl"),
                                           ("lambada_openai", "lambada_openai/lambada_test.jsonl"),
                                           ("piqa", "piqa/valid.jsonl")])
def test_a_missing_local_file_names_the_file_and_the_folder_contents(tmp_path, task, missing):
    pytest.importorskip("lm_eval")
    from linearize.eval.harness import write_local_tasks

    with pytest.raises(FileNotFoundError) as err:
        write_local_tasks(tmp_path / "data", [task], tmp_path / "tasks")
    folder = missing.split("/")[0]
    assert str(tmp_path / "data" / missing) in str(err.value) and f"DATA_DIR/{folder}/" in str(err.value)


def test_lm_eval_local_winogrande_and_lambada_end_to_end(base, tmp_path):
    """The harness's metrics on the tiny model agree with its per-sample results."""
    pytest.importorskip("lm_eval")
    from linearize.eval.harness import evaluate_lm_eval

    w = lambda *idx: " ".join(WORDS[i] for i in idx)  # noqa: E731
    data = tmp_path / "data"
    (data / "winogrande").mkdir(parents=True)
    rows = [{"context_options": [w(5, 6, 7 + i), w(5, 6, 20 + i)], "continuation": w(30 + i, 40), "gold": i % 2} for i in range(6)]
    (data / "winogrande" / "winogrande.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "lambada_openai").mkdir()
    (data / "lambada_openai" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": w(8, 9, 10, 11 + i)}) + "\n" for i in range(5)))
    model, tokenizer = load_any(str(base))
    report = evaluate_lm_eval(model, tokenizer, ["winogrande", "lambada_openai"], limit=5, data_dir=data, batch_size=4)

    wino = report["winogrande"]
    assert len(wino["samples"]) == 5 and {"acc", "acc_stderr"} <= set(wino["metrics"])
    picked = [max(range(2), key=lambda i: s["responses"][i][0]) for s in sorted(wino["samples"], key=lambda s: s["doc_id"])]
    assert [s["acc"] for s in sorted(wino["samples"], key=lambda s: s["doc_id"])] == [float(p == r["gold"]) for p, r in zip(picked, rows)]
    assert wino["metrics"]["acc"] == pytest.approx(sum(p == r["gold"] for p, r in zip(picked, rows)) / 5)

    lam = report["lambada_openai"]
    assert len(lam["samples"]) == 5 and {"perplexity", "acc"} <= set(lam["metrics"])
    ll = [s["responses"][0][0] for s in lam["samples"]]
    assert all(x < 0 for x in ll)
    assert lam["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(ll) / 5), rel=1e-6)
    assert lam["metrics"]["acc"] == pytest.approx(sum(s["responses"][0][1] for s in lam["samples"]) / 5)


@pytest.mark.parametrize("kind", ["teacher", "lolcats"])
def test_batched_generation_gives_each_prompt_what_it_gets_alone(base, word_tokenizer, kind):
    from conftest import synthetic_text
    from linearize import ConversionSpec, convert_model
    from linearize.models import load_teacher

    model, _, _ = load_teacher(str(base))
    if kind != "teacher":
        convert_model(model, ConversionSpec(kind, settings={"window_size": 4, "sink_size": 1}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "feature_map" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    samples = [{"input": synthetic_text(n, seed=n), "target": WORDS[1]} for n in (5, 23, 11, 30, 17)]
    alone = score_samples(samples, ModelGenerator(model, word_tokenizer), max_new_tokens=6)
    batched = score_samples(samples, ModelGenerator(model, word_tokenizer, batch_size=3), max_new_tokens=6, batch_size=3)
    assert [r["output"] for r in batched] == [r["output"] for r in alone]
    assert len({r["output"] for r in alone}) > 1  # the prompts lead to different continuations


def test_lm_eval_report_shows_the_literature_metric_an_average_and_every_metric():
    from linearize.eval.report import markdown

    def entry(hs_norm, piqa, lam):
        return {"status": "ok", "tasks": {
            "hellaswag": {"metrics": {"acc": 0.1, "acc_stderr": 0.01, "acc_norm": hs_norm, "acc_norm_stderr": 0.02}},
            "piqa": {"metrics": {"acc": piqa, "acc_stderr": 0.03}},
            "lambada_openai": {"metrics": {"acc": lam, "perplexity": 12.345, "perplexity_stderr": 1.5}}}}

    report = {"suite": "lm-eval", "models": {"teacher": entry(0.4, 0.6, 0.5), "student": entry(0.3, 0.6, 0.3),
                                              "broken": {"status": "failed", "error": "boom", "tasks": {}}}}
    lines = markdown(report).splitlines()
    assert lines[2] == "| model | hellaswag (acc_norm) | piqa (acc) | lambada_openai (acc) | average |"
    assert lines[4] == "| teacher | 0.400 | 0.600 | 0.500 | 0.500 |"
    assert lines[5] == "| student | 0.300 | 0.600 | 0.300 | 0.400 |"
    assert lines[6] == "| broken | failed | failed | failed | failed |"
    every = lines[lines.index("### every metric") + 2]
    assert every.startswith("| model | hellaswag acc | hellaswag acc_norm | piqa acc | lambada_openai acc | lambada_openai perplexity |")
    teacher_row = next(l for l in lines[lines.index("### every metric"):] if l.startswith("| teacher"))
    assert "0.400 ± 0.020" in teacher_row and "12.35 ± 1.50" in teacher_row


class _TensorShapes:
    """Every tensor shape an op produces inside the block (a TorchDispatchMode)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        shapes = self.shapes = set()

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                shapes.update(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
                return out

        self.mode = Record()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def quadratic(self, T: int) -> list[tuple]:
        """The shapes with two dimensions of at least ``T``."""
        return sorted(s for s in self.shapes if sum(d >= T for d in s) >= 2)


@pytest.mark.parametrize("kind, settings", [
    ("teacher", {}), ("hedgehog", {}), ("lolcats", {"window_size": 8, "sink_size": 2}), ("lawcat", {}),
    ("still", {"chunk_size": 16, "tokens_per_chunk": 2, "selected_budget": 8}),
])
def test_evaluating_a_converted_model_builds_no_length_squared_tensor_and_keeps_a_fixed_cache(base, word_tokenizer,
                                                                                              kind, settings):
    """Long left-padded prompts through the generation suites' generator and perplexity by
    length: a converted model never holds a tensor with two dimensions of the prompt's length
    (no attention matrix, no [B, 1, T, T] mask), and its cache is as large after a long prompt
    as after a short one. The teacher, as a control, does build [B, 1, T, T] masks."""
    from linearize import ConversionSpec, convert_model
    from linearize.cache import cache_nbytes
    from linearize.eval.ppl_by_length import token_nll
    from linearize.models import load_teacher

    model, _, _ = load_teacher(str(base))
    if kind != "teacher":
        convert_model(model, ConversionSpec(kind, settings=settings))
    prompts = [synthetic_text(200, seed=1), synthetic_text(160, seed=2)]
    T = len(word_tokenizer(prompts[0])["input_ids"])  # longer than the vocabulary (97), every chunk, window, conv
    assert T >= 200 > len(word_tokenizer(prompts[1])["input_ids"])
    with _TensorShapes() as seen:
        outputs = ModelGenerator(model, word_tokenizer, batch_size=2)(prompts, max_new_tokens=3)
        token_nll(model, torch.tensor(word_tokenizer(prompts[0])["input_ids"]), segment=64)
    assert len(outputs) == 2
    if kind == "teacher":
        assert (2, 1, T, T) in seen.quadratic(T)
        return
    assert seen.quadratic(T) == []
    sizes = []
    for n in (20, T):
        with torch.no_grad():
            out = model(torch.tensor([word_tokenizer(prompts[0])["input_ids"][:n]]), use_cache=True)
        sizes.append(cache_nbytes(out.cache if hasattr(out, "cache") else out.past_key_values))
    assert sizes[0] == sizes[1] > 0


def test_merge_reports_puts_models_side_by_side_and_refuses_runs_that_do_not_compare():
    from linearize.eval.report import merge_reports

    opts = {"lengths": [1024], "samples": 2, "batch_size": 4, "device": "cuda"}
    a = {"suite": "passkey", "options": opts, "models": {"/m/teacher.gguf": {"model": "/m/teacher.gguf", "status": "ok", "tasks": {"x": 1}}}}
    b = {"suite": "passkey", "options": {**opts, "batch_size": 16}, "models": {"/r/lolcats": {"model": "/r/lolcats", "status": "ok", "tasks": {"x": 2}}}}
    merged = merge_reports([a, b], {"/m/teacher.gguf": "teacher", "/r/lolcats": "lolcats"})
    assert list(merged["models"]) == ["teacher", "lolcats"] and merged["models"]["lolcats"]["tasks"] == {"x": 2}
    with pytest.raises(ValueError, match="different options \\(samples\\)"):
        merge_reports([a, {**b, "options": {**opts, "samples": 3}}])
    with pytest.raises(ValueError, match="cannot merge"):
        merge_reports([a, {**b, "suite": "niah"}])
    with pytest.raises(ValueError, match="in two"):
        merge_reports([a, a])


def test_a_model_out_of_memory_is_reported_with_the_fix(base, tmp_path):
    """An out-of-memory model fails alone, and its report says which option to lower."""
    def loader(name):
        model, tok = load_any(str(base))
        if name == "big":
            def oom(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.25 GiB.")
            model.generate = oom
        return model, tok

    opts = EvalOptions(**{**OPTS, "batch_size": 4})
    run_eval(["big", "small"], "passkey", tmp_path / "out", opts, loader=loader, progress=False, echo=False)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["models"]["big"]["status"] == "error"
    assert "Tried to allocate 2.25 GiB. Lower --batch-size (now 4)." in saved["models"]["big"]["error"]
    assert saved["models"]["small"]["status"] == "ok"


def test_chunked_prefill_gives_the_same_answers_with_shorter_forwards(base, converted_folder, tmp_path):
    """`--prefill-chunk 7`: the teacher and a converted model prefill each left-padded prompt
    batch at most 7 tokens a forward through their caches, and answer exactly as with one
    forward over the whole prompt."""
    for name in (str(base), str(converted_folder)):
        model, tok = load_any(name)
        widths = []
        model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                        with_kwargs=True)
        results = {}
        for chunk in (None, 7):
            widths.clear()
            opts = EvalOptions(**{**OPTS, "batch_size": 2, "prefill_chunk": chunk})
            results[chunk] = run_suite("passkey", model, tok, opts)["passkey"]["results"]
            assert (max(widths) <= 7) if chunk else (max(widths) >= 96)
        assert [r["output"] for r in results[7]] == [r["output"] for r in results[None]]
    with pytest.raises(EvalError, match="prefill-chunk must be a positive"):
        run_eval([str(base)], "passkey", tmp_path / "x", EvalOptions(**{**OPTS, "prefill_chunk": 0}), progress=False, echo=False)


def test_a_report_read_back_from_json_orders_its_lengths_as_numbers():
    """JSON turns the by-length keys into strings; the markdown still orders them 1K, 2K, ..., 32K."""
    from linearize.eval.report import markdown

    by = {n: i / 10 for i, n in enumerate([1024, 2048, 4096, 8192, 16384, 32768])}
    metrics = {"accuracy": 0.5, "by": {"length": by}}
    report = {"suite": "passkey", "options": {}, "models": {"m": {"model": "m", "status": "ok", "tasks": {"passkey": {"metrics": metrics}}}}}
    text = markdown(json.loads(json.dumps(report)))
    header = next(line for line in text.splitlines() if line.startswith("| model | 1024"))
    assert header == "| model | 1024 | 2048 | 4096 | 8192 | 16384 | 32768 |"
    row = text.splitlines()[text.splitlines().index(header) + 2]
    assert row == "| m | 0.000 | 0.100 | 0.200 | 0.300 | 0.400 | 0.500 |"
