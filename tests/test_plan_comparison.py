"""`scripts/plan_comparison.sh` end to end on a tiny model: a plan, its baselines (every k-th
layer, random seeds) converted two at a time, each scored beside the teacher (held-out
perplexity and KL, passkey), and `plan_comparison.py report` turning it into one table that says
where the plan wins."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_base_folder, synthetic_text, tiny_transfer_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_plan_comparison_converts_every_method_and_reports_who_wins(tmp_path):
    make_base_folder(tmp_path / "base")
    (tmp_path / "train.txt").write_text(synthetic_text(1500, seed=1))
    (tmp_path / "r.yaml").write_text(tiny_transfer_recipe("lolcats", tmp_path / "train.txt"))
    out = tmp_path / "plans"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MODEL": str(tmp_path / "base"),
           "RECIPE": str(tmp_path / "r.yaml"), "OUT": str(out), "DEVICE": "cpu", "DTYPE": "float32", "BATCH": "2",
           "BUDGETS": "softmax-layers=1", "SEEDS": "0 1", "PLANS": "transfer kl", "JOBS": "2", "LENGTHS": "96",
           "SETS": "stages.0.lr=2.0e-2", "STEPS": "plan convert heldout retrieval report"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "plan_comparison.sh")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = out / "softmax-layers-1"
    plan = json.loads((folder / "plan-kl" / "plan.json").read_text())  # KL's plan measured, listed second or not
    assert json.loads((folder / "plan-transfer" / "plan.json").read_text())["signal"] == "transfer"
    methods = ["kl", "transfer", "every", "random0", "random1"]
    for m in methods:  # every method has a model (a link where it chose what an earlier one did)
        assert (folder / m / "linearize.json").is_file(), m
        report = json.loads((folder / m / "report.json").read_text())
        assert report["recipe"]["stages"][0]["lr"] == 2.0e-2  # SETS reached the conversion
        assert len(report["converted_layers"]) == plan_layers(plan) - 1  # one layer stays softmax
    assert json.loads((folder / "kl" / "report.json").read_text())["converted_layers"] == plan["converted_layers"]
    assert "data ready" in run.stdout  # the shared data were built once, before the conversions ran side by side
    seconds = (folder / "seconds.txt").read_text()
    assert "plan-kl" in seconds and all(f"{m} " in seconds for m in ("kl", "every"))

    result = json.loads((out / "comparison.json").read_text())["budgets"]["softmax-layers=1"]
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", *methods}
    heldout = json.loads((folder / "heldout.json").read_text())
    for r in heldout["rows"]:
        assert rows[r["name"]]["perplexity"] == r["perplexity"] and rows[r["name"]]["kl"] == r["kl"]
    passkey = json.loads((folder / "eval-passkey" / "report.json").read_text())
    for entry in passkey["models"].values():
        name = "teacher" if Path(entry["model"]) == tmp_path / "base" else Path(entry["model"]).name
        by = entry["tasks"]["passkey"]["metrics"]["by"]["length"]
        assert rows[name]["passkey"] == {96: by["96"]} or rows[name]["passkey"] == {"96": by["96"]}
    # the verdicts follow from the rows: the plan wins a measure only if it beats every baseline
    for v in result["verdicts"]:
        key = {"held-out perplexity": "perplexity", "KL to the teacher": "kl", "passkey average": "passkey_average"}[v["measure"]]
        higher = key == "passkey_average"
        others = [rows[m][key] for m in ("every", "random0", "random1")]
        mine = rows["transfer"][key]
        assert v["plan_wins"] == all((mine > o) if higher else (mine < o) for o in others)
    assert {v["measure"] for v in result["verdicts"]} == {"held-out perplexity", "KL to the teacher", "passkey average"}
    table = (out / "comparison.md").read_text()
    assert "## softmax-layers=1" in table and "| budget | measure | plan | best baseline | plan - best | plan wins |" in table
    assert (out / "comparison.png").is_file()


def plan_layers(plan: dict) -> int:
    return len(plan["choice"])


def test_report_takes_a_link_and_the_teacher_from_where_they_were_scored(tmp_path):
    """The script scores the teacher with the first budget only and a method that chose what an
    earlier one did (a link to its model) not at all: the report fills both from where they were
    scored, and keeps a budget's own scores where it has them."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import plan_comparison as pc

    def budget(name, models, teacher_acc=None):
        folder = tmp_path / name
        for m in models:
            (folder / m).mkdir(parents=True)
            (folder / m / "linearize.json").write_text("{}")
        entries = {m: (str(folder / m), acc) for m, acc in models.items()}
        if teacher_acc is not None:
            entries["teacher"] = ("/models/base", teacher_acc)
        passkey = {k: {"model": path, "status": "ok", "tasks": {"passkey": {"metrics": {"by": {"length": {"4096": acc}}}}}}
                   for k, (path, acc) in entries.items()}
        (folder / "eval-passkey").mkdir()
        (folder / "eval-passkey" / "report.json").write_text(json.dumps({"models": passkey}))
        arc = {k: {"model": path, "status": "ok", "tasks": {"arc_challenge": {"metrics": {"acc_norm": acc / 2}}}}
               for k, (path, acc) in entries.items()}
        (folder / "eval-arc_challenge-25shot").mkdir()
        (folder / "eval-arc_challenge-25shot" / "report.json").write_text(json.dumps({"models": arc}))
        rows = [{"name": m, "softmax_layers": 2, "perplexity": 5.0, "kl": 0.1} for m in [*models, "every"]]
        (folder / "heldout.json").write_text(json.dumps({"teacher_perplexity": 4.0, "rows": rows}))
        return folder

    budget("softmax-layers-2", {"transfer": 0.75, "random0": 0.25}, teacher_acc=1.0)
    second = budget("softmax-layers-4", {"transfer": 0.5})
    (second / "every").symlink_to("transfer")
    first = {r["method"]: r for r in pc.budget_rows(tmp_path, "softmax-layers=2")}
    rows = {r["method"]: r for r in pc.budget_rows(tmp_path, "softmax-layers=4")}
    assert rows["teacher"]["passkey"] == {4096: 1.0} and rows["teacher"]["few_shot"] == first["teacher"]["few_shot"]
    assert rows["every"]["passkey"] == rows["transfer"]["passkey"] == {4096: 0.5}
    assert rows["every"]["few_shot_average"] == rows["transfer"]["few_shot_average"] == 0.25
    assert first["transfer"]["passkey"] == {4096: 0.75}  # a budget's own scores stay its own
    assert first["every"]["passkey_average"] is None  # not a link and not scored: left blank, not borrowed
    # a baseline that was not scored leaves the verdict open, not won against the others
    verdicts = {v["measure"]: v for v in pc.verdicts(pc.budget_rows(tmp_path, "softmax-layers=2"))}
    assert verdicts["passkey average"]["plan_wins"] is None and verdicts["passkey average"]["baselines_measured"] == 1
    assert verdicts["held-out perplexity"]["plan_wins"] is False  # every baseline measured: 5.0 against 5.0 is a tie
    # one baseline that beats the plan decides it, whether the others were measured or not
    (tmp_path / "softmax-layers-2" / "eval-passkey" / "report.json").write_text(json.dumps({"models": {
        m: {"model": str(tmp_path / "softmax-layers-2" / m), "status": "ok",
            "tasks": {"passkey": {"metrics": {"by": {"length": {"4096": acc}}}}}} for m, acc in (("transfer", 0.5), ("random0", 0.75))}}))
    verdicts = {v["measure"]: v for v in pc.verdicts(pc.budget_rows(tmp_path, "softmax-layers=2"))}
    assert verdicts["passkey average"]["plan_wins"] is False and verdicts["passkey average"]["best_baseline"] == "random0"


