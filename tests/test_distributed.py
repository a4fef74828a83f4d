"""Data parallel over two CPU processes (gloo), launched by torchrun or by accelerate, follows the
single-process run's loss curve."""

import json
from pathlib import Path

import pytest

from conftest import make_base_folder, synthetic_text
from test_run import RECIPE, run

pytest.importorskip("torch.distributed")


def test_two_processes_give_the_single_process_loss_curve(tmp_path):
    make_base_folder(tmp_path / "base")
    (tmp_path / "train.txt").write_text(synthetic_text(3000, seed=1))
    (tmp_path / "test.txt").write_text(synthetic_text(400, seed=2))
    (tmp_path / "r.yaml").write_text(RECIPE.format(train=tmp_path / "train.txt", test=tmp_path / "test.txt", steps=10))
    # no dropout (its masks depend on how rows are split) and a moderate LoRA lr
    common = ["convert", str(tmp_path / "base"), "--recipe", str(tmp_path / "r.yaml"),
              "--set", "stages.1.dropout=0.0", "--set", "stages.1.lr=3.0e-3"]
    reports = []
    ddp = Path(__file__).parent.parent / "examples" / "accelerate" / "ddp.yaml"
    for name, extra in (("one", []), ("two", ["--num-processes", "2"]),  # torchrun
                        ("accelerate", ["--num-processes", "2", "--accelerate-config", str(ddp)])):  # accelerate launch
        import sys

        result = run([sys.executable, "-m", "linearize", *common, "--out", str(tmp_path / name), *extra])
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    one = reports[0]
    for two in reports[1:]:
        assert (one["processes"], two["processes"]) == (1, 2)
        for a, b in zip(one["stages"], two["stages"]):
            assert a["tokens"] == b["tokens"]  # the same global batches
            losses = [(x["loss"], y["loss"]) for x, y in zip(a["history"], b["history"])]
            assert len(losses) == 10
            # same math, summed in another order: stated tolerance 1e-5 relative per step
            assert max(abs(x - y) / abs(x) for x, y in losses) <= 1e-5, a["stage"]
        assert abs(one["student_perplexity"] - two["student_perplexity"]) / one["student_perplexity"] <= 1e-4


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process descended from it, all at once."""
    import os
    import signal
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_process_run_killed_midway_resumes_to_the_same_weights(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_run import ENV, wait_for_checkpoint

    make_base_folder(tmp_path / "base")
    (tmp_path / "train.txt").write_text(synthetic_text(3000, seed=1))
    (tmp_path / "test.txt").write_text(synthetic_text(400, seed=2))
    (tmp_path / "r.yaml").write_text(RECIPE.format(train=tmp_path / "train.txt", test=tmp_path / "test.txt", steps=16))

    def cmd(out, *extra):
        return [sys.executable, "-m", "linearize", "convert", str(tmp_path / "base"), "--recipe", str(tmp_path / "r.yaml"),
                "--out", str(tmp_path / out), "--num-processes", "2", *extra]

    whole = run(cmd("whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(cmd("stopped"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for_checkpoint(tmp_path / "stopped.checkpoints", proc, stage_index=1, min_step=2)
    kill_tree(proc.pid)  # the launcher and both workers (which run in sessions of their own)
    proc.wait(timeout=60)
    assert not (tmp_path / "stopped").exists()
    resumed = run(cmd("stopped", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "lora: resuming at step" in resumed.stdout + resumed.stderr
    for name in ("students.safetensors", "lora.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "stopped" / name))
        assert all((a[k] == b[k]).all() for k in a), name
