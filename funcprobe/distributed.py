"""Data-parallel probing on ``torch.distributed``: one answer from shards of E and U.

Each rank holds its own shard of E and U (uneven, possibly empty). Collectives:

* μY: the local *sum* over U-prompts of ∇θ J and the local prompt count are all-reduced
  before dividing and preconditioning, so every rank holds the identical global μY;
* statistics: Σs, Σs², B (plus the counts of non-finite and non-zero s, so that every
  rank raises the same error) are all-reduced in float64 (seed 001 §D);
* optionally, the per-prompt s of all ranks are gathered to every rank.

Every error that depends on data of several ranks is decided after a collective, so all
ranks raise it together instead of some of them waiting forever. A handshake first
checks that all ranks probe the same parameter registry (names and sizes) with the
same settings. FSDP-sharded models are refused at the entry (``refuse_fsdp``).
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch import distributed as dist

from .pytree import ParamTree


def resolve_group(process_group: object | None) -> object | None:
    """The group to reduce over: ``process_group``, else WORLD when initialised, else None.

    Raises ``RuntimeError`` if a group is passed without an initialised default group,
    ``ValueError`` if this rank is not a member of it.
    """
    if process_group is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group: torch.distributed is not initialised (call init_process_group first)")
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"process_group: this rank ({dist.get_rank()}) is not a member of the group passed")
    return process_group


def collective_device(group: object, fallback: torch.device) -> torch.device:
    """CUDA for NCCL groups (the current device), else the CPU (gloo)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return fallback


def handshake(group: object, names: Sequence[str], numel: int, settings: Sequence[float]) -> None:
    """Check that every rank probes the same registry with the same settings.

    Raises ``RuntimeError`` on every rank (together) when they differ.
    """
    key = float(zlib.crc32("\n".join(names).encode()))
    local = torch.tensor([key, float(len(names)), float(numel), *map(float, settings)], dtype=torch.float64)
    dev = collective_device(group, torch.device("cpu"))
    lo, hi = local.to(dev), local.clone().to(dev)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        what = ["parameter names", "number of parameters", "parameter sizes"]
        bad = [what[i] if i < 3 else "settings (lr / weighting / direction / mode)" for i in range(len(local))
               if bool(lo[i] != hi[i])]
        raise RuntimeError(
            f"process_group: the {dist.get_world_size(group)} ranks disagree on {sorted(set(bad))}; every rank "
            "must call the probe on the same model (same params/adapter selection) with the same settings"
        )


def all_reduce_sum_tree(tree: Mapping[str, Tensor], group: object) -> ParamTree:
    """Σ over ranks of every tensor (one flat buffer, the tree's dtype)."""
    names = list(tree)
    if not names:
        return {}
    ref = tree[names[0]]
    dev = collective_device(group, ref.device)
    flat = torch.cat([tree[n].reshape(-1).to(dev) for n in names])
    dist.all_reduce(flat, group=group)
    out, offset = {}, 0
    for n in names:
        t = tree[n]
        out[n] = flat[offset : offset + t.numel()].reshape(t.shape).to(t.device)
        offset += t.numel()
    return out


def all_reduce_float64(values: Sequence[float], group: object) -> list[float]:
    """Σ over ranks of a few float64 scalars."""
    t = torch.tensor(list(values), dtype=torch.float64, device=collective_device(group, torch.device("cpu")))
    dist.all_reduce(t, group=group)
    return t.cpu().tolist()


def all_gather_varlen(s: Tensor, group: object) -> Tensor:
    """Concatenate every rank's 1-d ``s`` (lengths may differ, zero included), rank order."""
    dev = collective_device(group, s.device)
    n = torch.tensor([s.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    longest = max(int(x) for x in sizes)
    padded = torch.zeros(longest, dtype=torch.float64, device=dev)
    padded[: s.numel()] = s.to(device=dev, dtype=torch.float64)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes)]).to(s.device)


def refuse_fsdp(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` for FSDP (FSDP1 wrapper or FSDP2 ``fully_shard``) models.

    Their parameters are shards (flat parameters or ``DTensor``s) that are all-gathered by
    forward hooks; forward-mode AD and ``functional_call`` over such shards are not
    supported by torch. Probe an unsharded replica instead (see the README).
    """
    sharded = type(model).__name__ in ("FullyShardedDataParallel",) or type(model).__name__.startswith("FSDP")
    if not sharded:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()  # type: ignore[assignment]
        sharded = any(isinstance(p, DTensor) for p in model.parameters()) if DTensor else False
    if sharded:
        raise NotImplementedError(
            "model: FSDP-sharded models are not supported by the probe (forward-mode AD and functional_call "
            "cannot run over FSDP's parameter shards). Gather a full state dict "
            "(torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True))) into an unsharded replica of the model (with its "
            "PEFT adapter) and probe that, each rank with its own shard of E and U and the same process group"
        )
