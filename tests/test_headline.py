"""`scripts/headline.sh` end to end on a tiny model: two recipes converted side by side
(JOBS=2, the shared data built once), the teacher and the students scored in separate parts of
the run, and `scripts/headline_report.py` merging the parts into one table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_base_folder, synthetic_text, tiny_transfer_recipe

ROOT = Path(__file__).resolve().parents[1]


def headline(tmp_path, **env):
    full = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MODEL": str(tmp_path / "base"),
            "OUT": str(tmp_path / "run"), "LINEARIZE_DATA": str(tmp_path / "data"), "DEVICE": "cpu",
            "DTYPE": "float32", "BATCH": "2", "PPL_LENGTHS": "32,64", **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "headline.sh")], capture_output=True, text=True,
                          env=full, timeout=600)


def test_headline_run_in_parts_merges_into_one_table(tmp_path):
    make_base_folder(tmp_path / "base")
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "train.txt").write_text(synthetic_text(1500, seed=1))
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(synthetic_text(800, seed=2))
    for kind in ("lolcats", "hedgehog"):
        (tmp_path / f"{kind}.yaml").write_text(tiny_transfer_recipe(kind, "$LINEARIZE_DATA/train.txt"))
    recipes = f"{tmp_path / 'lolcats.yaml'} {tmp_path / 'hedgehog.yaml'}"
    run = tmp_path / "run"
    students = headline(tmp_path, RECIPES=recipes, JOBS="2", PART="students", STEPS="convert ppl",
                        MODELS=f"{run / 'lolcats'} {run / 'hedgehog'}")
    assert students.returncode == 0, students.stdout[-2000:] + students.stderr[-3000:]
    assert "data ready" in students.stdout
    assert (run / "lolcats" / "linearize.json").is_file() and (run / "hedgehog" / "linearize.json").is_file()
    teacher = headline(tmp_path, RECIPES=recipes, PART="teacher", STEPS="ppl retrieval", RETRIEVAL="passkey",
                       LENGTHS="96", MODELS=str(tmp_path / "base"))
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    # RETRIEVAL picks the retrieval suites: passkey ran, the needle suite did not
    assert (run / "teacher" / "eval-passkey" / "report.json").is_file() and not (run / "teacher" / "eval-niah").exists()
    report = headline(tmp_path, RECIPES=recipes, STEPS="report")
    assert report.returncode == 0, report.stderr[-3000:]

    summary = json.loads((run / "headline.json").read_text())
    assert list(summary["models"]) == ["teacher", "hedgehog", "lolcats"]
    seen = set()
    for part in ("teacher", "students"):  # every part's figures, unchanged, under its model's label
        own = json.loads((run / part / "eval-wikitext" / "report.json").read_text())
        for entry in own["models"].values():
            label = "teacher" if Path(entry["model"]) == tmp_path / "base" else Path(entry["model"]).name
            ppl = {int(t.split("@")[1]): v["metrics"]["ppl"] for t, v in entry["tasks"].items()}
            assert ppl == {int(n): v for n, v in summary["models"][label]["wikitext_ppl"].items()}
            assert set(ppl) == {32, 64}
            seen.add(label)
    assert seen == {"teacher", "lolcats", "hedgehog"}
    merged = json.loads((run / "eval-wikitext" / "report.json").read_text())
    assert set(merged["models"]) == {"teacher", "lolcats", "hedgehog"}
    table = (run / "headline.md").read_text()
    assert "| lolcats | attention_transfer | 4 |" in table and "| hedgehog | attention_transfer | 4 |" in table
    assert (run / "accuracy_by_length.png").is_file()  # the teacher's passkey accuracy by length
    assert set(summary["models"]["teacher"]["passkey"]) == {"96"} and summary["models"]["lolcats"]["passkey"] == {}
    layers = summary["models"]["lolcats"]["conversion"]["layer_mse"]
    own = json.loads((run / "lolcats" / "report.json").read_text())["heldout_transfer"]
    assert {int(i): v for i, v in own["after"]["mse"].items()} == {int(i): v for i, v in layers["after"].items()}
    assert "| lolcats |" in table.split("worst layer")[1] and (run / "transfer_by_layer.png").is_file()
    # the side-by-side table: per-layer MSE from the attention-transfer stage's held-back blocks
    stage = next(s for s in json.loads((run / "lolcats" / "report.json").read_text())["stages"] if s["stage"] == "attention_transfer")
    val = summary["models"]["lolcats"]["conversion"]["validation_layer_mse"]
    assert {w: {int(i): v for i, v in stage[w]["mse"].items()} for w in ("before", "after")} == \
        {w: {int(i): v for i, v in val[w].items()} for w in ("before", "after")}
    ratios = sorted(val["after"][n] / val["before"][n] for n in val["after"])
    row = next(line for line in table.split("## Side by side")[1].splitlines() if line.startswith("| lolcats |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{ratios[len(ratios) // 2]:.3f}" and cells[2].startswith(f"{ratios[-1]:.3f} (")
    assert cells[3] == f"{sum(r <= 0.2 for r in ratios)} / {len(ratios)}"
    assert "## Zero-shot" not in table  # a suite that did not run leaves no empty table
