"""The SDPA rule on Triton: flash attention with a tangent, as two Triton kernels (issue 15, part 3).

``attention_forward(call)`` is FlashAttention's forward (Dao et al. 2022; online softmax
over key blocks, Milakov & Gimelshein 2018): per query row the output and the log-sum-exp
``L_i = log Σ_j exp(s_ij)`` of the scaled, masked scores, never a ``[T × T]`` score buffer
(a bool mask, itself ``[T × T]``, is read once per call by ``keeps_lower_triangle``).
``attention_jvp(...)`` is its forward-mode derivative. With ``L`` from the forward,
``P_ij = exp(s_ij − L_i)`` needs no running max, so one pass over key blocks gives

    Ṡ = (q̇ kᵀ + q k̇ᵀ)·scale,   μ_i = Σ_j P_ij Ṡ_ij,
    Ȯ_i = Σ_j P_ij Ṡ_ij v_j + Σ_j P_ij v̇_j − μ_i O_i

(``Ṗ = P ⊙ (Ṡ − μ)``; docs/derivations.md#forward-mode-rules), five block products where
the forward has two, over present tangents only (a frozen q, k or v costs nothing).
``_FlashAttention`` is the ``torch.autograd.Function`` that the rules mode
(``funcprobe.forward.rules.jvp_rules(kernels="triton")``) sends SDPA calls to.

Semantics are those of ``F.scaled_dot_product_attention`` without dropout: ``is_causal``
is the top-left ``ones(L, S).tril()``; a bool mask keeps True, a float mask is added to
the scores; a query row with no visible key gives 0 (MATH's ``_safe_softmax``); GQA reads
key/value head ``h // (H / H_kv)``. A bool mask that keeps nothing above the diagonal also
lets the kernels skip key blocks past it (transformers' causal-plus-padding masks).

Where they run: on CUDA tensors the compiled kernels; on CPU tensors Triton's interpreter
(numpy, slow: for the tests, which check both kernels there against the blockwise PyTorch
attention and the SDPA rule in float64). fp16/bf16 on CUDA multiply in their own dtype with
float32 accumulation (tensor cores; P rounded to the input dtype before ``P·v``, as
FlashAttention does; fp16 also in the interpreter, so the tests run that path); bf16 in
the interpreter (whose bf16 products are wrong) and everything else in float32 or float64
(``input_precision="ieee"``).

Opt-in: only ``kernels="triton"`` (``ProbeSettings.kernels``, ``jvp_rules(kernels=...)``)
imports this module; without Triton it only reports ``available() == False``. The kernels
run as the torch operators ``funcprobe::flash_attention_forward`` / ``_jvp``, registered on
their first launch (``_ops``), never at import.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .attention import AttentionCall, _attention_tangent

try:  # optional: Triton comes with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

#: ``(query rows, keys)`` per block of one kernel launch
Blocks = tuple[int, int]


def _blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(query rows, keys in the forward, keys in the jvp, pipeline stages)`` per block.
    The jvp holds up to six tiles (q, q̇, k, k̇, v, v̇); float64 tiles take twice float32's
    shared memory, which sm_90's 227 KiB cannot hold at float32's block sizes; these fit
    (``benchmarks/compile_sm90.py``, ``benchmarks/results/compile-sm90.md``)."""
    if dtype == torch.float64:
        return 32, 16, 16, 1
    if head_dim <= 64:
        return 64, 64, 32, 2
    if head_dim <= 128:
        return 64, 32, 32, 2
    return 64, 32, 16, 2


