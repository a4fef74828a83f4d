"""Evaluation: perplexity (used by ``convert``), and the suites of ``linearize eval``:
passkey retrieval, RULER-style single-needle tasks, task files, perplexity by context length,
and lm-evaluation-harness tasks. Each suite builds samples and scores them with a pure function
(:func:`~.generation.score_samples`) that takes any generator callable."""

from .generation import ModelGenerator, contains_target, score_samples, summarize
from .perplexity import perplexity
from .runner import EvalOptions, SUITES, load_any, run_eval, run_suite

__all__ = ["EvalOptions", "ModelGenerator", "SUITES", "contains_target", "load_any", "perplexity", "run_eval",
           "run_suite", "score_samples", "summarize"]
