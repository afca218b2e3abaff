"""Which attention a Hugging Face model runs in the probe's forwards: implementations that
forward-mode AD and double backward can go through (the model's attention setting,
switched for the duration of a block and restored).

docs/failure-modes.md, failure 8: fused attention kernels (SDPA's flash / memory-efficient backends,
flash-attn) implement neither forward-mode AD nor double backward. Measured with
torch 2.13 on CPU: ``torch.func.jvp`` through an SDPA model fails with "Trying to use
forward AD with _scaled_dot_product_flash_attention_for_cpu that does not support it",
and the α-trick's second reverse pass with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented".

``probe_attention(module)`` makes every probe forward use a composite implementation:
models on ``"sdpa"`` keep it but with only the MATH backend allowed (plain matmul /
softmax, differentiable in every mode); any other non-eager implementation
(``flash_attention_2/3``, ``flex_attention``, hub kernels) is switched to ``"sdpa"``
(``"eager"`` where the model does not offer SDPA) and switched back afterwards, even on
error. SDPA rather than eager: in forward mode ``funcprobe.forward.rules.jvp_rules`` takes
every SDPA call (the closed-form rule; with ``kernels="triton"``, on CUDA, the Triton flash
kernels), never a ``[T × T]`` score tensor for all queries.

``blockwise_attention(module, block)`` installs ``funcprobe.forward.attention``'s blockwise
causal attention instead (the ``attention_block`` setting). Both are entered by
``funcprobe.edge.session``; transformers is imported only by ``blockwise_attention``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

#: implementations left in place (composite, differentiable in all modes under MATH SDPA)
SAFE_IMPLEMENTATIONS = ("eager", "sdpa")


def attention_implementation(module: nn.Module) -> str | None:
    """The HF ``config._attn_implementation`` of ``module`` (or its base model), else None."""
    config = getattr(module, "config", None)
    if config is None and hasattr(module, "get_base_model"):
        config = getattr(module.get_base_model(), "config", None)
    return getattr(config, "_attn_implementation", None)


def _settable(module: nn.Module) -> nn.Module | None:
    if hasattr(module, "set_attn_implementation"):
        return module
    if hasattr(module, "get_base_model"):  # peft.PeftModel
        base = module.get_base_model()
        if hasattr(base, "set_attn_implementation"):
            return base
    return None


@contextlib.contextmanager
def probe_attention(module: nn.Module) -> Iterator[str | None]:
    """Run the body with an attention implementation that supports JVP and double backward.

    Yields the implementation in use during the body. Restores the caller's setting on
    exit. Raises ``RuntimeError`` if a fused implementation is set and the model offers
    no ``set_attn_implementation`` to leave it, or switching takes no effect.
    """
    before = attention_implementation(module)
    target = _settable(module)
    switched = before is not None and before not in SAFE_IMPLEMENTATIONS
    if switched and target is None:
        raise RuntimeError(
            f"model: attention implementation {before!r} supports neither forward-mode AD nor double "
            "backward, and the model has no set_attn_implementation(); load it with attn_implementation='eager'"
        )
    used = before
    try:
        if switched:
            used = _switch(target)
        with sdpa_kernel([SDPBackend.MATH]):
            yield used
    finally:
        if switched:
            target.set_attn_implementation(before)


def _switch(target: nn.Module) -> str:
    """Set ``"sdpa"``, or ``"eager"`` where the model refuses SDPA; returns the one in
    effect, read back (transformers only warns where a model cannot switch at all).

    Raises ``RuntimeError`` if neither took effect.
    """
    for implementation in SAFE_IMPLEMENTATIONS[::-1]:  # "sdpa", then "eager"
        try:
            target.set_attn_implementation(implementation)
        except (ValueError, ImportError):  # transformers' "does not support SDPA" errors
            continue
        if attention_implementation(target) == implementation:
            return implementation
    raise RuntimeError(
        f"model: attention implementation {attention_implementation(target)!r} supports neither forward-mode AD "
        "nor double backward, and set_attn_implementation('sdpa' or 'eager') did not take effect; load it with "
        "attn_implementation='sdpa' or 'eager'")


#: the name funcprobe's blockwise attention is registered under while a probe forward runs
BLOCKWISE = "funcprobe_blockwise"


@contextlib.contextmanager
def blockwise_attention(module: nn.Module, block: int | None) -> Iterator[bool]:
    """With ``block`` set, run the body's forwards with ``funcprobe.forward.attention``'s
    blockwise causal attention: registered in transformers' ``AttentionInterface`` (and a
    mask function that builds no [T × T] mask) under ``BLOCKWISE``, set on the model, and
    all of it removed afterwards, even on error. Yields whether it is in use: models
    without ``set_attn_implementation``, with a sliding window, or already on a custom
    implementation keep theirs (``probe_attention``).
    """
    before = attention_implementation(module)
    target = _settable(module)
    config = getattr(target, "config", None)
    sliding = getattr(config, "sliding_window", None) not in (None, 0) or getattr(config, "use_sliding_window", False)
    if block is None or target is None or before not in SAFE_IMPLEMENTATIONS or sliding:
        yield False
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .attention import blockwise_causal_attention

    def attention(mod, query, key, value, attention_mask, **kwargs):  # transformers passes dropout=, scaling=
        if kwargs.get("dropout"):
            raise RuntimeError("attention: the blockwise attention runs without dropout (the probe's eval mode)")
        scaling = kwargs.get("scaling")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return blockwise_causal_attention(query, key, value, scaling=scale, block=block), None

    def no_mask(*args, **kwargs):  # causal only: the probe's sequences are left-aligned, padding trails
        return None

    AttentionInterface.register(BLOCKWISE, attention)
    AttentionMaskInterface.register(BLOCKWISE, no_mask)
    try:
        target.set_attn_implementation(BLOCKWISE)
        try:
            yield True
        finally:
            target.set_attn_implementation(before)
    finally:
        AttentionInterface._global_mapping.pop(BLOCKWISE, None)
        AttentionMaskInterface._global_mapping.pop(BLOCKWISE, None)
