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

Failures on some ranks only (docs/sharding.md#rank-failures). Every collective of a
``Communicator`` is an agreement point: it starts with a status exchange (one all-reduce of
a flag, the same on every rank whatever the collective), and a rank whose probe failed
since the last such point takes part in the next one with its flag up instead of running
on to its trainer's collectives. So all ranks learn of the failure at the same point
and raise together (``failing_together``): each its own error where every rank failed
alike, else ``ProbeRankError`` naming the failing ranks and their causes (all-gathered).
Only the probe's collectives pass through here; on FSDP2 the model's forwards, backwards
and full-tensor reads are FSDP's own collectives, which cannot carry a flag. A rank that
fails after one of those since the last agreement point (inside a forward, above all:
FSDP's state is then left mid-forward) cannot be agreed with; it raises
``ProbeRankError(agreed=False)`` at once, and the other ranks stop when their pending
collective fails. The process group's sequence numbers tell the two cases apart.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch import distributed as dist

from ..core.pytree import ParamTree
from ..errors import ProbeRankError, RankMismatchError


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


@contextlib.contextmanager
def failing_together(comm: "Communicator", module: nn.Module | None = None) -> Iterator[None]:
    """Run a part of the probe that communicates; every rank leaves it together.

    On success every rank passes a last agreement point on the way out, so a rank that
    failed after the block's last collective is heard before anyone's next collective.
    On a failure, ``Communicator.settle`` decides with the other ranks (see there).
    ``module``: the probed model, whose FSDP2 device meshes' groups are watched too (their
    collectives cannot be agreed on). Blocks nest (the outermost one clears the watch).
    """
    if comm.group is None:
        yield
        return
    _WATCH.enter([comm.group], sharded_groups(module))
    try:
        try:
            yield
        except Exception as err:  # noqa: BLE001 - settle raises on this rank, this error or ProbeRankError
            comm.settle(err)
            raise
        comm.settle(None)
    finally:
        _WATCH.leave()


def sharded_groups(module: nn.Module | None) -> list[object]:
    """The process groups of the device meshes of ``module``'s DTensor (FSDP2) parameters."""
    if module is None:
        return []
    from torch.distributed.tensor import DTensor

    meshes = {id(p.device_mesh): p.device_mesh for p in module.parameters() if isinstance(p, DTensor)}
    return [g for mesh in meshes.values() for g in mesh.get_all_groups()]


class _Watch:
    """The sequence numbers of the watched groups at this rank's last agreement point.

    A group's sequence number (``ProcessGroup._get_sequence_number_for_group``, kept by gloo
    and NCCL) counts the collectives this rank issued on it; when it moved since the last
    agreement point, this rank ran a collective that was no agreement point (FSDP's).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.seq: dict[object, int | None] = {}

    def enter(self, groups: Iterable[object], sharded: Iterable[object]) -> None:
        """Watch ``groups`` where their backend counts, and ``sharded`` (an FSDP2 model's) always:
        one without a count makes every failure one that cannot be agreed on."""
        self.depth += 1
        for g in groups:
            if _sequence(g) is not None:
                self.seq[g] = _sequence(g)
        for g in sharded:
            self.seq[g] = _sequence(g)

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.seq.clear()

    def agreed(self) -> None:
        """An agreement point has just passed on this rank."""
        for g in self.seq:
            self.seq[g] = _sequence(g)

    def moved(self) -> bool:
        """Whether this rank issued a collective since its last agreement point (or cannot tell)."""
        return any(last is None or _sequence(g) != last for g, last in self.seq.items())


def _sequence(group: object) -> int | None:
    try:
        return int(group._get_sequence_number_for_group())
    except Exception:  # noqa: BLE001 - a backend without sequence numbers: unknown
        return None


_WATCH = _Watch()
#: the third entry of every status exchange (exact in float64 summed over any number of ranks):
#: a sum that is not world × it means the exchange met a collective of another kind
_MAGIC = 2718.28125


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 400 else text[:397] + "..."


def _settled(err: BaseException) -> bool:
    return bool(getattr(err, "_funcprobe_settled", False))


def _settle_mark(err: BaseException) -> BaseException:
    try:
        err._funcprobe_settled = True
    except AttributeError:  # an exception type without a __dict__: it is decided again, harmlessly
        pass
    return err


def _collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (a dead peer, a timeout): no more collectives then."""
    text = str(err)
    return isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text


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
            self.checkpoint()
            self._run(handshake, self.group, names, numel, settings)

    def sum_tree(self, tree: Mapping[str, Tensor]) -> ParamTree:
        if self.group is None:
            return dict(tree)
        self.checkpoint()
        return self._run(all_reduce_sum_tree, tree, self.group)

    def agree(self, error: BaseException | None) -> None:
        """Tell the other ranks whether this rank's checks passed; raise if any rank's failed.

        A rank with ``error`` re-raises it (after telling the others); a rank whose checks
        passed raises ``RankMismatchError`` naming the ranks that failed and why. So a bad
        input on one rank stops every rank with a message, before any collective that would
        otherwise wait for it until the process group's timeout.
        """
        self.settle(error, inputs=True)

    def checkpoint(self) -> None:
        """An agreement point: returns on every rank, or raises on every rank where any
        rank's probe failed since the last one (``settle``)."""
        self.settle(None)

    def settle(self, error: BaseException | None, *, inputs: bool = False) -> None:
        """One status exchange of every rank; returns when no rank failed, else raises.

        ``error``: this rank's failure since the last agreement point (None: it passed).
        Where any rank failed, every rank raises here: where every rank failed with the same
        exception type (an error decided after a collective, e.g. ``NonFiniteError``), each
        re-raises its own; where every failing rank refused its input (``inputs``, from
        ``agree``), those re-raise their own and the others raise ``RankMismatchError``; else
        every rank raises ``ProbeRankError`` naming the failing ranks and their causes
        (``agreed=True``; from its own error on a failing rank). An error that was decided
        already is re-raised as it is.

        Raises ``ProbeRankError(agreed=False)`` without agreeing when a collective failed
        (the exchange, or ``error`` itself), or when ``error`` came after a collective that
        was no agreement point (an FSDP2 forward's): the other ranks may be waiting inside
        it, so no exchange can meet them.
        """
        if self.group is None:
            if error is not None:
                raise error
            return
        if error is not None and _settled(error):
            raise error
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        if error is not None and not inputs and _collective_failure(error):
            raise self._failed(error, None) from error
        if error is not None and not inputs and _WATCH.moved():
            raise _settle_mark(ProbeRankError(
                f"funcprobe: the probe failed on rank {rank} of {world} ({_describe(error)}) after a collective of "
                "the sharded model (an FSDP2 forward, backward or full-tensor read), where the ranks cannot agree: "
                "the other ranks may be waiting inside it, and stop when it fails (this process exits) or at the "
                "process group's timeout. The process group can no longer be trusted: stop the job "
                "(docs/sharding.md#rank-failures)",
                ranks=(rank,), causes={rank: _describe(error)}, agreed=False)) from error
        try:
            status = torch.tensor([0.0 if error is None else 1.0, 1.0, _MAGIC], dtype=torch.float64,
                                  device=collective_device(self.group, torch.device("cpu")))
            dist.all_reduce(status, group=self.group)
            failing, present, magic = status.cpu().tolist()
            if present != world or magic != world * _MAGIC:
                raise RuntimeError(f"the status exchange met another collective (sums {present}, {magic})")
            causes: list[tuple[str, bool] | None] = []
            if failing > 0:
                causes = [None] * world
                dist.all_gather_object(causes, None if error is None else (_describe(error), inputs),
                                       group=self.group)
        except Exception as failure:  # noqa: BLE001 - the group itself failed
            raise self._failed(failure, error) from (error if error is not None else failure)
        _WATCH.agreed()
        if not causes:
            return
        failed = {r: c[0] for r, c in enumerate(causes) if c is not None}
        refused = all(c[1] for c in causes if c is not None)  # every failure a refused input
        named = "; ".join(f"rank {r}: {c}" for r, c in failed.items())
        kinds = {c.split(":", 1)[0] for c in failed.values()}
        if error is not None and (refused or (len(failed) == world and len(kinds) == 1)):
            raise _settle_mark(error)
        if refused:
            raise _settle_mark(RankMismatchError(
                f"process_group: {len(failed)} other rank(s) refused their inputs ({named}); this rank stops too "
                "instead of waiting for them in a collective"))
        raise _settle_mark(ProbeRankError(
            f"funcprobe: the probe failed on rank(s) {sorted(failed)} of {world} ({named}); every rank stopped the "
            "probe at the same agreement point, so no collective of it is left pending and the ranks stay in step "
            f"(this is rank {rank})", ranks=tuple(sorted(failed)), causes=failed, agreed=True)) from error

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if self.group is None:
            return int(value)
        self.checkpoint()
        return int(self._run(all_reduce_float64, [float(value)], self.group, dist.ReduceOp.MAX)[0])

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        if self.group is None:
            return [float(v) for v in values]
        values = [float(v) for v in values]
        self.checkpoint()
        return self._run(all_reduce_float64, values, self.group)

    def gather(self, s: Tensor) -> Tensor:
        if self.group is None:
            return s
        self.checkpoint()
        return self._run(all_gather_varlen, s, self.group)

    def _run(self, collective, *args, **kwargs):
        """``collective(*args)`` after an agreement point; a failure of it is a failed collective."""
        try:
            out = collective(*args, **kwargs)
        except RankMismatchError:  # handshake's verdict, the same on every rank
            _WATCH.agreed()
            raise
        except Exception as failure:  # noqa: BLE001 - the group (or its input) failed mid-collective
            raise self._failed(failure, None) from failure
        _WATCH.agreed()
        return out

    def _failed(self, failure: BaseException, error: BaseException | None) -> ProbeRankError:
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        own = f"; this rank's probe had failed before it: {_describe(error)}" if error is not None else ""
        return _settle_mark(ProbeRankError(
            f"funcprobe: a collective failed on rank {rank} of {world} during the probe ({_describe(failure)}){own}. "
            "Another rank died, or failed where the ranks cannot agree (inside a forward of an FSDP2 model: see its "
            "error); the process group can no longer be trusted: stop the job (docs/sharding.md#rank-failures)",
            ranks=(rank,), causes={rank: _describe(error if error is not None else failure)}, agreed=False))
