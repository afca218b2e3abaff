"""The probe's side-effect boundary: enter a clean probing state, leave no trace.

``probe_session`` wraps every probe computation. Inside it the PEFT adapter being
probed is active (docs/failure-modes.md, failure 2), dropout is off (``eval()``;
switchable), attention runs in a differentiable implementation (failure 8) and an outer
``torch.inference_mode()`` is suspended (failure 3; ``torch.func`` transforms already
ignore an outer ``no_grad``). On exit the train/eval flag of every submodule, the
active adapter, ``requires_grad`` flags, the attention implementation and HF's
input-require-grads hooks are restored, even on error. The probe itself never calls ``.backward()``, so ``.grad``s and optimizer
state are untouched by construction.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from .precision import upcast_layerwise
from .registry import ParamRegistry, adapter_activated
from .token_chunks import chunked_mlps
from ..core.rollouts import RolloutBatch
from ..forward.attention_impl import blockwise_attention, probe_attention
from ..errors import SettingsError


@contextlib.contextmanager
def probe_session(registry: ParamRegistry, *, keep_dropout: bool = False,
                  dtype: torch.dtype | None = None, attention_block: int | None = None,
                  mlp_chunk: int | None = None) -> Iterator[None]:
    """Context for probe forwards on ``registry.module``; see the module docstring.

    Args:
        keep_dropout: keep the caller's train/eval modes (dropout active in train mode)
            instead of switching to ``eval()`` for the probe's forwards.
        dtype: compute the forwards in this dtype, upcasting low-precision layers on the
            fly (``funcprobe.edge.precision.upcast_layerwise``); None: the model's dtypes.
        attention_block: run attention blockwise with this many keys per block
            (``funcprobe.forward.attention_impl.blockwise_attention``); None: the model's own.
        mlp_chunk: run the model's MLP blocks on at most this many tokens per call
            (``funcprobe.edge.token_chunks``; for forward-mode passes); None: all at once.

    Raises:
        RuntimeError: the model's parameters are inference tensors (created under
            ``torch.inference_mode()``): no transform can differentiate them.
    """
    module = registry.module
    if keep_dropout and module.training and _gradient_checkpointing(module):
        raise SettingsError(
            "keep_dropout: the model is in train mode with gradient checkpointing, whose saved-tensor hooks "
            "torch.func does not support; use keep_dropout=False (the probe's forwards then run in eval mode, "
            "without checkpointing) or disable gradient checkpointing"
        )
    if any(t.is_inference() for t in registry.trainable.values()):
        raise RuntimeError(
            "model: its parameters were created under torch.inference_mode() and cannot be "
            "differentiated; build or load the model outside inference_mode"
        )
    modes = [(m, m.training) for m in module.modules()]
    try:
        with torch.inference_mode(False), adapter_activated(module, registry.adapter), probe_attention(module), \
                blockwise_attention(module, attention_block), _input_require_grads_suspended(module), \
                _mixed_precision_forward_suspended(module), upcast_layerwise(module, dtype):
            if not keep_dropout:
                module.eval()
            with chunked_mlps(module, mlp_chunk):
                yield
    finally:
        for m, training in modes:
            if m.training != training:
                m.train(training)


@contextlib.contextmanager
def _mixed_precision_forward_suspended(module: torch.nn.Module) -> Iterator[None]:
    """Run the body with the module's own ``forward`` instead of accelerate's mixed-precision
    wrapper (``accelerator.prepare`` with ``mixed_precision="bf16"/"fp16"`` replaces
    ``model.forward`` by an autocast + ``convert_outputs_to_fp32`` wrapper and keeps the
    original as ``model._original_forward``); the wrapper is put back afterwards.

    The probe's forwards then compute in the weights' own dtype: under the wrapper,
    ``torch.func.grad`` fails inside autocast ("expected scalar type Float but found
    BFloat16", torch 2.13 CPU).
    """
    original = module.__dict__.get("_original_forward")
    wrapper = module.__dict__.get("forward")
    if original is None or wrapper is None:
        yield
        return
    module.forward = original
    try:
        yield
    finally:
        module.forward = wrapper


def _gradient_checkpointing(module: torch.nn.Module) -> bool:
    """Whether HF gradient checkpointing is on anywhere in the model."""
    return any(bool(getattr(m, "gradient_checkpointing", False)) for m in module.modules())


#: forward hooks that call ``output.requires_grad_(True)`` (transformers' and peft's names)
_REQUIRE_GRADS_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def _input_require_grads_suspended(module: torch.nn.Module) -> Iterator[None]:
    """Take the ``enable_input_require_grads`` forward hooks out for the body, then put back
    exactly the same hooks in the same order.

    PEFT + gradient checkpointing (TRL's default) register a forward hook on the input
    embeddings that calls ``output.requires_grad_(True)``, which ``torch.func`` transforms
    refuse; the probe differentiates through ``functional_call`` and needs no such hook.
    (Repeated ``enable_input_require_grads`` calls leave hooks that no handle tracks, so
    the hooks are found by name on the modules themselves.)
    """
    saved = []
    for m in module.modules():
        hooks = m._forward_hooks
        if any(getattr(fn, "__name__", "") in _REQUIRE_GRADS_HOOKS for fn in hooks.values()):
            saved.append((m, hooks.copy()))
            for key in [k for k, fn in hooks.items() if getattr(fn, "__name__", "") in _REQUIRE_GRADS_HOOKS]:
                del hooks[key]
    try:
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)


def as_normal_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or a normal copy when it is an inference tensor.

    Tensors created under ``torch.inference_mode()`` cannot be saved for backward;
    copying them under ``inference_mode(False)`` makes the result identical to a call
    made outside inference mode.
    """
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def as_normal_batch(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    """``batch`` on ``device`` with any inference tensors copied to normal ones."""
    return batch.to(device).with_tensors(as_normal_tensor)
