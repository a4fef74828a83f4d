"""``linearize convert``: one recipe, run top to bottom.

The order: load the teacher; prepare every stage's data and the evaluation data while the model
is still pure softmax (teacher-written text needs the teacher); score the teacher; convert the
chosen layers; run the stages in order (scoring the student after each); save.

A run writes resumable checkpoints to ``OUT.checkpoints/`` (every ``checkpoint_every`` steps
of a stage, and at the end of each stage); ``--resume`` rebuilds the model the same way,
loads the last one and goes on from there. The folder is removed once the model is saved.
"""

from __future__ import annotations

import copy

import random
import shutil
import time
from pathlib import Path

import torch

from . import io
from .architectures import adapter_for
from .convert import ConversionSpec, convert_model, load_student_state_dict, student_state_dict
from .data import build_blocks
from .distributed import current as current_distributed, local_parameter_bytes
from .eval.perplexity import perplexity
from .lora import has_lora, load_lora_state_dict, lora_state_dict, merged_weights
from .models import load_teacher
from .recipe import Recipe
from .stages.attention_transfer import AttentionTransfer, measure_transfer
from .stages.lora import LoraStage
from .training import Checkpoints, NonFiniteLossError, StageOutOfMemoryError, rng_state, set_rng_state

STAGE_RUNNERS = {"attention_transfer": AttentionTransfer, "lora": LoraStage}


class RunError(RuntimeError):
    """A run that cannot start or continue as asked (the message says what to do)."""


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"the recipe asks for device {name!r} but CUDA is not available; use --device cpu")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where a run writes its checkpoints: ``OUT.checkpoints`` beside the output folder."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoints")


def _recipe_key(recipe_dict: dict) -> dict:
    return {k: v for k, v in recipe_dict.items() if k not in ("overrides", "device")}


