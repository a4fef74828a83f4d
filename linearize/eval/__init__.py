"""Evaluation: perplexity (here), and the suites built on it."""

from .perplexity import perplexity

__all__ = ["perplexity"]