def available() -> bool:
    """Whether Triton is importable (the kernels need it; CPU tensors run its interpreter)."""
    return triton is not None


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (numpy, on CPU tensors)."""
    return triton is not None and type(_forward_kernel).__name__ == "InterpretedFunction"


def applies(call: AttentionCall) -> bool:
    """Whether the kernels take this SDPA call under ``jvp_rules(kernels="triton")``: Triton
    installed, CUDA tensors (CPU tensors only where Triton runs its interpreter, the tests),
    and a call the kernels cover (``_supported``); other calls take the closed-form rule."""
    if triton is None:
        return False
    if not (call.q.is_cuda or (interpreted() and call.q.device.type == "cpu")):
        return False
    return _supported(call)


def _supported(call: AttentionCall, gqa: Optional[bool] = None) -> bool:
    """``[B, H, L, D]`` tensors of one floating dtype, head dims ≤ 256, key/value heads
    dividing the query's (equal unless ``gqa``; None: the call's own), a bool or same-dtype
    float mask that broadcasts *to* the scores."""
    q, k, v, mask = call.q, call.k, call.v, call.mask
    gqa = call.options.gqa if gqa is None else gqa
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False
    B, H, L, D = q.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[-1] != D or max(D, v.shape[-1]) > 256:
        return False
    if H % k.shape[1] or (k.shape[1] != H and not gqa):
        return False
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype != q.dtype or mask.ndim > 4:
            return False
        try:  # broadcastable *to* the scores, not merely with them
            return torch.broadcast_shapes(mask.shape, (B, H, L, k.shape[2])) == (B, H, L, k.shape[2])
        except RuntimeError:
            return False
    return True


#: mask elements tested at a time by ``keeps_lower_triangle`` (its transient bool buffer)
MASK_CHECK_ELEMENTS = 2**26


def keeps_lower_triangle(mask: Optional[Tensor]) -> bool:
    """Whether a bool ``mask`` hides every key after its query (j > i), as transformers'
    causal-plus-padding masks do, so the kernels may skip key blocks past the diagonal.
    One pass over the mask, a few ``[L, S]`` at a time (one host sync); False for None and
    float masks."""
    if mask is None or mask.dtype != torch.bool:
        return False
    L, S = mask.shape[-2:]
    upper = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu_(1)
    own = tuple(0 if stride == 0 else slice(None) for stride in mask.stride()[:-2])  # broadcast dims: once
    flat = mask[own].reshape(-1, L, S)
    step = max(1, MASK_CHECK_ELEMENTS // max(L * S, 1))
    seen = torch.zeros((), dtype=torch.bool, device=mask.device)
    for start in range(0, flat.shape[0], step):
        seen |= (flat[start:start + step] & upper).any()
    return not bool(seen)


def attention_forward(call: AttentionCall, *, blocks: Optional[Blocks] = None,
                      lower_triangle: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """Attention output and per-row log-sum-exp.

    Args:
        call: ``q [B, H, L, D]``, ``k [B, H_kv, S, D]``, ``v [B, H_kv, S, Dv]`` (H a multiple
            of H_kv; GQA whatever ``call.options.gqa`` says), one floating dtype, on CUDA
            (compiled) or CPU (Triton's interpreter); ``mask`` None, bool (True = attend)
            or additive float broadcastable to ``[B, H, L, S]``, not together with
            ``is_causal``; ``scale`` default ``D**-0.5``.
        blocks: ``(query rows, keys)`` per block (powers of two ≥ 16; None: by head
            dimension and dtype, ``_blocks``).
        lower_triangle: whether ``mask`` hides every key after its query (None: found by
            ``keeps_lower_triangle``; callers that run both kernels find it once).

    Returns ``(out, lse)``: ``out [B, H, L, Dv]`` in float32 (float64 for float64 inputs),
    ``lse [B, H, L]`` in the same dtype, ``-inf`` for rows that see no key (their ``out`` is 0).

    Raises ``RuntimeError`` without Triton, ``ValueError`` for shapes, dtypes or arguments
    the kernels do not cover (``_supported``), before any work.
    """
    launch = _launch(call, blocks, lower_triangle, "forward")
    out, lse = _ops().forward(call.q, call.k, call.v, call.mask, call.options.scale, launch)
    return out, lse


def attention_jvp(call: AttentionCall, out: Tensor, lse: Tensor,
                  tangents: tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]], *,
                  blocks: Optional[Blocks] = None, lower_triangle: Optional[bool] = None) -> Optional[Tensor]:
    """Tangent of the attention output for ``tangents = (dq, dk, dv)`` (None: none).

    ``out`` and ``lse`` are ``attention_forward``'s for the same ``call``; the tangents
    have their primal's shape. Returns ``[B, H, L, Dv]`` in ``out``'s dtype (float32 or
    float64), or None when all three tangents are None. Raises as ``attention_forward``,
    and ``ValueError`` naming a tangent whose shape is not its primal's.
    """
    dq, dk, dv = tangents
    if dq is None and dk is None and dv is None:
        return None
    launch = _launch(call, blocks, lower_triangle, "jvp")
    q, k, v = call.q, call.k, call.v
    B, H, L, _ = q.shape
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t is not None and t.shape != like.shape:
            raise ValueError(f"{name}: expected the shape of its primal {tuple(like.shape)}, got {tuple(t.shape)}")
    if out.shape != (B, H, L, v.shape[-1]) or lse.shape != (B, H, L):
        raise ValueError("out, lse: expected attention_forward's outputs for these q, k, v")
    return _ops().jvp([q, k, v, out, lse], [dq, dk, dv], call.mask, call.options.scale, launch)


class _Ops(NamedTuple):
    forward: object
    jvp: object


@functools.cache
def _ops() -> _Ops:
    """The kernels as torch operators ``funcprobe::flash_attention_forward`` and
    ``funcprobe::flash_attention_jvp``, defined on the first call (the first launch of the
    kernels), once per process: importing funcprobe registers none.

    Operators so that torch.func hands the kernels plain tensors (inside a Function's
    jvp the tensors are functorch wrappers, which have no storage a kernel can read).
    ``launch`` is ``(block_m, block_n, skip_upper)`` (``_launch``)."""

    @torch.library.custom_op("funcprobe::flash_attention_forward", mutates_args=())
    def forward_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: Optional[float],
                   launch: Sequence[int]) -> tuple[Tensor, Tensor]:
        call = _Call(q, k, v, mask, scale, launch)
        out = torch.empty(call.B, call.H, call.L, call.Dv, dtype=call.acc, device=q.device)
        lse = torch.empty(call.B, call.H, call.L, dtype=call.acc, device=q.device)
        call.launch(_forward_kernel, q, k, v, out, lse, *_strides(q, k, v, out), *_strides(lse.unsqueeze(-1)))
        return out, lse

    @forward_op.register_fake
    def _(q, k, v, mask, scale, launch):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(*q.shape[:3], v.shape[-1], dtype=acc), q.new_empty(*q.shape[:3], dtype=acc)

    @torch.library.custom_op("funcprobe::flash_attention_jvp", mutates_args=())
    def jvp_op(primals: Sequence[Tensor], tangents: Sequence[Optional[Tensor]], mask: Optional[Tensor],
               scale: Optional[float], launch: Sequence[int]) -> Tensor:
        q, k, v, out, lse = primals
        dq, dk, dv = tangents
        call = _Call(q, k, v, mask, scale, launch)
        given = [q if t is None else t.to(q.dtype) for t in (dq, dk, dv)]  # q: a placeholder never read
        strides = [(0, 0, 0, 0) if t is None else _strides(t) for t in (dq, dk, dv)]
        result = torch.empty_like(out)
        call.launch(_jvp_kernel, q, k, v, *given, out, lse, result,
                    *_strides(q, k, v), *strides[0], *strides[1], *strides[2], *_strides(out, result),
                    *_strides(lse.unsqueeze(-1)), HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None)
        return result

    @jvp_op.register_fake
    def _(primals, tangents, mask, scale, launch):
        return torch.empty_like(primals[3])

    return _Ops(forward_op, jvp_op)


def _launch(call: AttentionCall, blocks: Optional[Blocks], lower_triangle: Optional[bool],
            kernel: str) -> tuple[int, int, int]:
    """``(block_m, block_n, skip_upper)`` for ``kernel`` ("forward" or "jvp"): block sizes
    by ``_blocks`` where None, the arguments checked (``_check``), then whether key blocks
    past the diagonal may be skipped (``is_causal``, or a mask that keeps the lower triangle)."""
    rows, forward_keys, jvp_keys, _ = _blocks(call.q.shape[-1], call.q.dtype)
    block_m, block_n = (rows, forward_keys if kernel == "forward" else jvp_keys) if blocks is None else blocks
    _check(call, block_m, block_n)
    mask = call.mask
    lower = mask is not None and (keeps_lower_triangle(mask) if lower_triangle is None else lower_triangle)
    return block_m, block_n, int(call.options.is_causal or lower)


def _check(call: AttentionCall, block_m: int, block_n: int) -> None:
    """The arguments' errors, named, before any work."""
    q, k, v, mask = call.q, call.k, call.v, call.mask
    if triton is None:
        raise RuntimeError("funcprobe.forward.triton needs Triton (pip install triton)")
    if q.device != k.device or q.device != v.device or (mask is not None and mask.device != q.device):
        raise ValueError("q, k, v, mask: expected one device")
    if not q.is_cuda and not interpreted():
        raise ValueError(f"q: on {q.device}, the compiled kernels need CUDA tensors (CPU tensors run only in "
                         "Triton's interpreter: TRITON_INTERPRET=1 set before triton is imported)")
    if not _supported(call, gqa=True):
        raise ValueError(f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)}, mask "
                         f"{None if mask is None else (tuple(mask.shape), mask.dtype)}: expected [B, H, L, D], "
                         f"[B, H_kv, S, D], [B, H_kv, S, Dv] of one float dtype, H a multiple of H_kv, "
                         f"D, Dv <= 256, a bool or same-dtype mask broadcastable to [B, H, L, S]")
    if call.options.is_causal and mask is not None:
        raise ValueError("is_causal and mask: expected at most one of them")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}: expected a power of two >= 16, got {b}")


