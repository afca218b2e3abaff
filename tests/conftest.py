"""Test-session setup: without CUDA, Triton's kernels (funcprobe.forward.triton) can
run only in Triton's interpreter, which Triton chooses when its modules are imported; so
``TRITON_INTERPRET=1`` is set here, before anything imports Triton (no other code reads it)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
