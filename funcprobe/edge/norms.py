"""RMSNorm modules run as one op (``funcprobe.core.jvp_rules.rms_norm``) in forward-mode passes.

A Llama/Qwen2-style RMSNorm is six operators (cast, square, mean, add, rsqrt, two
products); forward-mode AD differentiates each of them with its own elementwise
tangent kernels and buffers. ``rms_norm`` computes the same value in one call, so that
``jvp_rules`` can give it a closed-form tangent.

``rms_norms_as_one_op(module)`` sets, for the duration of a probe forward, an
instance-level ``forward`` on every submodule whose class name ends in ``RMSNorm`` and
that holds a ``weight`` ``[D]`` and an epsilon (``variance_epsilon`` or ``eps``) —
only where ``rms_norm`` reproduces the module's own output bit for bit on a test input
(checked once per module and cached weakly; Gemma's ``1 + weight`` form, for one, fails
the check and keeps its own forward). The instance attribute is removed on exit, even on
error.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch import nn

from torch.func import functional_call

from ..core.jvp_rules import rms_norm
from .fsdp import full_tensor

_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _reproduced(module: nn.Module, eps: float) -> bool:
    """``rms_norm`` equals the module's own forward on a seeded random input, exactly."""
    if module in _CHECKED:
        return _CHECKED[module]
    weight = module.weight
    ok = False
    if weight.device.type != "meta":
        gen = torch.Generator(device="cpu").manual_seed(0)
        try:
            full = full_tensor(weight.detach())  # FSDP2: the gathered value (every rank checks alike)
            x = (torch.randn(2, 3, full.shape[0], generator=gen) * 3).to(device=full.device, dtype=full.dtype)
            with torch.no_grad():
                own = functional_call(module, {"weight": full}, (x,))
                ok = bool(torch.equal(own, rms_norm(x, full, eps)))
        except Exception:  # noqa: BLE001 - a module the op cannot stand in for keeps its forward
            ok = False
    _CHECKED[module] = ok
    return ok


@contextlib.contextmanager
def rms_norms_as_one_op(module: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Run the body with ``module``'s RMSNorm blocks calling ``rms_norm``; yields how many."""
    if not enabled:
        yield 0
        return
    patched = []
    try:
        for m in module.modules():
            eps = _epsilon(m)
            weight = getattr(m, "weight", None)
            if not type(m).__name__.endswith("RMSNorm") or eps is None or "forward" in m.__dict__ \
                    or not isinstance(weight, torch.Tensor) or weight.ndim != 1 or not _reproduced(m, eps):
                continue
            m.forward = (lambda mod, e: lambda x: rms_norm(x, mod.weight, e))(m, eps)
            patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
