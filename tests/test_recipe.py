"""Recipes: the built-ins validate; bad ones fail with a message that names file, key and fix."""

import textwrap

import pytest

from linearize.recipe import RecipeError, builtin_recipes, load_recipe

GOOD = """
model: smollm2-135m-instruct
students: {kind: lolcats, layers: all, window_size: 64}
stages:
  - stage: attention_transfer
    data: {source: teacher, samples: 4}
    seq_len: 128
    steps: 10
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def fake_data_folder(root, recipe_file):
    """Create, under ``root``, every ``$LINEARIZE_DATA/...`` path a recipe names (a folder when the
    name has no suffix), so the recipe's checks pass without the real data."""
    import re

    for rel in set(re.findall(r"\$LINEARIZE_DATA/([^\s,}]+)", recipe_file.read_text())):
        target = root / rel
        if target.suffix:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("[]")
        else:
            target.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_validate(name, tmp_path, monkeypatch):
    fake_data_folder(tmp_path, builtin_recipes()[name])
    monkeypatch.setenv("LINEARIZE_DATA", str(tmp_path))
    recipe = load_recipe(name)
    assert recipe.stages and recipe.students.kind


def test_a_recipe_on_a_data_folder_says_which_variable_to_set(monkeypatch):
    monkeypatch.delenv("LINEARIZE_DATA", raising=False)
    with pytest.raises(RecipeError, match=r"key 'stages\.0\.data\.0\.path': .*\$LINEARIZE_DATA, which is not set: export LINEARIZE_DATA="):
        load_recipe("lolcats")


def test_per_layer_settings_parse_and_round_trip(tmp_path):
    text = GOOD.replace("window_size: 64}", "window_size: 64, per_layer: {2: {window_size: 128}, 5: {kind: hedgehog, feature_dim: 32}}}")
    r = load_recipe(write(tmp_path, text))
    assert r.students.per_layer == {2: {"window_size": 128}, 5: {"kind": "hedgehog", "feature_dim": 32}}
    assert r.to_dict()["students"]["per_layer"] == r.students.per_layer
    saved = {k: v for k, v in r.to_dict().items() if k != "overrides"}
    again = load_recipe(write(tmp_path, __import__("yaml").safe_dump(saved), name="again.yaml"))
    assert again.students.per_layer == r.students.per_layer


def test_a_data_mix_parses_to_a_list_of_sources(tmp_path):
    text = GOOD.replace("data: {source: teacher, samples: 4}", "data: [{source: teacher, samples: 4}, {source: passkey, samples: 2, length: 100}]")
    stage = load_recipe(write(tmp_path, text)).stages[0]
    assert [d.source for d in stage.data] == ["teacher", "passkey"] and stage.data[1].length == 100


def test_good_recipe_parses_with_types(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.students.settings["window_size"] == 64
    assert r.stages[0].lr == 0.01 and isinstance(r.stages[0].lr, float)


def test_overrides_and_model_argument_win(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), overrides=["stages.0.steps=200", "students.window_size=32"], model="other/model")
    assert r.stages[0].steps == 200 and r.students.settings["window_size"] == 32 and r.model == "other/model"
    assert r.to_dict()["overrides"] == ["stages.0.steps=200", "students.window_size=32"]


