"""``linearize convert``: one recipe, run top to bottom.

The order: load the teacher; prepare every stage's data and the evaluation data while the model
is still pure softmax (teacher-written text needs the teacher); score the teacher; convert the
chosen layers; run the stages in order; score the student on the same blocks; save.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from . import io
from .architectures import adapter_for
from .convert import ConversionSpec, convert_model
from .data import get_texts, pack
from .eval.perplexity import perplexity
from .models import load_teacher
from .recipe import Recipe
from .stages.attention_transfer import AttentionTransfer, measure_transfer

STAGE_RUNNERS = {"attention_transfer": AttentionTransfer}


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"the recipe asks for device {name!r} but CUDA is not available; use --device cpu")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class ConvertRun:
    def __init__(self, recipe: Recipe, out_dir: str | Path, device: str | None = None, log=print):
        self.recipe, self.out_dir, self.log = recipe, Path(out_dir), log
        self.device = pick_device(device or recipe.device)
        self.report: dict = {"recipe": recipe.to_dict(), "device": self.device}

    # ------------------------------------------------------------------ set-up
    def setup(self):
        r = self.recipe
        seed_everything(r.seed)
        started = time.perf_counter()
        self.model, self.tokenizer, self.source = load_teacher(r.model, dtype=r.precision, device=self.device)
        self.adapter = adapter_for(self.model.config)
        self.log(f"teacher: {r.model} ({self.model.config.model_type}, {self.model.config.num_hidden_layers} layers, "
                 f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters) "
                 f"loaded in {time.perf_counter() - started:.1f}s on {self.device}")
        self.stage_blocks = [self._blocks(stage.data, stage.seq_len) for stage in r.stages]
        self.eval_blocks = None
        if r.eval is not None:
            self.eval_blocks = self._blocks(r.eval.data, r.eval.seq_len)[: r.eval.max_blocks]

    def _heldout_transfer(self) -> dict:
        return measure_transfer(self.model, self.adapter, self.eval_blocks, batch_size=4)

    def _blocks(self, data, seq_len):
        texts = get_texts(data, self.model, self.tokenizer, self.source.reference)
        return pack(texts, self.tokenizer, seq_len)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        r = self.recipe
        self.setup()
        if self.eval_blocks is not None:
            self.report["teacher_perplexity"] = perplexity(self.model, self.eval_blocks, progress=True, desc="teacher perplexity")
        spec = ConversionSpec(r.students.kind, r.students.layers, r.students.settings)
        convert_model(self.model, spec)
        self.model.linearize_base = self.source.reference
        self.report["converted_layers"] = spec.layer_indices(self.model.config.num_hidden_layers)
        if self.eval_blocks is not None:  # attention-transfer error on held-out text, before training
            self.report["heldout_transfer"] = {"before": self._heldout_transfer()}
        self.report["stages"] = []
        for stage, blocks in zip(r.stages, self.stage_blocks):
            self.log(f"stage {stage.stage}: {len(blocks)} blocks of {stage.seq_len} tokens, {stage.steps} steps")
            runner = STAGE_RUNNERS[stage.stage](stage, self.model, self.adapter, blocks, log=self.log)
            self.report["stages"].append(runner.run(seed=r.seed))
        if self.eval_blocks is not None:
            held = self.report["heldout_transfer"]
            held["after"] = self._heldout_transfer()
            self.log("attention-transfer error on held-out text, per layer\n" + transfer_table(held["before"], held["after"]))
            self.report["student_perplexity"] = perplexity(self.model, self.eval_blocks, progress=True, desc="student perplexity")
            self.report["eval_tokens"] = int(self.eval_blocks.numel())
            self.log(perplexity_table(self.report))
        io.save(self.model, self.out_dir, self.tokenizer, self.source.reference, r.to_dict(), self.report,
                extra_files={"report.md": markdown_report(self.report)})
        self.log(f"saved to {self.out_dir}  (load it with: linearize.load({str(self.out_dir)!r}))")
        return self.report


def transfer_table(before: dict, after: dict) -> str:
    rows = ["layer | rel. error before | after | ratio", "----- | ----------------- | ----- | -----"]
    for i in sorted(before["relative_error"]):
        b, a = before["relative_error"][i], after["relative_error"][i]
        rows.append(f"{i:>5} | {b:17.4f} | {a:5.4f} | {a / b:5.3f}")
    b, a = before["mean_relative_error"], after["mean_relative_error"]
    rows.append(f" mean | {b:17.4f} | {a:5.4f} | {a / b:5.3f}")
    return "\n".join(rows)


def perplexity_table(report: dict) -> str:
    t, s = report["teacher_perplexity"], report["student_perplexity"]
    return (
        f"held-out perplexity ({report.get('eval_tokens', '?')} tokens)\n"
        f"model   | perplexity\n--------|-----------\nteacher | {t:10.3f}\nstudent | {s:10.3f}  ({s / t:.3f}x)"
    )


def markdown_report(report: dict) -> str:
    lines = ["# linearize convert report", ""]
    recipe = report["recipe"]
    lines += [f"- model: `{recipe['model']}`", f"- student: `{recipe['students']['kind']}` on layers "
              f"{report.get('converted_layers')}", f"- device: {report['device']}", ""]
    if "teacher_perplexity" in report and "student_perplexity" in report:
        lines += ["## Held-out perplexity", "", "| model | perplexity |", "|---|---|",
                  f"| teacher | {report['teacher_perplexity']:.3f} |", f"| student | {report['student_perplexity']:.3f} |", ""]
    for stage in report.get("stages", []):
        lines += [f"- {stage['stage']}: {stage['steps']} steps, {stage['tokens']} tokens, {stage['seconds']:.0f}s", ""]
    held = report.get("heldout_transfer", {})
    if held.get("after"):
        lines += ["## Attention-transfer error on held-out text", "",
                  "Relative error ||y_student - y_teacher|| / ||y_teacher|| of each layer's attention output.", "",
                  "| " + transfer_table(held["before"], held["after"]).replace("\n", " |\n| ") + " |", ""]
    return "\n".join(lines)
