"""Choosing the entropy-bonus coefficient β or the step-size scale c before the step.

``EntropyProbe.choose(E, U, EntropyControl(target, knob=...))`` (``funcprobe.api``) runs ``choose`` here. What
it computes once (docs/control.md#how-the-controller-works):

* the policy gradient g_pg of U (one backward, as ``update_direction``) and, for β, the
  entropy-bonus gradient g_H of U (``entropy_bonus_gradient``: one backward over U);
* ∇LX[n] for every prompt n of E, one single-prompt backward each (the influence split's
  μX, kept per prompt): δH at any knob value x is then η·mean_n ⟨∇LX[n], Δ(x)⟩ and its SE
  η·sd_n/√B_E, through the exact step map Δ (clipping, Adam's moments, per-group learning
  rates), with no further forward;
* with E = U (``E=None``: the trainer's own batch) the leave-one-out form: per prompt also
  ∇J_n and the bonus gradient of its own tokens, and t[n] = ⟨∇LX[n], Δ(g_{-n}(x))⟩ with
  g_{-n}(x) the gradient without prompt n (``funcprobe.passes.leave_one_out``'s estimator,
  extended to the bonus): the biased same-batch value is never acted on.

The solvers of ``funcprobe.core.control`` then pick x; with ``effects=True`` or a KL budget,
one effects pass (forward-mode JVP) along the chosen step gives the KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import passes
from .core.control import ControlDecision, ControlRequest, solve_bracketed, solve_scale
from .core.logprobs import logprobs_and_entropies, response_sums, token_entropies
from .core.objectives import MODELLED_COSINE, entropy_objective
from .core.pytree import ParamTree
from .core.rollouts import RolloutBatch
from .core.statistics import entropy_unit
from .core.steps import StepMap
from .edge.optim import step_map
from .errors import NoSignalError, SettingsError
from .run import ProbeRun


def entropy_bonus_fn(run: ProbeRun) -> Callable[[dict, RolloutBatch], Tensor]:
    """θ, batch ↦ ``[B]`` Σ_{g,t} H_t per prompt: each prompt's summed next-token entropies
    (nats, teacher-forced, temperature 1) over its response tokens."""
    module, frozen = run.registry.module, run.registry.frozen

    def f(theta: dict, batch: RolloutBatch) -> Tensor:
        return response_sums(module, (frozen, theta), batch, token_entropies).sum(-1)

    return f


def entropy_bonus_gradient(run: ProbeRun, U: RolloutBatch) -> ParamTree:
    """g_H = ∇θ of TRL's entropy bonus on U: Σ_{n,g,t} H_t / T, the mean next-token
    entropy over U's T completion tokens (TRL 1.16 ``GRPOTrainer._compute_loss`` with one
    micro-batch: ``loss − entropy_coef · (entropies·mask).sum() / mask.sum()``, whatever the
    loss type). One backward over U; name → tensor, float32 or wider.

    Raises ``ValueError`` when U has no completion token."""
    tokens = float(U.response_lengths.sum())
    if tokens == 0:
        raise ValueError("U: there are no completion tokens for the entropy bonus")
    total = run.gradient(entropy_bonus_fn(run), U)
    return {n: t / tokens for n, t in total.items()}


@dataclass(frozen=True)
class _Layout:
    """The registry's names, shapes and the gradient dtype: flat vectors ↔ trees."""

    names: tuple[str, ...]
    like: ParamTree

    def flat(self, tree: ParamTree) -> Tensor:
        return torch.cat([tree[n].reshape(-1).double() for n in self.names])

    def tree(self, vector: Tensor) -> ParamTree:
        out, start = {}, 0
        for n in self.names:
            ref = self.like[n]
            out[n] = vector[start:start + ref.numel()].reshape(ref.shape).to(ref.dtype)
            start += ref.numel()
        return out


def _per_prompt(run: ProbeRun, f, batch: RolloutBatch, layout: _Layout) -> Tensor:
    """``[B, P]`` float64 rows ∇θ f[n], one single-prompt backward each."""
    return torch.stack([layout.flat(run.gradient_over(f, [(chunk, keep)])) for chunk, keep in run.prompts(batch)])


