"""Entropy influence: which update prompts, responses and tokens drive the predicted δH.

``funcprobe.api.entropy_influence(model, E, U, optimizer=...)`` (and ``EntropyProbe.influence``) split
the predicted entropy change of the next step exactly,

    δH = δH_baseline + Σ_{i∈U} δH_i,   δH_i = Σ_{g,t} δH_{i,g,t},

with δH_baseline = η⟨μX, Δ(0)⟩ (Adam's momentum and weight decay) and
δH_i = η·c/|U|·⟨diag(q)·μX, ∇J_i⟩ (docs/derivations.md#entropy-influence;
``funcprobe.core.influence``). Cost, for E and U of B_E and B_U prompts:

* one backward over U (the mean policy gradient g, as ``update_direction``) and one
  backward over E (μX = mean_n ∇LX[n], chunked: the memory of a training backward of
  one chunk);
* one JVP pass over U (every token's share at once);
* one JVP pass over E along Δ (SE of δH) and one along Δ(0) (SE of the baseline;
  skipped where Δ(0) = 0, e.g. SGD);
* per named group: one backward over U and one JVP pass over E;
* ``matrix=True``: min(B_E, B_U) × (one single-prompt backward + one JVP pass over the
  other batch), for every s[n, i] and a SE per update prompt.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from . import passes
from .core.influence import (
    EntropyInfluence,
    GroupInfluence,
    StepSplit,
    response_coefficients,
    scaled_direction,
    split_step,
    vdot,
)
from .core.objectives import Objective, entropy_objective
from .core.pytree import ParamTree, tree_map, tree_sq_norm
from .core.rollouts import RolloutBatch
from .core.statistics import check_scalars, mean_and_sample_var, scalar_counts
from .core.steps import StepMap
from .core.transforms import summed_gradient
from .edge.distributed import Communicator
from .edge.progress import chunk_progress
from .errors import SettingsError
from .run import ProbeRun


def check_groups(groups: object, U: RolloutBatch) -> dict[str, Tensor]:
    """``groups`` as name → ``[B_U, G, T]`` bool masks of U's response tokens.

    Raises ``SettingsError`` naming ``groups`` for a non-mapping, a non-string name, a
    non-bool tensor or a shape other than ``[B_U, G]`` / ``[B_U, G, T]``.
    """
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise SettingsError(f"groups: expected a dict name -> bool mask, got {type(groups).__name__}")
    B, G, T = U.input_ids.shape
    out = {}
    for name, mask in groups.items():
        if not isinstance(name, str) or not name:
            raise SettingsError(f"groups: names must be non-empty strings, got {name!r}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise SettingsError(f"groups[{name!r}]: expected a bool tensor of shape [{B}, {G}] or [{B}, {G}, {T}], "
                                f"got {type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}")
        if tuple(mask.shape) == (B, G):
            mask = mask.unsqueeze(-1).expand(B, G, T)
        elif tuple(mask.shape) != (B, G, T):
            raise SettingsError(f"groups[{name!r}]: expected shape [{B}, {G}] or [{B}, {G}, {T}] (U's prompts, "
                                f"responses, columns), got {list(mask.shape)}")
        out[name] = mask.to(U.input_ids.device) & U.response_mask
    return out


def check_matrix(matrix: object, comm: Communicator) -> bool:
    """``matrix`` as a bool; refused across ranks (``SettingsError``)."""
    if not isinstance(matrix, bool):
        raise SettingsError(f"matrix: expected True or False, got {matrix!r}")
    if matrix and comm.distributed:
        raise SettingsError("matrix: the evaluation x update matrix is computed in one process only; "
                            "run it without a process group")
    return matrix


@dataclass(frozen=True)
class InfluenceRequest:
    """What an influence split computes besides the per-prompt/response/token shares:
    ``groups`` (name → ``[B_U, G, T]`` bool mask, ``check_groups``) and the ``matrix``
    s[n, i] (``check_matrix``)."""

    groups: Mapping[str, Tensor] = field(default_factory=dict)
    matrix: bool = False


def influence(run: ProbeRun, E: RolloutBatch, U: RolloutBatch, step: StepMap, lr: float,
              request: InfluenceRequest) -> EntropyInfluence:
    """``EntropyProbe.influence`` after its checks: δH split over U's prompts, responses,
    tokens and the request's groups, with SEs over E, and the matrix if requested."""
    registry, comm, groups = run.registry, run.comm, request.groups
    group_key = float(zlib.crc32("\n".join(groups).encode()))  # every rank names the same groups
    comm.handshake(registry.names, registry.numel(),
                   [lr, *run.settings.direction_code(), *run.settings.probe_code(), group_key, float(len(groups))])
    (num_eval,) = comm.sum_floats([float(E.num_prompts)])
    if num_eval < 2:  # identical on every rank: decided after the all-reduce
        raise ValueError(f"E: the conditional variance needs at least 2 prompts (over all ranks), got {int(num_eval)}")
    gradient, count, objective = passes.policy_gradient(run, U)
    full = step(gradient)
    split = split_step(step, gradient)
    scale = lr * split.clip / count

    # μX = mean_n ∇LX[n] over E (all ranks)
    lx = entropy_objective(run.settings.weighting).on_logprobs(run.logprob_fn())
    mu_x = tree_map(lambda t: t / num_eval, comm.sum_tree(run.gradient(lx, E)))

    # every token's share: one JVP of U's token log-probs along η·c/|U|·q ⊙ μX
    U = run.batch(U)
    a = response_coefficients(objective, U, torch.float64)  # [B_U, G]
    shares = run.token_derivatives(scaled_direction(split, mu_x, scale), U, "funcprobe token shares (jvp)")
    per_token = torch.where(U.response_mask, a.unsqueeze(-1) * shares, torch.zeros((), dtype=torch.float64))
    per_response = per_token.sum(-1)
    per_prompt = per_response.sum(-1)

    # the totals and their SEs over E
    s_total = passes.scalars(run, E, full)
    s_base = passes.scalars(run, E, split.baseline) if tree_sq_norm(split.baseline) > 0 else torch.zeros_like(s_total)
    check_scalars(s_total, comm.sum_floats(scalar_counts(s_total)))
    # the means of s are ⟨μX, Δ⟩ and ⟨μX, Δ(0)⟩ up to rounding (tested); the deltas come from μX
    (update_sum,) = comm.sum_floats([float(per_prompt.sum())])
    shares_of = _Shares(run=run, E=E, U=U, a=a, per_token=per_token, split=split, scale=scale)
    matrix = _matrix(run, E, U, objective, shares_of) if request.matrix else None
    return EntropyInfluence(
        delta_h=lr * vdot(mu_x, full), se=_se(comm, s_total, lr),
        delta_h_baseline=lr * vdot(mu_x, split.baseline), se_baseline=_se(comm, s_base, lr),
        delta_h_update=update_sum, se_update=_se(comm, s_total - s_base, lr), per_prompt=per_prompt,
        per_response=per_response, per_token=per_token, clip=split.clip, step=step.name, lr=lr,
        num_eval_prompts=int(num_eval), num_update_prompts=count,
        groups={name: shares_of.group(mask) for name, mask in groups.items()}, matrix=matrix,
        per_prompt_se=None if matrix is None else matrix.std(0, correction=1) / matrix.shape[0] ** 0.5,
    )


