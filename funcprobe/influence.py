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
* ``matrix=True``: B_E × (one single-prompt backward over E + one JVP pass of U's token
  log-probs), for every s[n, i] and a SE per update prompt, response and token (the
  token work of the JVPs, B_E·B_U·G·T, is the same whichever batch the rows run over;
  rows over E are what give each token's per-prompt contributions).
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
    ShareSpread,
    StepSplit,
    response_coefficients,
    scaled_direction,
    split_step,
    vdot,
)
from .core.objectives import entropy_objective
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
    spread = _per_eval_prompt(run, E, shares_of) if request.matrix else _Spread()
    return EntropyInfluence(
        delta_h=lr * vdot(mu_x, full), se=_se(comm, s_total, lr),
        delta_h_baseline=lr * vdot(mu_x, split.baseline), se_baseline=_se(comm, s_base, lr),
        delta_h_update=update_sum, se_update=_se(comm, s_total - s_base, lr), per_prompt=per_prompt,
        per_response=per_response, per_token=per_token, clip=split.clip, step=step.name, lr=lr,
        num_eval_prompts=int(num_eval), num_update_prompts=count,
        groups={name: shares_of.group(mask) for name, mask in groups.items()}, matrix=spread.matrix,
        per_prompt_se=spread.per_prompt_se, per_response_se=spread.per_response_se,
        per_token_se=spread.per_token_se,
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


@dataclass(frozen=True)
class _Spread:
    """The matrix s[n, i] ``[B_E, B_U]`` and the SEs over E of every prompt's ``[B_U]``,
    response's ``[B_U, G]`` and token's ``[B_U, G, T]`` share (None without the matrix)."""

    matrix: Tensor | None = None
    per_prompt_se: Tensor | None = None
    per_response_se: Tensor | None = None
    per_token_se: Tensor | None = None


def _per_eval_prompt(run: ProbeRun, E: RolloutBatch, shares: _Shares) -> _Spread:
    """Every share's per-prompt contributions over E (one process): per E prompt n, a
    single-prompt backward of LX[n] and one JVP of U's token log-probs along
    scale·q ⊙ ∇LX[n] give x_n[i, g, t] = a[i, g]·d/dε log π(y_{i,g,t}), whose mean over n
    is ``per_token``. Rows s[n, i] = Σ_{g,t} x_n; the token SEs are accumulated
    (``ShareSpread``), the ``[B_E, B_U, G]`` response rows kept."""
    lx = entropy_objective(run.settings.weighting).on_logprobs(run.logprob_fn())
    E, U = run.batch(E), shares.U
    zero = torch.zeros((), dtype=torch.float64)
    tokens = ShareSpread(shares.per_token)
    responses = []
    for n in chunk_progress("funcprobe s[n, i] matrix", run.settings.progress)(range(E.num_prompts),
                                                                             E.num_prompts):
        single = run.gradient(lx, E.select(n, n + 1))
        derivatives = run.token_derivatives(scaled_direction(shares.split, single, shares.scale), U)
        x = torch.where(U.response_mask, shares.a.unsqueeze(-1) * derivatives, zero)
        tokens.add(x)
        responses.append(x.sum(-1))
    per_response = torch.stack(responses)  # [B_E, B_U, G]
    matrix = per_response.sum(-1)
    root_b = E.num_prompts ** 0.5
    return _Spread(matrix=matrix, per_prompt_se=matrix.std(0, correction=1) / root_b,
                   per_response_se=per_response.std(0, correction=1) / root_b, per_token_se=tokens.se())
