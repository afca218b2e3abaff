"""The forward-mode rules: a ``TorchFunctionMode`` that routes operators to Functions whose
tangents skip the tangents of frozen tensors (issue 15, part 1).

PyTorch's generic forward-AD formula for a matrix product, ``mm``: ``ȧ·b + a·ḃ``, fills
the tangent of an operand that has none with a zero tensor and multiplies by it:
``x @ W`` with a tangent on ``x`` only costs three full products, not two
(4096×1024 @ 1024×1024 under ``torch.func.jvp``: 3.14x one product, 2.12x with the rule
here, two plain products 2.06x; ``benchmarks/results/op-counts.md``; ``torch.profiler``
shows ``aten::zeros``, a third ``aten::mm`` and an ``aten::add``). In a LoRA probe every
base weight is frozen, so every linear layer of the model pays that third product.

The ``torch.autograd.Function``s compute the same values with a ``jvp`` that uses only the
tangents that exist (``ctx.set_materialize_grads(False)``: a missing tangent arrives as
None, never as zeros):

* ``linear(x, W, b)``: ``ẋ Wᵀ [+ x Ẇᵀ] [+ ḃ]`` (``_Linear``, here);
* ``addmm(c, a, b, β, α)`` (GPT-2's ``Conv1D``): ``β ċ + α (ȧ b + a ḃ)`` over present terms;
* ``matmul(a, b)``: ``ȧ b + a ḃ`` over present terms (eager attention's q·kᵀ and p·v);
* ``silu(x)``: ``ẋ · σ(x)(1 + x(1 − σ(x)))`` in two buffers instead of the generic chain
  of elementwise tangent kernels;
* ``scaled_dot_product_attention`` without dropout: softmax attention's tangent in closed
  form (``funcprobe.forward.attention._Attention``); with ``kernels="triton"``, the calls
  the Triton kernels cover on CUDA go to them (``funcprobe.forward.triton``);
* ``linear_logprobs(h, W, b, y)``, the LM head and the target's log-prob in one op
  (``funcprobe.forward.head``): tangent ``ḣ·(W_y − pᵀW)``, one ``[m, V] × [V, D]`` product
  and no ``[m, V]`` logits tangent.

``jvp_rules(kernels="off")`` is the mode, active for the duration of a ``torch.func.jvp``
call (``funcprobe.core.transforms.directional_derivatives``); every other operator runs as
before. The Functions have no backward: the mode is for forward mode only (a backward
through them raises autograd's error, never a wrong value). Values are those of the
plain operators (same kernels; attention as SDPA's MATH backend, except where the Triton
kernels compute it: fp16/bf16 products there round P to the input dtype, as FlashAttention
does); tangents equal the generic path's to rounding (``tests/test_jvp_rules.py``: float64
< 1e-12 per rule, the probe's s < 1e-10). Measured effect: ``benchmarks/results/jvp-overhead.md``
and ``benchmarks/results/op-counts.md``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import SettingsError
from ._tangents import add
from .attention import _Attention, sdpa_call
from .head import _LinearLogprobs, linear_logprobs

#: values of ``kernels``: "off" (the closed-form attention rule everywhere, the default) or
#: "triton" (the Triton flash kernels for the SDPA calls they cover on CUDA; opt-in: at batch
#: scale they were not faster than the rule on an H200, benchmarks/results/gpu-h200-2026-12-04)
KERNELS = ("off", "triton")


class _Linear(torch.autograd.Function):
    """``F.linear(x, W, b)`` whose tangent multiplies only by present tangents."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _ = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(x, weight)
        ctx.shape = output.shape

    @staticmethod
    def jvp(ctx, dx: Optional[Tensor], dweight: Optional[Tensor], dbias: Optional[Tensor]) -> Optional[Tensor]:
        x, weight = ctx.saved_tensors
        out = None if dx is None else F.linear(dx, weight)
        out = add(out, None if dweight is None else F.linear(x, dweight))
        if dbias is not None and out is None:
            return dbias.expand(ctx.shape).clone()
        return add(out, dbias)


class _Addmm(torch.autograd.Function):
    """``torch.addmm(c, a, b, beta=β, alpha=α)`` = ``β c + α a b``."""

    @staticmethod
    def forward(c: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, a, b, beta, alpha = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(a, b)
        ctx.beta, ctx.alpha, ctx.shape = beta, alpha, output.shape

    @staticmethod
    def jvp(ctx, dc, da, db, _beta, _alpha) -> Optional[Tensor]:
        a, b = ctx.saved_tensors
        out = None if da is None else torch.mm(da, b)
        out = add(out, None if db is None else torch.mm(a, db))
        if out is not None and ctx.alpha != 1:
            out = out * ctx.alpha
        if dc is not None:
            dc = (dc if ctx.beta == 1 else dc * ctx.beta).expand(ctx.shape)
        return add(out, dc)


class _Matmul(torch.autograd.Function):
    """``torch.matmul(a, b)`` (any broadcasting): a bilinear map, so ``ȧ b + a ḃ``."""

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, da: Optional[Tensor], db: Optional[Tensor]) -> Optional[Tensor]:
        a, b = ctx.saved_tensors
        out = None if da is None else torch.matmul(da, b)
        return add(out, None if db is None else torch.matmul(a, db))


