"""What every Triton kernel test module needs: the interpreter on a machine without a GPU, the
device the kernels run on, the relative error, and a spy that counts calls.

Triton reads ``TRITON_INTERPRET`` when it is imported and when a kernel is defined
(``@triton.jit``), so the switch must be on before triton is first imported: tests/conftest.py
sets it for the suite, and importing this module sets it for a run of one file alone. With CUDA
the kernels compile. A test module imports this before anything from ``linearize.kernels``.
"""

import contextlib
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
    """Counts the launches (``kernel[grid](...)``) of the kernel ``name`` of ``module``, and keeps
    their grids, replacing it (through ``monkeypatch``) while still launching it."""

    def __init__(self, monkeypatch, module, name):
        self.kernel, self.calls, self.grids = getattr(module, name), 0, []
        monkeypatch.setattr(module, name, self)

    def __getitem__(self, grid):
        self.calls += 1
        self.grids.append(grid)
        return self.kernel[grid]


@contextlib.contextmanager
def memory_checked():
    """Under Triton's interpreter: every element a kernel loads or stores (where its mask is true)
    must lie inside one of the tensors passed to that launch. Yields a list that fills with
    ``(kernel, "load" | "store", elements out of range)``, one entry an offending access. (A
    compiled kernel that touches memory outside its tensors may fault on a GPU, or read another
    tensor's bytes, whatever the interpreter's results say.)"""
    import numpy as np
    import triton.runtime.interpreter as interp

    ranges, bad, current = [], [], [""]
    init, builder = interp.GridExecutor._init_args_hst, interp.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store

    def record(self, args_dev, kwargs):
        args, kw = init(self, args_dev, kwargs)
        ranges.clear()
        current[0] = self.fn.__name__
        for t in list(args) + list(kw.values()):
            if isinstance(t, torch.Tensor) and t.numel():
                extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
                ranges.append((t.data_ptr(), t.data_ptr() + extent * t.element_size()))
        return args, kw

    def check(kind, ptrs, mask):
        on = np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)
        p = ptrs.data[on]
        if p.size:
            size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
            inside = np.zeros(p.shape, bool)
            for lo, hi in ranges:
                inside |= (p >= lo) & (p + size <= hi)
            if not inside.all():
                bad.append((current[0], kind, int((~inside).sum())))

    def checked_load(ptrs, mask, other, *rest):
        check("load", ptrs, mask)
        return load(ptrs, mask, other, *rest)

    def checked_store(ptrs, value, mask, *rest):
        check("store", ptrs, mask)
        return store(ptrs, value, mask, *rest)

    interp.GridExecutor._init_args_hst = record
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    try:
        yield bad
    finally:
        interp.GridExecutor._init_args_hst = init
        builder.create_masked_load, builder.create_masked_store = load, store
