"""The ``linearize`` command."""

from __future__ import annotations

import argparse
import sys


def _launch(num_processes: int, argv: list[str]) -> int:
    """Run ``linearize convert`` in ``num_processes`` processes through torch's launcher (torchrun),
    on this machine: one process a GPU, or gloo over CPU processes without one."""
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc_per_node={num_processes}", "-m", "linearize", *argv])
    except Exception as err:  # a failing process stops them all; its error is printed above
        print(f"linearize: error: a process failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 1
    return 0


def _launch_accelerate(config_file: str, num_processes: int | None, argv: list[str]) -> int:
    """Run ``linearize convert`` through ``accelerate launch --config_file FILE`` (FSDP, or any
    other set-up the file describes); ``num_processes`` overrides the file's."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    cmd = ["--config_file", config_file]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    try:
        launch_command(launch_command_parser().parse_args([*cmd, "-m", "linearize", *argv]))
    except Exception as err:  # a failing process stops them all; its error is printed above
        print(f"linearize: error: a process failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 1
    return 0


_LAUNCH_OPTIONS = ("--num-processes", "--accelerate-config")


def _without_launch_options(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:  # the same command, less the options that launched it
        if skip:
            skip = False
        elif a in _LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in _LAUNCH_OPTIONS)):
            out.append(a)
    return out


def _convert(args) -> int:
    import os
    import time
    from pathlib import Path

    from .pipeline import ConvertRun
    from .recipe import RecipeError, load_recipe

    launched = "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and (args.num_processes > 1 or args.accelerate_config):
        if args.accelerate_config and not Path(args.accelerate_config).is_file():
            raise FileNotFoundError(f"--accelerate-config: no file {args.accelerate_config}")
        if args.recipe != "auto":
            load_recipe(args.recipe, overrides=args.set or [], model=args.model)  # fail early, once
        argv = _without_launch_options(args.argv)
        if args.accelerate_config:
            return _launch_accelerate(args.accelerate_config, args.num_processes if args.num_processes > 1 else None, argv)
        return _launch(args.num_processes, argv)

    if args.recipe == "auto":
        if not args.budget:
            raise RecipeError("--recipe auto needs --budget (e.g. --budget softmax-layers=4); see `linearize plan --help`")
        from .plan import run_plan

        base = load_recipe(args.base_recipe, overrides=args.set or [], model=args.model)
        plan_dir = Path(f"{args.out}.plan")
        if args.resume and (plan_dir / "recipe.yaml").is_file():  # the plan of the interrupted run
            print(f"resuming with the plan in {plan_dir}")
            plan_seconds = None
        else:
            result, _ = run_plan(args.model, base, args.budget, plan_dir, candidates=args.candidates, signal=args.signal,
                                 calibration_steps=args.calibration_steps, signal_blocks=args.signal_blocks,
                                 device=args.device)
            plan_seconds = result["timing"]["plan_seconds"]
        recipe = load_recipe(str(plan_dir / "recipe.yaml"), model=args.model)
    else:
        if args.candidates or args.signal or args.calibration_steps or args.signal_blocks:
            raise RecipeError("--candidates, --signal, --calibration-steps and --signal-blocks go with --recipe auto")
        recipe = load_recipe(args.recipe, overrides=args.set or [], model=args.model)
        plan_seconds = None
    if args.data_only:
        run = ConvertRun(recipe, args.out, device=args.device)
        run.setup()
        sizes = [f"{stage.stage} {blocks.tokens():,} tokens" for stage, blocks in zip(recipe.stages, run.stage_blocks)]
        if run.eval_blocks is not None:
            sizes.append(f"evaluation {run.eval_blocks.tokens():,} tokens")
        print("data ready (cached for the conversion): " + ", ".join(sizes))
        return 0
    started = time.perf_counter()
    ConvertRun(recipe, args.out, device=args.device, resume=args.resume).run()
    if plan_seconds is not None and int(os.environ.get("RANK", "0")) == 0:
        seconds = time.perf_counter() - started
        print(f"plan {plan_seconds:.0f}s, conversion {seconds:.0f}s: the plan took {plan_seconds / seconds:.1%} "
              "of the conversion's time")
    if args.push_to_hub and (int(os.environ.get("RANK", "0")) == 0):
        from .hub import push

        where = push(args.out, args.push_to_hub, dry_run_dir=f"{args.out}.hub" if args.dry_run else None)
        print(f"{'dry run: the upload is in' if args.dry_run else 'pushed to'} {where}")
    return 0


def _push(args) -> int:
    from .hub import push

    where = push(args.folder, args.repo_id, dry_run_dir=args.dry_run, private=args.private, token=args.token,
                 revision=args.revision)
    print(f"{'dry run: the upload is in' if args.dry_run else 'pushed to'} {where}")
    return 0


def _plan(args) -> int:
    from .plan import run_plan
    from .recipe import load_recipe

    base = load_recipe(args.recipe, overrides=args.set or [], model=args.model)
    run_plan(args.model, base, args.budget, args.out, candidates=args.candidates, signal=args.signal,
             calibration_steps=args.calibration_steps, signal_blocks=args.signal_blocks, device=args.device,
             reuse=args.reuse)
    return 0


def _recipes(args) -> int:
    from .recipe import builtin_recipes, describe, recipe_path

    if args.action == "show":
        if not args.name:
            print("usage: linearize recipes show NAME", file=sys.stderr)
            return 2
        print(recipe_path(args.name).read_text(), end="")
        return 0
    recipes = builtin_recipes()
    width = max(len(n) for n in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {describe(path)}")
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _eval(args) -> int:
    from .eval.runner import EvalOptions, run_eval

    opts = EvalOptions(
        samples=args.samples, seed=args.seed, max_new_tokens=args.max_new_tokens, haystack=args.haystack,
        task_files=args.task_file or [], text=args.text, max_chunks=args.max_chunks, segment=args.segment,
        prefill_chunk=args.prefill_chunk,
        limit=args.limit, num_fewshot=args.num_fewshot, data_dir=args.data_dir, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype,
    )
    for key in ("lengths", "depths", "niah_tasks", "tasks"):
        if getattr(args, key) is not None:
            setattr(opts, key, getattr(args, key))
    out = args.out or f"eval-{args.suite}"
    report = run_eval(args.models, args.suite, out, opts, resume=args.resume)
    print(f"report: {out}/report.json, {out}/report.md")
    return 0 if all(e["status"] == "ok" for e in report["models"].values()) else 1


def _plan_options(p, auto: bool = False) -> None:
    """The planner's options, shared by ``plan`` and ``convert --recipe auto``."""
    with_auto = "with --recipe auto: " if auto else ""
    p.add_argument("--candidates", nargs="+", action="extend", metavar="KEY=V1,V2", default=[],
                   help=with_auto + "student settings to choose from per layer, e.g. window_size=16,64,256 "
                        "(several keys: their grid); default: the recipe's own settings")
    p.add_argument("--signal", choices=["kl", "transfer"], default=None,
                   help=with_auto + "what the plan minimises: transfer (default; each layer's attention-transfer "
                        "error) or kl (its end-to-end KL to the teacher with only it converted; measures both "
                        "signals, at several times the cost)")
    p.add_argument("--calibration-steps", type=int, default=None,
                   help=with_auto + "attention-transfer steps of each option's measuring fit (default: 10%% of the "
                        "recipe's first attention-transfer stage, split over the options, at least 3)")
    p.add_argument("--signal-blocks", type=int, default=None,
                   help=with_auto + "held-back blocks the signals are measured on (default: scaled to the recipe's "
                        "training tokens, at least 1, at most the stage's val_blocks)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linearize", description="Turn a pretrained LLM into a linear-attention model by distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model with a recipe and save the result")
    p.add_argument("model", nargs="?", default=None,
                   help="Hub id, local folder, .gguf file, or 'smollm2-135m-instruct' (default: the recipe's model)")
    p.add_argument("--recipe", required=True,
                   help="a built-in recipe name (see `linearize recipes`), a YAML file, or 'auto' (plan, then convert)")
    p.add_argument("--budget", default=None, help="with --recipe auto: the budget (see `linearize plan --help`)")
    p.add_argument("--base-recipe", default="smoke", help="with --recipe auto: the recipe the plan starts from")
    _plan_options(p, auto=True)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. stages.0.steps=200")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the recipe's, 'auto')")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="data-parallel over N processes on this machine (one a GPU; gloo over CPU processes "
                        "without GPUs); the same as `accelerate launch --multi_gpu --num_processes N -m linearize convert ...`")
    p.add_argument("--accelerate-config", metavar="FILE", default=None,
                   help="launch through `accelerate launch --config_file FILE` (e.g. examples/accelerate/fsdp.yaml: "
                        "FSDP, the teacher's weights sharded over the processes); --num-processes overrides the file's")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the result with a model card")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: write the upload to OUT.hub/ instead")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (in OUT.checkpoints/)")
    p.add_argument("--data-only", action="store_true",
                   help="load the teacher, build (and cache) every stage's data and the evaluation data, then stop: "
                        "recipes that share a data mix can then convert side by side without generating it twice")
    p.set_defaults(func=_convert)

    p = sub.add_parser("plan", help="choose, layer by layer, what to convert under a budget; writes a recipe")
    p.add_argument("model", nargs="?", default=None, help="as for convert (default: the recipe's model)")
    p.add_argument("--recipe", default="smoke", help="the base recipe: student, settings, stages (default: smoke)")
    p.add_argument("--budget", required=True,
                   help="softmax-layers=N (or N%%) | kv-memory=SIZE@CONTEXT (64MiB@32768) | prefill=RATIO@CONTEXT (0.5@16384)")
    p.add_argument("--out", required=True, help="folder for recipe.yaml, plan.json, plan.md, plan.png")
    _plan_options(p)
    p.add_argument("--reuse", metavar="DIR", default=None,
                   help="take the measurements from an earlier plan's folder (same model, recipe, candidates and "
                        "calibration steps) and only choose again, e.g. under another budget or signal")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the base recipe")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_plan)

    p = sub.add_parser("push", help="upload a converted model folder to the Hugging Face Hub, with a model card")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--dry-run", metavar="OUT", default=None, help="write the folder that would be uploaded to OUT; no network")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="a Hub token (default: the logged-in one, or HF_TOKEN)")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_push)
    p = sub.add_parser("eval", help="evaluate converted models and teachers side by side",
                       description="Run one evaluation suite on every MODEL and write report.json, report.md "
                                   "and plots into --out. MODEL: a converted-model folder, or anything convert "
                                   "accepts (Hub id, model folder, .gguf, smollm2-135m-instruct).")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--suite", required=True, help="passkey | niah | task-file | ppl-by-length | lm-eval")
    p.add_argument("--out", default=None, help="report folder (default: eval-SUITE)")
    p.add_argument("--lengths", type=_ints, default=None, help="context lengths in tokens, e.g. 1024,2048")
    p.add_argument("--depths", type=_floats, default=None, help="needle depths in 0..1, e.g. 0,0.5,1")
    p.add_argument("--samples", type=int, default=3, help="samples per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens to generate (default: passkey 10, else 32)")
    p.add_argument("--haystack", default=None, help="niah: real-text haystack (.json {'text'}, .txt, or a folder of .txt)")
    p.add_argument("--niah-tasks", type=_names, default=None, help="niah_single_1,niah_single_2,niah_single_3 (default: all)")
    p.add_argument("--task-file", action="append", help="task-file: a JSONL file of {input, target, ...} (repeatable)")
    p.add_argument("--text", default=None, help="ppl-by-length: the text file")
    p.add_argument("--max-chunks", type=int, default=4, help="ppl-by-length: chunks per length")
    p.add_argument("--segment", type=int, default=512, help="ppl-by-length: tokens per forward (through the cache)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="passkey, niah, task-file: prefill long prompts N tokens a forward through the cache "
                        "(the same greedy output, activations bounded by N instead of the prompt's length)")
    p.add_argument("--tasks", type=_names, default=None, help="lm-eval: task names, e.g. piqa (default: piqa)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: items per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--data-dir", default=None,
                   help="lm-eval: local data folder for piqa, arc_easy, arc_challenge, hellaswag, winogrande, "
                        "lambada_openai (layout: README, Evaluating)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts a batch: lm-eval's batch size, and the generation suites' (passkey, niah, "
                   "task-file), left-padded")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16")
    p.add_argument("--resume", action="store_true",
                   help="keep the models the report in --out already finished with the same options; run the rest")
    p.set_defaults(func=_eval)

    p = sub.add_parser("recipes", help="list the built-in recipes, or show one")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_recipes)
    return parser


def main(argv=None) -> int:
    import torch

    from .models import ModelLoadError
    from .recipe import RecipeError
    from .pipeline import RunError
    from .hub import PushError
    from .plan import PlanError
    from .training import NonFiniteLossError, StageOutOfMemoryError
    from .eval.runner import EvalError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (RecipeError, ModelLoadError, EvalError, NonFiniteLossError, StageOutOfMemoryError, RunError,
            FileNotFoundError, PlanError, PushError) as err:
        print(f"linearize: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if type(err).__name__ == "UnsupportedArchitectureError":
            print(f"linearize: error: {err}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        hint = {"convert": "; run the same command with --resume to continue from the last checkpoint",
                "eval": "; the report in --out holds every model that finished before"}.get(args.command, "")
        print(f"linearize: interrupted{hint}", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as err:
        print(
            f"linearize: error: out of memory ({str(err).splitlines()[0]}). Lower the recipe's batch_size or seq_len "
            "(e.g. --set stages.0.batch_size=2), or use precision: bfloat16.",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