class _Silu(torch.autograd.Function):
    """``F.silu(x) = x σ(x)``; tangent ``ẋ σ(x)(1 + x(1 − σ(x)))``."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return F.silu(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, dx: Optional[Tensor]) -> Optional[Tensor]:
        if dx is None:
            return None
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(x)
        return torch.rsub(sig, 1).mul_(x).add_(1).mul_(sig).mul_(dx)  # two buffers of x's size


def kernel_module(kernels: str) -> Optional[ModuleType]:
    """The module of the attention kernels chosen by ``kernels``: None for ``"off"``,
    ``funcprobe.forward.triton`` for ``"triton"`` (imported here, so Triton is imported
    only when chosen).

    Raises ``SettingsError`` (a ``ValueError``) naming ``kernels`` for a value not in
    ``KERNELS``, or for ``"triton"`` where Triton cannot be imported.
    """
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise SettingsError(f"kernels: expected one of {KERNELS}, got {kernels!r}")
    if kernels == "off":
        return None
    from . import triton as module

    if not module.available():
        raise SettingsError("kernels: 'triton' needs Triton, which cannot be imported here (pip install triton, "
                            "or kernels='off')")
    return module


def _is_tensor(*xs) -> bool:
    return all(isinstance(x, Tensor) for x in xs)


class jvp_rules(TorchFunctionMode):
    """Route ``F.linear``, ``torch.addmm``, ``torch.matmul``/``@``, ``F.silu``,
    ``F.scaled_dot_product_attention`` and ``linear_logprobs`` to the Functions of
    ``funcprobe.forward`` while active (a context manager; see the module docstring).

    Args:
        kernels: ``"off"`` (default): every SDPA call takes the closed-form rule.
            ``"triton"``: SDPA calls that the Triton kernels cover (``funcprobe.forward.triton
            .applies``: CUDA tensors, ``[B, H, T, D]``, head dims ≤ 256, ...) go to the
            kernels, the others take the closed-form rule.

    Raises ``SettingsError`` naming ``kernels`` at construction for an unknown value, or for
    ``"triton"`` without an importable Triton (``kernel_module``).

    Calls with arguments the rules do not cover (``out=``, an ``inplace`` silu, SDPA with
    dropout, non-tensor operands) run as the plain operator.
    """

    def __init__(self, kernels: str = "off"):
        super().__init__()
        self._kernels = kernel_module(kernels)
        self._lower: Optional[tuple[Tensor, int, bool]] = None  # (mask, its version, keeps_lower_triangle)

    def _keeps_lower_triangle(self, mask: Optional[Tensor]) -> bool:
        """``keeps_lower_triangle`` of the kernels' module, once per mask while the mode is
        active: a model hands every layer the same mask, and each check reads all of it
        and syncs with the host."""
        if mask is None:
            return False
        if self._lower is None or self._lower[0] is not mask or self._lower[1] != mask._version:
            self._lower = (mask, mask._version, self._kernels.keeps_lower_triangle(mask))
        return self._lower[2]

    def _attention(self, args: tuple, kwargs: dict):
        """An SDPA call through the kernels or the closed-form rule; None for calls neither covers."""
        call = sdpa_call(args, kwargs)
        if call is None:
            return None
        tensors = (call.q, call.k, call.v, call.mask, call.options)
        if self._kernels is not None and self._kernels.applies(call):
            return self._kernels._FlashAttention.apply(*tensors, self._keeps_lower_triangle(call.mask))[0]
        return _Attention.apply(*tensors)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not kwargs.keys() - {"bias"}:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if _is_tensor(x, weight) and (bias is None or isinstance(bias, Tensor)):
                return _Linear.apply(x, weight, bias)
        elif func is torch.addmm and not kwargs.keys() - {"beta", "alpha"} and len(args) == 3 and _is_tensor(*args):
            return _Addmm.apply(*args, kwargs.get("beta", 1), kwargs.get("alpha", 1))
        elif func in (torch.matmul, Tensor.matmul, Tensor.__matmul__) and not kwargs and len(args) == 2 \
                and _is_tensor(*args) and args[0].ndim >= 2 and args[1].ndim >= 2:
            return _Matmul.apply(*args)
        elif func is F.scaled_dot_product_attention:
            out = self._attention(args, kwargs)
            if out is not None:
                return out
        elif func is linear_logprobs:
            value, _, _ = _LinearLogprobs.apply(*args)
            return value
        elif func is F.silu and not kwargs.get("inplace", False) and len(args) == 1 and _is_tensor(*args):
            return _Silu.apply(args[0])
        return func(*args, **kwargs)
