"""Entropy influence: which update prompts, responses and tokens drive the predicted δH.

``entropy_influence(model, E, U, optimizer=...)`` (and ``EntropyProbe.influence``) split
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
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .api import EntropyProbe, _local_scalars, _mean_policy_gradient, min_chunks
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
from .core.transforms import directional_derivatives, summed_gradient
from .edge.distributed import Communicator
from .edge.memory import chunk_size_for
from .edge.optim import step_map
from .edge.precision import compute_dtype, primal
from .edge.progress import chunk_progress
from .edge.registry import ParamRegistry
from .edge.session import as_normal_batch, session_for
from .errors import SettingsError
from .settings import ProbeSettings


def entropy_influence(model: nn.Module, E: RolloutBatch, U: RolloutBatch, *,
                      optimizer: torch.optim.Optimizer | None = None, lr: float | None = None,
                      groups: Mapping[str, Tensor] | None = None, matrix: bool = False,
                      settings: ProbeSettings | None = None, **options: Any) -> EntropyInfluence:
    """The predicted entropy change of the step on U, split over U's prompts, responses
    and tokens, with E-conditional standard errors.

    Args:
        model: ``nn.Module`` (HF / PEFT, possibly DDP-wrapped).
        E: evaluation rollouts, B_E ≥ 2 prompts (over all ranks).
        U: update rollouts with ``advantages`` ``[B_U, G]``.
        optimizer, lr, settings, **options: as ``EntropyProbe`` (default
            ``step="optimizer_step"``: the Δθ ``optimizer.step()`` takes now).
        groups: name → bool mask over this rank's U, ``[B_U, G]`` (responses) or
            ``[B_U, G, T]`` (tokens; only response tokens count), e.g.
            ``{"correct": rewards > 0}``: each gets δH_S (the sum of its tokens' shares)
            and SE_E.
        matrix: also compute s[n, i] ``[B_E, B_U]`` and a SE per update prompt (one process
            only; cost in the module docstring).

    Returns:
        ``EntropyInfluence``: ``delta_h`` = ``delta_h_baseline`` + ``per_prompt.sum()``
        (nats), ``per_response`` ``[B_U, G]``, ``per_token`` ``[B_U, G, T]``, ``groups``,
        ``matrix``, the SEs.

    Raises:
        SettingsError (``ValueError``): a bad ``groups`` or ``matrix`` (named), and the
            errors of ``EntropyProbe`` and ``EntropyProbe.predict``.
    """
    probe = EntropyProbe(model, optimizer, lr=lr, settings=settings, **options)
    return probe.influence(E, U, groups=groups, matrix=matrix)


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


def influence(registry: ParamRegistry, E: RolloutBatch, U: RolloutBatch, optimizer: torch.optim.Optimizer | None,
              lr: float, settings: ProbeSettings, groups: Mapping[str, Tensor], matrix: bool) -> EntropyInfluence:
    """``EntropyProbe.influence`` after its checks: the registry and settings are resolved,
    ``groups`` checked (``check_groups``)."""
    comm = Communicator.for_group(settings.process_group)
    check_matrix(matrix, comm)
    group_key = float(zlib.crc32("\n".join(groups).encode()))  # every rank names the same groups
    comm.handshake(registry.names, registry.numel(),
                   [lr, *settings.direction_code(), *settings.probe_code(), group_key, float(len(groups))])
    (num_eval,) = comm.sum_floats([float(E.num_prompts)])
    if num_eval < 2:  # identical on every rank: decided after the all-reduce
        raise ValueError(f"E: the conditional variance needs at least 2 prompts (over all ranks), got {int(num_eval)}")
    step = step_map(settings, optimizer, registry)
    gradient, count, objective = _mean_policy_gradient(registry, U, settings, comm)
    full = step(gradient)
    split = split_step(step, gradient)
    scale = lr * split.clip / count
    E = as_normal_batch(E, registry.device)
    U = as_normal_batch(U, registry.device)
    dtype = compute_dtype(registry, settings.precision)
    theta = primal(registry, dtype)

    # μX = mean_n ∇LX[n] over E (all ranks)
    lx = entropy_objective(settings.weighting).on_logprobs(registry.logprob_fn())
    chunk = chunk_size_for(settings, registry, E, "gradient")
    with session_for(registry, settings, dtype, forward_mode=False):
        mu_x = summed_gradient(lx, chunk_size=chunk, min_chunks=min_chunks(registry, comm, E, chunk))(theta, E)
    mu_x = comm.sum_tree(mu_x)
    mu_x = tree_map(lambda t: t / num_eval, mu_x)

    # every token's share: one JVP of U's token log-probs along η·c/|U|·q ⊙ μX
    a = response_coefficients(objective, U, torch.float64)  # [B_U, G]
    shares = _token_derivatives(registry, U, _as_tangent(scaled_direction(split, mu_x, scale), theta), settings,
                                dtype, comm)
    per_token = torch.where(U.response_mask, a.unsqueeze(-1) * shares, torch.zeros((), dtype=torch.float64))
    per_response = per_token.sum(-1)
    per_prompt = per_response.sum(-1)

    # the totals and their SEs over E
    s_total = _local_scalars(registry, E, full, settings, comm)
    s_base = (_local_scalars(registry, E, split.baseline, settings, comm) if tree_sq_norm(split.baseline) > 0
              else torch.zeros_like(s_total))
    check_scalars(s_total, comm.sum_floats(scalar_counts(s_total)))
    # the means of s are ⟨μX, Δ⟩ and ⟨μX, Δ(0)⟩ up to rounding (tested); the deltas come from μX
    se = _se(comm, s_total, lr)
    se_baseline = _se(comm, s_base, lr)
    se_update = _se(comm, s_total - s_base, lr)
    (update_sum,) = comm.sum_floats([float(per_prompt.sum())])
    delta_h = lr * vdot(mu_x, full)
    delta_h_baseline = lr * vdot(mu_x, split.baseline)

    named = {name: _group(registry, E, U, theta, mask, a, per_token, split, scale, settings, comm, dtype)
             for name, mask in groups.items()}
    mat = per_prompt_se = None
    if matrix:
        mat = _matrix(registry, E, U, theta, objective, split, scale, settings, dtype)
        per_prompt_se = mat.std(0, correction=1) / mat.shape[0] ** 0.5
    return EntropyInfluence(
        delta_h=delta_h, se=se, delta_h_baseline=delta_h_baseline, se_baseline=se_baseline,
        delta_h_update=update_sum, se_update=se_update, per_prompt=per_prompt, per_response=per_response,
        per_token=per_token, clip=split.clip, step=step.name, lr=lr, num_eval_prompts=int(num_eval),
        num_update_prompts=count, groups=named, matrix=mat, per_prompt_se=per_prompt_se,
    )


def _as_tangent(tree: Mapping[str, Tensor], theta: ParamTree) -> ParamTree:
    return {n: tree[n].to(device=t.device, dtype=t.dtype) for n, t in theta.items()}


def _token_derivatives(registry: ParamRegistry, U: RolloutBatch, tangent: ParamTree, settings: ProbeSettings,
                       dtype: torch.dtype, comm: Communicator) -> Tensor:
    """``[B_U, G, T]`` float64 d/dε log π(y_t) along ``tangent`` (one JVP pass over U)."""
    chunk = chunk_size_for(settings, registry, U, "jvp")
    derivatives = directional_derivatives(
        registry.token_logprob_fn(), mode="jvp", chunk_size=chunk,
        wrap=chunk_progress("funcprobe token shares (jvp)", settings.progress),
        min_chunks=min_chunks(registry, comm, U, chunk),
        rules=False if settings.generic_jvp else settings.kernels)
    with session_for(registry, settings, dtype, forward_mode=True):
        out = derivatives(primal(registry, dtype), tangent, U)
    if U.num_prompts == 0:
        return torch.zeros(U.input_ids.shape, dtype=torch.float64, device=U.input_ids.device)
    return out


def _se(comm: Communicator, s: Tensor, lr: float) -> float:
    """η·sd(s)/sqrt(B) over all ranks' s (B ≥ 2: checked before), float64."""
    total, total_sq, num = comm.sum_floats([float(s.sum()), float((s * s).sum()), float(s.numel())])
    _, sample_var = mean_and_sample_var(total, total_sq, int(num))
    return lr * (sample_var / num) ** 0.5


def _group(registry: ParamRegistry, E: RolloutBatch, U: RolloutBatch, theta: ParamTree, mask: Tensor, a: Tensor,
           per_token: Tensor, split: StepSplit, scale: float, settings: ProbeSettings, comm: Communicator,
           dtype: torch.dtype) -> GroupInfluence:
    """δH_S = Σ of the group's token shares; SE from s_S[n] = scale·⟨q ⊙ ∇LX[n], ∇J_S⟩ over E."""
    weights = torch.where(mask, a.unsqueeze(-1), torch.zeros((), dtype=torch.float64))
    gradient = comm.sum_tree(_token_weighted_gradient(registry, U, theta, weights, settings, dtype, comm))
    delta_h, num_tokens = comm.sum_floats([float(per_token[mask].sum()), float(mask.sum())])
    if tree_sq_norm(gradient) == 0.0:
        s = torch.zeros(E.num_prompts, dtype=torch.float64)
        return GroupInfluence(delta_h=delta_h, se=0.0, s=s, num_tokens=int(num_tokens))
    s = _local_scalars(registry, E, scaled_direction(split, gradient, scale), settings, comm)
    se = _se(comm, s, 1.0)
    return GroupInfluence(delta_h=delta_h, se=se, s=s, num_tokens=int(num_tokens))


def _token_weighted_gradient(registry: ParamRegistry, U: RolloutBatch, theta: ParamTree, weights: Tensor,
                             settings: ProbeSettings, dtype: torch.dtype, comm: Communicator) -> ParamTree:
    """Σ_{n,g,t} weights[n,g,t]·∇ log π(y_{n,g,t}) over this rank's U (chunked backward;
    on FSDP2 every rank runs the same number of chunks, placeholders included)."""
    token_fn = registry.token_logprob_fn()
    chunk = chunk_size_for(settings, registry, U, "gradient")
    total = tree_map(lambda t: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)), theta)
    starts = list(range(0, U.num_prompts, chunk))
    pad = min_chunks(registry, comm, U, chunk) - len(starts)
    with session_for(registry, settings, dtype, forward_mode=False):
        for start in starts:
            stop = min(start + chunk, U.num_prompts)
            w = weights[start:stop]
            if not registry.sharded and not bool((w != 0).any()):
                continue

            def f(t: ParamTree, batch: RolloutBatch, w: Tensor = w) -> Tensor:
                values = token_fn(t, batch)
                return (w.to(values.dtype) * values).sum((1, 2))

            part = summed_gradient(f, chunk_size=chunk)(theta, U.select(start, stop))
            total = {n: total[n] + part[n] for n in total}
        if pad > 0:  # placeholder forwards and backwards (exact zeros) so that FSDP2's collectives match
            summed_gradient(lambda t, b: token_fn(t, b).sum((1, 2)), chunk_size=chunk, min_chunks=pad)(
                theta, U.select(0, 0))
    return total


