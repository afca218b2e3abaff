"""The probe's passes over a ``ProbeRun``: the policy gradient of U, the step, s over E, δH ± SE.

Each pass is a short composition of the run's two core calls with an objective of
``funcprobe.core.objectives`` and the statistics of ``funcprobe.core.statistics``, reduced
over the run's ranks. The entry points (``funcprobe.api``) and the influence split
(``funcprobe.influence``) are built from these; none of them checks settings (done once by
the entry points) or re-extracts the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import torch
from torch import Tensor

from torch.func import jvp

from .core.effects import Effects, moment_sums, prompt_components
from .core.objectives import (Objective, entropy_objective, entropy_surrogate, policy_gradient_objective,
                              token_sum_objective)
from .core.pytree import ParamTree, check_like, tree_map, tree_sq_norm, tree_vdot
from .core.rollouts import RolloutBatch
from .core.statistics import EntropyPrediction, check_scalars, scalar_counts
from .core.token_stats import LOGPROB, LOGPROB_TANGENT
from .core.steps import StepMap
from .edge.optim import group_lrs, step_map
from .edge.progress import log
from .errors import NonFiniteError, NoSignalError, SettingsError
from .run import ProbeRun


def policy_gradient(run: ProbeRun, U: RolloutBatch) -> tuple[ParamTree, int, Objective]:
    """(g = mean_{n∈U} ∇θ J[n] over all ranks, the global prompt count |U|, the objective J).

    Raises ``ValueError`` when no rank has a prompt and ``NonFiniteError`` for a NaN/inf
    gradient (naming the parameters), identically on every rank.
    """
    objective = policy_gradient_of(run, U)
    total = run.comm.sum_tree(run.gradient(objective.on_logprobs(run.logprob_fn()), U, "funcprobe grad J over U"))
    (count,) = run.comm.sum_floats([float(U.num_prompts)])
    if count == 0:
        raise ValueError("U: there are no update prompts (on any rank)")
    gradient = tree_map(lambda t: t / count, total)
    bad = sorted(n for n, g in gradient.items() if not bool(torch.isfinite(g).all()))
    if bad:  # identical on every rank: decided after the all-reduce
        raise NonFiniteError(f"U: the policy gradient is NaN or inf at {len(bad)} parameter(s): {bad[:8]}"
                             + _non_finite_weights(run))
    return gradient, int(count), objective


def _non_finite_weights(run: ProbeRun) -> str:
    """The end of a non-finite result's message: the model's weights and buffers that are
    themselves NaN/inf, probed or frozen (``ParamRegistry.non_finite``), else what to check."""
    weights = run.registry.non_finite()
    if weights:
        return f"; the model's own weights are non-finite at {weights}"
    return " (no weight or buffer of the model is non-finite: check the advantages and the model's dtype)"


def policy_gradient_of(run: ProbeRun, U: RolloutBatch) -> Objective:
    """J of ``settings.loss_type`` (docs/definitions.md#trl-loss-types), or of the weighting.

    ``dapo``/``bnpo`` need the completion-token count T and sequence count N of the whole
    U: all-reduced here for ``dapo``; ``bnpo`` (TRL normalises each rank's micro-batch by
    its own tokens) is refused across ranks.
    """
    loss_type = run.settings.loss_type
    if loss_type is None:
        return policy_gradient_objective(run.settings.weighting)
    if loss_type in ("grpo", "dr_grpo"):
        return policy_gradient_objective("per_token_avg" if loss_type == "grpo" else "dr_grpo")
    if loss_type == "bnpo" and run.comm.distributed:
        raise SettingsError("loss_type: 'bnpo' normalises each rank's micro-batch by its own token count, which "
                            "is not modelled across ranks; use 'dapo' (TRL's default) or one process")
    tokens, sequences = run.comm.sum_floats([float(U.response_lengths.sum()), float(U.num_prompts * U.group_size)])
    if tokens == 0:
        raise ValueError("U: there are no completion tokens (on any rank)")
    return token_sum_objective(sequences / tokens)


@dataclass(frozen=True)
class Direction:
    """The step of an update batch and what it was made from.

    Attributes:
        mu: μY = step(gradient), name → tensor.
        step: the ``StepMap`` (read from the optimizer).
        gradient: g = mean_{i∈U} ∇J_i over all ranks.
        count: |U|, the prompts over all ranks.
        objective: J, the policy-gradient objective of the settings.
        signal: whether g is non-zero.
        own_scale: the factor that puts one prompt's ∇J_n in the units of ``gradient``
            (1 when g is funcprobe's own mean of ∇J; a trainer's clipped gradient: see
            ``given_direction``).
    """

    mu: ParamTree
    step: StepMap
    gradient: ParamTree
    count: int
    objective: Objective
    signal: bool
    own_scale: float = 1.0


def update_direction(run: ProbeRun, U: RolloutBatch, optimizer: torch.optim.Optimizer | None) -> Direction:
    """μY of U under the settings' step map, with what made it (``Direction``).

    A zero policy gradient with a non-zero step (Adam's momentum or weight decay under
    ``adam_step``/``optimizer_step``) is not an error: it is logged, and ``predict`` says
    so in ``EntropyPrediction.policy_gradient_signal``. Raises ``NoSignalError`` when μY is
    zero everywhere.
    """
    registry = run.registry
    run.comm.handshake(registry.names, registry.numel(), run.settings.direction_code())
    step = step_map(run.settings, optimizer, registry)
    gradient, count, objective = policy_gradient(run, U)
    mu = step(gradient)
    if tree_sq_norm(mu) == 0.0:  # identical on every rank: decided after the all-reduce
        if step.name == "optimizer_step" and not any(group_lrs(optimizer, registry,
                                                               run.settings.optimizer_lr).values()):
            raise NoSignalError(
                "U: the update direction (optimizer_step) is zero because the optimizer's learning rate is 0 for "
                "every probed parameter (a schedule at its end or in warm-up); optimizer_lr='initial' predicts "
                "the step at the scheduler's base rates, step='adam_step' with lr= a step of one given rate"
            )
        raise NoSignalError(
            f"U: the update direction ({step.name}) is zero everywhere; the policy gradient is "
            f"{'zero too' if tree_sq_norm(gradient) == 0.0 else 'not'} (are all advantages 0, is the adapter disabled?)"
        )
    signal = tree_sq_norm(gradient) > 0.0
    if not signal:
        log.warning("U carries no policy-gradient signal (all advantages 0?): the %s step is Adam's momentum and "
                    "weight decay only", step.name)
    return Direction(mu=mu, step=step, gradient=gradient, count=count, objective=objective, signal=signal)


def given_direction(run: ProbeRun, U: RolloutBatch, gradient: Mapping[str, Tensor],
                    optimizer: torch.optim.Optimizer | None) -> tuple[Direction, float]:
    """The step of a gradient a trainer computed on U (``{name: −p.grad}``, already clipped),
    made by the settings' step map without clipping, and how well funcprobe's model of the
    loss explains it: (``Direction`` whose ``own_scale`` c puts each prompt's ∇J_n in the
    trainer's units, the cosine between the trainer's gradient and c·mean ∇J).

    c = ⟨g_trainer, ḡ⟩/⟨ḡ, ḡ⟩ with ḡ = mean_n ∇J_n over all ranks (one backward over U): the
    trainer's clipping factor when the loss is modelled. A cosine below 1 − 1e-2 means
    the trainer's loss has terms funcprobe does not model (a KL term, an entropy bonus, ...):
    the caller should not remove self-influence with it. A zero given gradient has nothing
    to remove: c = 0 and a cosine of 1 (the step, if any, is Adam's momentum and decay).
    """
    step = step_map(replace(run.settings, max_grad_norm=None), optimizer, run.registry)
    mu = step(dict(gradient))
    model, count, objective = policy_gradient(run, U)
    model_sq, given_sq = tree_sq_norm(model), tree_sq_norm(gradient)
    if given_sq == 0.0:  # no gradient, so no prompt has a share to remove (Adam still steps: momentum, decay)
        return Direction(mu, step, dict(gradient), count, objective, False, own_scale=0.0), 1.0
    if model_sq == 0.0:  # the trainer has a gradient the modelled loss does not give
        return Direction(mu, step, dict(gradient), count, objective, True), 0.0
    dot = float(tree_vdot({n: t.double() for n, t in gradient.items()}, {n: t.double() for n, t in model.items()}))
    cosine = dot / (model_sq * given_sq) ** 0.5
    return Direction(mu, step, dict(gradient), count, objective, True, own_scale=dot / model_sq), cosine


def scalars(run: ProbeRun, E: RolloutBatch, muY: Mapping[str, Tensor]) -> Tensor:
    """s ``[B_local]`` float64 = ⟨∇θ LX[n], μY⟩ of this rank's E (μY checked: names, shapes,
    finite, non-zero)."""
    check_like(run.registry.trainable, muY, "muY")
    if tree_sq_norm(muY) == 0.0:  # μY is the same on every rank (update_direction all-reduces it)
        raise NoSignalError("muY: the update direction is zero everywhere; there is no step to probe")
    f = entropy_objective(run.settings.weighting).on_logprobs(run.logprob_fn())
    return run.derivatives(f, muY, E, f"funcprobe s[n] ({run.settings.mode})")


def prediction(run: ProbeRun, E: RolloutBatch, muY: Mapping[str, Tensor], lr: float) -> EntropyPrediction:
    """δH = η·mean s over E (all ranks) with its E-conditional SE (``conditional_variance``)."""
    registry, settings, comm = run.registry, run.settings, run.comm
    if not comm.distributed and E.num_prompts < 2:
        raise ValueError(f"E: the conditional variance needs at least 2 prompts, got {E.num_prompts}")
    comm.handshake(registry.names, registry.numel(), [lr, *settings.probe_code()])
    s = scalars(run, E, muY)
    totals = comm.sum_floats([float(s.sum()), float((s * s).sum()), *scalar_counts(s)])
    _check_scalars(run, s, totals[2:])
    if settings.gather_s:
        s = comm.gather(s)
    result = EntropyPrediction.from_sums(s, totals[:3], lr=lr, mode=settings.mode, weighting=settings.weighting)
    warn_beyond_first_order(run, lr * tree_sq_norm(muY) ** 0.5, result)
    return result


#: ‖Δθ‖ / ‖θ‖ over the probed parameters above which ``warn_beyond_first_order`` warns:
#: a step as large as the weights themselves (a heuristic scale, set high so that it does
#: not fire on ordinary steps)
FIRST_ORDER_RELATIVE_STEP = 1.0


def warn_beyond_first_order(run: ProbeRun, step_norm: float, result: EntropyPrediction) -> None:
    """Log one warning when the prediction is outside the range where a first-order
    (linear) prediction can hold:

    * |δH| > log V: the entropy per token lies in [0, log V] (V the vocabulary), and both
      weightings' units (nats per Lmax tokens, nats per token) are averages of it, so no
      step can change it by more: a larger prediction is certainly not the change;
    * ‖Δθ‖ > ``FIRST_ORDER_RELATIVE_STEP``·‖θ‖ over the probed parameters: the step is as
      large as the weights themselves, far outside the neighbourhood a Taylor expansion
      describes (a heuristic scale; η·‖μY‖ is ``step_norm``).

    The prediction is returned all the same (it is the first-order term, exactly)."""
    theta = tree_sq_norm(run.registry.trainable) ** 0.5
    vocab = run.registry.vocab_size
    reasons = []
    if vocab is not None and vocab > 1 and abs(result.delta_h) > math.log(vocab):
        reasons.append(f"|dH| = {abs(result.delta_h):.3g} {result.unit} exceeds log V = {math.log(vocab):.3g}, "
                       "the most an entropy per token can change")
    if theta > 0 and step_norm > FIRST_ORDER_RELATIVE_STEP * theta:
        reasons.append(f"the step moves the probed parameters by ||dtheta|| / ||theta|| = {step_norm / theta:.3g} "
                       f"(> {FIRST_ORDER_RELATIVE_STEP:g})")
    if reasons:
        log.warning("funcprobe: the predicted dH = %+.3g %s is beyond first order and unreliable: %s (a smaller "
                    "learning rate?)", result.delta_h, result.unit, "; ".join(reasons))


def leave_one_out(run: ProbeRun, U: RolloutBatch, direction: Direction, lr: float, *, effects: bool = False,
                  rewards: Tensor | None = None) -> EntropyPrediction:
    """δH of ``direction``'s step estimated on its own update batch U without self-influence.

    For each prompt n of U: its gradient ∇J_n (a one-prompt backward), the step the optimizer
    would take without it, Δ_n = Δ(g_{-n}) with g_{-n} = (|U|·g − ∇J_n)/(|U| − 1), exactly
    through the step map (``_without_own``), and t[n] = ⟨∇LX[n], Δ_n⟩ (a one-prompt JVP).
    No t[n] scores prompt n's own contribution to the step: for a step linear in g (SGD,
    frozen Adam) mean t is unbiased for the expected change of the step, E[⟨∇H, Δ⟩] (a
    U-statistic); for the real Adam step it estimates the change of a step on |U| − 1 prompts
    (measured: docs/derivations.md#leave-one-out).
    s over U along the full step, which counts it, is kept as ``delta_h_same_batch``
    (docs/derivations.md#leave-one-out). SE: sd(t)/sqrt(|U|), the spread over the evaluation
    side as for SE_E. Cost: one JVP pass over U (the same-batch value) plus |U| one-prompt
    backward and JVP passes. With ``effects``, each one-prompt JVP is the effects pass
    (``ProbeRun.token_stats``), so the effects are leave-one-out too (``rewards``: ``[B_local, G]``
    of this rank's U, or None).

    Raises ``ValueError`` for |U| < 2 (over all ranks) and the errors of ``prediction``.
    """
    settings, comm = run.settings, run.comm
    count = direction.count
    if count < 2:
        raise ValueError(f"U: the leave-one-out estimate needs at least 2 update prompts, got {count}")
    if effects:
        same = prediction_with_effects(run, U, direction.mu, lr, rewards)
    else:
        same = prediction(run, U, direction.mu, lr)
    lx = entropy_objective(settings.weighting).on_logprobs(run.logprob_fn())
    j = direction.objective.on_logprobs(run.logprob_fn())
    t, parts, sdots, offset = [], [], [], 0
    for chunk, keep in run.prompts(U, "funcprobe leave-one-out over U"):
        own = {n: g * direction.own_scale for n, g in run.gradient_over(j, [(chunk, keep)]).items()}
        step = _without_own(direction, own)
        if effects:
            stats = run.token_stats_over(step, [(chunk, keep)], chunk)
            if keep:
                r = None if rewards is None else _on(rewards[offset:offset + 1], stats)
                d, part, sdot = scalars_and_components(stats, chunk, settings.weighting, r)
                parts.append(part)
                sdots.append(sdot)
        else:
            d = run.derivatives_over(lx, step, [(chunk, keep)])
        if keep:
            t.append(d)
            offset += chunk.num_prompts
    t = torch.cat(t) if t else torch.zeros(0, dtype=torch.float64)
    if effects:
        if not parts:  # an empty shard: no prompt here, but the all-reduce needs the shapes
            stats = torch.zeros((*U.input_ids.shape, 5), dtype=torch.float64)
            _, empty, sdot = scalars_and_components(stats, U, settings.weighting, None)
            parts, sdots = [empty], [sdot]
        result, _ = assemble(run, (t, torch.cat(parts), torch.cat(sdots)), lr, U, rewards is not None,
                              "leave_one_out")
    else:
        totals = comm.sum_floats([float(t.sum()), float((t * t).sum()), *scalar_counts(t)])
        if totals[3] > 0:  # non-finite t (every t = 0 is a possible estimate here: no prompt sees another's step)
            _check_scalars(run, t, totals[2:])
        if settings.gather_s:
            t = comm.gather(t)
        result = EntropyPrediction.from_sums(t, totals[:3], lr=lr, mode=settings.mode, weighting=settings.weighting)
    return replace(result, estimator="leave_one_out", delta_h_same_batch=same.delta_h, se_same_batch=same.se)


def _check_scalars(run: ProbeRun, s: Tensor, counts: list[float]) -> None:
    """``check_scalars``, with the model's own non-finite weights named in a ``NonFiniteError``."""
    try:
        check_scalars(s, counts)
    except NonFiniteError as err:
        raise NonFiniteError(str(err) + _non_finite_weights(run)) from None


def _without_own(direction: Direction, own: ParamTree) -> ParamTree:
    """The step the optimizer would take on U without one prompt, whose gradient is ``own``:
    Δ(g_{-n}) with g_{-n} = (|U|·g − own)/(|U| − 1), exactly through the step map (clipping,
    Adam's moments and learning rates included)."""
    g, count = direction.gradient, direction.count
    return direction.step({n: (count * g[n] - own[n].to(g[n].dtype)) / (count - 1) for n in g})


# ---------------------------------------------------------------------------- effects
def scalars_and_components(stats: Tensor, batch: RolloutBatch, weighting: str,
                           rewards: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """From ``token_stats`` ``[B, G, T, 5]`` of ``batch``: (s ``[B]`` = the tangent of LX, the
    same scalars as ``scalars``; the effects' components ``[B, K]``; Ṡ ``[B, G]``)."""
    S, sdot = stats[..., LOGPROB].sum(-1), stats[..., LOGPROB_TANGENT].sum(-1)
    _, s = jvp(lambda x: entropy_surrogate(x, batch, weighting), (S,), (sdot,))
    return s, prompt_components(stats, batch, rewards), sdot


def assemble(run: ProbeRun, values: tuple[Tensor, Tensor, Tensor], lr: float, batch: RolloutBatch,
              has_rewards: bool, estimator: str) -> tuple[EntropyPrediction, Effects]:
    """δH ± SE and the effects from this rank's (s, components, Ṡ) of ``batch`` (one all-reduce);
    all-zero s is refused except for leave-one-out (where every t = 0 is a possible estimate)."""
    settings, comm = run.settings, run.comm
    s, components, sdot = values
    require_signal = estimator != "leave_one_out"
    counts = scalar_counts(s)
    totals = comm.sum_floats([float(s.sum()), float((s * s).sum()), *counts, *moment_sums(components)])
    if require_signal or totals[3] > 0:
        _check_scalars(run, s, totals[2:2 + len(counts)])
    optional = (["reward"] if has_rewards else []) + (
        ["entropy_seq_mean_token_sum_norm"] if batch.max_len is not None else [])
    effects = Effects.from_moments(totals[2 + len(counts):], lr=lr, components=components,
                                   logprob_change=lr * sdot, optional=optional, estimator=estimator)
    if settings.gather_s:
        s = comm.gather(s)
    result = EntropyPrediction.from_sums(s, totals[:3], lr=lr, mode=settings.mode, weighting=settings.weighting)
    return replace(result, estimator=estimator, effects=effects), effects


def prediction_with_effects(run: ProbeRun, E: RolloutBatch, muY: Mapping[str, Tensor], lr: float,
                            rewards: Tensor | None) -> EntropyPrediction:
    """``prediction`` and the step's predicted effects (``funcprobe.core.effects``) from one
    forward-mode pass over E (``ProbeRun.token_stats``): s is the tangent of LX from the same
    per-token log-prob tangents. ``rewards``: ``[B_local, G]`` of this rank's E, or None."""
    registry, settings, comm = run.registry, run.settings, run.comm
    if not comm.distributed and E.num_prompts < 2:
        raise ValueError(f"E: the conditional variance needs at least 2 prompts, got {E.num_prompts}")
    comm.handshake(registry.names, registry.numel(), [lr, *settings.probe_code()])
    check_like(registry.trainable, muY, "muY")
    if tree_sq_norm(muY) == 0.0:
        raise NoSignalError("muY: the update direction is zero everywhere; there is no step to probe")
    batch = run.batch(E)
    stats = run.token_stats(muY, batch, "funcprobe effects (jvp)")
    s, components, sdot = scalars_and_components(stats, batch, settings.weighting, _on(rewards, stats))
    result, _ = assemble(run, (s, components, sdot), lr, E, rewards is not None, "independent")
    warn_beyond_first_order(run, lr * tree_sq_norm(muY) ** 0.5, result)
    return result


def _on(rewards: Tensor | None, like: Tensor) -> Tensor | None:
    return None if rewards is None else rewards.to(device=like.device, dtype=torch.float64)
