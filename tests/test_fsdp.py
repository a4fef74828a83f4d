"""FSDP (accelerate's FSDP2, the teacher's weights sharded) over two CPU processes (gloo).

The runs launch exactly as on GPUs: ``linearize convert --accelerate-config
examples/accelerate/fsdp.yaml --num-processes 2``, i.e. ``accelerate launch --config_file ...``.
Against one process: the same loss curve and the same saved files; a killed FSDP run resumes to
the weights of one never stopped; a failure in one process ends the run with its error."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_base_folder, synthetic_text
from test_distributed import kill_tree
from test_run import ENV, RECIPE, run, wait_for_checkpoint

pytest.importorskip("torch.distributed.fsdp")

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "examples" / "accelerate" / "fsdp.yaml"
STEPS = 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    make_base_folder(root / "base")
    (root / "train.txt").write_text(synthetic_text(3000, seed=1))
    (root / "test.txt").write_text(synthetic_text(400, seed=2))
    (root / "r.yaml").write_text(RECIPE.format(train=root / "train.txt", test=root / "test.txt", steps=STEPS))
    return root


def command(root, out, *extra, fsdp=True):
    # no dropout (its masks depend on how rows are split) and a moderate LoRA lr, as for data parallel;
    # the adapters saved merged into the weights they adapt, which under FSDP are gathered from the shards
    cmd = [sys.executable, "-m", "linearize", "convert", str(root / "base"), "--recipe", str(root / "r.yaml"),
           "--set", "stages.1.dropout=0.0", "--set", "stages.1.lr=3.0e-3", "--set", "stages.1.merge=true",
           "--out", str(root / out), *extra]
    if fsdp:
        cmd += ["--accelerate-config", str(FSDP_CONFIG), "--num-processes", "2"]
    return cmd


@pytest.fixture(scope="module")
def single(workdir):
    result = run(command(workdir, "one", fsdp=False))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "one"


@pytest.fixture(scope="module")
def sharded(workdir):
    result = run(command(workdir, "fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP: the teacher's weights are sharded over 2 processes" in result.stdout + result.stderr
    return workdir / "fsdp"


def test_fsdp_gives_the_single_process_loss_curve_and_files(single, sharded):
    one, two = (json.loads((folder / "report.json").read_text()) for folder in (single, sharded))
    assert (one["processes"], one["fsdp"], two["processes"], two["fsdp"]) == (1, False, 2, True)
    # each process holds half the teacher (rank 0 the larger half of odd-sized rows), not all of it
    assert abs(two["teacher_bytes_per_process"] - one["teacher_bytes_per_process"] / 2) <= 0.01 * one["teacher_bytes_per_process"]
    for a, b in zip(one["stages"], two["stages"]):
        assert a["tokens"] == b["tokens"]  # the same global batches
        losses = [(x["loss"], y["loss"]) for x, y in zip(a["history"], b["history"])]
        assert len(losses) == STEPS
        # same math, summed in another order: the data-parallel tolerance, 1e-5 relative per step
        assert max(abs(x - y) / abs(x) for x, y in losses) <= 1e-5, a["stage"]
    assert abs(one["student_perplexity"] - two["student_perplexity"]) / one["student_perplexity"] <= 1e-4
    # the saved artifact: the same files, keys and shapes; values within 1e-4 relative per tensor
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in sharded.iterdir())
    assert json.loads((single / "linearize.json").read_text()) == json.loads((sharded / "linearize.json").read_text())
    for name in ("students.safetensors", "merged.safetensors"):
        a, b = load_file(str(single / name)), load_file(str(sharded / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
            assert float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) <= 1e-4, k


def test_killed_fsdp_run_resumes_to_the_same_weights(workdir, sharded):
    proc = subprocess.Popen(command(workdir, "stopped"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for_checkpoint(workdir / "stopped.checkpoints", proc, stage_index=1, min_step=2)
    kill_tree(proc.pid)  # the launcher and both workers
    proc.wait(timeout=60)
    assert not (workdir / "stopped").exists()
    resumed = run(command(workdir, "stopped", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "lora: resuming at step" in resumed.stdout + resumed.stderr
    for name in ("students.safetensors", "merged.safetensors"):
        a, b = load_file(str(sharded / name)), load_file(str(workdir / "stopped" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


FAIL_ON_RANK_1 = """
import os, sys
if os.environ.get("RANK") == "1":
    sys.path.insert(0, {repo!r})
    import linearize.training as training
    step_once = training.TrainingStage._train_step
    def failing(self, step, *args):
        if step == 3:
            raise RuntimeError("injected failure in process 1")
        return step_once(self, step, *args)
    training.TrainingStage._train_step = failing
"""


def test_a_failure_in_one_fsdp_process_stops_the_run_with_its_error(workdir, tmp_path):
    # every process imports sitecustomize at start; the one of rank 1 fails at step 3
    (tmp_path / "sitecustomize.py").write_text(FAIL_ON_RANK_1.format(repo=str(REPO)))
    started = time.time()
    result = subprocess.run(command(workdir, "failed"), capture_output=True, text=True, timeout=300,
                            env={**ENV, "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert time.time() - started < 240  # stopped, not hung in a collective
    assert "injected failure in process 1" in result.stderr
    assert "linearize: error: a process failed" in result.stderr
    assert not (workdir / "failed").exists()


def test_the_launch_options_are_not_passed_on_to_the_processes():
    from linearize.cli import _without_launch_options

    argv = ["convert", "m", "--num-processes", "2", "--recipe", "r.yaml", "--accelerate-config=f.yaml",
            "--out", "o", "--accelerate-config", "g.yaml", "--num-processes=4"]
    assert _without_launch_options(argv) == ["convert", "m", "--recipe", "r.yaml", "--out", "o"]


def test_an_fsdp1_config_is_refused(monkeypatch):
    from linearize.distributed import Distributed

    monkeypatch.setenv("FSDP_VERSION", "1")
    dist = Distributed()
    dist.fsdp = True
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        dist.shard(torch.nn.Linear(2, 2))
