"""The planner: budgets parsed and respected exactly (with candidate settings per layer), the
knapsack equal to brute force, the KL signal equal to a direct computation, and a plan that
validates, converts, reloads with each layer's own settings and is deterministic."""

import itertools
import json
import math
import random

import pytest
import torch

from conftest import make_base_folder, synthetic_text, tiny_model
from linearize.plan import (
    SOFTMAX,
    Budget,
    BudgetError,
    Costs,
    PlanError,
    Shapes,
    budget_costs,
    make_plan,
    parse_budget,
    parse_candidates,
    solve,
)

SETTINGS = {"feature_map": "hedgehog", "feature_dim": None, "window_size": 4, "window_factor_init": 0.1, "sink_size": 1}


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


def test_candidates_make_a_grid_and_bad_ones_are_refused():
    options = parse_candidates(["window_size=4,16", "feature_dim=8,null"], "lolcats", SETTINGS)
    assert [o.name for o in options] == ["window_size=4 feature_dim=8", "window_size=4 feature_dim=None",
                                         "window_size=16 feature_dim=8", "window_size=16 feature_dim=None"]
    assert [o.overrides for o in options] == [{"feature_dim": 8}, {}, {"window_size": 16, "feature_dim": 8},
                                              {"window_size": 16}]  # only what differs from the recipe
    assert options[2].settings == {**SETTINGS, "window_size": 16, "feature_dim": 8}
    assert [o.name for o in parse_candidates([], "lolcats", SETTINGS)] == ["lolcats"]
    for bad, message in [(["windw_size=4"], r"lolcats has no setting 'windw_size'; its settings are .*window_size"),
                         (["window_size=0,4"], r"option 'window_size=0': key 'students\.window_size': must be >= 1"),
                         (["window_size"], "expected KEY=V1,V2"), (["window_size=4,4"], "listed twice"),
                         (["window_size=4", "window_size=8"], "given twice"),
                         (["feature_map=hedgehog,nope"], "unknown feature map 'nope'")]:
        with pytest.raises(PlanError, match=message):
            parse_candidates(bad, "lolcats", SETTINGS)


# ---------------------------------------------------------------------------------- budgets, exactly
WINDOWS = (2, 8, 32)


@pytest.fixture(scope="module")
def options_and_states():
    """A 12-layer tiny model, softmax or LoLCATs at three windows, with each layer's measured state."""
    from linearize.plan.measure import option_state_bytes

    model = tiny_model("llama", num_hidden_layers=12)
    options = [SOFTMAX] + parse_candidates([f"window_size={','.join(map(str, WINDOWS))}"], "lolcats", SETTINGS)
    tokens = torch.arange(1, 97)
    state = [[None] * len(options) for _ in range(12)]
    for k, option in enumerate(options[1:], start=1):
        for i, b in option_state_bytes(model, option, tokens).items():
            state[i][k] = b
    return Shapes.of(model), options, state


def _errors(L: int, O: int, seed: int) -> list[list[float]]:
    """Random errors, softmax 0, a wider window lower on most layers (not all)."""
    rng = random.Random(seed)
    out = []
    for _ in range(L):
        base = rng.uniform(0.05, 1.0)
        out.append([0.0] + [base * rng.uniform(0.3, 1.1) ** k for k in range(1, O)])
    return out


BUDGETS = ["kv-memory=300000@1024", "kv-memory=1MiB@4096", "kv-memory=2.5MiB@8192", "kv-memory=0.3MiB@256",
           "prefill=0.3@4096", "prefill=0.62@4096", "prefill=0.9@2048", "softmax-layers=5", "softmax-layers=25%"]