@dataclass(frozen=True)
class _Model:
    """What makes δH(x) a dot product: the step map, ∇LX rows of E, g_pg and g_H (flat),
    and for E = U each prompt's own ∇J_n and bonus gradient with its token count."""

    step: StepMap
    layout: _Layout
    rows: Tensor
    g_pg: Tensor
    g_h: Tensor | None
    own: tuple[Tensor, Tensor | None, Tensor, float] | None  # (∇J rows, bonus rows, tokens [B], T)
    count: int
    lr: float

    def gradients(self, beta: float) -> list[Tensor]:
        """The ascent gradient(s) at β: [g_pg + β g_H], or per prompt g_{-n}(β) for E = U."""
        full = self.g_pg if self.g_h is None or beta == 0.0 else self.g_pg + beta * self.g_h
        if self.own is None:
            return [full]
        own_j, own_h, tokens, total = self.own
        out = []
        for n in range(own_j.shape[0]):
            g = (self.count * self.g_pg - own_j[n]) / (self.count - 1)
            if own_h is not None and beta != 0.0:
                g = g + beta * (total * self.g_h - own_h[n]) / (total - float(tokens[n]))
            out.append(g)
        return out

    def steps(self, beta: float) -> list[Tensor]:
        """Flat Δ(g) for each of ``gradients(beta)``."""
        return [self.layout.flat(self.step(self.layout.tree(g))) for g in self.gradients(beta)]

    def predict(self, beta: float) -> tuple[float, float]:
        """(δH, SE) at β: η·mean and η·sd/√B of s[n] = ⟨∇LX[n], Δ⟩ (Δ_n for E = U)."""
        steps = self.steps(beta)
        s = self.rows @ steps[0] if len(steps) == 1 else (self.rows * torch.stack(steps)).sum(-1)
        B = s.numel()
        return self.lr * float(s.mean()), self.lr * float(s.std(correction=1)) / math.sqrt(B)


def choose(run: ProbeRun, E: RolloutBatch | None, U: RolloutBatch, optimizer: torch.optim.Optimizer | None,
           request: ControlRequest, lr: float) -> ControlDecision:
    """``EntropyProbe.choose`` after its checks: the knob value for ``request`` and the
    prediction of the step at it. ``E=None``: E is U (leave-one-out). ``lr``: η of δH (1.0
    for ``optimizer_step``). ``request.gradient``: the trainer's ascent gradient g_pg of U
    before clipping (checked, float32 or wider), used instead of funcprobe's own; with E = U
    each prompt's share is put in its units by fitting funcprobe's model of the loss to it
    (``passes.given_direction``'s fit).

    Raises ``SettingsError`` across ranks or on a sharded model (one process, replicated
    model only), ``ValueError`` for fewer than 2 prompts or no completion tokens, a
    ``gradient`` that funcprobe's model of the loss does not explain (cosine below
    ``MODELLED_COSINE``: the leave-one-out estimate cannot remove each prompt's share, and
    the biased same-batch value is never acted on), and the errors of
    ``funcprobe.passes.policy_gradient``.
    """
    if run.comm.distributed:
        raise SettingsError("process_group: choosing a knob runs in one process only for now")
    if run.sharding.name != "replica":
        raise SettingsError("choose: a sharded (FSDP2) model is not supported; choose on a replicated model")
    same = E is None
    evaluation = U if same else E
    if evaluation.num_prompts < 2:
        raise ValueError(f"{'U' if same else 'E'}: choosing a knob needs at least 2 prompts, "
                         f"got {evaluation.num_prompts}")
    model = _model(run, E, U, optimizer, request, lr)
    target = request.target
    measured = _measured_entropy(run, evaluation) if target.schedule is not None else (None, None)
    current = measured
    if request.prior is not None:
        fused = request.prior.fuse(*measured)
        current = (fused.mean, fused.se)
    aim = target.delta_h
    if target.schedule is not None:
        aim = target.schedule.at(request.step_index + 1) - current[0]
    uncontrolled, uncontrolled_se = model.predict(0.0)
    want_kl = run.settings.effects or target.kl_budget is not None
    if request.knob == "lr_scale":
        kl1 = _kl(run, E, U, model, 0.0) if want_kl else None
        sol = solve_scale(uncontrolled, uncontrolled_se, None if kl1 is None else kl1[0], target, aim)
        c = sol.value
        delta_h, se = c * uncontrolled, c * uncontrolled_se
        kl = None if kl1 is None else (c * c * kl1[0], c * c * kl1[1])
        step = {n: t * c for n, t in model.step(model.layout.tree(model.g_pg)).items()}
        gradient = {}
    else:
        sol = solve_bracketed(model.predict, aim, target.band, target.risk, request.beta_max,
                              request.beta_min)
        delta_h, se = model.predict(sol.value)
        kl = _kl(run, E, U, model, sol.value) if want_kl else None
        g = model.g_pg if sol.value == 0.0 else model.g_pg + sol.value * model.g_h
        gradient = model.layout.tree(g)
        step = model.step(gradient)
    return ControlDecision(
        knob=request.knob, value=sol.value, reachable=sol.reachable, reason=sol.reason, target=target,
        aimed=sol.aimed, delta_h=delta_h, se=se, uncontrolled=uncontrolled, uncontrolled_se=uncontrolled_se,
        span=sol.span, estimator="leave_one_out" if same else "independent", lr=lr,
        unit=entropy_unit(run.settings.weighting), evaluations=sol.evaluations + 1,
        kl=None if kl is None else kl[0], kl_se=None if kl is None else kl[1],
        current_entropy=current[0], current_entropy_se=current[1], measured_entropy=measured[0],
        measured_entropy_se=measured[1], step=step, gradient=gradient)


