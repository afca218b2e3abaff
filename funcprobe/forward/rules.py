"""Forward-mode rules that skip the tangents of frozen tensors (issue 15, part 1).

PyTorch's generic forward-AD formula for a matrix product, ``mm``: ``ȧ·b + a·ḃ``, fills
the tangent of an operand that has none with a zero tensor and multiplies by it:
``x @ W`` with a tangent on ``x`` only costs three full products, not two
(4096×1024 @ 1024×1024 under ``torch.func.jvp``: 3.14x one product, 2.12x with the rule
here, two plain products 2.06x; ``benchmarks/results/op-counts.md``; ``torch.profiler``
shows ``aten::zeros``, a third ``aten::mm`` and an ``aten::add``). In a LoRA probe every base weight is frozen, so every linear layer of
the model pays that third product.

The ``torch.autograd.Function``s here compute the same values with a ``jvp`` that uses
only the tangents that exist (``ctx.set_materialize_grads(False)``: a missing tangent
arrives as None, never as zeros):

* ``linear(x, W, b)``: ``ẋ Wᵀ [+ x Ẇᵀ] [+ ḃ]``;
* ``addmm(c, a, b, β, α)`` (GPT-2's ``Conv1D``): ``β ċ + α (ȧ b + a ḃ)`` over present terms;
* ``matmul(a, b)``: ``ȧ b + a ḃ`` over present terms (eager attention's q·kᵀ and p·v);
* ``silu(x)``: ``ẋ · σ(x)(1 + x(1 − σ(x)))`` in two buffers instead of the generic chain
  of elementwise tangent kernels;
* ``scaled_dot_product_attention`` without dropout (``_Attention``: softmax attention's
  tangent in closed form; on CUDA with Triton installed ``_FlashAttention``, the flash
  kernels of ``funcprobe.core.triton_attention``, forward and jvp over key blocks);
* ``linear_logprobs(h, W, b, y)``, the LM head and the target's log-prob in one op
  (``funcprobe.core.logprobs`` calls it for a plain ``nn.Linear`` head): tangent
  ``ḣ·(W_y − pᵀW)``, one ``[m, V] × [V, D]`` product and no ``[m, V]`` logits tangent.

``jvp_rules()`` is a ``TorchFunctionMode`` that routes these calls to the Functions for
the duration of a ``torch.func.jvp`` call
(``funcprobe.core.transforms.directional_derivatives``); every other operator runs as
before. The Functions have no backward: the mode is for forward mode only (a backward
through them raises autograd's error, never a wrong value). Values are those of the
plain operators (same kernels; attention as SDPA's MATH backend, except on CUDA with
Triton, where the flash kernels compute it: fp16/bf16 products there round P to the input
dtype, as FlashAttention does); tangents equal the
generic path's to rounding (``tests/test_jvp_rules.py``: float64 < 1e-12 per rule, the
probe's s < 1e-10). Measured effect: ``benchmarks/results/jvp-overhead.md`` and
``benchmarks/results/op-counts.md``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from funcprobe.core import triton_attention


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


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
        out = _add(out, None if dweight is None else F.linear(x, dweight))
        if dbias is not None and out is None:
            return dbias.expand(ctx.shape).clone()
        return _add(out, dbias)


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
        out = _add(out, None if db is None else torch.mm(a, db))
        if out is not None and ctx.alpha != 1:
            out = out * ctx.alpha
        if dc is not None:
            dc = (dc if ctx.beta == 1 else dc * ctx.beta).expand(ctx.shape)
        return _add(out, dc)


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
        return _add(out, None if db is None else torch.matmul(a, db))


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


class _Attention(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` without dropout, as its MATH backend computes it
    (q and k each scaled by √scale, additive mask, ``_safe_softmax``, GQA by repeating
    key/value heads), with the tangent

        Ṡ = q̇ kᵀ + q k̇ᵀ (scaled),  Ṗ = P ⊙ (Ṡ − Σ_j P ⊙ Ṡ),  Ȯ = Ṗ v + P v̇

    over present tangents: ``q̇ kᵀ + q k̇ᵀ`` as one product of concatenations
    ``[q̇, q]·[k, k̇]ᵀ``, the row sums of ``P ⊙ Ṡ`` as batched dots and Ṗ formed in Ṡ's
    buffer, where the generic path differentiates every operator of the composite
    (scaling, mask, the safe softmax's NaN guards) one by one. Query rows run in blocks
    whose scores take at most ``ATTENTION_BLOCK_BYTES`` (softmax rows are independent);
    P is not kept between the forward and the jvp but recomputed per block (one more
    ``q kᵀ`` product), so the rule never holds ``[T × T]`` buffers for all queries: less
    than the MATH forward, which holds S and P whole.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: Optional[float],
                gqa: bool) -> Tensor:
        dtype = q.dtype
        q, k, v, qs, ks, factor = _prepared(q, k, v, scale, gqa)
        out = [torch.matmul(_probabilities(qs, ks, mask, is_causal, rows), v) for rows in _row_blocks(q, k)]
        return torch.cat(out, -2).to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, mask, is_causal, scale, gqa = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(q, k, v)
        ctx.mask, ctx.is_causal, ctx.scale, ctx.gqa = mask, is_causal, scale, gqa

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        q, k, v = ctx.saved_tensors
        return _attention_tangent(q, k, v, ctx.mask, ctx.is_causal, ctx.scale, ctx.gqa, dq, dk, dv, dmask)


def _attention_tangent(q, k, v, mask, is_causal, scale, gqa, dq, dk, dv, dmask) -> Optional[Tensor]:
    """``_Attention``'s tangent: Ȯ = Ṗ v + P v̇ with Ṗ = P ⊙ (Ṡ − Σ_j P ⊙ Ṡ) and Ṡ =
    scale·(q̇ kᵀ + q k̇ᵀ) + ṁ (the tangent of an additive float mask), over present tangents."""
    if dq is None and dk is None and dv is None and dmask is None:
        return None
    dtype = q.dtype
    q, k, v, qs, ks, factor = _prepared(q, k, v, scale, gqa)
    dq, dk, dv = (None if t is None else _accumulation(t) for t in (dq, dk, dv))
    dk = None if dk is None else _repeat_kv(dk, q, gqa)
    dv = None if dv is None else _repeat_kv(dv, q, gqa)
    out = []
    for rows in _row_blocks(q, k):  # P of each block recomputed exactly as the forward did
        p = _probabilities(qs, ks, mask, is_causal, rows)
        qb, dqb = q[..., rows, :], None if dq is None else dq[..., rows, :]
        if dqb is not None and dk is not None:  # [q̇, q]·[k, k̇]ᵀ = q̇ kᵀ + q k̇ᵀ in one product
            ds = torch.matmul(torch.cat([dqb, qb], -1), torch.cat([k, dk], -1).transpose(-2, -1))
        elif dqb is not None or dk is not None:
            ds = torch.matmul(dqb, k.transpose(-2, -1)) if dk is None else torch.matmul(qb, dk.transpose(-2, -1))
        else:
            ds = None
        if ds is not None:
            ds.mul_(factor * factor)
        if dmask is not None:  # an additive float mask's tangent adds to the scores' (a mask built from θ)
            dm = dmask[..., rows, :] if dmask.ndim >= 2 and dmask.shape[-2] != 1 else dmask
            dm = _accumulation(dm).expand_as(p)
            ds = dm.clone() if ds is None else ds.add_(dm)
        block = None
        if ds is not None:  # Ṗ = P ⊙ (Ṡ − Σ_j P ⊙ Ṡ), formed in Ṡ's buffer; the row sums as batched dots
            rowsum = torch.matmul(p.unsqueeze(-2), ds.unsqueeze(-1)).squeeze(-1)
            block = torch.matmul(ds.sub_(rowsum).mul_(p), v)
            del ds
        if dv is not None:
            block = _add(block, torch.matmul(p, dv))
        out.append(block)
    return torch.cat(out, -2).to(dtype)


class _FlashAttention(torch.autograd.Function):
    """SDPA without dropout through the Triton kernels of ``funcprobe.core.triton_attention``
    (CUDA tensors, ``triton_attention.enabled_for``): the forward keeps the float32 output
    and the per-row log-sum-exp, and the jvp makes one pass over key blocks with them; no
    ``[T × T]`` score buffer in either. Outputs ``(out, out in float32, lse)``; the mode
    returns ``out``. ``lower`` (whether a bool mask hides every later key) is found once, by
    the mode. A float mask that carries a tangent (one built from θ) takes the closed-form
    rule's tangent instead (the kernels treat the mask as constant).
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: Optional[float],
                gqa: bool, lower: bool):
        wide, lse = triton_attention.attention_forward(q, k, v, mask, is_causal, scale, lower_triangle=lower)
        return wide.to(q.dtype), wide, lse

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, mask, is_causal, scale, gqa, lower = inputs
        _, wide, lse = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(wide, lse)
        ctx.save_for_forward(q, k, v, wide, lse)
        ctx.mask, ctx.is_causal, ctx.scale, ctx.gqa, ctx.lower = mask, is_causal, scale, gqa, lower

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        q, k, v, wide, lse = ctx.saved_tensors
        if dmask is not None:
            out = _attention_tangent(q, k, v, ctx.mask, ctx.is_causal, ctx.scale, ctx.gqa, dq, dk, dv, dmask)
        else:
            out = triton_attention.attention_jvp(q, k, v, wide, lse, dq, dk, dv, ctx.mask, ctx.is_causal, ctx.scale,
                                                 lower_triangle=ctx.lower)
        return None if out is None else out.to(q.dtype), None, None


