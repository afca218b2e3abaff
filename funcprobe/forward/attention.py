"""Attention in forward mode, the maths: blockwise causal attention and SDPA's closed-form rule.

* ``blockwise_causal_attention``: causal attention over key blocks (online softmax) in
  plain PyTorch. Forward-mode AD carries the tangent through it block by block, so no
  ``[T × T]`` score matrix, primal or tangent, is ever held for all heads at once (the
  ``attention_block`` setting; ``funcprobe.forward.attention_impl`` installs it in a model).
* ``_Attention``: ``F.scaled_dot_product_attention`` without dropout as its MATH backend
  computes it, with its tangent in closed form (``_attention_tangent``); the rules mode
  (``funcprobe.forward.rules``) routes SDPA calls to it. ``AttentionCall`` bundles one such
  call's tensors and options (``sdpa_call`` reads them from SDPA's arguments).

Blockwise attention: for queries i and keys j ≤ i, with running max m (held without a
tangent: the result does not depend on it), running sum l and accumulator a over key
blocks b:

    s = scaling · q kᵀ (keys of b, queries at or after the block's start),
    m' = max(m, max_j s),  l' = l·e^{m−m'} + Σ_j e^{s−m'},  a' = a·e^{m−m'} + e^{s−m'} v,
    out = a / l

— exactly softmax(s)·v (Milakov & Gimelshein 2018; Dao et al., FlashAttention, 2022).
Causal only: the probe left-aligns every sequence (``funcprobe.core.logprobs``), so padding
trails and no real token ever attends to it; padded rows compute values nobody reads.
Grouped-query attention: query head h reads key/value head h // (H / H_kv).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._tangents import add

def blockwise_causal_attention(query: Tensor, key: Tensor, value: Tensor, *, scaling: float,
                               block: int = 512) -> Tensor:
    """``[B, T, H, D]`` causal softmax attention, key blocks of ``block`` tokens.

    Args:
        query: ``[B, H, T, D]``; key, value: ``[B, H_kv, T, D]`` with H a multiple of H_kv.
        scaling: the factor on q·k (1/sqrt(D) in most models).
        block: keys per block (memory ∝ B·H·T·block per block, primal and tangent).

    Raises ``ValueError`` for mismatched shapes or ``block`` < 1.
    """
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    if key.shape != (B, Hkv, T, D) or value.shape[:3] != (B, Hkv, T) or H % Hkv != 0:
        raise ValueError(f"attention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} are not [B, H, T, D], [B, H_kv, T, D] with H a multiple of H_kv")
    if block < 1:
        raise ValueError(f"block: expected an integer >= 1, got {block}")
    g = H // Hkv
    q = query.reshape(B, Hkv, g, T, D)
    Dv = value.shape[-1]
    wide = torch.promote_types(q.dtype, torch.float64)  # running sums in float64: long rows lose no digits
    acc = q.new_zeros((B, Hkv, g, T, Dv), dtype=wide)
    total = q.new_zeros((B, Hkv, g, T, 1), dtype=wide)
    run_max = q.new_full((B, Hkv, g, T, 1), float("-inf"))
    rows = torch.arange(T, device=q.device)
    for start in range(0, T, block):
        stop = min(start + block, T)
        kb = key[:, :, None, start:stop]  # [B, Hkv, 1, b, D]
        vb = value[:, :, None, start:stop]
        qs = q[..., start:, :]  # queries before the block see none of its keys
        s = torch.matmul(qs, kb.transpose(-1, -2)) * scaling  # [B, Hkv, g, T - start, b]
        future = rows[start:stop].unsqueeze(0) > rows[start:].unsqueeze(1)  # key after query
        s = s.masked_fill(future, float("-inf"))
        m_old = run_max[..., start:, :]
        m_new = torch.maximum(m_old, s.amax(-1, keepdim=True)).detach()
        p = torch.exp(s - m_new)
        corr = torch.exp(m_old - m_new)
        corr = corr.to(wide)
        acc = torch.cat([acc[..., :start, :], acc[..., start:, :] * corr + torch.matmul(p, vb).to(wide)], -2)
        total = torch.cat([total[..., :start, :], total[..., start:, :] * corr + p.sum(-1, keepdim=True, dtype=wide)],
                          -2)
        run_max = torch.cat([run_max[..., :start, :], m_new], -2)
    out = (acc / total).to(q.dtype)  # every query sees key 0: total > 0
    return out.reshape(B, H, T, Dv).transpose(1, 2)


# ---------------------------------------------------------------- SDPA's closed-form rule
@dataclass(frozen=True)
class AttentionOptions:
    """What an SDPA call computes besides its tensors.

    Attributes:
        is_causal: key j visible to query i only when j ≤ i (top-left ``ones(L, S).tril()``).
        scale: factor on q·kᵀ; None: ``D**-0.5``.
        gqa: SDPA's ``enable_gqa``: key/value heads repeated to the query's head count.
    """

    is_causal: bool = False
    scale: Optional[float] = None
    gqa: bool = False


@dataclass(frozen=True)
class AttentionCall:
    """One SDPA call without dropout: ``q [B, H, L, D]``, ``k [B, H_kv, S, D]``,
    ``v [B, H_kv, S, Dv]`` (any leading dims for the rule; 4-D for the kernels), ``mask``
    None, bool (True = attend) or additive float, broadcastable to ``[B, H, L, S]``."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Optional[Tensor] = None
    options: AttentionOptions = AttentionOptions()