class _Call:
    """One kernel launch's shapes, mask, causal skip, scale and grid (arguments checked
    by ``_check`` in the public functions; ``launch`` as ``_launch`` returns it)."""

    def __init__(self, q, k, v, mask, scale, launch):
        self.B, self.H, self.L, self.D = q.shape
        self.Hkv, self.S, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.dtype = q.dtype
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.scale = float(scale if scale is not None else self.D ** -0.5)
        self.block_m, self.block_n, skip_upper = (int(x) for x in launch)
        self.skip_upper = bool(skip_upper)
        self.mask_kind = 0
        self.mask = q.new_empty(0)
        self.mask_strides = (0, 0, 0, 0)
        if mask is not None:
            full = mask.expand(self.B, self.H, self.L, self.S)
            self.mask_kind = 1 if mask.dtype == torch.bool else 2
            self.mask = full.view(torch.uint8) if mask.dtype == torch.bool else full
            self.mask_strides = tuple(full.stride())
        # the interpreter's bf16 products are wrong (numpy has no bf16): there bf16 runs upcast
        self.low_precision = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and not interpreted())

    def launch(self, kernel, *args, **flags) -> None:
        grid = (triton.cdiv(self.L, self.block_m), self.B * self.H)
        kernel[grid](*args, self.mask, *self.mask_strides, self.H, self.H // self.Hkv, self.L, self.S, self.D,
                     self.Dv, self.scale,
                     BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=_pow2(self.D), BLOCK_DV=_pow2(self.Dv),
                     CAUSAL=self.skip_upper, IS_CAUSAL=self.skip_upper and self.mask_kind == 0,
                     MASK_KIND=self.mask_kind, LOW=self.low_precision, WIDE=self.acc == torch.float64,
                     num_warps=4, num_stages=_blocks(self.D, self.dtype)[3], **flags)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _strides(*ts: Tensor) -> tuple[int, ...]:
    return tuple(s for t in ts for s in t.stride())


