"""linearize eval: exact scoring with fake generators, prompt construction, task-file errors,
report files, a failing model next to a working one, perplexity by length, lm-eval parity."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import WORDS, converted_model, make_base_folder, tiny_model

from linearize.eval.generation import ModelGenerator, score_samples, summarize
from linearize.eval.runner import EvalError, EvalOptions, load_any, run_eval


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