#: float32 bytes of one query block's [.., rows, keys] scores; the rule holds about three such buffers
ATTENTION_BLOCK_BYTES = 16 * 2**20


def _prepared(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], gqa: bool):
    """``(q, k, v, q·c, k·c, c)`` as the MATH backend forms them: fp16/bf16 in float32, key
    and value heads repeated for GQA, c = √scale applied to q and k before their product."""
    q, k, v = (_accumulation(t) for t in (q, k, v))
    k, v = _repeat_kv(k, q, gqa), _repeat_kv(v, q, gqa)
    factor = (scale if scale is not None else q.shape[-1] ** -0.5) ** 0.5
    return q, k, v, q * factor, k * factor, factor


def _row_blocks(q: Tensor, k: Tensor) -> list[slice]:
    """Query rows in blocks whose scores take at most ``ATTENTION_BLOCK_BYTES`` (softmax
    rows are independent, so blocks give each row the values of the whole)."""
    L, S = q.shape[-2], k.shape[-2]
    per_row = 4 * S * max(1, q[..., 0, 0].numel())
    rows = max(1, min(L, ATTENTION_BLOCK_BYTES // per_row))
    return [slice(a, min(a + rows, L)) for a in range(0, L, rows)]


def _probabilities(qs: Tensor, ks: Tensor, mask: Optional[Tensor], is_causal: bool, rows: slice) -> Tensor:
    """``_safe_softmax((q k)ᵀ + mask)`` for the query ``rows`` (q and k pre-scaled)."""
    s = torch.matmul(qs[..., rows, :], ks.transpose(-2, -1))
    if is_causal:  # MATH's ones(L, S).tril(): key j visible to query i when j <= i
        i = torch.arange(rows.start, rows.stop, device=s.device).unsqueeze(-1)
        s.masked_fill_(torch.arange(s.shape[-1], device=s.device) > i, float("-inf"))
    if mask is not None:
        if mask.ndim >= 2 and mask.shape[-2] != 1:
            mask = mask[..., rows, :]
        if torch.broadcast_shapes(s.shape, mask.shape) != s.shape:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        else:
            s = s.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else s.add_(mask)
    return torch.ops.aten._safe_softmax(s, -1)


def _accumulation(t: Tensor) -> Tensor:
    """fp16/bf16 in float32, as SDPA's MATH backend computes them; other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _repeat_kv(x: Tensor, q: Tensor, gqa: bool) -> Tensor:
    """Key/value heads repeated to the query's head count (SDPA's ``enable_gqa``)."""
    if not gqa or x.shape[-3] == q.shape[-3]:
        return x
    return x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3)


def linear_logprobs(h: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
    """``log softmax(h Wᵀ + b)[target]`` per row: ``h [m, D]``, ``W [V, D]``, ``b [V]``,
    ``targets [m]`` → ``[m]`` nats, the logits promoted to float32 or wider.

    An LM head and the target's log-prob in one call. Plain operators here; under
    ``jvp_rules`` a Function whose tangent is ``ḣ·(W_y − pᵀW)`` (p = softmax of the
    logits): one ``[m, V] × [V, D]`` product in place of the ``[m, V]`` logits tangent and
    the log-softmax's elementwise tangent kernels.
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
            dz = _add(dz, None if dbias is None else dbias.expand_as(z).to(h.dtype))
            dz = dz.to(z.dtype)
            out = _add(out, dz.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - (p * dz).sum(-1))
        return out, None, None


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """``_Attention``'s arguments for an SDPA call it covers (no dropout, tensors, a mask
    that is not both given and causal), else None."""
    if dropout_p != 0.0 or not _is_tensor(query, key, value) or query.ndim < 3:
        return None
    if attn_mask is not None and (is_causal or not isinstance(attn_mask, Tensor)):
        return None
    return query, key, value, attn_mask, bool(is_causal), scale, bool(enable_gqa)


def _is_tensor(*xs) -> bool:
    return all(isinstance(x, Tensor) for x in xs)


class jvp_rules(TorchFunctionMode):
    """Route ``F.linear``, ``torch.addmm``, ``torch.matmul``/``@``, ``F.silu``,
    ``F.scaled_dot_product_attention`` and ``linear_logprobs`` to the Functions above while
    active (a context manager; see the module docstring).

    Calls with arguments the rules do not cover (``out=``, an ``inplace`` silu, SDPA with
    dropout, non-tensor operands) run as the plain operator.
    """

    def __init__(self):
        super().__init__()
        self._lower: Optional[tuple[Tensor, int, bool]] = None  # (mask, its version, keeps_lower_triangle)

    def _keeps_lower_triangle(self, mask: Optional[Tensor]) -> bool:
        """``triton_attention.keeps_lower_triangle``, once per mask while the mode is
        active: a model hands every layer the same mask, and each check reads all of it
        and syncs with the host."""
        if mask is None:
            return False
        if self._lower is None or self._lower[0] is not mask or self._lower[1] != mask._version:
            self._lower = (mask, mask._version, triton_attention.keeps_lower_triangle(mask))
        return self._lower[2]

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
            call = _sdpa_arguments(*args, **kwargs)
            if call is not None:
                if triton_attention.enabled_for(call[0], call[1], call[2], call[3], call[6]):
                    return _FlashAttention.apply(*call, self._keeps_lower_triangle(call[3]))[0]
                return _Attention.apply(*call)
        elif func is linear_logprobs:
            value, _, _ = _LinearLogprobs.apply(*args)
            return value
        elif func is F.silu and not kwargs.get("inplace", False) and len(args) == 1 and _is_tensor(*args):
            return _Silu.apply(args[0])
        return func(*args, **kwargs)
