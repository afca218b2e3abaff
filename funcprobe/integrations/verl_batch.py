"""E = U for the verl plug-in: the rows of one actor mini-batch, regrouped by prompt (``uid``)
over the data-parallel group, as a ``RolloutBatch`` per rank.

verl hands each rank a TensorDict of rows (one response each): ``input_ids`` (a jagged nested
tensor of each row's attended tokens, or ``[N, P + R]`` padded), ``attention_mask`` ``[N, P + R]``
(prompts left-padded to P, responses right-padded to R), ``response_mask`` ``[N, R]``,
``advantages`` ``[N, R]``, ``uid`` (the prompt of each row) and, from verl's trainer,
``token_level_scores`` ``[N, R]`` (the reward function's score, summed over a row: verl's
``critic/score``). ``trainer.balance_batch`` reorders
rows across ranks and mini-batches cut the batch, so one rank may hold part of a prompt's group:
every rank's rows are gathered, grouped by ``uid`` in the order of first appearance (rank 0's rows
first), and the B groups are dealt to the W ranks in contiguous blocks (rank r gets prompts
``r·B//W .. (r+1)·B//W − 1``). Every rank computes the same grouping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..core.rollouts import RolloutBatch
from ..edge.progress import log


class BatchRefused(ValueError):
    """The mini-batch cannot be probed as it is (named reason); the step goes on unprobed."""


@dataclass(frozen=True)
class Rows:
    """One rank's rows, padded: ``ids``/``mask`` ``[N, P + R]``, ``advantage`` ``[N]`` float64
    (one per response), ``uid`` (N hashable prompt ids), ``response_start`` P, ``score`` ``[N]``
    float64 (each response's summed ``token_level_scores``; None where the batch has none)."""

    ids: torch.Tensor
    mask: torch.Tensor
    advantage: torch.Tensor
    uid: list
    response_start: int
    score: torch.Tensor | None = None


def local_rows(data: Any) -> Rows:
    """This rank's rows of verl's mini-batch TensorDict ``data`` (see the module docstring).

    Raises:
        BatchRefused: naming the field: a missing ``attention_mask``/``response_mask``/
            ``advantages``/``uid``, a ``response_mask`` that is not the attended response tokens
            (holes: multi-turn tool tokens that are attended but not trained), or advantages that
            vary along a response (token-level advantages: funcprobe models one per response).
    """
    for key in ("input_ids", "attention_mask", "response_mask", "advantages", "uid"):
        if key not in data.keys():
            raise BatchRefused(f"{key}: the mini-batch has no {key!r} (needed to rebuild the rollouts)")
    mask = data["attention_mask"].detach().cpu().long()
    response_mask = data["response_mask"].detach().cpu().long()
    N, R = response_mask.shape
    if mask.dim() != 2 or mask.shape[0] != N or mask.shape[1] <= R:
        raise BatchRefused(f"attention_mask: expected [N, P + R] with N = {N}, R = {R}, got {tuple(mask.shape)}")
    P = mask.shape[1] - R
    if not torch.equal(mask[:, P:], response_mask):
        rows = (mask[:, P:] != response_mask).any(1).nonzero().flatten().tolist()
        raise BatchRefused(f"response_mask: differs from the attended response tokens in {len(rows)} row(s) (e.g. "
                           f"{rows[:4]}): holes (multi-turn tool tokens) are not supported")
    input_ids = data["input_ids"]
    ids = torch.zeros(N, P + R, dtype=torch.long)
    if getattr(input_ids, "is_nested", False):
        values = input_ids.values().detach().cpu().long()
        if values.numel() != int(mask.sum()):
            raise BatchRefused(f"input_ids: {values.numel()} packed tokens, but attention_mask has {int(mask.sum())}")
        ids[mask.bool()] = values
    else:
        ids = torch.where(mask.bool(), input_ids.detach().cpu().long(), 0)
    adv = data["advantages"].detach().cpu().double()
    token_adv = torch.where(response_mask.bool(), adv, torch.nan)
    first = token_adv.nanmean(1) if N else torch.zeros(0, dtype=torch.float64)
    varying = (response_mask.bool() & (adv != first[:, None])).any(1)
    if bool(varying.any()):
        raise BatchRefused(f"advantages: vary along the response in {int(varying.sum())} row(s) (token-level "
                           "advantages, e.g. GAE); funcprobe models one advantage per response (GRPO-style)")
    score = None
    if "token_level_scores" in data.keys():
        scores = data["token_level_scores"].detach().cpu().double()
        if tuple(scores.shape) != (N, R):
            raise BatchRefused(f"token_level_scores: expected [N, R] = [{N}, {R}], got {tuple(scores.shape)}")
        score = torch.where(response_mask.bool(), scores, 0.0).sum(1)
        if not bool(torch.isfinite(score).all()):
            raise BatchRefused("token_level_scores: non-finite scores")
    return Rows(ids, mask, first, list(data["uid"]), P, score)


def gather_rows(rows: Rows | BatchRefused, group: Any) -> list[Rows]:
    """Every rank's ``Rows`` in rank order (``[rows]`` without a process group or with one rank).
    ``rows`` may be this rank's refusal: it is gathered like rows, so every rank raises it.

    Raises:
        BatchRefused: a rank's refusal, naming the rank.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        out: list = [rows]
    else:
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, rows if isinstance(rows, Rows) else str(rows), group=group)
    for rank, r in enumerate(out):
        if not isinstance(r, Rows):
            raise BatchRefused(f"rank {rank}: {r}")
    return out


def regroup(all_rows: list[Rows], rank: int, world: int,
            max_len: float | None) -> tuple[RolloutBatch, int, torch.Tensor | None]:
    """This rank's share of the prompt groups of ``all_rows`` (every rank's rows, rank order) as a
    ``RolloutBatch`` (``max_len``: Lmax of the dr_grpo weighting, or None), B, the number of
    prompts over all ranks, and the share's scores ``[B_local, G]`` float64 (None unless every
    rank's rows have them).

    Raises:
        BatchRefused: ranks with different prompt/response widths, prompt groups of unequal
            size (a group cut by the mini-batch split: named by uid), or groups of one response.
    """
    widths = {(r.response_start, r.ids.shape[1]) for r in all_rows}
    if len(widths) != 1:
        raise BatchRefused(f"attention_mask: ranks hold different (prompt, total) widths {sorted(widths)}")
    ids = torch.cat([r.ids for r in all_rows])
    mask = torch.cat([r.mask for r in all_rows])
    adv = torch.cat([r.advantage for r in all_rows])
    uids = [u for r in all_rows for u in r.uid]
    order: dict = {}
    for i, u in enumerate(uids):
        order.setdefault(u, []).append(i)
    sizes = {u: len(ix) for u, ix in order.items()}
    G = max(sizes.values()) if sizes else 0
    short = [(u, n) for u, n in sizes.items() if n != G]
    if short:
        u, n = short[0]
        raise BatchRefused(f"uid: {len(short)} prompt group(s) of this mini-batch are incomplete (e.g. uid {u!r}: {n} "
                           f"of {G} responses), cut by the mini-batch split, trainer.balance_batch or actor.shuffle; "
                           "one mini-batch per update keeps whole groups (ppo_mini_batch_size = data.train_batch_size)")
    if G < 2:
        raise BatchRefused(f"uid: groups of {G} response(s); the leave-one-out estimate needs G >= 2 per prompt")
    B = len(order)
    groups = list(order.values())[rank * B // world:(rank + 1) * B // world]
    P = all_rows[0].response_start
    scored = all(r.score is not None for r in all_rows)
    if not scored and any(r.score is not None for r in all_rows):
        log.warning("funcprobe: token_level_scores: only some ranks' rows have them; the reward effect is left out")
    score = torch.cat([r.score for r in all_rows]) if scored else None
    if not groups:
        empty = torch.zeros((0, G), dtype=torch.float64) if scored else None
        return RolloutBatch.empty(G, advantages=True, max_len=max_len), B, empty
    index = torch.tensor(groups)
    return RolloutBatch(ids[index], mask[index], P, adv[index], max_len), B, None if score is None else score[index]