@pytest.mark.parametrize("text", BUDGETS)
def test_every_budget_is_met_and_one_more_step_of_quality_would_break_it(options_and_states, text):
    shapes, options, state = options_and_states
    budget = parse_budget(text)
    costs = budget_costs(budget, shapes, options, state)
    if budget.kind != "softmax_layers":
        assert costs.cost[0][1] < costs.cost[0][2] < costs.cost[0][3]  # state and FLOPs grow with the window
    for seed in range(3):
        errors = _errors(shapes.num_layers, len(options), seed)
        result = make_plan(budget, shapes, options, {"transfer": errors, "kl": errors, "state_bytes": state}, "kl")
        choice = result["choice"]
        assert costs.total(choice) == result["cost"] <= costs.capacity  # never over
        for i, o in enumerate(choice):  # any layer moved to an option with less error breaks the budget
            for k in range(len(options)):
                if errors[i][k] < errors[i][o]:
                    assert costs.total(choice[:i] + [k] + choice[i + 1:]) > costs.capacity, (i, o, k)
        if budget.kind == "softmax_layers":
            assert len(result["softmax_layers"]) == (3 if budget.fraction else 5)
            assert all(min(errors[i][1:]) == errors[i][o] for i, o in enumerate(choice) if o)  # settings are free
        if budget.kind == "kv_memory":
            assert sum(state[i][o] if o else shapes.softmax_kv_bytes(budget.context) for i, o in enumerate(choice)) <= budget.value
        if budget.kind == "prefill":
            T, L = budget.context, shapes.num_layers
            flops = sum(shapes.shared_flops(T) + shapes.attention_flops(options[o], T) for o in choice)
            assert flops <= budget.value * L * (shapes.shared_flops(T) + shapes.softmax_flops(T))


def test_budgets_that_allow_nothing_everything_or_cannot_be_met(options_and_states):
    shapes, options, state = options_and_states
    L = shapes.num_layers
    errors = _errors(L, len(options), 0)
    measured = {"transfer": errors, "kl": errors, "state_bytes": state}

    def choice(budget):
        return make_plan(budget, shapes, options, measured, "kl")["choice"]

    floor = sum(state[i][1] for i in range(L))  # every layer at the smallest window
    assert choice(Budget("kv_memory", floor, 4096)) == [1] * L  # exactly the cheapest plan: nothing more
    assert choice(Budget("kv_memory", 1e15, 4096)) == [0] * L  # everything softmax
    assert choice(Budget("prefill", 1.0, 4096)) == [0] * L
    assert choice(Budget("softmax_layers", L)) == [0] * L
    zero = choice(Budget("softmax_layers", 0))
    assert 0 not in zero and all(errors[i][o] == min(errors[i][1:]) for i, o in enumerate(zero))
    with pytest.raises(BudgetError, match=r"kv-memory limit 0\.1 MiB at 4096 tokens is below the cheapest plan's "
                                          r"0\.\d+ MiB of decode cache \(every layer window_size=2\)"):
        choice(Budget("kv_memory", 0.1 * 2**20, 4096))
    with pytest.raises(BudgetError, match=rf"is below the cheapest plan's {floor / 2**20:.4g} MiB"):
        choice(Budget("kv_memory", floor - 1, 4096))
    with pytest.raises(BudgetError, match=r"prefill ratio 0\.01 at 4096 tokens is below the cheapest plan's "
                                          r"0\.\d+x the teacher's prefill FLOPs \(every layer window_size=2\)"):
        choice(Budget("prefill", 0.01, 4096))
    with pytest.raises(BudgetError, match="exceeds the model's 12 layers"):
        choice(Budget("softmax_layers", 13))


def test_the_largest_errors_stay_softmax_with_one_option():
    errors = [[0.0, e] for e in (0.1, 0.5, 0.3, 0.49, 0.05)]
    for m, expected in [(2, [1, 3]), (3, [1, 2, 3]), (0, []), (5, [0, 1, 2, 3, 4])]:
        s = solve(Costs([[1, 0]] * 5, m, "layers"), errors)
        assert [i for i, o in enumerate(s.choice) if o == 0] == expected


def _brute_force(cost, errors, capacity):
    best = None
    for choice in itertools.product(*(range(len(row)) for row in cost)):
        if sum(cost[i][o] for i, o in enumerate(choice)) <= capacity:
            e = sum(errors[i][o] for i, o in enumerate(choice))
            best = e if best is None else min(best, e)
    return best


