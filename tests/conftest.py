"""Session setup for every test.

Triton kernels are tested on CPU tensors under the Triton interpreter when no CUDA device is
present (CI). TRITON_INTERPRET is read when a @triton.jit decorator runs, so it is set here, before
anything imports triton (mucs_fast imports the kernels only on first use); an explicit setting in
the environment wins.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