#: ``F.scaled_dot_product_attention``'s parameters in order, and the defaults of the optional ones
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_call(args: tuple, kwargs: dict) -> Optional[AttentionCall]:
    """The ``AttentionCall`` of an SDPA call (``F.scaled_dot_product_attention(*args,
    **kwargs)``) that the rules cover: no dropout, tensors of at least 3 dims, a mask that
    is not both given and causal. None for any other call, and for arguments SDPA itself
    refuses (it raises its own error when run as the plain operator)."""
    if len(args) > len(_SDPA_PARAMETERS) or kwargs.keys() - set(_SDPA_PARAMETERS):
        return None
    given = dict(zip(_SDPA_PARAMETERS, args))
    if given.keys() & kwargs.keys():
        return None
    a = {**_SDPA_DEFAULTS, **given, **kwargs}
    if not {"query", "key", "value"} <= a.keys():
        return None
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if a["dropout_p"] != 0.0 or not all(isinstance(x, Tensor) for x in (q, k, v)) or q.ndim < 3:
        return None
    if mask is not None and (a["is_causal"] or not isinstance(mask, Tensor)):
        return None
    return AttentionCall(q, k, v, mask, AttentionOptions(bool(a["is_causal"]), a["scale"], bool(a["enable_gqa"])))


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

    ``apply(q, k, v, mask, options)``: the tensors apart (autograd sees their tangents),
    ``options`` an ``AttentionOptions``.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], options: AttentionOptions) -> Tensor:
        call = AttentionCall(q, k, v, mask, options)
        q, k, v, qs, ks, _ = _prepared(call)
        out = [torch.matmul(_probabilities(qs, ks, call, rows), v) for rows in _row_blocks(q, k)]
        return torch.cat(out, -2).to(call.q.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, mask, options = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(q, k, v)
        ctx.mask, ctx.options = mask, options

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, _options):
        q, k, v = ctx.saved_tensors
        return _attention_tangent(AttentionCall(q, k, v, ctx.mask, ctx.options), (dq, dk, dv), dmask)


def _attention_tangent(call: AttentionCall, tangents: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]],
                       dmask: Optional[Tensor]) -> Optional[Tensor]:
    """``_Attention``'s tangent for ``tangents = (q̇, k̇, v̇)`` (None: none): Ȯ = Ṗ v + P v̇
    with Ṗ = P ⊙ (Ṡ − Σ_j P ⊙ Ṡ) and Ṡ = scale·(q̇ kᵀ + q k̇ᵀ) + ṁ (``dmask``, the tangent of
    an additive float mask), over present tangents; None when none is present.
    ``[.., L, Dv]`` in q's dtype."""
    dq, dk, dv = tangents
    if dq is None and dk is None and dv is None and dmask is None:
        return None
    q, k, v, qs, ks, factor = _prepared(call)
    gqa = call.options.gqa
    dq, dk, dv = (None if t is None else _accumulation(t) for t in (dq, dk, dv))
    dk = None if dk is None else _repeat_kv(dk, q, gqa)
    dv = None if dv is None else _repeat_kv(dv, q, gqa)
    out = []
    for rows in _row_blocks(q, k):  # P of each block recomputed exactly as the forward did
        p = _probabilities(qs, ks, call, rows)
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
            block = add(block, torch.matmul(p, dv))
        out.append(block)
    return torch.cat(out, -2).to(call.q.dtype)


#: float32 bytes of one query block's [.., rows, keys] scores; the rule holds about three such buffers
ATTENTION_BLOCK_BYTES = 16 * 2**20


def _prepared(call: AttentionCall):
    """``(q, k, v, q·c, k·c, c)`` as the MATH backend forms them: fp16/bf16 in float32, key
    and value heads repeated for GQA, c = √scale applied to q and k before their product."""
    q, k, v = (_accumulation(t) for t in (call.q, call.k, call.v))
    k, v = _repeat_kv(k, q, call.options.gqa), _repeat_kv(v, q, call.options.gqa)
    scale = call.options.scale
    factor = (scale if scale is not None else q.shape[-1] ** -0.5) ** 0.5
    return q, k, v, q * factor, k * factor, factor


def _row_blocks(q: Tensor, k: Tensor) -> list[slice]:
    """Query rows in blocks whose scores take at most ``ATTENTION_BLOCK_BYTES`` (softmax
    rows are independent, so blocks give each row the values of the whole)."""
    L, S = q.shape[-2], k.shape[-2]
    per_row = 4 * S * max(1, q[..., 0, 0].numel())
    rows = max(1, min(L, ATTENTION_BLOCK_BYTES // per_row))
    return [slice(a, min(a + rows, L)) for a in range(0, L, rows)]


def _probabilities(qs: Tensor, ks: Tensor, call: AttentionCall, rows: slice) -> Tensor:
    """``_safe_softmax((q k)ᵀ + mask)`` for the query ``rows`` (q and k pre-scaled; the
    mask and causality of ``call``)."""
    s = torch.matmul(qs[..., rows, :], ks.transpose(-2, -1))
    if call.options.is_causal:  # MATH's ones(L, S).tril(): key j visible to query i when j <= i
        i = torch.arange(rows.start, rows.stop, device=s.device).unsqueeze(-1)
        s.masked_fill_(torch.arange(s.shape[-1], device=s.device) > i, float("-inf"))
    mask = call.mask
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