def test_the_knapsack_finds_the_brute_force_optimum_on_random_instances():
    rng = random.Random(0)
    for _ in range(300):
        L, O = rng.randint(1, 6), rng.randint(1, 4)
        shared = [rng.randint(0, 30) for _ in range(O)]
        cost = [list(shared) if rng.random() < 0.5 else [rng.randint(0, 30) for _ in range(O)] for _ in range(L)]
        errors = [[round(rng.random(), 1) for _ in range(O)] for _ in range(L)]  # rounded: ties too
        capacity = rng.randint(0, 30 * L)
        best, s = _brute_force(cost, errors, capacity), solve(Costs(cost, capacity, "x"), errors)
        if best is None:
            assert s is None
            continue
        assert sum(cost[i][o] for i, o in enumerate(s.choice)) <= capacity
        assert math.isclose(sum(errors[i][o] for i, o in enumerate(s.choice)), best, abs_tol=1e-9)
        i, o = rng.randrange(L), rng.randrange(O)  # the best plan with option o forced on layer i
        forced = _brute_force([row if j != i else [row[o]] for j, row in enumerate(cost)],
                              [row if j != i else [row[o]] for j, row in enumerate(errors)], capacity)
        assert (forced is None and s.best_with[i][o] == math.inf) or math.isclose(s.best_with[i][o], forced, abs_tol=1e-9)


