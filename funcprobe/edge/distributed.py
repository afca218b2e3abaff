"""Data-parallel probing on ``torch.distributed``: one answer from shards of E and U.

Each rank holds its own shard of E and U (uneven, possibly empty). Collectives:

* μY: the local *sum* over U-prompts of ∇θ J and the local prompt count are all-reduced
  before dividing and preconditioning, so every rank holds the identical global μY;
* statistics: Σs, Σs², B (plus the counts of non-finite and non-zero s, so that every
  rank raises the same error) are all-reduced in float64 (docs/seeds/001 §D);
* optionally, the per-prompt s of all ranks are gathered to every rank.

Every error that depends on data of several ranks is decided after a collective, so all
ranks raise it together instead of some of them waiting forever. A handshake first
checks that all ranks probe the same parameter registry (names and sizes) with the
same settings. On FSDP2 every probe forward is a collective too: ``Communicator.max_int``
of the local chunk counts gives every rank the same number of them (``funcprobe.edge.sharding.FSDP2.chunks``).

``Communicator`` bundles these for one group, and is a no-op without one, so the
library's orchestration (``funcprobe.api``) reads the same with and without ranks.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch import distributed as dist

from ..core.pytree import ParamTree
from ..errors import RankMismatchError


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

    Raises ``RankMismatchError`` (a ``RuntimeError``) on every rank together when they differ.
    """
    key = float(zlib.crc32("\n".join(names).encode()))
    local = torch.tensor([key, float(len(names)), float(numel), *map(float, settings)], dtype=torch.float64)
    dev = collective_device(group, torch.device("cpu"))
    lo, hi = local.to(dev), local.clone().to(dev)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        what = ["parameter names", "number of parameters", "parameter sizes"]
        bad = [what[i] if i < 3 else "settings (lr / step / weighting / mode)" for i in range(len(local))
               if bool(lo[i] != hi[i])]
        raise RankMismatchError(
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


def all_reduce_float64(values: Sequence[float], group: object, op: object = None) -> list[float]:
    """Σ (or ``op``, e.g. ``dist.ReduceOp.MAX``) over ranks of a few float64 scalars."""
    t = torch.tensor(list(values), dtype=torch.float64, device=collective_device(group, torch.device("cpu")))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
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


@contextlib.contextmanager
def checked_together(comm: "Communicator") -> Iterator[None]:
    """Run local checks; every rank passes together or every rank raises (``Communicator.agree``)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised by agree on this rank
        comm.agree(err)
        raise
    comm.agree(None)


@dataclass(frozen=True)
class Communicator:
    """The collectives of one probe call over ``group``; identity operations when None."""

    group: object | None = None

    @classmethod
    def for_group(cls, process_group: object | None) -> "Communicator":
        """``Communicator(resolve_group(process_group))``."""
        return cls(resolve_group(process_group))

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def handshake(self, names: Sequence[str], numel: int, settings: Sequence[float]) -> None:
        if self.group is not None:
            handshake(self.group, names, numel, settings)

    def sum_tree(self, tree: Mapping[str, Tensor]) -> ParamTree:
        return all_reduce_sum_tree(tree, self.group) if self.group is not None else dict(tree)

    def agree(self, error: BaseException | None) -> None:
        """Tell the other ranks whether this rank's checks passed; raise if any rank's failed.

        A rank with ``error`` re-raises it (after telling the others); a rank whose checks
        passed raises ``RankMismatchError`` naming how many ranks failed. So a bad input on
        one rank stops every rank with a message, before any collective that would
        otherwise wait for it until the process group's timeout.
        """
        (failed,) = self.sum_floats([0.0 if error is None else 1.0])
        if error is not None:
            raise error
        if failed > 0:
            raise RankMismatchError(
                f"process_group: {int(failed)} other rank(s) refused their inputs (see their error); this rank "
                "stops too instead of waiting for them in a collective"
            )

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if self.group is None:
            return int(value)
        return int(all_reduce_float64([float(value)], self.group, dist.ReduceOp.MAX)[0])

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        return all_reduce_float64(values, self.group) if self.group is not None else [float(v) for v in values]

    def gather(self, s: Tensor) -> Tensor:
        return all_gather_varlen(s, self.group) if self.group is not None else s