class ConvertRun:
    """One recipe, top to bottom: ``setup`` (teacher, data), then ``run`` (score the teacher,
    convert, the stages with checkpoints, score the student, save)."""

    def __init__(self, recipe: Recipe, out_dir: str | Path, device: str | None = None, log=print, resume: bool = False):
        self.dist = current_distributed()
        self.recipe, self.out_dir, self.resume = recipe, Path(out_dir), resume
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.device = self.dist.device(pick_device(device or recipe.device))
        self.report: dict = {"recipe": recipe.to_dict(), "device": self.device}
        self.checkpoints = Checkpoints(checkpoint_dir(self.out_dir))

    # ------------------------------------------------------------------ set-up
    def setup(self):
        r = self.recipe
        seed_everything(r.seed)
        started = time.perf_counter()
        # under FSDP the teacher is loaded whole on the CPU, then sharded onto the devices (below)
        load_device = "cpu" if self.dist.fsdp else self.device
        with self.dist.main_process_first():  # the first process fills the caches the others read
            self.model, self.tokenizer, self.source = load_teacher(r.model, dtype=r.precision, device=load_device)
        self.adapter = adapter_for(self.model.config)
        self.log(f"teacher: {r.model} ({self.model.config.model_type}, {self.model.config.num_hidden_layers} layers, "
                 f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters) "
                 f"loaded in {time.perf_counter() - started:.1f}s on {load_device}")
        with self.dist.main_process_first():
            self.stage_blocks = [self._blocks(stage.data, stage.seq_len) for stage in r.stages]
            self.eval_blocks = None
            if r.eval is not None:
                self.eval_blocks = self._blocks(r.eval.data, r.eval.seq_len)[: r.eval.max_blocks]
        if self.dist.fsdp:  # every process keeps 1/N of the teacher; the students and adapters come after
            self.model = self.dist.shard(self.model)
        held = local_parameter_bytes(self.model)
        self.report["teacher_bytes_per_process"] = held
        if self.dist.fsdp:
            self.log(f"FSDP: the teacher's weights are sharded over {self.dist.world_size} processes "
                     f"({held / 2**20:.1f} MiB on each)")

    def _heldout_transfer(self) -> dict:
        return measure_transfer(self.model, self.adapter, self.eval_blocks, batch_size=4)

    def _blocks(self, data, seq_len):
        return build_blocks(data, self.tokenizer, seq_len, self.model, self.source.reference, log=self.log)

    # ------------------------------------------------------------------ checkpoints
    def _previous_checkpoint(self) -> dict | None:
        if not self.checkpoints.exists():
            if self.resume:
                self.log(f"no checkpoint in {self.checkpoints.folder}: starting from the beginning")
            return None
        if not self.resume:
            raise RunError(
                f"{self.checkpoints.folder} holds the checkpoint of an unfinished run; continue it with --resume, "
                "or delete that folder to start over"
            )
        state = self.checkpoints.load()
        saved, now = _recipe_key(state["recipe"]), _recipe_key(self.recipe.to_dict())
        if saved != now:
            keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise RunError(
                f"the checkpoint in {self.checkpoints.folder} was made with a different recipe (differs in: "
                f"{', '.join(keys)}); resume with the same recipe and --set options, or delete the folder to start over"
            )
        done = "done" if state["stage_done"] else f"step {state['stage_state']['step']}"
        self.log(f"resuming from {self.checkpoints.path}: stage {state['stage_index']} ({done})")
        return state

    def _model_state(self) -> dict:
        return {
            "students": {k: v.detach().cpu().clone() for k, v in student_state_dict(self.model).items()},
            "lora": {k: v.detach().cpu().clone() for k, v in lora_state_dict(self.model).items()} if has_lora(self.model) else {},
        }

    def _load_model_state(self, state: dict) -> None:
        load_student_state_dict(self.model, state["students"])
        if state["lora"]:
            load_lora_state_dict(self.model, state["lora"])

    def _save_checkpoint(self, index: int, stage_state: dict | None, done: bool = False) -> None:
        if not self.dist.is_main:
            return
        stage = self.recipe.stages[index]
        summary = {"stage_index": index, "stage": stage.stage, "stage_done": done,
                   "step": stage_state["step"] if stage_state else None, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.checkpoints.save({
            "recipe": self.recipe.to_dict(),
            "stage_index": index,
            "stage_done": done,
            "stage_state": stage_state,
            "model_state": self._model_state(),
            "reports": list(self.report["stages"]),
            # the held-out attention-transfer error as measured when its stage ended: a run resumed in
            # a later stage no longer holds the weights it was measured with
            "heldout_transfer": copy.deepcopy(self.report.get("heldout_transfer")),
            "rng": rng_state(),
        }, summary)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        r = self.recipe
        previous = self._previous_checkpoint()
        self.setup()
        if self.eval_blocks is not None:
            self.report["teacher_perplexity"] = perplexity(self.model, self.eval_blocks, progress=self.dist.is_main, desc="teacher perplexity")
        spec = ConversionSpec(r.students.kind, r.students.layers, r.students.settings, r.students.per_layer)
        convert_model(self.model, spec)
        self.model.linearize_base = self.source.reference
        self.report["converted_layers"] = spec.layer_indices(self.model.config.num_hidden_layers)
        held = None
        if self.eval_blocks is not None:  # attention-transfer error on held-out text, before training
            held = self.report["heldout_transfer"] = {"before": self._heldout_transfer()}
        self.report["stages"] = []
        last_transfer = max((i for i, s in enumerate(r.stages) if s.stage == "attention_transfer"), default=None)
        for i, (stage, blocks) in enumerate(zip(r.stages, self.stage_blocks)):
            runner = STAGE_RUNNERS[stage.stage](
                stage, self.model, self.adapter, blocks, seed=r.seed, log=self.log,
                on_checkpoint=lambda state, i=i: self._save_checkpoint(i, state),
            )
            runner.prepare()
            resume = None
            if previous is not None and i <= previous["stage_index"]:
                if i < previous["stage_index"] or previous["stage_done"]:  # finished before the interruption
                    self.report["stages"].append(previous["reports"][i])
                    if i == previous["stage_index"]:
                        self._load_model_state(previous["model_state"])
                        set_rng_state(previous["rng"])
                    if i == last_transfer and held is not None:
                        saved = (previous.get("heldout_transfer") or {}).get("after")
                        held["after"] = saved if saved is not None else self._heldout_transfer()
                    continue
                self._load_model_state(previous["model_state"])
                resume = previous["stage_state"]
            self.log(f"stage {i} ({stage.stage}): {len(blocks)} blocks of {stage.seq_len} tokens, {runner.steps} steps")
            result = self._run_stage(i, runner, resume)
            if i == last_transfer and held is not None:  # the stage this error measures
                held["after"] = self._heldout_transfer()
            if self.eval_blocks is not None:
                result["perplexity"] = perplexity(self.model, self.eval_blocks, progress=self.dist.is_main, desc=f"perplexity after {stage.stage}")
            self.report["stages"].append(result)
            self._save_checkpoint(i, None, done=True)
        if held is not None and "after" in held:
            self.log("attention-transfer error on held-out text, per layer\n" + transfer_table(held["before"], held["after"]))
        if self.eval_blocks is not None:
            last = self.report["stages"][-1] if self.report["stages"] else {}
            self.report["student_perplexity"] = last.get("perplexity") or perplexity(self.model, self.eval_blocks)
            self.report["eval_tokens"] = self.eval_blocks.tokens()
            self.log(perplexity_table(self.report))
        merge = any(s.stage == "lora" and s.merge for s in r.stages)
        self.report["processes"] = self.dist.world_size
        self.report["fsdp"] = self.dist.fsdp
        # merging reads the base weights, which under FSDP every process gathers together
        merged = merged_weights(self.model) if merge and has_lora(self.model) and self.dist.fsdp else None
        if self.dist.is_main:
            self.report["checkpoint_bytes"] = self.checkpoints.nbytes()
            io.save(self.model, self.out_dir, self.tokenizer, self.source.reference, r.to_dict(), self.report,
                    extra_files={"report.md": markdown_report(self.report)}, merge_lora=merge, merged=merged)
            shutil.rmtree(self.checkpoints.folder, ignore_errors=True)
        self.dist.barrier()
        self.log(f"saved to {self.out_dir}  (load it with: linearize.load({str(self.out_dir)!r}))")
        return self.report

    def _run_stage(self, index: int, runner, resume):
        stage = self.recipe.stages[index]
        try:
            return runner.run(resume=resume)
        except NonFiniteLossError as err:
            where = f"; the last checkpoint is in {self.checkpoints.folder}" if self.checkpoints.exists() else ""
            raise NonFiniteLossError(f"stages.{index}: {err}{where}") from None
        except torch.OutOfMemoryError as err:
            raise StageOutOfMemoryError(
                f"out of memory in stages.{index} ({stage.stage}, batch_size {stage.batch_size} x seq_len "
                f"{stage.seq_len}): lower stages.{index}.batch_size (raise stages.{index}.grad_accum to keep the "
                f"global batch) or stages.{index}.seq_len, or use precision: bfloat16. "
                f"({str(err).splitlines()[0] if str(err) else 'CUDA/CPU allocator'})"
            ) from None


def transfer_table(before: dict, after: dict) -> str:
    rows = ["layer | rel. error before | after | ratio", "----- | ----------------- | ----- | -----"]
    for i in sorted(before["relative_error"]):
        b, a = before["relative_error"][i], after["relative_error"][i]
        rows.append(f"{i:>5} | {b:17.4f} | {a:5.4f} | {a / b:5.3f}")
    b, a = before["mean_relative_error"], after["mean_relative_error"]
    rows.append(f" mean | {b:17.4f} | {a:5.4f} | {a / b:5.3f}")
    return "\n".join(rows)


def perplexity_rows(report: dict) -> list[tuple[str, float]]:
    """``(label, perplexity)``: the teacher, then the student after each stage that measured it."""
    rows = [("teacher", report["teacher_perplexity"])]
    stages = [s for s in report.get("stages", []) if s.get("perplexity") is not None]
    for s in stages:
        rows.append((f"student after {s['stage']}", s["perplexity"]))
    if not stages:
        rows.append(("student", report["student_perplexity"]))
    return rows


def perplexity_table(report: dict) -> str:
    rows = perplexity_rows(report)
    t = rows[0][1]
    width = max(len(label) for label, _ in rows)
    lines = [f"held-out perplexity ({report.get('eval_tokens', '?')} tokens)",
             f"{'model':<{width}} | perplexity", f"{'-' * width}-|-----------"]
    for label, value in rows:
        ratio = "" if label == "teacher" else f"  ({value / t:.3f}x)"
        lines.append(f"{label:<{width}} | {value:10.3f}{ratio}")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    lines = ["# linearize convert report", ""]
    recipe = report["recipe"]
    lines += [f"- model: `{recipe['model']}`", f"- student: `{recipe['students']['kind']}` on layers "
              f"{report.get('converted_layers')}", f"- device: {report['device']}", ""]
    if "teacher_perplexity" in report and "student_perplexity" in report:
        rows = perplexity_rows(report)
        lines += ["## Held-out perplexity", "", "| model | perplexity | vs teacher |", "|---|---|---|"]
        lines += [f"| {label} | {value:.3f} | {value / rows[0][1]:.3f}x |" for label, value in rows] + [""]
    for stage in report.get("stages", []):
        memory = f", peak GPU memory {stage['peak_memory_bytes'] / 2**30:.2f} GiB" if stage.get("peak_memory_bytes") else ""
        lines += [f"- {stage['stage']}: {stage['steps']} steps, {stage['tokens']} tokens, {stage['seconds']:.0f}s "
                  f"({stage.get('tokens_per_second', 0):.0f} tokens/s){memory}", ""]
    held = report.get("heldout_transfer", {})
    if held.get("after"):
        lines += ["## Attention-transfer error on held-out text", "",
                  "Relative error ||y_student - y_teacher|| / ||y_teacher|| of each layer's attention output.", "",
                  "| " + transfer_table(held["before"], held["after"]).replace("\n", " |\n| ") + " |", ""]
    return "\n".join(lines)
