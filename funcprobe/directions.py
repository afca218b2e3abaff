"""The update direction μY = Δ = P(∇θ mean_{n∈U} J[n]), with the step θ ← θ + η·Δ.

* ``policy_gradient_sum``: sum over the prompts of U of ∇θ J[n], in microbatches, with
  ``torch.func.grad`` through ``functional_call`` (no ``.backward()``, no ``.grad``).
* preconditioners P, pure functions of one tensor and its optimizer state:
  ``sgd`` (identity), ``adam`` (the seeds' frozen-state preconditioner
  ``g / (sqrt(v / (1 − β2^t)) + ε)``, seed 003 "Adam preconditioning") and
  ``adam_step`` (the exact next ``torch.optim.Adam``/``AdamW`` step per unit learning
  rate: first moment, second-moment update, both bias corrections, ε outside the
  square root, L2 or decoupled weight decay, AMSGrad).
* ``read_adam_state``: the edge that reads a ``torch.optim.Adam``/``AdamW`` by the
  registry's names (``torch.optim`` keys its state by parameter object; this is the only
  place that touches those objects, read-only).

Sign convention: the trainer minimises ``−mean J`` so the optimizer sees the gradient
``−∇ mean J`` (with ``maximize=True`` it sees ``+∇ mean J`` and flips it, which is the
same step). Δ is therefore the ascent direction of J.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor
from torch.func import grad

from .logprobs import sequence_logprobs
from .pytree import ParamTree, tree_map
from .registry import ParamRegistry
from .rollouts import RolloutBatch
from .surrogates import check_weighting, policy_gradient_surrogate

DIRECTIONS = ("sgd", "adam", "adam_step")


@dataclass(frozen=True)
class AdamHyper:
    """The hyper-parameters of the ``torch.optim`` param group that holds a parameter."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    amsgrad: bool


@dataclass(frozen=True)
class AdamState:
    """One parameter's Adam state (``None`` fields: no state yet, i.e. step 0)."""

    hyper: AdamHyper
    step: int = 0
    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    max_exp_avg_sq: Tensor | None = None


def policy_gradient_sum(registry: ParamRegistry, U: RolloutBatch, *, weighting: str, batch_size: int) -> ParamTree:
    """``Σ_{n∈U} ∇θ J[n]`` as name→tensor (float32 or wider), U in microbatches.

    The sum (not the mean) so that data-parallel ranks can all-reduce it with their
    prompt counts; zeros for an empty U. Must run inside ``probe_session`` (the public
    entry points do that). Raises ``ValueError`` if U has no advantages.
    """
    check_weighting(weighting)
    U.require_advantages("U")

    def total_j(theta: ParamTree, group: RolloutBatch) -> Tensor:
        S = sequence_logprobs(registry.module, registry.merged(theta), group)
        return policy_gradient_surrogate(S, group, weighting).sum()

    grad_j = grad(total_j)
    acc = tree_map(lambda t: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)),
                   registry.trainable)
    for start in range(0, U.num_prompts, batch_size):
        g = grad_j(registry.trainable, U.select(start, min(start + batch_size, U.num_prompts)))
        acc = tree_map(lambda a, t: a + t.to(a.dtype), acc, g)
    return acc


# ------------------------------------------------------------------ preconditioners
def adam_preconditioner(g: Tensor, state: AdamState) -> Tensor:
    """``g / (sqrt(v / (1 − β2^t)) + ε)`` with the frozen ``exp_avg_sq`` v and ``step`` t.

    Source: seed 003 (``adam_preconditioner.apply_preconditioner``), SPEC ``adam``.
    Raises ``ValueError`` when the state has no second moment yet.
    """
    if state.exp_avg_sq is None or state.step < 1:
        raise ValueError("adam_preconditioner: the parameter has no Adam state yet (step 0)")
    h = state.hyper
    v_hat = state.exp_avg_sq.to(g.dtype) / (1.0 - h.beta2**state.step)
    return g / (v_hat.sqrt() + h.eps)


def adam_step(g: Tensor, param: Tensor, state: AdamState) -> Tensor:
    """The next Adam/AdamW step per unit learning rate, (θ_new − θ) / lr, for ascent gradient g.

    Mirrors ``torch.optim.Adam`` (single-tensor path, torch 2.13) fed the loss gradient
    ``−g``: weight decay (L2 on the gradient, or decoupled ``θ ← θ(1 − lr·wd)``), the
    moment updates, both bias corrections, ε outside the square root, AMSGrad's max.
    Exact for parameters with no state (step 0, zero moments).
    """
    h = state.hyper
    dtype = g.dtype
    p = param.to(dtype)
    loss_grad = -g
    if h.weight_decay != 0 and not h.decoupled_weight_decay:
        loss_grad = loss_grad + h.weight_decay * p
    m_prev = torch.zeros_like(g) if state.exp_avg is None else state.exp_avg.to(dtype)
    v_prev = torch.zeros_like(g) if state.exp_avg_sq is None else state.exp_avg_sq.to(dtype)
    t = state.step + 1
    m = h.beta1 * m_prev + (1.0 - h.beta1) * loss_grad
    v = h.beta2 * v_prev + (1.0 - h.beta2) * loss_grad * loss_grad
    if h.amsgrad:
        v_max_prev = torch.zeros_like(g) if state.max_exp_avg_sq is None else state.max_exp_avg_sq.to(dtype)
        v = torch.maximum(v_max_prev, v)
    denom = v.sqrt() / (1.0 - h.beta2**t) ** 0.5 + h.eps
    delta = -(m / (1.0 - h.beta1**t)) / denom
    if h.weight_decay != 0 and h.decoupled_weight_decay:
        delta = delta - h.weight_decay * p
    return delta