def _se(comm: Communicator, s: Tensor, lr: float) -> float:
    """η·sd(s)/sqrt(B) over all ranks' s (B ≥ 2: checked before), float64."""
    total, total_sq, num = comm.sum_floats([float(s.sum()), float((s * s).sum()), float(s.numel())])
    _, sample_var = mean_and_sample_var(total, total_sq, int(num))
    return lr * (sample_var / num) ** 0.5


@dataclass(frozen=True)
class _Shares:
    """What a group's δH_S and SE are computed from: the run, E, U (normalised), the
    response coefficients ``a`` ``[B_U, G]``, every token's share ``[B_U, G, T]``, the split
    step and its scale η·c/|U|."""

    run: ProbeRun
    E: RolloutBatch
    U: RolloutBatch
    a: Tensor
    per_token: Tensor
    split: StepSplit
    scale: float

    def group(self, mask: Tensor) -> GroupInfluence:
        """δH_S = Σ of the group's token shares; SE from s_S[n] = scale·⟨q ⊙ ∇LX[n], ∇J_S⟩ over E."""
        run, comm = self.run, self.run.comm
        weights = torch.where(mask, self.a.unsqueeze(-1), torch.zeros((), dtype=torch.float64))
        gradient = comm.sum_tree(_token_weighted_gradient(run, self.U, weights))
        delta_h, num_tokens = comm.sum_floats([float(self.per_token[mask].sum()), float(mask.sum())])
        if tree_sq_norm(gradient) == 0.0:
            s = torch.zeros(self.E.num_prompts, dtype=torch.float64)
            return GroupInfluence(delta_h=delta_h, se=0.0, s=s, num_tokens=int(num_tokens))
        s = passes.scalars(run, self.E, scaled_direction(self.split, gradient, self.scale))
        return GroupInfluence(delta_h=delta_h, se=_se(comm, s, 1.0), s=s, num_tokens=int(num_tokens))


def _token_weighted_gradient(run: ProbeRun, U: RolloutBatch, weights: Tensor) -> ParamTree:
    """Σ_{n,g,t} weights[n,g,t]·∇ log π(y_{n,g,t}) over this rank's U (chunked backward; a
    chunk of zero weights is skipped where forwards are not collective)."""
    token_fn = run.logprob_fn(per_token=True)
    total = tree_map(lambda t: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)), run.theta)
    start = 0
    with run.session(forward_mode=False):
        for chunk, keep in run.chunks(U, "gradient"):
            stop = start + (chunk.num_prompts if keep else 0)
            w = weights[start:stop] if keep else torch.zeros(chunk.input_ids.shape, dtype=torch.float64)
            start = stop
            if not run.sharding.collective_forwards and not bool((w != 0).any()):
                continue

            def f(t: ParamTree, batch: RolloutBatch, w: Tensor = w) -> Tensor:
                values = token_fn(t, batch)
                return (w.to(device=values.device, dtype=values.dtype) * values).sum((1, 2))

            part = summed_gradient(f)(run.theta, [(chunk, keep)])
            total = {n: total[n] + part[n] for n in total}
    return total


def _matrix(run: ProbeRun, E: RolloutBatch, U: RolloutBatch, objective: Objective, shares: _Shares) -> Tensor:
    """``[B_E, B_U]`` s[n, i] = scale·⟨q ⊙ ∇LX[n], ∇J_i⟩ by min(B_E, B_U) passes (one process)."""
    lx = entropy_objective(run.settings.weighting).on_logprobs(run.logprob_fn())
    j = objective.on_logprobs(run.logprob_fn())
    E, U = run.batch(E), run.batch(U)
    one, other, fn_one, fn_other = (E, U, lx, j) if E.num_prompts <= U.num_prompts else (U, E, j, lx)
    rows = []
    for k in chunk_progress("funcprobe s[n, i] matrix", run.settings.progress)(range(one.num_prompts),
                                                                             one.num_prompts):
        single = run.gradient(fn_one, one.select(k, k + 1))
        rows.append(run.derivatives(fn_other, scaled_direction(shares.split, single, shares.scale), other))
    out = torch.stack(rows)
    return out if one is E else out.T