# ---------------------------------------------------------------------------------- the KL signal
def test_the_kl_signal_equals_a_direct_computation():
    from conftest import converted_model
    from linearize import ConversionSpec, attention_mode, students
    from linearize.architectures import adapter_for
    from linearize.data import Blocks
    from linearize.plan import layer_kl_reference, layer_signals
    from linearize.stages.attention_transfer import measure_transfer

    model = converted_model("qwen2", ConversionSpec("lolcats", "all", {"window_size": 4, "sink_size": 1}), seed=3)
    adapter = adapter_for(model.config)
    ids = torch.randint(1, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0  # a padded last block
    blocks = Blocks(ids, mask)
    transfer, fast, _ = layer_signals(model, adapter, blocks, batch_size=2)
    reference = layer_kl_reference(model, blocks, batch_size=2)
    assert transfer == pytest.approx(measure_transfer(model, adapter, blocks, batch_size=2)["relative_error"], rel=1e-6)
    with torch.no_grad():  # layer 1 by hand: sum_t sum_v p log(p / q) over the real tokens, per token
        with attention_mode(model, "teacher"):
            log_p = torch.log_softmax(model(ids, attention_mask=mask).logits.double(), -1)
            students(model)[1].mode = "student"
            log_q = torch.log_softmax(model(ids, attention_mask=mask).logits.double(), -1)
    by_hand = float(((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum())
    assert sorted(fast) == sorted(reference) == [0, 1, 2]
    assert all(fast[i] > 0 for i in fast)
    for i in fast:
        assert math.isclose(fast[i], reference[i], rel_tol=1e-9), (i, fast[i], reference[i])
    assert math.isclose(reference[1], by_hand, rel_tol=1e-9)
    assert all(s.mode == "student" for s in students(model).values())  # modes put back



@pytest.mark.parametrize("chunk", [None, 3 * 97])  # the default chunking, and 3 rows a chunk (a ragged last one)
def test_the_kl_signal_equals_converting_only_that_layer(monkeypatch, chunk):
    """``kl[i]`` of :func:`layer_signals` (one transfer-mode pass, then layer i's suffix from its
    captured input, the KL in chunks of rows) against the plain computation: a fresh teacher with
    only layer i converted (the same student weights), one full forward, the KL in float64."""
    from conftest import converted_model
    from linearize import ConversionSpec, convert_model, students
    from linearize.architectures import adapter_for
    from linearize.data import Blocks
    from linearize.plan import layer_signals
    from linearize.plan.measure import TeacherDistribution

    if chunk is not None:
        monkeypatch.setattr(TeacherDistribution, "CPU_CHUNK", chunk)
    settings = {"window_size": 4, "sink_size": 1}
    model = converted_model("llama", ConversionSpec("lolcats", "all", settings), seed=5, num_hidden_layers=5)
    ids = torch.randint(1, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # padded blocks
    mask[2, 6:] = 0
    _, kl, _ = layer_signals(model, adapter_for(model.config), Blocks(ids, mask), batch_size=2)
    with torch.no_grad():
        teacher = tiny_model("llama", seed=5, num_hidden_layers=5)
        log_p = torch.log_softmax(teacher(ids, attention_mask=mask).logits.double(), -1)
        for i in (0, 2, 4):
            one = tiny_model("llama", seed=5, num_hidden_layers=5)
            convert_model(one, ConversionSpec("lolcats", [i], settings))
            assert sorted(students(one)) == [i]
            students(one)[i].load_state_dict(students(model)[i].state_dict())
            log_q = torch.log_softmax(one(ids, attention_mask=mask).logits.double(), -1)
            direct = float(((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / mask.sum())
            assert direct > 0
            assert math.isclose(kl[i], direct, rel_tol=1e-5), (i, kl[i], direct)


def test_the_teacher_distribution_in_chunks_equals_all_rows_at_once(monkeypatch):
    from linearize.plan.measure import TeacherDistribution

    g = torch.Generator().manual_seed(0)
    teacher, other = torch.randn(2, 9, 50, generator=g) * 3, torch.randn(2, 9, 50, generator=g) * 3
    for mask in (torch.ones(2, 9, dtype=torch.long), torch.tensor([[1] * 9, [1] * 4 + [0] * 5])):
        real = mask.bool()
        log_p = torch.log_softmax(teacher[real].double(), -1)
        log_q = torch.log_softmax(other[real].double(), -1)
        expected = float((log_p.exp() * (log_p - log_q)).sum())
        for chunk in (50, 3 * 50, 4 * 50 + 7, 2**18):
            monkeypatch.setattr(TeacherDistribution, "CPU_CHUNK", chunk)
            dist = TeacherDistribution(teacher, mask)
            assert dist.tokens == int(mask.sum())
            assert torch.equal(dist.p, log_p.exp())
            assert math.isclose(dist.kl_sum(other), expected, rel_tol=1e-12), (chunk, mask)


# ---------------------------------------------------------------------------------- end to end
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


@pytest.fixture
def tiny_recipe(tmp_path):
    from linearize.recipe import load_recipe

    make_base_folder(tmp_path / "base")
    (tmp_path / "train.txt").write_text(synthetic_text(900, seed=1))
    (tmp_path / "r.yaml").write_text(RECIPE.format(train=tmp_path / "train.txt"))
    return load_recipe(str(tmp_path / "r.yaml"), model=str(tmp_path / "base"))


def _without_timing(result):
    return json.dumps({k: v for k, v in result.items() if k != "timing"}, sort_keys=True)


def test_a_per_layer_plan_is_deterministic_converts_and_reloads_with_each_layers_settings(tmp_path, tiny_recipe):
    import linearize
    from linearize.pipeline import ConvertRun
    from linearize.plan import run_plan
    from linearize.recipe import load_recipe

    base, logs = str(tmp_path / "base"), []
    # at 1000 tokens a softmax layer's cache (256 KB) is over the limit, and so are three windows of 8
    budget, candidates = "kv-memory=50000@1000", ["window_size=4,8"]
    result, path = run_plan(base, tiny_recipe, budget, tmp_path / "plan", candidates=candidates, calibration_steps=3,
                            signal="kl", log=logs.append)
    costs = result["costs"]
    assert result["signal"] == "kl" and result["cost"] <= costs["capacity"] == 50000
    assert 0 not in result["choice"] and result["choice"] != [2, 2, 2]
    assert {"recipe.yaml", "plan.json", "plan.md", "plan.png"} <= {p.name for p in (tmp_path / "plan").iterdir()}
    assert any("plan time" in line and "%" in line for line in logs)
    again, _ = run_plan(base, tiny_recipe, budget, tmp_path / "plan2", candidates=candidates, calibration_steps=3,
                        signal="kl", log=logs.append)
    assert _without_timing(again) == _without_timing(result)  # a fixed seed and calibration set: the same plan

    planned = load_recipe(str(path))
    windows = {i: (4, 8)[o - 1] for i, o in enumerate(result["choice"])}
    assert planned.students.layers == [0, 1, 2]
    assert planned.students.per_layer == {i: {"window_size": 8} for i, w in windows.items() if w == 8}  # the recipe's is 4
    ConvertRun(planned, tmp_path / "out", log=logs.append).run()
    loaded = linearize.load(tmp_path / "out")
    assert {i: s.settings.window_size for i, s in linearize.students(loaded).items()} == windows

    # the same measurements, chosen again under another budget and by the other signal (the default)
    other, _ = run_plan(base, tiny_recipe, "softmax-layers=1", tmp_path / "plan3", candidates=candidates,
                        calibration_steps=3, reuse=tmp_path / "plan", log=logs.append)
    assert other["signal"] == "transfer" and other["measured"] == json.loads(json.dumps(result["measured"]))
    transfer = other["measured"]["transfer"]
    assert other["softmax_layers"] == [max(range(3), key=lambda i: min(transfer[i][1:]))]

    # the default signal measures the transfer error alone: the same numbers, no KL, and a plan by it
    alone, _ = run_plan(base, tiny_recipe, "softmax-layers=1", tmp_path / "plan5", candidates=candidates,
                        calibration_steps=3, log=logs.append)
    assert alone["measured"]["kl"] is None and alone["measured"]["transfer"] == other["measured"]["transfer"]
    assert alone["choice"] == other["choice"]
    assert "kl /" not in (tmp_path / "plan5" / "plan.md").read_text() and (tmp_path / "plan5" / "plan.png").is_file()
    with pytest.raises(PlanError, match=r"--reuse .*plan5: its measurements have no kl signal .*--signal kl"):
        run_plan(base, tiny_recipe, "softmax-layers=1", tmp_path / "plan6", candidates=candidates,
                 calibration_steps=3, signal="kl", reuse=tmp_path / "plan5", log=logs.append)
    with pytest.raises(PlanError, match=r"--reuse .*: its measurements were made with other calibration_steps, options"):
        run_plan(base, tiny_recipe, budget, tmp_path / "plan4", candidates=["window_size=4,16"], calibration_steps=2,
                 reuse=tmp_path / "plan", log=logs.append)


def test_convert_with_recipe_auto_plans_then_converts(tmp_path):
    from linearize.cli import main

    make_base_folder(tmp_path / "base")
    (tmp_path / "train.txt").write_text(synthetic_text(900, seed=1))
    (tmp_path / "r.yaml").write_text(RECIPE.format(train=tmp_path / "train.txt"))
    code = main(["convert", str(tmp_path / "base"), "--recipe", "auto", "--base-recipe", str(tmp_path / "r.yaml"),
                 "--budget", "prefill=0.8@512", "--candidates", "window_size=2,8", "--calibration-steps", "2",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    plan = json.loads((tmp_path / "out.plan" / "plan.json").read_text())
    saved = json.loads((tmp_path / "out" / "linearize.json").read_text())
    assert saved["conversion"]["layers"] == plan["converted_layers"]
    assert saved["conversion"].get("per_layer", {}) == {str(i): v for i, v in plan["per_layer"].items()}
    assert plan["cost"] <= plan["costs"]["capacity"]
    assert main(["convert", str(tmp_path / "base"), "--recipe", "auto", "--out", str(tmp_path / "x")]) == 2  # no budget
    assert main(["convert", str(tmp_path / "base"), "--recipe", str(tmp_path / "r.yaml"), "--candidates", "window_size=2",
                 "--out", str(tmp_path / "y")]) == 2  # candidates without a plan


def test_the_calibration_is_scaled_to_the_recipe():
    from linearize.plan import default_calibration
    from linearize.recipe import load_recipe

    smoke = load_recipe("smoke")  # 60 attention-transfer + 20 LoRA steps of 2 x 256 tokens
    assert default_calibration(smoke, 30, 1, held_blocks=4) == (6, 1)  # 10% of 60 steps; 4096 tokens / 30 layers < 1 block
    assert default_calibration(smoke, 30, 3, held_blocks=4) == (3, 1)  # at least 3 steps an option
    long = load_recipe("smoke", overrides=["stages.0.steps=3000", "stages.1.steps=3000"])
    assert default_calibration(long, 30, 2, held_blocks=4) == (150, 4)  # 3.1M tokens: at most the blocks held back
    assert default_calibration(long, 30, 2, held_blocks=32) == (150, 20)  # 10% of 3.1M tokens / (30 layers x 2 options)
