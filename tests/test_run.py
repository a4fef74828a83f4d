"""`linearize convert` end to end on a tiny model: attention transfer then LoRA, and a run that is
killed (SIGKILL) and interrupted (SIGINT), then resumed, ends with the weights of a run that was
never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_base_folder, synthetic_text

RECIPE = """
description: tiny end-to-end run
seed: 3
students: {{kind: lolcats, window_size: 4, sink_size: 1}}
stages:
  - stage: attention_transfer
    data: {{source: text, path: {train}}}
    seq_len: 32
    batch_size: 2
    steps: {steps}
    lr: 1.0e-2
    val_blocks: 2
    eval_every: 10
    checkpoint_every: 2
  - stage: lora
    data: {{source: text, path: {train}}}
    seq_len: 32
    batch_size: 2
    grad_accum: 2
    steps: {steps}
    lr: 3.0e-2
    rank: 4
    dropout: 0.1
    loss: ce
    schedule: cosine
    warmup_steps: 2
    val_blocks: 2
    eval_every: 10
    checkpoint_every: 2
eval:
  data: {{source: text, path: {test}}}
  seq_len: 32
  max_blocks: 4
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_base_folder(root / "base")
    (root / "train.txt").write_text(synthetic_text(3000, seed=1))
    (root / "test.txt").write_text(synthetic_text(400, seed=2))
    (root / "r.yaml").write_text(RECIPE.format(train=root / "train.txt", test=root / "test.txt", steps=40))
    return root


def command(root, out, *extra):
    return [sys.executable, "-m", "linearize", "convert", str(root / "base"), "--recipe", str(root / "r.yaml"),
            "--out", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(cmd, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    out = workdir / "whole"
    result = run(command(workdir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_convert_runs_both_stages_and_reports_each(uninterrupted):
    out, result = uninterrupted
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["attention_transfer", "lora"]
    # real tokens trained on: every step's blocks, less the padding of the stream's last block if drawn
    assert 40 * 2 * 32 - 32 < report["stages"][0]["tokens"] <= 40 * 2 * 32
    assert 40 * 2 * 2 * 32 - 32 < report["stages"][1]["tokens"] <= 40 * 2 * 2 * 32
    assert "student after attention_transfer" in result.stdout and "student after lora" in result.stdout
    # both stages improved on their validation loss, so the weights compared below are trained ones
    assert all(0 < s["best_step"] and s["after"]["loss"] < s["before"]["loss"] for s in report["stages"])
    config = json.loads((out / "linearize.json").read_text())
    assert config["lora"]["rank"] == 4 and not config["lora"]["merged"]
    assert {"students.safetensors", "lora.safetensors", "linearize.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert not (out.parent / "whole.checkpoints").exists()  # removed once the model is saved


def wait_for_checkpoint(folder: Path, proc, stage_index: int, min_step: int, timeout=240):
    summary = folder / "checkpoint.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before the checkpoint to interrupt at")
        if summary.is_file():
            try:
                s = json.loads(summary.read_text())
            except json.JSONDecodeError:
                s = {}
            if s.get("stage_index") == stage_index and not s.get("stage_done") and (s.get("step") or 0) >= min_step:
                return s
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared in time")


def test_killed_and_interrupted_run_resumes_to_the_same_weights(workdir, uninterrupted):
    out = workdir / "stopped"
    ckpt = workdir / "stopped.checkpoints"
    # 1. SIGKILL in the middle of attention transfer
    proc = subprocess.Popen(command(workdir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    wait_for_checkpoint(ckpt, proc, stage_index=0, min_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    # 2. without --resume the run refuses to overwrite the checkpoint
    refused = run(command(workdir, out))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    # 3. resume, then Ctrl-C in the middle of LoRA: it saves where it is and says how to go on
    proc = subprocess.Popen(command(workdir, out, "--resume"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, text=True)
    wait_for_checkpoint(ckpt, proc, stage_index=1, min_step=2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "resuming from" in stdout and "attention_transfer: resuming at step" in stderr + stdout
    assert "--resume" in stderr
    # 4. resume to the end
    final = run(command(workdir, out, "--resume"))
    assert final.returncode == 0, final.stderr[-3000:]
    assert "lora: resuming at step" in final.stdout + final.stderr
    whole = uninterrupted[0]
    for name in ("students.safetensors", "lora.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (name, k)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (whole, out))
    assert ra["student_perplexity"] == rb["student_perplexity"]
    # the held-out attention error after attention transfer is the one measured when that stage ended,
    # not one measured again with the weights of a later stage (or none) after the resume
    assert ra["heldout_transfer"] == rb["heldout_transfer"]
    assert rb["heldout_transfer"]["after"]["mean_relative_error"] < rb["heldout_transfer"]["before"]["mean_relative_error"]
    assert [h["loss"] for h in ra["stages"][1]["history"]] == [h["loss"] for h in rb["stages"][1]["history"]]


def test_data_only_caches_the_teacher_text_that_the_conversion_then_reads(tmp_path):
    """`convert --data-only` writes the teacher's texts into the cache and no model; the
    conversion that follows reads those texts instead of generating them again."""
    make_base_folder(tmp_path / "base")
    (tmp_path / "test.txt").write_text(synthetic_text(400, seed=2))
    recipe = RECIPE.format(train=tmp_path / "test.txt", test=tmp_path / "test.txt", steps=2).replace(
        f"{{source: text, path: {tmp_path / 'test.txt'}}}\n    seq_len: 32\n    batch_size: 2\n    steps: 2\n    lr: 1.0e-2",
        "{source: teacher, samples: 6, max_new_tokens: 48, batch_size: 6, seed: 5}\n    seq_len: 32\n    batch_size: 2\n"
        "    steps: 2\n    lr: 1.0e-2", 1)
    assert "source: teacher" in recipe
    (tmp_path / "r.yaml").write_text(recipe)
    env = {**ENV, "LINEARIZE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    cmd = command(tmp_path, out)
    first = subprocess.run(cmd + ["--data-only"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "data ready" in first.stdout and "attention_transfer" in first.stdout
    assert not out.exists() and not Path(f"{out}.checkpoints").exists()
    cached = list((tmp_path / "cache" / "teacher-text").glob("*.jsonl"))
    assert len(cached) == 1
    texts = [json.loads(line)["text"] for line in cached[0].read_text().splitlines()]
    assert len(texts) == 6
    stamp = cached[0].stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "teacher writes text" not in second.stderr  # read from the cache, not generated again
    assert cached[0].stat().st_mtime_ns == stamp and (out / "linearize.json").is_file()
