"""The LM head's forward-mode operator: ``linear_logprobs``, logits and the target's log-prob in one op.

``funcprobe.core.logprobs`` calls ``linear_logprobs(h, W, b, y)`` for a head that is a plain
``nn.Linear`` (``funcprobe.core.lm_head.HeadSplit.linear_weights``), one token chunk at a
time. Outside the rules mode it is the plain composite (``F.linear``, ``logsumexp``,
``gather``); under ``funcprobe.forward.rules.jvp_rules`` it is ``_LinearLogprobs``, whose
tangent never forms the ``[m, V]`` logits tangent when only ``h`` carries one (the LoRA
case: the head is frozen): ``ḣ·(W_y − pᵀW)``, one ``[m, V] × [V, D]`` product in place of
the logits tangent and the log-softmax's elementwise tangent kernels.

The rest of the LM-head machinery (cutting a model into body and head, token chunks) is
not a forward-mode operator and stays in ``funcprobe.core.lm_head``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._tangents import add


def linear_logprobs(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
    """``log softmax(h Wᵀ + b)[target]`` per row: ``h [m, D]``, ``W [V, D]``, ``b [V]``,
    ``targets [m]`` (int64 in ``[0, V)``) → ``[m]`` nats, the logits promoted to float32 or wider.

    An LM head and the target's log-prob in one call. Plain operators here; under
    ``jvp_rules`` the Function ``_LinearLogprobs`` (see the module docstring). Errors are
    those of ``F.linear`` and ``gather`` for mismatched shapes or targets out of range.
    """
    if torch.overrides.has_torch_function((h, weight)):
        return torch.overrides.handle_torch_function(linear_logprobs, (h, weight), h, weight, bias, targets)
    return _head_logprobs(h, weight, bias, targets)[0]


def _head_logprobs(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor):
    """(log-probs ``[m]``, logits ``[m, V]`` in float32 or wider, their logsumexp ``[m, 1]``)."""
    z = F.linear(h, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1), z, lse


class _LinearLogprobs(torch.autograd.Function):
    """``linear_logprobs`` with a tangent that never forms the ``[m, V]`` logits tangent
    when only ``h`` has one (the LoRA case: the head is frozen).

    Tangent: ``Σ_v (δ_vy − p_v) ż_v`` with ``ż_v = ḣ·W_v + h·Ẇ_v + ḃ_v``; the ``ḣ`` term
    is ``ḣ·(W_y − pᵀW)``, the ``Ẇ``/``ḃ`` terms (a trained head) are formed as logits.
    Outputs ``(log-probs, logits, logsumexp)``; the rules mode returns the first.
    """

    @staticmethod
    def forward(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor):
        return _head_logprobs(h, weight, bias, targets)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, weight, _, targets = inputs
        _, z, lse = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(z, lse)
        ctx.save_for_forward(h, weight, targets, z, lse)

    @staticmethod
    def jvp(ctx, dh, dweight, dbias, _dtargets):
        h, weight, targets, z, lse = ctx.saved_tensors
        p = (z - lse).exp_()  # [m, V] softmax, one buffer
        out = None
        if dh is not None:
            expected = torch.mm(p.to(weight.dtype), weight)  # [m, D] pᵀW
            row = weight.index_select(0, targets) - expected
            out = (dh * row).sum(-1).to(z.dtype)
        if dweight is not None or dbias is not None:
            dz = F.linear(h, dweight) if dweight is not None else None
            dz = add(dz, None if dbias is None else dbias.expand_as(z).to(h.dtype))
            dz = dz.to(z.dtype)
            out = add(out, dz.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - (p * dz).sum(-1))
        return out, None, None
