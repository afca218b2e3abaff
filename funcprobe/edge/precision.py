"""The precision policy: bf16/fp16 models are probed in float32, layer by layer, untouched.

Computed in bf16, the probe's own numbers (tangents, log-softmax, the directional
derivative) lose too much to bf16's 8 bits of mantissa: on GPT-2, Qwen2 and Llama configs
s came out 2.0-2.7% off the float32 answer of the same weights (``tests/test_precision.py``),
and on SmolLM2-135M + LoRA the mean s 4.9-7.5% off (the measurement in issue 10). ``precision="auto"`` (the default) therefore computes the probe's forwards in
float32 whenever the model holds bf16 or fp16 parameters:

* the probed parameters θ (LoRA-sized) are upcast once: the primal and the tangent of
  every transform are float32 (``primal``);
* every other weight is upcast on the fly, one module at a time, by a forward pre-hook
  that swaps the module's low-precision parameters and buffers for float32 copies (and
  upcasts its floating inputs) and a forward hook that swaps them back
  (``upcast_layerwise``), so no float32 copy of the whole model is ever held for a
  forward-mode pass; PEFT's own input casting is switched off meanwhile
  (``peft.helpers.disable_input_dtype_casting``).

The model, its parameters and its hooks are exactly as before afterwards (the hooks are
removed even on error). ``precision="model"`` computes in the model's own dtypes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..core.pytree import ParamTree
from .registry import ParamRegistry

LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(registry: ParamRegistry, precision: str) -> torch.dtype | None:
    """float32 for ``precision="float32"``, or for ``"auto"`` when any parameter of the model
    is bf16/fp16; None (the model's own dtypes) otherwise."""
    if precision == "model" or not registry.sharding.upcasts:  # FSDP2: the dtypes FSDP gathers in
        return None
    if precision == "float32":
        return torch.float32
    tensors = list(registry.trainable.values()) + list(registry.frozen.values())
    return torch.float32 if any(t.dtype in LOW_PRECISION for t in tensors) else None


def primal(registry: ParamRegistry, dtype: torch.dtype | None) -> ParamTree:
    """θ for the transforms: the registry's tensors, upcast to ``dtype`` where lower."""
    if dtype is None:
        return registry.trainable
    return {n: _up(t, dtype) for n, t in registry.trainable.items()}


def _up(t: Any, dtype: torch.dtype) -> Any:
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype in LOW_PRECISION:
        return t.to(dtype)
    return t


@contextlib.contextmanager
def upcast_layerwise(module: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Forward hooks that run every module holding low-precision tensors in ``dtype``."""
    if dtype is None:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    handles = []
    for m in module.modules():
        own = [n for n, t in list(m._parameters.items()) + list(m._buffers.items())
               if isinstance(t, Tensor) and t.dtype in LOW_PRECISION]
        if not own:
            continue
        handles.append(m.register_forward_pre_hook(_pre_hook(own, dtype), with_kwargs=True))
        handles.append(m.register_forward_hook(_post_hook(), always_call=True))
    try:
        with disable_input_dtype_casting(module):
            yield
    finally:
        for h in handles:
            h.remove()


def _pre_hook(names: list[str], dtype: torch.dtype):
    def hook(m: nn.Module, args: tuple, kwargs: dict):
        saved = {}
        for n in names:
            table = m._parameters if n in m._parameters else m._buffers
            t = table[n]
            if isinstance(t, Tensor) and t.dtype in LOW_PRECISION:
                saved[n] = t
                table[n] = t.to(dtype)
        m.__dict__.setdefault("_funcprobe_saved", []).append(saved)
        return tuple(_up(a, dtype) for a in args), {k: _up(v, dtype) for k, v in kwargs.items()}

    return hook


def _post_hook():
    def hook(m: nn.Module, args: tuple, output: Any):
        stack = m.__dict__.get("_funcprobe_saved")
        if not stack:
            return None
        for n, t in stack.pop().items():
            (m._parameters if n in m._parameters else m._buffers)[n] = t
        if not stack:
            del m.__dict__["_funcprobe_saved"]
        return None

    return hook
