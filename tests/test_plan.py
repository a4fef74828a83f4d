"""The planner: budgets parsed and respected exactly, layers chosen by measured error, and a plan
that validates and converts."""

import json

import pytest

from conftest import make_base_folder, synthetic_text, tiny_model
from linearize.convert import ConversionSpec
from linearize.plan import (
    Budget,
    BudgetError,
    choose_layers,
    layer_costs,
    max_softmax_layers,
    parse_budget,
    plan_cost,
)


def test_parse_budget():
    assert parse_budget("softmax-layers=4") == Budget("softmax_layers", 4.0)
    assert parse_budget("softmax-layers=25%") == Budget("softmax_layers", 0.25, fraction=True)
    assert parse_budget("kv-memory=64MiB@32768") == Budget("kv_memory", 64 * 2**20, 32768)
    assert parse_budget("prefill=0.5@16384") == Budget("prefill", 0.5, 16384)
    for bad, message in [("kv-memory=64MiB", "needs the context length"), ("speed=2", "unknown budget kind"),
                         ("kv-memory=lots@10", "size like 64MiB"), ("prefill=fast@100", "is not a number"),
                         ("softmax-layers=-1", ">= 0")]:
        with pytest.raises(BudgetError, match=message):
            parse_budget(bad)


@pytest.fixture(scope="module")
def costs():
    model = tiny_model("llama", num_hidden_layers=12)
    return layer_costs(model, ConversionSpec("lolcats", settings={"window_size": 16}), student_state_bytes=20_000)


@pytest.mark.parametrize("text", ["kv-memory=300000@1024", "kv-memory=1MiB@4096", "kv-memory=2.5MiB@8192",
                                  "prefill=0.3@4096", "prefill=0.62@4096", "prefill=0.9@2048", "softmax-layers=5",
                                  "softmax-layers=25%"])
def test_budget_is_met_and_no_more_layers_would_fit(costs, text):
    budget = parse_budget(text)
    m = max_softmax_layers(budget, costs)
    limit = budget.value if budget.kind != "softmax_layers" else m
    assert 0 <= m <= costs.num_layers
    assert plan_cost(m, budget, costs) <= limit + 1e-9  # never over
    if m < costs.num_layers and budget.kind != "softmax_layers":
        assert plan_cost(m + 1, budget, costs) > limit  # and as many as fit
    if budget.kind == "softmax_layers":
        assert m == (3 if budget.fraction else 5)


def test_budgets_that_allow_nothing_everything_or_cannot_be_met(costs):
    L = costs.num_layers
    floor = L * costs.student_state_bytes
    assert max_softmax_layers(Budget("kv_memory", floor, 4096), costs) == 0  # exactly the all-student cache
    assert max_softmax_layers(Budget("kv_memory", 1e15, 4096), costs) == L
    assert max_softmax_layers(Budget("prefill", 1.0, 4096), costs) == L
    assert max_softmax_layers(Budget("softmax_layers", 0), costs) == 0
    with pytest.raises(BudgetError, match=r"kv-memory limit 0\.10 MiB is below what converting every layer needs: 0\.23 MiB"):
        max_softmax_layers(Budget("kv_memory", 0.1 * 2**20, 4096), costs)
    with pytest.raises(BudgetError, match=r"prefill ratio 0\.01 at 4096 tokens is below the cheapest plan's 0\.\d+"):
        max_softmax_layers(Budget("prefill", 0.01, 4096), costs)
    with pytest.raises(BudgetError, match="exceeds the model's 12 layers"):
        max_softmax_layers(Budget("softmax_layers", 13), costs)


def test_the_largest_errors_stay_softmax():
    errors = {0: 0.1, 1: 0.5, 2: 0.3, 3: 0.5, 4: 0.05}
    assert choose_layers(errors, 2) == [1, 3]
    assert choose_layers(errors, 3) == [1, 2, 3]
    assert choose_layers(errors, 0) == [] and choose_layers(errors, 5) == [0, 1, 2, 3, 4]


RECIPE = """
seed: 0
students: {{kind: lolcats, window_size: 4, sink_size: 1}}
stages:
  - stage: attention_transfer
    data: {{source: text, path: {train}}}
    seq_len: 32
    batch_size: 2
    steps: 4
    val_blocks: 2
"""


def test_plan_measures_writes_a_recipe_that_converts_and_is_deterministic(tmp_path):
    from linearize.pipeline import ConvertRun
    from linearize.plan import run_plan
    from linearize.recipe import load_recipe

    make_base_folder(tmp_path / "base")
    (tmp_path / "train.txt").write_text(synthetic_text(1500, seed=1))
    (tmp_path / "r.yaml").write_text(RECIPE.format(train=tmp_path / "train.txt"))
    base = load_recipe(str(tmp_path / "r.yaml"), model=str(tmp_path / "base"))
    logs = []
    result, path = run_plan(str(tmp_path / "base"), base, "softmax-layers=1", tmp_path / "plan", calibration_steps=3,
                            log=logs.append)
    errors = result["errors_after"]
    assert result["softmax_layers"] == [max(errors, key=errors.get)]
    assert sorted(result["softmax_layers"] + result["converted_layers"]) == list(range(len(errors)))
    assert {"recipe.yaml", "plan.json", "plan.md"} <= {p.name for p in (tmp_path / "plan").iterdir()}
    planned = load_recipe(str(path))
    assert planned.students.layers == result["converted_layers"]
    again, _ = run_plan(str(tmp_path / "base"), base, "softmax-layers=1", tmp_path / "plan2", calibration_steps=3,
                        log=logs.append)
    assert json.dumps(again, sort_keys=True) == json.dumps(result, sort_keys=True)
    report = ConvertRun(planned, tmp_path / "out", log=logs.append).run()
    assert report["converted_layers"] == result["converted_layers"]


def test_convert_with_recipe_auto_plans_then_converts(tmp_path):
    from linearize.cli import main

    make_base_folder(tmp_path / "base")
    (tmp_path / "train.txt").write_text(synthetic_text(1500, seed=1))
    (tmp_path / "r.yaml").write_text(RECIPE.format(train=tmp_path / "train.txt"))
    code = main(["convert", str(tmp_path / "base"), "--recipe", "auto", "--base-recipe", str(tmp_path / "r.yaml"),
                 "--budget", "kv-memory=1MiB@100000", "--out", str(tmp_path / "out")])
    assert code == 0
    plan = json.loads((tmp_path / "out.plan" / "plan.json").read_text())
    saved = json.loads((tmp_path / "out" / "linearize.json").read_text())
    assert saved["conversion"]["layers"] == plan["converted_layers"]
    assert plan["cost"] <= 2**20
    assert main(["convert", str(tmp_path / "base"), "--recipe", "auto", "--out", str(tmp_path / "x")]) == 2  # no budget
