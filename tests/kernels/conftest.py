import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined (`@triton.jit`, i.e. when the kernel
# module is imported), so it is set here, before any test module of this folder imports one.
# Without CUDA the kernels then run in Triton's CPU interpreter; with CUDA they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