BAD = [
    ("unknown top-level key", GOOD + "sead: 3\n", r"key 'sead': unknown key\. Did you mean 'seed'\?"),
    ("unknown stage key", GOOD.replace("steps: 10", "stpes: 10"), r"key 'stages\.0\.stpes': unknown key\. Did you mean 'steps'\?"),
    ("wrong type", GOOD.replace("steps: 10", "steps: ten"), r"key 'stages\.0\.steps': expected an integer, got 'ten'"),
    ("out of range", GOOD.replace("seq_len: 128", "seq_len: 0"), r"key 'stages\.0\.seq_len': must be >= 1, got 0"),
    ("negative lr", GOOD.replace("steps: 10", "steps: 10\n    lr: -1"), r"key 'stages\.0\.lr': must be > 0"),
    ("unknown student", GOOD.replace("kind: lolcats", "kind: lolcat"), r"key 'students\.kind': unknown student 'lolcat'\. Did you mean 'lolcats'\?"),
    ("unknown student setting", GOOD.replace("window_size: 64", "window: 64"), r"key 'students\.window': unknown key\. Did you mean 'window_size'\?"),
    ("unknown stage", GOOD.replace("stage: attention_transfer", "stage: attention_transfr"), r"key 'stages\.0\.stage': unknown stage 'attention_transfr'\. Did you mean 'attention_transfer'\?"),
    ("missing data", GOOD.replace("    data: {source: teacher, samples: 4}\n", ""), r"key 'stages\.0\.data': missing; it is required"),
    ("missing data file", GOOD.replace("{source: teacher, samples: 4}", "{source: text, path: /no/such/file.txt}"), r"key 'stages\.0\.data\.path': data file or folder not found: /no/such/file\.txt"),
    ("bad data source", GOOD.replace("source: teacher", "source: web"), r"key 'stages\.0\.data\.source': expected 'teacher' \| 'text'"),
    ("malformed yaml", GOOD.replace("steps: 10", "steps: [10"), r"malformed YAML at line \d+"),
    ("bad layers", GOOD.replace("layers: all", "layers: most"), r"key 'students\.layers': expected 'all', a list of layer indices"),
    ("no stages", "students: {kind: hedgehog}\nstages: []\n", r"key 'stages': expected a non-empty list"),
    ("bad precision", GOOD + "precision: fp8\n", r"key 'precision': expected 'float32' \| 'bfloat16' \| 'float16', got 'fp8'"),
    ("steps and tokens", GOOD.replace("steps: 10", "steps: 10\n    tokens: 5000"), r"key 'stages\.0': give exactly one of 'steps' \(optimiser steps\) and 'tokens'"),
    ("no steps nor tokens", GOOD.replace("    steps: 10\n", ""), r"key 'stages\.0': give exactly one of 'steps'"),
    ("zero grad_accum", GOOD.replace("steps: 10", "steps: 10\n    grad_accum: 0"), r"key 'stages\.0\.grad_accum': must be >= 1, got 0"),
    ("bad schedule", GOOD.replace("steps: 10", "steps: 10\n    schedule: cosin"), r"key 'stages\.0\.schedule': expected 'constant' \| 'linear' \| 'cosine', got 'cosin'"),
    ("lora stage key on transfer", GOOD.replace("steps: 10", "steps: 10\n    rank: 8"), r"key 'stages\.0\.rank': unknown key"),
    ("bad lora loss", GOOD + "  - {stage: lora, data: {source: teacher}, steps: 5, loss: mse}\n", r"key 'stages\.1\.loss': expected 'ce' \| 'kl', got 'mse'"),
    ("lora dropout range", GOOD + "  - {stage: lora, data: {source: teacher}, steps: 5, dropout: 1.5}\n", r"key 'stages\.1\.dropout': must lie in \[0, 1\), got 1\.5"),
    ("lora targets type", GOOD + "  - {stage: lora, data: {source: teacher}, steps: 5, target_modules: q_proj}\n", r"key 'stages\.1\.target_modules': expected a list of strings, got 'q_proj'"),
    ("negative sinks", GOOD.replace("window_size: 64", "window_size: 64, sink_size: -1"), r"key 'students\.sink_size': must be >= 0, got -1"),
    ("unknown key in a mix", GOOD.replace("{source: teacher, samples: 4}", "[{source: teacher}, {source: passkey, sample: 4}]"), r"key 'stages\.0\.data\.1\.sample': unknown key\. Did you mean 'samples'\?"),
    ("empty mix", GOOD.replace("{source: teacher, samples: 4}", "[]"), r"key 'stages\.0\.data': an empty list"),
    ("passkey longer than a block", GOOD.replace("{source: teacher, samples: 4}", "{source: passkey, length: 200}"), r"key 'stages\.0\.data\.length': a passkey sample is one block: length 200 exceeds seq_len 128"),
    ("unknown per-layer setting", GOOD.replace("window_size: 64}", "window_size: 64, per_layer: {3: {windw_size: 8}}}"), r"key 'students\.per_layer\.3\.windw_size': unknown key\. Did you mean 'window_size'\?"),
    ("per-layer student kind", GOOD.replace("window_size: 64}", "window_size: 64, per_layer: {3: {kind: hedgehg}}}"), r"key 'students\.per_layer\.3\.kind': unknown student 'hedgehg'"),
    ("per-layer other kind keeps no base setting", GOOD.replace("window_size: 64}", "window_size: 64, per_layer: {3: {kind: hedgehog, window_size: 8}}}"), r"key 'students\.per_layer\.3\.window_size': unknown key"),
    ("per-layer layer not converted", GOOD.replace("layers: all, window_size: 64}", "layers: [0, 1], window_size: 64, per_layer: {5: {window_size: 8}}}"), r"key 'students\.per_layer': settings for layer\(s\) \[5\], which 'layers' does not convert"),
    ("unknown feature map", GOOD.replace("window_size: 64", "feature_map: cosine"), r"key 'students\.feature_map': unknown feature map 'cosine'"),
]


@pytest.mark.parametrize("case,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_message_names_file_key_and_fix(tmp_path, case, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert path in str(info.value)


def test_bad_override_is_reported(tmp_path):
    with pytest.raises(RecipeError, match="no item 'stages.3'"):
        load_recipe(write(tmp_path, GOOD), overrides=["stages.3.steps=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(write(tmp_path, GOOD), overrides=["stages.0.steps"])


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="Did you mean 'smoke'"):
        load_recipe("smoek")