def precondition(
    gradient: Mapping[str, Tensor],
    direction: str,
    *,
    params: Mapping[str, Tensor] | None = None,
    states: Mapping[str, AdamState] | None = None,
    allow_identity_fallback: bool = False,
) -> ParamTree:
    """Apply P to an ascent gradient, name by name.

    Args:
        gradient: name→``∇ mean J``.
        direction: ``"sgd"``, ``"adam"`` or ``"adam_step"``.
        params: name→current θ (``adam_step`` with weight decay).
        states: name→``AdamState`` from ``read_adam_state`` (``adam``, ``adam_step``).
        allow_identity_fallback: ``adam`` only: use P = identity for parameters with no
            optimizer state instead of raising.

    Raises:
        ValueError: unknown ``direction``; ``adam`` and parameters without state (listed).
        KeyError: ``states``/``params`` missing names of ``gradient`` (listed).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if direction == "sgd":
        return dict(gradient)
    if states is None:
        raise ValueError(f"direction={direction!r} needs the optimizer's state (an Adam or AdamW optimizer)")
    missing = sorted(set(gradient) - set(states))
    if missing:
        raise KeyError(f"optimizer: {len(missing)} parameter(s) are in no param group: {missing[:8]}")
    if direction == "adam":
        stateless = sorted(n for n in gradient if states[n].exp_avg_sq is None)
        if stateless and not allow_identity_fallback:
            raise ValueError(
                f"optimizer: direction='adam' needs exp_avg_sq, but {len(stateless)} parameter(s) have no Adam "
                f"state yet: {stateless[:8]}; use direction='adam_step' (exact for them) or "
                "allow_identity_fallback=True"
            )
        return {
            n: (g if states[n].exp_avg_sq is None else adam_preconditioner(g, states[n])) for n, g in gradient.items()
        }
    if params is None:
        raise ValueError("direction='adam_step' needs the current parameters")
    return {n: adam_step(g, params[n], states[n]) for n, g in gradient.items()}


# ---------------------------------------------------------------- optimizer edge
def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(optimizer, torch.optim.Adam) or not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def read_adam_state(optimizer: torch.optim.Optimizer, registry: ParamRegistry) -> dict[str, AdamState]:
    """Name→``AdamState`` for the registry's trainable parameters (read-only, no copies).

    Parameters in no param group of ``optimizer`` are left out (``precondition`` reports
    them). Wrappers (accelerate) are looked through. Raises ``TypeError`` for an
    optimizer other than ``torch.optim.Adam``/``AdamW``.
    """
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(
            f"optimizer: expected torch.optim.Adam or AdamW for an Adam direction, got {type(optimizer).__name__}"
        )
    group_of: dict[Tensor, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[p] = group
    out: dict[str, AdamState] = {}
    for name, p in registry.live_parameters().items():
        group = group_of.get(p)
        if group is None:
            continue
        beta1, beta2 = (float(b) for b in group["betas"])
        hyper = AdamHyper(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(
                group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            ),
            amsgrad=bool(group.get("amsgrad", False)),
        )
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" in st:
            out[name] = AdamState(
                hyper=hyper,
                step=int(st["step"]),
                exp_avg=st["exp_avg"].detach(),
                exp_avg_sq=st["exp_avg_sq"].detach(),
                max_exp_avg_sq=st["max_exp_avg_sq"].detach() if "max_exp_avg_sq" in st else None,
            )
        else:
            out[name] = AdamState(hyper=hyper)
    return out


def optimizer_lr(optimizer: torch.optim.Optimizer, registry: ParamRegistry) -> float:
    """The learning rate the optimizer uses for the registry's parameters.

    Raises ``ValueError`` if they sit in param groups with different learning rates
    (pass ``lr=`` explicitly then) or in none.
    """
    optimizer = unwrap_optimizer(optimizer)
    live = set(registry.live_parameters().values())
    lrs = {float(g["lr"]) for g in optimizer.param_groups if any(p in live for p in g["params"])}
    if len(lrs) != 1:
        raise ValueError(
            f"lr: the probed parameters are in param groups with learning rates {sorted(lrs)}; pass lr= explicitly"
        )
    return lrs.pop()
