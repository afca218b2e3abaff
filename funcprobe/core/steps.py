"""Step maps P as values: μY = P(∇θ mean_{n∈U} J[n]), the step θ ← θ + η·μY.

Each step map is a small frozen value closed over what it needs (optax style): build it
once from the optimizer's state (``funcprobe.edge.optim.step_map`` does that, reading
``torch.optim`` by parameter name), then apply it to an ascent gradient tree. Pure: no
optimizer objects here, only tensors and numbers.

* ``sgd()``: identity;
* ``frozen_adam(states)``: the seeds' preconditioner ``g / (sqrt(v / (1 − β2^t)) + ε)``
  with Adam's state frozen (docs/seeds/003 "Adam preconditioning"; formerly called ``adam``);
* ``adam_step_map(params, states)``: the exact next ``torch.optim.Adam``/``AdamW`` step per
  unit learning rate (first moment, second-moment update, both bias corrections, ε
  outside the square root, L2 or decoupled weight decay, AMSGrad;
  docs/derivations.md#adam-step);
* ``optimizer_step_map(params, states, lrs, max_grad_norm)``: the step the trainer will
  actually take, learning rates inside: ``chain(clip_by_global_norm(c), adam_step_map,
  scale_by_lr(lrs))``.

Sign convention: the trainer minimises ``−mean J``, so the optimizer sees the gradient
``−∇ mean J`` (with ``maximize=True`` it sees ``+∇ mean J`` and flips it, which is the
same step). The step is therefore the ascent direction of J.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from .pytree import ParamTree


@dataclass(frozen=True)
class AdamHyper:
    """The hyper-parameters of the ``torch.optim`` param group that holds a parameter
    (the learning rate is not among them: steps here are per unit learning rate)."""

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


@dataclass(frozen=True)
class StepMap:
    """A step map: ascent gradient tree → step tree.

    Attributes:
        name: ``"sgd"``, ``"frozen_adam"``, ``"adam_step"`` or ``"optimizer_step"``.
        fn: gradient tree → step tree (same names).
        per_unit_lr: True when the step is per unit learning rate (θ ← θ + η·step);
            False when the learning rates are inside it (θ ← θ + step).
        coordinatewise: True when coordinate k of the step depends on coordinate k of the
            gradient only (Adam, AdamW, SGD, the learning rates); False for global-norm
            clipping.
        parts: the maps of a ``chain``, in order (empty for a single map).
        max_norm: the clipping threshold of ``clip_by_global_norm`` (None otherwise).
        linear: True when the map is linear (SGD, the frozen-state preconditioner, the
            learning rates): A(x) = q ⊙ x.
        secant_fn: for a coordinate-wise map, gradient g ↦ (A(0), q) with
            q = (A(g) − A(0)) / g computed without cancellation (A'(0) where g = 0);
            None where the map does not provide it (``funcprobe.core.influence``
            then takes the difference).
    """

    name: str
    fn: Callable[[Mapping[str, Tensor]], ParamTree] = field(repr=False)
    per_unit_lr: bool = True
    coordinatewise: bool = True
    parts: tuple["StepMap", ...] = field(default=(), repr=False)
    max_norm: float | None = None
    linear: bool = False
    secant_fn: Callable[[Mapping[str, Tensor]], tuple[ParamTree, ParamTree]] | None = field(default=None, repr=False)

    def __call__(self, gradient: Mapping[str, Tensor]) -> ParamTree:
        return self.fn(gradient)

    def split_clipping(self) -> tuple[float | None, "StepMap"]:
        """``(c, A)`` with this map = A ∘ clip_by_global_norm(c) and A coordinate-wise
        (``c`` None: no clipping). Raises ``ValueError`` for a map of another shape."""
        parts = self.parts or (self,)
        max_norm = parts[0].max_norm
        rest = parts[1:] if max_norm is not None else parts
        if not all(m.coordinatewise for m in rest):
            raise ValueError(f"step: {self.name!r} is not global-norm clipping followed by a coordinate-wise map")
        if len(rest) == 1:
            return max_norm, rest[0]
        return max_norm, chain(self.name, *rest)


def per_name(name: str, fn: Callable[[str, Tensor], Tensor], *, per_unit_lr: bool = True,
             secant: Callable[[str, Tensor], tuple[Tensor, Tensor]] | None = None, linear: bool = False) -> StepMap:
    """A coordinate-wise step map from ``fn(parameter name, gradient tensor) → step tensor``
    (and optionally ``secant(name, g) → (A(0), q)``, see ``StepMap.secant_fn``)."""

    def secant_fn(gradient: Mapping[str, Tensor]) -> tuple[ParamTree, ParamTree]:
        pairs = {n: secant(n, g) for n, g in gradient.items()}
        return {n: a for n, (a, _) in pairs.items()}, {n: q for n, (_, q) in pairs.items()}

    return StepMap(name, lambda gradient: {n: fn(n, g) for n, g in gradient.items()}, per_unit_lr,
                   linear=linear, secant_fn=None if secant is None else secant_fn)


def chain(name: str, *maps: StepMap) -> StepMap:
    """The maps applied in order (optax's ``chain``); per unit lr only if all of them are.

    The chain has a ``secant_fn`` when its first map has one and every later map is
    linear (Adam followed by the learning rates): A(0) and q pass through the linear maps.
    """

    def fn(gradient: Mapping[str, Tensor]) -> ParamTree:
        tree = dict(gradient)
        for m in maps:
            tree = m(tree)
        return tree

    secant_fn = None
    if maps and maps[0].secant_fn is not None and all(m.linear and m.coordinatewise for m in maps[1:]):

        def secant_fn(gradient: Mapping[str, Tensor]) -> tuple[ParamTree, ParamTree]:
            at_zero, q = maps[0].secant_fn(gradient)
            for m in maps[1:]:
                at_zero, q = m(at_zero), m(q)
            return at_zero, q

    return StepMap(name, fn, all(m.per_unit_lr for m in maps), all(m.coordinatewise for m in maps), tuple(maps),
                   linear=all(m.linear for m in maps), secant_fn=secant_fn)


def sgd() -> StepMap:
    """P = identity."""
    return per_name("sgd", lambda name, g: g, secant=lambda name, g: (torch.zeros_like(g), torch.ones_like(g)),
                    linear=True)


def clip_by_global_norm(max_norm: float) -> StepMap:
    """``g ← g · min(1, c / (‖g‖ + 1e-6))`` with the 2-norm over every tensor of the tree:
    ``torch.nn.utils.clip_grad_norm_`` (torch 2.13, ``norm_type=2``) as a pure map."""

    def fn(gradient: Mapping[str, Tensor]) -> ParamTree:
        coef = clip_coefficient(gradient, max_norm)
        return {n: g * coef.to(g.dtype) for n, g in gradient.items()}

    return StepMap("clip_by_global_norm", fn, coordinatewise=False, max_norm=float(max_norm))


def clip_coefficient(gradient: Mapping[str, Tensor], max_norm: float) -> Tensor:
    """``min(1, c / (‖g‖ + 1e-6))``, the 0-d factor ``clip_grad_norm_`` multiplies every
    gradient by (2-norm over all tensors of the tree)."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradient.values()]))
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def scale_by_lr(lrs: Mapping[str, float]) -> StepMap:
    """Multiply each parameter's step by its param group's learning rate."""
    lrs = dict(lrs)
    return per_name("scale_by_lr", lambda name, g: g * lrs[name], per_unit_lr=False,
                    secant=lambda name, g: (torch.zeros_like(g), torch.full_like(g, lrs[name])), linear=True)


def frozen_adam(states: Mapping[str, AdamState], *, allow_identity_fallback: bool = False) -> StepMap:
    """The seeds' frozen-state Adam preconditioner for every name of ``states``.

    Raises ``ValueError`` listing the parameters with no Adam state yet, unless
    ``allow_identity_fallback`` (then P = identity for them).
    """
    stateless = sorted(n for n, st in states.items() if st.exp_avg_sq is None)
    if stateless and not allow_identity_fallback:
        raise ValueError(
            f"optimizer: step 'frozen_adam' needs exp_avg_sq, but {len(stateless)} parameter(s) have no Adam "
            f"state yet: {stateless[:8]}; use step='adam_step' (exact for them) or allow_identity_fallback=True"
        )
    states = dict(states)

    def fn(name: str, g: Tensor) -> Tensor:
        st = states[name]
        return g if st.exp_avg_sq is None else adam_preconditioner(g, st)

    return per_name("frozen_adam", fn, secant=lambda name, g: (torch.zeros_like(g), fn(name, torch.ones_like(g))),
                    linear=True)


def adam_step_map(params: Mapping[str, Tensor], states: Mapping[str, AdamState]) -> StepMap:
    """The exact next Adam/AdamW step per unit learning rate for every name of ``states``."""
    params, states = dict(params), dict(states)
    return per_name("adam_step", lambda name, g: adam_step(g, params[name], states[name]),
                    secant=lambda name, g: adam_secant(g, params[name], states[name]))


def optimizer_step_map(params: Mapping[str, Tensor], states: Mapping[str, AdamState], lrs: Mapping[str, float],
                       max_grad_norm: float | None = None) -> StepMap:
    """Δθ = what ``clip_grad_norm_`` + ``optimizer.step()`` of Adam/AdamW will add to θ now:
    global-norm clipping (if ``max_grad_norm``), the exact Adam/AdamW step, each param
    group's current learning rate (docs/definitions.md#step-maps)."""
    maps = [] if max_grad_norm is None else [clip_by_global_norm(max_grad_norm)]
    return chain("optimizer_step", *maps, adam_step_map(params, states), scale_by_lr(lrs))


def adam_preconditioner(g: Tensor, state: AdamState) -> Tensor:
    """``g / (sqrt(v / (1 − β2^t)) + ε)`` with the frozen ``exp_avg_sq`` v and ``step`` t.

    Source: docs/seeds/003 (``adam_preconditioner.apply_preconditioner``),
    docs/definitions.md#step-maps. Raises ``ValueError`` when the state has no second
    moment yet.
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
    denom = _sqrt(v) / (1.0 - h.beta2**t) ** 0.5 + h.eps
    delta = -(m / (1.0 - h.beta1**t)) / denom
    if h.weight_decay != 0 and h.decoupled_weight_decay:
        delta = delta - h.weight_decay * p
    return delta


def adam_secant(g: Tensor, param: Tensor, state: AdamState) -> tuple[Tensor, Tensor]:
    """(f(0), q) for the next Adam/AdamW step f of ``adam_step``, with
    q = (f(g) − f(0)) / g elementwise, computed without subtracting f(0) (the momentum and
    weight-decay part, often far larger than the gradient's) from f(g).

    With l the L2 term, m(g) = β1·m0 + (1−β1)(l − g), v(g) = β2·v0 + (1−β2)(l − g)²,
    D = sqrt(v̂)/sqrt(bc2) + ε and f = −m/(bc1·D) (+ the decoupled decay, a constant):
    q = −((m(g) − m(0))/g · D(0) − m(0)·(D(g) − D(0))/g) / (bc1·D(g)·D(0)), with
    (m(g) − m(0))/g = −(1−β1) and (v(g) − v(0))/g = (1−β2)(g − 2l) exactly; where g = 0
    this is f'(0) (docs/derivations.md#entropy-influence).
    """
    h = state.hyper
    dtype = g.dtype
    p = param.to(dtype)
    l = h.weight_decay * p if (h.weight_decay != 0 and not h.decoupled_weight_decay) else torch.zeros_like(g)
    m0_prev = torch.zeros_like(g) if state.exp_avg is None else state.exp_avg.to(dtype)
    v0_prev = torch.zeros_like(g) if state.exp_avg_sq is None else state.exp_avg_sq.to(dtype)
    t = state.step + 1
    bc1, bc2 = 1.0 - h.beta1**t, (1.0 - h.beta2**t) ** 0.5
    m0 = h.beta1 * m0_prev + (1.0 - h.beta1) * l
    v0 = h.beta2 * v0_prev + (1.0 - h.beta2) * l * l
    vg = h.beta2 * v0_prev + (1.0 - h.beta2) * (l - g) * (l - g)
    dv = (1.0 - h.beta2) * (g - 2.0 * l)  # (v(g) − v(0)) / g
    if h.amsgrad:
        v_max = torch.zeros_like(g) if state.max_exp_avg_sq is None else state.max_exp_avg_sq.to(dtype)
        w0, wg = torch.maximum(v_max, v0), torch.maximum(v_max, vg)
        both_v = (vg >= v_max) & (v0 >= v_max)
        safe_g = torch.where(g != 0, g, torch.ones_like(g))
        dv = torch.where(both_v, dv, torch.where(g != 0, (wg - w0) / safe_g, torch.zeros_like(g)))
        v0, vg = w0, wg
    root0, rootg = _sqrt(v0), _sqrt(vg)
    roots = root0 + rootg
    dD = torch.where(roots > 0, dv / torch.where(roots > 0, roots, torch.ones_like(roots)), torch.zeros_like(g)) / bc2
    D0, Dg = root0 / bc2 + h.eps, rootg / bc2 + h.eps
    q = -(-(1.0 - h.beta1) * D0 - m0 * dD) / (bc1 * Dg * D0)
    return adam_step(torch.zeros_like(g), param, state), q


def _sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for v ≥ 0 (the same values), with derivative 0 where v = 0 instead of
    ``inf·0 = NaN``: there Adam's step is ``N(g)/(sqrt(v(g))/√bc2 + ε)`` with N(0) = 0 and
    v = O(g²), whose derivative N'(0)/ε this gives exactly (used by the secant of
    ``funcprobe.core.influence``)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))