def test_an_average_over_fewer_tasks_than_the_budget_measured_is_not_given(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import plan_comparison as pc

    folder = tmp_path / "softmax-layers-2"
    for task, shots, scored in (("arc_challenge", 25, ["transfer", "every"]), ("winogrande", 5, ["transfer"])):
        (folder / f"eval-{task}-{shots}shot").mkdir(parents=True)
        models = {m: {"model": str(folder / m), "status": "ok", "tasks": {task: {"metrics": {"acc": 0.5}}}} for m in scored}
        (folder / f"eval-{task}-{shots}shot" / "report.json").write_text(json.dumps({"models": models}))
    rows = {r["method"]: r for r in pc.budget_rows(tmp_path, "softmax-layers=2")}
    assert rows["transfer"]["few_shot_average"] == 0.5
    assert rows["every"]["few_shot_average"] is None  # winogrande missing: no average over arc alone


def test_the_plan_against_the_best_baseline_on_the_same_items(tmp_path):
    """The few-shot and passkey verdicts carry the plan's score minus the best baseline's on the
    items both scored, with the standard error of the paired differences: a loss by one item in
    ten is within noise, a loss on every item of a hundred is not; the table says which."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import plan_comparison as pc

    # by hand: groups a (differences 1, 0, 0, 0) and b (differences -1, -1); mean of the means
    # (0.25 - 1) / 2, error sqrt(var_a / 4 + var_b / 2) / 2 with var_a = 0.25, var_b = 0
    diff, se, n = pc.paired_difference({"a": {"1": 1, "2": 1, "3": 0, "4": 0}, "b": {"1": 0, "2": 0}},
                                       {"a": {"1": 0, "2": 1, "3": 0, "4": 0, "9": 1}, "b": {"1": 1, "2": 1}})
    assert (diff, n) == (-0.375, 6) and abs(se - (0.25 / 4) ** 0.5 / 2) < 1e-12
    assert pc.paired_difference({"a": {"1": 1}}, {"a": {"1": 0}}) is None  # one shared item: no error
    assert pc.paired_difference({"a": {"1": 1, "2": 0}}, {"b": {"1": 0, "2": 1}}) is None  # other groups

    folder = tmp_path / "softmax-layers-2"

    def scores(plan_right, baseline_right, items):
        (folder / "eval-winogrande-5shot").mkdir(parents=True, exist_ok=True)
        models = {}
        for m, right in (("transfer", plan_right), ("every", baseline_right)):
            samples = [{"doc_id": i, "acc": float(i < right)} for i in range(items)]
            models[m] = {"model": str(folder / m), "status": "ok",
                         "tasks": {"winogrande": {"metrics": {"acc": right / items}, "samples": samples}}}
        (folder / "eval-winogrande-5shot" / "report.json").write_text(json.dumps({"models": models}))
        return {v["measure"]: v for v in pc.verdicts(pc.budget_rows(tmp_path, "softmax-layers=2"))}["few-shot average"]

    close = scores(5, 6, 10)  # the baseline right on one more item of ten
    assert close["plan_wins"] is False and abs(close["difference"] + 0.1) < 1e-12 and close["clear"] is False
    assert pc._verdict(close) == "**no** (within noise)" and pc._difference(close) == "-0.100 ± 0.100"
    far = scores(0, 100, 100)  # wrong on every item the baseline got right
    assert far["difference"] == -1.0 and far["standard_error"] == 0.0 and far["clear"] is True
    assert pc._verdict(far) == "**no**"
    tie = scores(0, 0, 100)  # both wrong everywhere (as every student at passkey): a tie, not noise
    assert tie["plan_wins"] is False and tie["difference"] == 0.0 and pc._verdict(tie) == "**no** (a tie)"


def test_two_plans_that_chose_the_same_have_one_key(tmp_path):
    """The script converts a plan once when both signals chose the same layers and settings (a
    recipe file each, so the paths differ), and separately when the settings differ."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import plan_comparison as pc

    def plan(name, per_layer, signal):
        (tmp_path / name).mkdir()
        (tmp_path / name / "plan.json").write_text(json.dumps(
            {"converted_layers": [0, 2], "per_layer": per_layer, "signal": signal}))
        return tmp_path / name

    a = plan("a", {"0": {"window_size": 256}}, "kl")
    b = plan("b", {"0": {"window_size": 256}}, "transfer")
    c = plan("c", {"0": {"window_size": 64}}, "transfer")
    assert pc.plan_key(a) == pc.plan_key(b) != pc.plan_key(c)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "plan_comparison.py"), "key", str(b)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and run.stdout.strip() == pc.plan_key(a)
