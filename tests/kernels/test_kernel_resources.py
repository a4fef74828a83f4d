"""The launchers' kernels compiled for sm_90 (H100, H200) here, without a GPU: each asks for no
more shared memory than a block may have there. A launch over the limit fails only when it
starts on the GPU (``OutOfResources``); the hybrid backward with 128-token chunks did, on an
H200 (303,104 bytes asked, 232,448 allowed), while every CPU test passed.

The suite runs the kernels under the interpreter, which compiles nothing, so each check runs
``python -m linearize.kernels.resources`` in a process of its own without it."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from linearize.kernels.resources import SM90_SHARED_LIMIT  # noqa: E402


def compiled(features, window, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the kernels are launched with
    out = subprocess.run([sys.executable, "-m", "linearize.kernels.resources", "hybrid", "--features", str(features),
                          "--window", str(window), *extra], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == ["_fwd_kernel", "_bwd_kernel"], out.stdout
    return rows


@pytest.mark.parametrize("features", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_hybrid_kernels_with_128_token_windows_fit_sm90(features):
    """Windows of 128 (the longest the kernels take) make 128-token chunks, the largest tiles;
    the registers a thread, from the ptxas log, are within sm_90's 255."""
    for r in compiled(features, 128, "--registers"):
        assert r["shared"] <= SM90_SHARED_LIMIT, r
        assert 0 < r["registers"] <= 255 and r["stack_bytes"] >= 0 and r["spill_bytes"] >= 0, r


@pytest.mark.slow
def test_hybrid_kernels_with_heads_of_128_fit_sm90():
    """Heads of 128, 128 features, window 64: the backward an H200 refused with two pipelining
    stages (308,224 bytes asked). Slow: the dispatcher sends heads of 128 to the reference on
    CUDA anyway (``chunk.MAX_COMPILED_HEAD``)."""
    for r in compiled(128, 64, "--head-dim", "128"):
        assert r["shared"] <= SM90_SHARED_LIMIT, r


@pytest.mark.slow
@pytest.mark.parametrize("features", [32, 64, 128, 256])
@pytest.mark.parametrize("window", [0, 16, 64])
def test_hybrid_kernels_with_heads_of_128_fit_sm90_all(features, window):
    """Heads of 128 take windows up to 64 (``chunk.max_window``)."""
    from linearize.kernels.hybrid.chunk import max_window

    assert window <= max_window(torch.bfloat16, 128)
    for r in compiled(features, window, "--head-dim", "128"):
        assert r["shared"] <= SM90_SHARED_LIMIT, r


@pytest.mark.slow
@pytest.mark.parametrize("features", [32, 64, 128, 256])
@pytest.mark.parametrize("window", [0, 16, 64, 128])
def test_hybrid_kernels_fit_sm90(features, window):
    for r in compiled(features, window):
        assert r["shared"] <= SM90_SHARED_LIMIT, r


@pytest.mark.slow
@pytest.mark.parametrize("features", [32, 64, 128, 256])
@pytest.mark.parametrize("window", [0, 16, 64])
def test_hybrid_kernels_fit_sm90_fp32(features, window):
    """fp32 inputs (fp32 products): windows up to 64, as ``chunk.max_window`` allows them."""
    from linearize.kernels.hybrid.chunk import max_window

    assert window <= max_window(torch.float32)
    for r in compiled(features, window, "--dtype", "float32"):
        assert r["shared"] <= SM90_SHARED_LIMIT, r


@pytest.mark.slow
def test_the_check_sees_the_launch_an_h200_refused():
    """With two pipelining stages, as it was launched, the backward of 128-token chunks asks for
    more than sm_90 has: what the H200 refused (303,104 bytes with Triton 3.6), seen here."""
    fwd, bwd = compiled(64, 128, "--force-stages", "2")
    assert bwd["num_stages"] == 2 and bwd["shared"] > SM90_SHARED_LIMIT, bwd