class _FlashAttention(torch.autograd.Function):
    """SDPA without dropout through the kernels (``jvp_rules(kernels="triton")`` where
    ``applies``): the forward keeps the float32 output and the per-row log-sum-exp, and the
    jvp makes one pass over key blocks with them; no ``[T × T]`` score buffer in either.
    Outputs ``(out, out in float32, lse)``; the mode returns ``out``. ``lower`` (whether a
    bool mask hides every later key) is found once, by the mode. A float mask that carries a
    tangent (one built from θ) takes the closed-form rule's tangent instead (the kernels
    treat the mask as constant).

    ``apply(q, k, v, mask, options, lower)``: the tensors apart (autograd sees their
    tangents), ``options`` an ``AttentionOptions``.
    """

    @staticmethod
    def forward(q, k, v, mask, options, lower):
        wide, lse = attention_forward(AttentionCall(q, k, v, mask, options), lower_triangle=lower)
        return wide.to(q.dtype), wide, lse

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, mask, options, lower = inputs
        _, wide, lse = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(wide, lse)
        ctx.save_for_forward(q, k, v, wide, lse)
        ctx.mask, ctx.options, ctx.lower = mask, options, lower

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        q, k, v, wide, lse = ctx.saved_tensors
        call = AttentionCall(q, k, v, ctx.mask, ctx.options)
        if dmask is not None:
            out = _attention_tangent(call, (dq, dk, dv), dmask)
        else:
            out = attention_jvp(call, wide, lse, (dq, dk, dv), lower_triangle=ctx.lower)
        return None if out is None else out.to(q.dtype), None, None


