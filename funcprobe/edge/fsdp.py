"""FSDP2 (``fully_shard``): probe the sharded model itself, no unsharded replica.

FSDP2 keeps PEFT's parameter names (they stay the registry's keys) but holds each
parameter as a ``DTensor`` shard and all-gathers it into the module's parameter slot in a
forward pre-hook of its FSDP unit (``FSDPParam.to_unsharded``), after anything
``torch.func.functional_call`` installed before the forward; forward-mode AD over the
shards themselves fails ("mixed torch.Tensor and DTensor", pytorch issue 182641). So:

* θ (the probed LoRA tensors) is gathered once per call into full tensors on every rank
  (``full_parameters``; LoRA-sized), the frozen base stays sharded and is gathered layer
  by layer by FSDP itself, as in training;
* ``installed(module, θ)`` puts θ into each probed parameter's slot with a forward
  pre-hook on the module that owns it, registered after FSDP's own (so it runs after the
  all-gather), and hands FSDP its own tensor back in a forward hook registered first
  (``prepend=True``: before FSDP reshards). Forward-mode tangents and reverse-mode graphs
  then flow through θ exactly as through ``functional_call``;
* every probe forward is a collective: the ``FSDP2`` strategy of ``funcprobe.edge.sharding``
  gives every rank the same number of forwards (and backwards) whatever its shard of E or U,
  empty shards included;
* the effects pass (``token_stats``) runs the model's whole forward under one JVP with θ
  installed the same way (``sharded_token_stats_function``): the head split of
  ``funcprobe.core.lm_head`` calls the body and the head with ``functional_call``, outside
  FSDP's hooks, where the root unit's head and norm are still shards.

Which models are FSDP2, and the refusal of FSDP1 and DeepSpeed ZeRO-3, are decided in
``funcprobe.edge.sharding``.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Mapping

from torch import Tensor, nn

from ..core.logprobs import response_token_values, sequence_logprobs, token_logprobs
from ..core.rollouts import RolloutBatch
from ..core.token_stats import whole_forward_token_stats


def full_parameters(module: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """``{name: full tensor}`` of the named parameters on every rank (a DTensor is
    all-gathered: a collective, called by every rank in the same order), detached."""
    from torch.distributed.tensor import DTensor

    named = dict(module.named_parameters())
    out = {}
    for n in names:
        p = named[n].detach()
        out[n] = p.full_tensor() if isinstance(p, DTensor) else p
    return out


def full_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or its full value when it is a DTensor (optimizer state, ``.grad``)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def installed(module: nn.Module, theta: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the body, every forward of ``module`` uses ``theta[name]`` for the named
    parameters (cast to the dtype FSDP gathered the slot in, e.g. bf16 under a
    ``MixedPrecisionPolicy``); hooks removed on exit, FSDP's own tensors back in place.

    Raises ``KeyError`` for a name that is not a parameter of ``module``.
    """
    handles = []
    owners = dict(module.named_modules())
    try:
        for name, value in theta.items():
            owner_name, _, pname = name.rpartition(".")
            owner = owners[owner_name]
            if pname not in owner._parameters:
                raise KeyError(f"{name}: not a parameter of the model")
            saved: list[object] = []

            def pre(mod: nn.Module, args: tuple, pname: str = pname, value: Tensor = value,
                    saved: list = saved) -> None:
                current = mod._parameters[pname]
                saved.append(current)
                mod._parameters[pname] = value.to(current.dtype) if current is not None else value

            def post(mod: nn.Module, args: tuple, output: object, pname: str = pname, saved: list = saved) -> None:
                mod._parameters[pname] = saved.pop()

            handles.append(owner.register_forward_pre_hook(pre))  # after FSDP's all-gather (prepend=True)
            handles.append(owner.register_forward_hook(post, prepend=True))  # before FSDP reshards
        yield
    finally:
        for h in handles:
            h.remove()


def sharded_logprob_function(module: nn.Module, *, per_token: bool = False):
    """S(θ, batch) ``[B, G]`` (or the token log-probs ``[B, G, T]``) of an FSDP2 model: the
    model's own forward with θ installed by ``installed``, full logits of the response
    columns (the root unit's LM head is gathered by FSDP's root hooks)."""

    def logprobs(theta: dict, batch: RolloutBatch) -> Tensor:
        with installed(module, theta):
            if per_token:
                return response_token_values(module, {}, batch, token_logprobs, full_logits=True)
            return sequence_logprobs(module, {}, batch, full_logits=True)

    return logprobs


def sharded_token_stats_function(module: nn.Module):
    """``(θ, tangent, batch) ↦ [B, G, T, 5]`` per-token statistics (``funcprobe.core.token_stats``)
    of an FSDP2 model: its own whole forward under one JVP, θ put in place by ``installed``."""
    return partial(whole_forward_token_stats, module, partial(installed, module))
