"""Sums of tangents of which some may be absent (None: the operand carries none).

The Functions of ``funcprobe.forward`` compute a tangent only from the tangents that
exist (``ctx.set_materialize_grads(False)``); their terms are added with ``add``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """``a + b`` over present terms: ``b`` where ``a`` is None, ``a`` where ``b`` is, None for both."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b
