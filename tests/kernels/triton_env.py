"""What every Triton kernel test module needs: the interpreter on a machine without a GPU, the
device the kernels run on, the relative error, and a spy that counts calls.

Triton reads ``TRITON_INTERPRET`` when it is imported and when a kernel is defined
(``@triton.jit``), so the switch must be on before triton is first imported: tests/conftest.py
sets it for the suite, and importing this module sets it for a run of one file alone. With CUDA
the kernels compile. A test module imports this before anything from ``linearize.kernels``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from linearize.kernels.linear.chunk import interpreting  # noqa: E402

if interpreting():
    DEVICE = "cpu"
    if type(triton.language.zeros).__name__ == "JITFunction":  # defined before the switch was on
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it in the environment",
                    allow_module_level=True)
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def rel(a, b) -> float:
    """``||a - b|| / ||b||`` in fp32 (the absolute error where ``b`` is zero)."""
    a, b = a.detach().float(), b.detach().float()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


class Spy:
    """Counts the calls of ``module.name`` (replaced by a counting wrapper for the test)."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)


def through_kernels(monkeypatch, model, x, mask, params, max_new_tokens, choices=("reference", "triton")):
    """A converted model under each ``LINEARIZE_KERNELS`` choice: ``{choice: (logits at the real
    positions, the gradients of params of their mean square, the greedy continuation, its
    scores)}``; the continuation goes through the model's cache."""
    real = mask.bool()
    results = {}
    for choice in choices:
        monkeypatch.setenv("LINEARIZE_KERNELS", choice)
        model.zero_grad()
        logits = model(x, attention_mask=mask).logits
        logits[real].float().pow(2).mean().backward()
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        results[choice] = (logits[real].detach(), [p.grad.clone() for p in params], out.sequences,
                           torch.stack(out.scores))
    return results


class Launches:
    """Counts the launches (``kernel[grid](...)``) of the kernel ``name`` of ``module``, which it
    replaces (through ``monkeypatch``) while still launching it."""

    def __init__(self, monkeypatch, module, name):
        self.kernel, self.calls = getattr(module, name), 0
        monkeypatch.setattr(module, name, self)

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]
