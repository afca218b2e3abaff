"""How a model's parameters are read, installed and iterated: replica or FSDP2, one strategy.

Every probe pass asks the same five things of the model, and the answer depends only on
how its parameters are held:

* ``parameters(module, names)``: θ (the probed tensors) and the frozen rest, in full;
* ``read(t)``: the full value of a tensor the trainer holds (``.grad``, optimizer state);
* ``logprob_fn(module, frozen, per_token)``: the pure S(θ, batch) handed to the core;
* ``token_stats_fn(module, frozen)``: the effects pass's per-token statistics along a tangent;
* ``chunks(batch, chunk_size, comm)``: the chunks a pass runs, as ``(batch, keep)`` pairs.

``Replica`` is an ordinary module (one process, DDP, DataParallel, ``torch.compile``):
θ is a set of detached views, S runs through ``torch.func.functional_call``, each rank runs
the chunks of its own shard. ``FSDP2`` is a ``fully_shard`` model (``funcprobe.edge.fsdp``):
θ is gathered in full, the frozen base stays sharded and FSDP gathers it layer by layer in
each forward, θ is installed by hooks around the model's own forward, and since every
forward (and backward) is a collective, every rank runs the same number of chunks: the
most of any rank, a rank short of it running extra chunks on a one-prompt stand-in batch
whose results are dropped (``keep`` False). The core's transforms only see the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..core.logprobs import logprob_function
from ..core.token_stats import token_stats
from ..core.rollouts import RolloutBatch
from ..core.transforms import chunk_count, chunked
from .distributed import Communicator
from ..errors import SettingsError, UnsupportedModelError
from .fsdp import full_parameters, full_tensor, sharded_logprob_function, sharded_token_stats_function

#: (θ, batch) ↦ [B, G] (or [B, G, T] per token)
LogprobFn = Callable[[dict[str, Tensor], RolloutBatch], Tensor]
#: (θ, tangent, batch) ↦ [B, G, T, 5] (``funcprobe.core.token_stats.TOKEN_STATS``)
TokenStatsFn = Callable[[dict[str, Tensor], dict[str, Tensor], RolloutBatch], Tensor]
#: wraps the iterable of real chunks (a progress bar); ``wrap(chunks, count)``
ChunkWrapper = Callable[[Iterable, int], Iterable]


def no_progress(chunks: Iterable, count: int) -> Iterable:
    """The ``ChunkWrapper`` that shows nothing."""
    return chunks


@dataclass(frozen=True)
class Replica:
    """Every rank holds the whole model: detached views, ``functional_call``, own chunks."""

    name = "replica"
    #: whether each forward involves every rank (then no rank may skip one)
    collective_forwards = False
    #: whether the precision policy may upcast low-precision layers on the fly
    upcasts = True
    #: whether a pass holds whole logits of its chunk (here the head split keeps them chunked)
    whole_logits = False

    def check_mode(self, mode: str) -> None:
        """Every mode runs on a replica."""

    def parameters(self, module: nn.Module, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(trainable, frozen)`` name→tensor, detached views of the live parameters."""
        named = dict(module.named_parameters())
        trainable = {n: named[n].detach() for n in names}
        frozen = {n: p.detach() for n, p in named.items() if n not in trainable}
        return trainable, frozen

    def read(self, t: Tensor) -> Tensor:
        return t

    def logprob_fn(self, module: nn.Module, frozen: dict[str, Tensor], *, per_token: bool) -> LogprobFn:
        return logprob_function(module, frozen, per_token=per_token)

    def token_stats_fn(self, module: nn.Module, frozen: dict[str, Tensor]) -> TokenStatsFn:
        """``funcprobe.core.token_stats`` closed over the module and the frozen rest (head split)."""
        return lambda theta, tangent, batch: token_stats(module, frozen, theta, tangent, batch)

    def chunks(self, batch: RolloutBatch, chunk_size: int, comm: Communicator,
               wrap: ChunkWrapper = no_progress) -> Iterator[tuple[RolloutBatch, bool]]:
        """This rank's chunks of ``batch``, in order, all kept."""
        yield from wrap(chunked(batch, chunk_size), chunk_count(batch, chunk_size))


