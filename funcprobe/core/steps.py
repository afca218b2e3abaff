"""Step maps P as values: μY = P(∇θ mean_{n∈U} J[n]), the step θ ← θ + η·μY.

Each step map is a small frozen value closed over what it needs (optax style): build it
once from the optimizer's state (``funcprobe.edge.optim.step_map`` does that, reading
``torch.optim`` by parameter name), then apply it to an ascent gradient tree. Pure: no
optimizer objects here, only tensors and numbers.

Every step map has one shape, held in its type: optional clipping by the global norm
(``StepMap.clip``, a ``ClipByGlobalNorm``), then a coordinate-wise map A
(``StepMap.update``: coordinate k of the step depends on coordinate k of the gradient
only). ``funcprobe.core.influence.split_step`` relies on that shape. The blocks:

* ``sgd()``: identity;
* ``frozen_adam(states)``: the seeds' preconditioner ``g / (sqrt(v / (1 − β2^t)) + ε)``
  with Adam's state frozen (docs/seeds/003 "Adam preconditioning"; formerly called ``adam``);
* ``adam_next_step(params, states)``: the exact next ``torch.optim.Adam``/``AdamW`` step
  per unit learning rate (first moment, second-moment update, both bias corrections, ε
  outside the square root, L2 or decoupled weight decay, AMSGrad;
  docs/derivations.md#adam-step); the step of the setting ``step="adam_step"``;
* ``clip_by_global_norm(c)``: ``torch.nn.utils.clip_grad_norm_`` as a pure map;
* ``scale_by_lr(lrs)``: each parameter's learning rate;
* ``chain(*maps)``: the maps in order;
* ``optimizer_step_map(params, states, lrs, max_grad_norm)``: the step the trainer will
  actually take, learning rates inside: ``chain(clip_by_global_norm(c),
  adam_next_step(...), scale_by_lr(lrs))``.

Sign convention: the trainer minimises ``−mean J``, so the optimizer sees the gradient
``−∇ mean J`` (with ``maximize=True`` it sees ``+∇ mean J`` and flips it, which is the
same step). The step is therefore the ascent direction of J.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from .pytree import ParamTree

#: coordinate-wise map of one parameter: (parameter name, gradient tensor) → step tensor
Update = Callable[[str, Tensor], Tensor]
#: its secant: (name, g) → (A(0), q) with q = (A(g) − A(0)) / g (A'(0) where g = 0)
Secant = Callable[[str, Tensor], tuple[Tensor, Tensor]]


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
class ClipByGlobalNorm:
    """``g ← g · min(1, c / (‖g‖ + 1e-6))`` with the 2-norm over every tensor of the tree:
    ``torch.nn.utils.clip_grad_norm_`` (torch 2.13, ``norm_type=2``) as a pure map.

    Raises ``ValueError`` (naming ``max_norm``) unless ``max_norm`` is a finite number > 0.
    """

    max_norm: float

    def __post_init__(self) -> None:
        value = self.max_norm
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"max_norm: expected a finite number > 0, got {value!r}")
        object.__setattr__(self, "max_norm", float(value))

    def coefficient(self, gradient: Mapping[str, Tensor]) -> Tensor:
        """``min(1, c / (‖g‖ + 1e-6))``, the 0-d factor ``clip_grad_norm_`` multiplies every
        gradient by (2-norm over all tensors of the tree)."""
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradient.values()]))
        return torch.clamp(self.max_norm / (total + 1e-6), max=1.0)

    def __call__(self, gradient: Mapping[str, Tensor]) -> ParamTree:
        coef = self.coefficient(gradient)
        return {n: g * coef.to(g.dtype) for n, g in gradient.items()}


def _identity(name: str, g: Tensor) -> Tensor:
    """The coordinate-wise identity (``sgd``; the coordinate-wise part of a bare clip)."""
    return g


def _identity_secant(name: str, g: Tensor) -> tuple[Tensor, Tensor]:
    return torch.zeros_like(g), torch.ones_like(g)


@dataclass(frozen=True)
class StepMap:
    """A step map: ascent gradient tree (name → tensor) → step tree (same names and shapes),
    ``Δ(g) = A(clip(g))``.

    Attributes:
        name: what the step is called in messages and results (``"sgd"``, ``"frozen_adam"``,
            ``"adam_step"``, ``"optimizer_step"``, or a ``chain``'s name).
        update: A, coordinate-wise: ``update(parameter name, g) → step`` of the same shape,
            coordinate k depending on coordinate k of g only.
        clip: the global-norm clipping applied to the whole gradient tree before A
            (``None``: no clipping).
        secant: optional ``secant(name, g) → (A(0), q)`` with q = (A(g) − A(0)) / g computed
            without cancellation (A'(0) where g = 0); ``None``:
            ``funcprobe.core.influence`` takes the difference.
        linear: True when A is linear, A(x) = q ⊙ x (SGD, the frozen-state preconditioner,
            the learning rates): a ``chain`` passes a secant through such maps.
    """

    name: str
    update: Update = field(repr=False)
    clip: ClipByGlobalNorm | None = None
    secant: Secant | None = field(default=None, repr=False)
    linear: bool = False

    def __call__(self, gradient: Mapping[str, Tensor]) -> ParamTree:
        """Δ(g): ``clip`` (if any), then ``update`` per parameter."""
        if self.clip is not None:
            gradient = self.clip(gradient)
        return self.coordinatewise(gradient)

    def coordinatewise(self, gradient: Mapping[str, Tensor]) -> ParamTree:
        """A(g), the map without its clipping."""
        return {n: self.update(n, g) for n, g in gradient.items()}


def chain(*maps: StepMap, name: str | None = None) -> StepMap:
    """The maps applied in order (optax's ``chain``), as one ``StepMap``.

    Clipping may come only before every non-identity coordinate-wise map (clip, then A):
    identity maps (``sgd()``, the coordinate-wise part of ``clip_by_global_norm``) are
    skipped. The chain has a ``secant`` when the first non-identity map has one and every
    later map is linear (Adam followed by the learning rates): A(0) and q pass through the
    linear maps.

    Raises ``ValueError`` for no maps, more than one clipping, or a clipping after a
    non-identity map (not clipping followed by a coordinate-wise map).
    """
    if not maps or not all(isinstance(m, StepMap) for m in maps):
        raise ValueError(f"maps: expected one or more StepMap values, got {[type(m).__name__ for m in maps]}")
    name = name if name is not None else "chain(" + ", ".join(m.name for m in maps) + ")"
    clips = [m for m in maps if m.clip is not None]
    if len(clips) > 1:
        raise ValueError(f"maps: {len(clips)} clip_by_global_norm maps in one chain; at most one")
    parts = [m for m in maps if m.update is not _identity]
    if clips:
        at = next(i for i, m in enumerate(maps) if m.clip is not None)
        before = [m.name for m in maps[:at] if m.update is not _identity]
        if before:
            raise ValueError(
                f"maps: {clips[0].name!r} clips by the global norm after the coordinate-wise map(s) {before}; "
                "a step map clips first, then applies a coordinate-wise map"
            )
    clip = clips[0].clip if clips else None
    if not parts:
        return StepMap(name, _identity, clip, _identity_secant, linear=True)
    if len(parts) == 1:
        return StepMap(name, parts[0].update, clip, parts[0].secant, parts[0].linear)
    updates = [m.update for m in parts]

    def update(n: str, g: Tensor) -> Tensor:
        for f in updates:
            g = f(n, g)
        return g

    secant = None
    first = parts[0].secant
    if first is not None and all(m.linear for m in parts[1:]):
        rest = updates[1:]

        def secant(n: str, g: Tensor) -> tuple[Tensor, Tensor]:
            at_zero, q = first(n, g)
            for f in rest:
                at_zero, q = f(n, at_zero), f(n, q)
            return at_zero, q

    return StepMap(name, update, clip, secant, linear=all(m.linear for m in parts))


def sgd() -> StepMap:
    """P = identity."""
    return StepMap("sgd", _identity, secant=_identity_secant, linear=True)


def clip_by_global_norm(max_norm: float) -> StepMap:
    """Clipping alone (``ClipByGlobalNorm(max_norm)`` with the identity after it), to
    ``chain`` before a coordinate-wise map. Raises the ``ValueError`` of ``ClipByGlobalNorm``."""
    return StepMap("clip_by_global_norm", _identity, ClipByGlobalNorm(max_norm), _identity_secant, linear=True)


def scale_by_lr(lrs: Mapping[str, float]) -> StepMap:
    """Multiply each parameter's step by its param group's learning rate (``lrs``: name →
    lr; a name missing from it raises ``KeyError`` when the map is applied)."""
    lrs = dict(lrs)
    return StepMap("scale_by_lr", lambda name, g: g * lrs[name],
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

    def update(name: str, g: Tensor) -> Tensor:
        st = states[name]
        return g if st.exp_avg_sq is None else adam_preconditioner(g, st)

    return StepMap("frozen_adam", update, secant=lambda name, g: (torch.zeros_like(g), update(name, torch.ones_like(g))),
                   linear=True)


def adam_next_step(params: Mapping[str, Tensor], states: Mapping[str, AdamState]) -> StepMap:
    """The exact next Adam/AdamW step per unit learning rate, (θ_new − θ) / lr, for every
    name of ``states`` (``params``: name → the parameter's current value, for weight
    decay); the step of ``step="adam_step"``. Mirrors ``torch.optim.Adam`` (single-tensor
    path, torch 2.13) fed the loss gradient ``−g``; exact for parameters with no state."""
    params, states = dict(params), dict(states)
    return StepMap("adam_step", lambda name, g: _adam_update(g, params[name], states[name]),
                   secant=lambda name, g: _adam_secant(g, params[name], states[name]))


def optimizer_step_map(params: Mapping[str, Tensor], states: Mapping[str, AdamState], lrs: Mapping[str, float],
                       max_grad_norm: float | None = None) -> StepMap:
    """Δθ = what ``clip_grad_norm_`` + ``optimizer.step()`` of Adam/AdamW will add to θ now:
    global-norm clipping (if ``max_grad_norm``), the exact Adam/AdamW step, each param
    group's current learning rate (docs/definitions.md#step-maps)."""
    maps = [] if max_grad_norm is None else [clip_by_global_norm(max_grad_norm)]
    return chain(*maps, adam_next_step(params, states), scale_by_lr(lrs), name="optimizer_step")


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


def _adam_update(g: Tensor, param: Tensor, state: AdamState) -> Tensor:
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


def _adam_secant(g: Tensor, param: Tensor, state: AdamState) -> tuple[Tensor, Tensor]:
    """(f(0), q) for the next Adam/AdamW step f of ``_adam_update``, with
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
    return _adam_update(torch.zeros_like(g), param, state), q


def _sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for v ≥ 0 (the same values), with derivative 0 where v = 0 instead of
    ``inf·0 = NaN``: there Adam's step is ``N(g)/(sqrt(v(g))/√bc2 + ε)`` with N(0) = 0 and
    v = O(g²), whose derivative N'(0)/ε this gives exactly (used by the secant of
    ``funcprobe.core.influence``)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))
