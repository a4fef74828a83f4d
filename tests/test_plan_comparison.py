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
           "BUDGETS": "softmax-layers=1", "SEEDS": "0 1", "JOBS": "2", "LENGTHS": "96",
           "SETS": "stages.0.lr=2.0e-2", "STEPS": "plan convert heldout retrieval report"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "plan_comparison.sh")], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = out / "softmax-layers-1"
    plan = json.loads((folder / "plan-kl" / "plan.json").read_text())
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
        mine = rows["kl"][key]
        assert v["plan_wins"] == all((mine > o) if higher else (mine < o) for o in others)
    assert {v["measure"] for v in result["verdicts"]} == {"held-out perplexity", "KL to the teacher", "passkey average"}
    table = (out / "comparison.md").read_text()
    assert "## softmax-layers=1" in table and "| budget | measure | plan | best baseline | plan wins |" in table
    assert (out / "comparison.png").is_file()


def plan_layers(plan: dict) -> int:
    return len(plan["choice"])