def _jit(fn):
    """``triton.jit`` (compiled, or interpreted where ``TRITON_INTERPRET=1`` was set before
    Triton's import: Triton decides that at decoration, its own library included)."""
    return triton.jit(fn) if triton is not None else fn


def _kernel(name: str):
    return {"forward": _forward_kernel, "jvp": _jvp_kernel}[name]


# ---------------------------------------------------------------- kernels (Triton source)
# Each program takes BLOCK_M query rows of one (batch, head) and walks the key blocks.

@_jit
def _dot(a, b, LOW: tl.constexpr, WIDE: tl.constexpr):
    """a·b accumulated in float32 (float64 if WIDE): on tensor cores in b's dtype (LOW:
    fp16/bf16 inputs, a rounded to it), else IEEE products in the accumulation dtype."""
    acc_t = tl.float64 if WIDE else tl.float32
    if LOW:
        out = tl.dot(a.to(b.dtype), b, out_dtype=acc_t)
    else:
        out = tl.dot(a.to(acc_t), b.to(acc_t), input_precision="ieee", out_dtype=acc_t)
    return out


@_jit
def _program(H, GROUP, L, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """This program's batch, query head, key/value head, query rows (int64: b·stride
    overflows int32 past 2³¹ elements), which rows exist, and the end of its key range
    (keys past the block's last row are hidden when CAUSAL)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    return b, h, h // GROUP, rows, rows < L, hi


@_jit
def _scores(q, K, k_base, skn, skd, keys, dims, D, S, M, m_base, smm, smn, rows, row_ok, scale,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, LOW: tl.constexpr, WIDE: tl.constexpr):
    """One key block: the kᵀ tile, the scores ``scale·q kᵀ`` (+ a float mask) and which of
    them a query may see (in range, causal, bool mask)."""
    key_ok = keys < S
    kt = tl.load(K + k_base + keys[None, :] * skn + dims[:, None] * skd, mask=key_ok[None, :] & (dims[:, None] < D),
                 other=0.0)
    s = _dot(q, kt, LOW, WIDE) * scale
    visible = key_ok[None, :] & row_ok[:, None]
    if IS_CAUSAL:
        visible = visible & (keys[None, :] <= rows[:, None])
    if MASK_KIND == 1:
        keep = tl.load(M + m_base + rows[:, None] * smm + keys[None, :] * smn, mask=visible, other=0)
        # a reduction over a size-1 axis hides the 8-bit load from Triton's operand-width
        # heuristic: Triton 3.6 otherwise gives float64 P·v a k-width of 4, which its fp64 MMA
        # lowering rejects ("fp64 don't support largeK MMA"); bf16/fp16/fp32 still compile
        # (Triton 3.9: the forward at head dim 64 with less shared memory, compile-sm90.md)
        keep = tl.max(keep.to(tl.int32)[:, :, None], axis=2)
        visible = visible & (keep != 0)
    if MASK_KIND == 2:
        s = s + tl.load(M + m_base + rows[:, None] * smm + keys[None, :] * smn, mask=visible, other=0.0).to(s.dtype)
    return kt, s, visible


@_jit
def _forward_kernel(Q, K, V, O, LSE,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                    slb, slh, slm, _sl1,
                    M, smb, smh, smm, smn,
                    H, GROUP, L, S, D, DV, scale: tl.float64,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    CAUSAL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, LOW: tl.constexpr,
                    WIDE: tl.constexpr):
    acc_t = tl.float64 if WIDE else tl.float32
    scale = tl.full([], scale, acc_t)  # a Python float arrives as fp32 unless annotated; in float64 exactly
    b, h, hk, rows, row_ok, hi = _program(H, GROUP, L, S, BLOCK_M, CAUSAL)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :] * sqd,
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), acc_t)
    l_i = tl.zeros([BLOCK_M], acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], acc_t)
    for start in range(0, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        _, s, visible = _scores(q, K, b * skb + hk * skh, skn, skd, keys, dims, D, S, M, b * smb + h * smh, smm, smn,
                                rows, row_ok, scale, IS_CAUSAL, MASK_KIND, LOW, WIDE)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(V + b * svb + hk * svh + keys[:, None] * svn + vdims[None, :] * svd,
                     mask=(keys < S)[:, None] & (vdims[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p, vb, LOW, WIDE)
        m_i = m_new
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    m_safe = tl.where(seen, m_i, 0.0)
    lse = tl.where(seen, m_safe + tl.log(l_safe), float("-inf"))
    tl.store(O + b * sob + h * soh + rows[:, None] * som + vdims[None, :] * sod, out,
             mask=row_ok[:, None] & (vdims[None, :] < DV))
    tl.store(LSE + b * slb + h * slh + rows * slm, lse, mask=row_ok)


@_jit
def _jvp_kernel(Q, K, V, DQ, DK, DV_, O, LSE, DO,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                dqb, dqh, dqm, dqd, dkb, dkh, dkn, dkd, dvb, dvh, dvn, dvd,
                sob, soh, som, sod, rob, roh, rom, rod,
                slb, slh, slm, _sl1,
                M, smb, smh, smm, smn,
                H, GROUP, L, S, D, DV, scale: tl.float64,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, LOW: tl.constexpr,
                WIDE: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr):
    acc_t = tl.float64 if WIDE else tl.float32
    scale = tl.full([], scale, acc_t)  # a Python float arrives as fp32 unless annotated; in float64 exactly
    b, h, hk, rows, row_ok, hi = _program(H, GROUP, L, S, BLOCK_M, CAUSAL)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    q_mask = row_ok[:, None] & (dims[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :] * sqd, mask=q_mask, other=0.0)
    if HAS_DQ:
        dq = tl.load(DQ + b * dqb + h * dqh + rows[:, None] * dqm + dims[None, :] * dqd, mask=q_mask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + rows * slm, mask=row_ok, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = exp(-inf) = 0
    mu = tl.zeros([BLOCK_M], acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], acc_t)
    for start in range(0, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kt, s, visible = _scores(q, K, b * skb + hk * skh, skn, skd, keys, dims, D, S, M, b * smb + h * smh, smm, smn,
                                 rows, row_ok, scale, IS_CAUSAL, MASK_KIND, LOW, WIDE)
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        v_mask = (keys < S)[:, None] & (vdims[None, :] < DV)
        if HAS_DQ or HAS_DK:
            ds = tl.zeros([BLOCK_M, BLOCK_N], acc_t)
            if HAS_DQ:
                ds += _dot(dq, kt, LOW, WIDE)
            if HAS_DK:
                dkt = tl.load(DK + b * dkb + hk * dkh + keys[None, :] * dkn + dims[:, None] * dkd,
                              mask=(keys < S)[None, :] & (dims[:, None] < D), other=0.0)
                ds += _dot(q, dkt, LOW, WIDE)
            pds = p * (ds * scale)
            mu += tl.sum(pds, 1)
            vb = tl.load(V + b * svb + hk * svh + keys[:, None] * svn + vdims[None, :] * svd, mask=v_mask, other=0.0)
            acc += _dot(pds, vb, LOW, WIDE)
        if HAS_DV:
            dvb_ = tl.load(DV_ + b * dvb + hk * dvh + keys[:, None] * dvn + vdims[None, :] * dvd, mask=v_mask,
                           other=0.0)
            acc += _dot(p, dvb_, LOW, WIDE)
    o_mask = row_ok[:, None] & (vdims[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * som + vdims[None, :] * sod, mask=o_mask, other=0.0)
    tl.store(DO + b * rob + h * roh + rows[:, None] * rom + vdims[None, :] * rod, acc - mu[:, None] * o, mask=o_mask)
