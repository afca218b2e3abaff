"""Test-session setup.

``benchmarks/`` is appended to ``sys.path``: the tests import the ground truth the
benchmarks share (``exact_entropy``, ``calibration_study``, ``token_covariance``), which is
not part of the library.

Without CUDA, Triton's kernels (funcprobe.forward.triton) can
run only in Triton's interpreter, which Triton chooses when its modules are imported; so
``TRITON_INTERPRET=1`` is set here, before anything imports Triton (no other code reads it)."""

import os
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
