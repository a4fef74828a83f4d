"""The ``linearize`` command."""

from __future__ import annotations

import argparse
import sys


def _convert(args) -> int:
    from .pipeline import ConvertRun
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set or [], model=args.model)
    ConvertRun(recipe, args.out, device=args.device, resume=args.resume).run()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linearize", description="Turn a pretrained LLM into a linear-attention model by distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model with a recipe and save the result")
    p.add_argument("model", nargs="?", default=None,
                   help="Hub id, local folder, .gguf file, or 'smollm2-135m-instruct' (default: the recipe's model)")
    p.add_argument("--recipe", required=True, help="a built-in recipe name (see `linearize recipes`) or a YAML file")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key, e.g. stages.0.steps=200")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the recipe's, 'auto')")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (in OUT.checkpoints/)")
    p.set_defaults(func=_convert)

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
    from .training import NonFiniteLossError, StageOutOfMemoryError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, ModelLoadError, NonFiniteLossError, StageOutOfMemoryError, RunError, FileNotFoundError) as err:
        print(f"linearize: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if type(err).__name__ == "UnsupportedArchitectureError":
            print(f"linearize: error: {err}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("linearize: interrupted; run the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
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