def _matrix(registry: ParamRegistry, E: RolloutBatch, U: RolloutBatch, theta: ParamTree, objective: Objective,
            split: StepSplit, scale: float, settings: ProbeSettings, dtype: torch.dtype) -> Tensor:
    """``[B_E, B_U]`` s[n, i] = scale·⟨q ⊙ ∇LX[n], ∇J_i⟩ by min(B_E, B_U) passes."""
    lx = entropy_objective(settings.weighting).on_logprobs(registry.logprob_fn())
    j = objective.on_logprobs(registry.logprob_fn())
    if E.num_prompts <= U.num_prompts:  # a row per evaluation prompt: ∇LX[n], then a JVP over U
        rows, (one, other, fn_one, fn_other) = [], (E, U, lx, j)
    else:  # a column per update prompt: ∇J_i, then a JVP over E
        rows, (one, other, fn_one, fn_other) = [], (U, E, j, lx)
    derivatives = directional_derivatives(fn_other, mode="jvp",
                                          chunk_size=chunk_size_for(settings, registry, other, "jvp"),
                                          rules=False if settings.generic_jvp else settings.kernels)
    single = summed_gradient(fn_one, chunk_size=1)
    with session_for(registry, settings, dtype, forward_mode=True):
        for k in chunk_progress("funcprobe s[n, i] matrix", settings.progress)(range(one.num_prompts),
                                                                              one.num_prompts):
            gradient = single(theta, one.select(k, k + 1))
            rows.append(derivatives(theta, _as_tangent(scaled_direction(split, gradient, scale), theta), other))
    out = torch.stack(rows)
    return out if one is E else out.T