def _model(run: ProbeRun, E: RolloutBatch | None, U: RolloutBatch, optimizer: torch.optim.Optimizer | None,
           request: ControlRequest, lr: float) -> _Model:
    """The backward passes: g_pg (or the request's given one), g_H (β only), ∇LX rows of E,
    and for E = U the own rows (in the units of the given gradient, when given)."""
    given = request.gradient
    step = step_map(run.settings, optimizer, run.registry)
    gradient, count, objective = passes.policy_gradient(run, U)
    layout = _Layout(tuple(run.registry.names), gradient)
    own_scale = 1.0
    if given is not None:
        own_scale = _fit(layout.flat(given), layout.flat(gradient))
        gradient = given
    lx = entropy_objective(run.settings.weighting).on_logprobs(run.logprob_fn())
    beta = request.knob == "beta"
    tokens = U.response_lengths.sum(-1).double()  # [B_U] completion tokens per prompt
    total = float(tokens.sum())
    if beta and total == 0:
        raise ValueError("U: there are no completion tokens for the entropy bonus")
    if E is not None:
        g_h = layout.flat(entropy_bonus_gradient(run, U)) if beta else None
        return _Model(step, layout, _per_prompt(run, lx, E, layout), layout.flat(gradient), g_h, None, count, lr)
    if count < 2:
        raise ValueError(f"U: the leave-one-out estimate needs at least 2 update prompts, got {count}")
    own_j = _per_prompt(run, objective.on_logprobs(run.logprob_fn()), U, layout) * own_scale
    own_h = _per_prompt(run, entropy_bonus_fn(run), U, layout) if beta else None
    if beta and bool((tokens == total).any()):
        raise ValueError("U: one prompt holds every completion token; the bonus without it is undefined")
    g_h = own_h.sum(0) / total if beta else None
    return _Model(step, layout, _per_prompt(run, lx, U, layout), layout.flat(gradient), g_h,
                  (own_j, own_h, tokens, total), count, lr)


def _fit(given: Tensor, modelled: Tensor) -> float:
    """c with c·g_model the least-squares fit to the given gradient (the trainer's units for
    each prompt's own share), after checking that the model explains it."""
    dot, sq, given_sq = float(given @ modelled), float(modelled @ modelled), float(given @ given)
    if sq == 0.0 or given_sq == 0.0:  # e.g. every prompt's rewards equal: all advantages 0
        raise NoSignalError("gradient: the trainer's gradient or funcprobe's model of it is zero; there is no "
                            "step to choose a knob for")
    cosine = dot / math.sqrt(sq * given_sq)
    if cosine < MODELLED_COSINE:
        raise ValueError(f"gradient: funcprobe's model of the loss does not explain the trainer's gradient (cosine "
                         f"{cosine:.4f} < {MODELLED_COSINE}): each prompt's own share cannot be removed, and a "
                         "knob is never chosen on the biased same-batch value")
    return dot / sq


def _kl(run: ProbeRun, E: RolloutBatch | None, U: RolloutBatch, model: _Model, beta: float) -> tuple[float, float]:
    """(KL, SE) of the step at β from one effects pass (forward-mode JVP) over E along Δ, or
    for E = U per prompt along Δ_n (the leave-one-out effects)."""
    steps = [model.layout.tree(d) for d in model.steps(beta)]
    if E is not None:
        kl = passes.prediction_with_effects(run, E, steps[0], model.lr, None).effects["kl"]
        return kl.value, kl.se
    s, parts, sdots = [], [], []
    for (chunk, keep), step in zip(run.prompts(U), steps):
        stats = run.token_stats_over(step, [(chunk, keep)], chunk)
        d, part, sdot = passes.scalars_and_components(stats, chunk, run.settings.weighting, None)
        s.append(d)
        parts.append(part)
        sdots.append(sdot)
    _, effects = passes.assemble(run, (torch.cat(s), torch.cat(parts), torch.cat(sdots)), model.lr, U, False,
                                 "leave_one_out")
    return effects["kl"].value, effects["kl"].se


def _measured_entropy(run: ProbeRun, batch: RolloutBatch) -> tuple[float, float]:
    """(Ĥ, SE) on ``batch`` in the units of δH: mean over prompts of mean_g Σ_t H_t / Lmax
    (``dr_grpo``; unbiased for H_w by the chain rule of entropy) or of mean_g −S / |y|
    (``per_token_avg``; unbiased for H_w by its definition). One forward, no gradient."""
    batch = run.batch(batch)
    module, frozen = run.registry.module, run.registry.frozen
    values = []
    with torch.no_grad(), run.session(forward_mode=False):
        for chunk, keep in run.chunks(batch, "gradient"):
            if keep:
                values.append(response_sums(module, (frozen, run.theta), chunk, logprobs_and_entropies).double())
    sums = torch.cat(values)  # [B, G, 2]: S, Σ_t H_t
    if run.settings.weighting == "dr_grpo":
        per = sums[..., 1] / batch.max_len_tensor(torch.float64)
    else:
        per = -sums[..., 0] / batch.response_lengths.double()
    per_prompt = per.mean(-1)
    return float(per_prompt.mean()), float(per_prompt.std(correction=1)) / math.sqrt(per_prompt.numel())