@dataclass(frozen=True)
class FSDP2:
    """A ``fully_shard`` model: θ gathered in full, the base sharded, equal chunk counts."""

    name = "fsdp2"
    collective_forwards = True
    #: the forwards compute in the dtypes FSDP gathers in (its ``MixedPrecisionPolicy``)
    upcasts = False
    #: every pass runs the model's own forward to whole logits of the response columns
    whole_logits = True

    def check_mode(self, mode: str) -> None:
        """Refuse ``mode="vjp"``: ``torch.func``'s reverse transforms see the all-gathered
        parameters, not the probe's (``SettingsError`` naming ``mode``)."""
        if mode == "vjp":
            raise SettingsError("mode: 'vjp' (reverse over reverse) does not run through FSDP2's hooks (torch.func's "
                                "reverse transforms see the all-gathered parameters, not the probe's); use mode='jvp'")

    def parameters(self, module: nn.Module, names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(θ in full on every rank, {})``: a collective, called by every rank in the same
        order; the frozen base is left to FSDP."""
        return full_parameters(module, names), {}

    def read(self, t: Tensor) -> Tensor:
        """The full value of a DTensor (a collective), or ``t`` itself."""
        return full_tensor(t)

    def logprob_fn(self, module: nn.Module, frozen: dict[str, Tensor], *, per_token: bool) -> LogprobFn:
        return sharded_logprob_function(module, per_token=per_token)

    def token_stats_fn(self, module: nn.Module, frozen: dict[str, Tensor]) -> TokenStatsFn:
        """The model's whole forward under one JVP, θ installed by hooks (``frozen`` is empty)."""
        return sharded_token_stats_function(module)

    def chunks(self, batch: RolloutBatch, chunk_size: int, comm: Communicator,
               wrap: ChunkWrapper = no_progress) -> Iterator[tuple[RolloutBatch, bool]]:
        """This rank's chunks, then dropped chunks on a stand-in batch up to the most chunks
        of any rank (an all-reduce: called by every rank together)."""
        own = chunk_count(batch, chunk_size)
        most = comm.max_int(own)
        yield from wrap(chunked(batch, chunk_size), own)
        for _ in range(own, most):
            yield stand_in(batch.group_size, batch.input_ids.device), False


def stand_in(group_size: int, device: torch.device) -> RolloutBatch:
    """One prompt of token id 0 with G one-token responses of id 0, zero advantages, Lmax 1:
    the input of the forwards a rank runs only to take part in FSDP2's collectives."""
    ids = torch.zeros((1, group_size, 2), dtype=torch.long, device=device)
    return RolloutBatch(ids, torch.ones_like(ids), 1, torch.zeros((1, group_size), dtype=torch.float64,
                                                                    device=device), 1.0)


Sharding = Replica | FSDP2


def sharding_of(module: nn.Module) -> Sharding:
    """``FSDP2()`` when ``fully_shard`` was applied anywhere in ``module``, else ``Replica()``
    (FSDP1 and DeepSpeed ZeRO-3 are refused before, by ``refuse_unsupported_sharding`` in
    ``funcprobe.edge.registry.unwrap_model``)."""
    return FSDP2() if is_fsdp2(module) else Replica()


def is_fsdp2(module: nn.Module) -> bool:
    """True when ``fully_shard`` was applied anywhere in ``module`` (or it holds DTensor parameters)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        isinstance(p, DTensor) for p in module.parameters())


def refuse_unsupported_sharding(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` for FSDP1 and DeepSpeed ZeRO-3 models, with the reason.

    FSDP1 flattens each unit's parameters into one ``FlatParameter`` and re-creates the
    original parameters as views of it at every forward, so there is no per-name slot to
    put θ in; ZeRO-3 gathers partitioned parameters inside its own autograd Functions,
    which ``torch.func`` transforms cannot run through. ZeRO stages 1–2 keep full
    parameters (an ordinary module, as under DDP; not tested here).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise UnsupportedModelError(
            "model: FSDP1 (FullyShardedDataParallel) is not supported: it flattens each unit's parameters into one "
            "FlatParameter and rebuilds them as views at every forward, so the probe has no parameter slot to put "
            "its tensors in. Use FSDP2 (torch.distributed.fsdp.fully_shard; verl: actor strategy 'fsdp2', "
            "accelerate: fsdp_version 2), which the probe supports, or gather a full state dict into an unsharded "
            "replica and probe that"
        )
    if any(hasattr(p, "ds_id") and getattr(p, "ds_status", None) is not None for p in model.parameters()):
        raise UnsupportedModelError(
            "model: DeepSpeed ZeRO-3 is not supported: it gathers partitioned parameters inside its own autograd "
            "Functions, which torch.func's forward-mode transforms cannot run through. ZeRO stages 1-2 hold full "
            "parameters and work like DDP; for stage 3, gather a full state dict into an unsharded replica"
        )

