"""Choosing a knob of the next step before it is taken: targets, the solvers, the decision.

Pure values and scalar solvers (no model): the edge (``funcprobe.control``) computes, once,
what makes the predicted entropy change of the step a cheap function of a knob, and hands
the solvers here a callable ``predict(x) → (δH, SE)`` (nats per W, docs/definitions.md#weighting)
that costs step-map evaluations and dot products only (docs/control.md).

Knobs (``KNOBS``):

* ``"beta"``: the entropy-bonus coefficient β, ascent gradient g_pg + β·g_H, in [β_min, β_max]
  (β_min = 0 by default: a bonus only; β_min < 0 admits an entropy penalty, which can lower
  the entropy faster than the policy gradient alone). Adam's step is non-linear in the
  gradient, so δH(β) is solved for numerically: a grid walking out from 0 for the first
  crossing of the target, then bisection to the resolution of float64 (``solve_bracketed``);
* ``"lr_scale"``: a scale c ∈ (0, 1] of every param group's learning rate for this step
  only. Adam's and AdamW's step Δθ is linear in the learning rate (clipping acts on the
  gradient, decoupled weight decay is lr·wd·θ), so δH(c) = c·δH(1), SE(c) = c·SE(1) and the
  second-order KL(c) = c²·KL(1): closed form (``solve_scale``).

Targets (``EntropyTarget``): a per-step δH*, a band [lo, hi] (optionally its 95% interval
rather than its mean: ``risk``), a schedule H*(t) (``EntropySchedule``: δH* = H*(t+1) − Ĥ(t),
Ĥ measured on E), a KL budget (the step-size scale only). The result (``ControlDecision``)
says whether the target was reachable in the knob's range; a value is never clamped
silently.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from ..errors import SettingsError
from .statistics import Z_95

#: the knobs ``choose`` can set
KNOBS = ("beta", "lr_scale")

#: points of the grid on each side of 0 (toward β_max, and toward β_min < 0) that brackets the first crossing
GRID_POINTS = 48
#: the smallest grid point above 0, as a fraction of β_max
GRID_FIRST = 1e-6

#: ``predict(x) → (δH, SE)`` at knob value x (nats per W)
Predict = Callable[[float], tuple[float, float]]


def _real(value: object, name: str, *, allow_inf: bool = False) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise SettingsError(f"{name}: expected a real number, got {value!r}")
    value = float(value)
    if not allow_inf and not math.isfinite(value):
        raise SettingsError(f"{name}: expected a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class EntropySchedule:
    """An entropy schedule H*(t) in the units of δH (nats per W, docs/definitions.md#weighting).

    ``end=None``: hold ``start``. Otherwise a linear anneal from ``start`` at t = 0 to
    ``end`` at t = ``steps``, held at ``end`` after.

    Raises ``SettingsError`` naming ``schedule.start``/``end``/``steps`` for a non-finite
    level, ``end`` without ``steps`` (or the reverse), or ``steps`` not an int ≥ 1.
    """

    start: float
    end: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _real(self.start, "schedule.start"))
        if (self.end is None) != (self.steps is None):
            raise SettingsError("schedule.end, schedule.steps: give both (a linear anneal) or neither (hold start)")
        if self.end is not None:
            object.__setattr__(self, "end", _real(self.end, "schedule.end"))
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise SettingsError(f"schedule.steps: expected an int >= 1, got {self.steps!r}")

    def at(self, t: int) -> float:
        """H*(t) for an optimizer step index t ≥ 0."""
        if self.end is None:
            return self.start
        return self.start + (self.end - self.start) * min(t, self.steps) / self.steps


#: the relative error of a first-order δH added to its SE when a prediction carries the
#: entropy estimate forward (``EntropyEstimate.advance``): per_token_avg at the optimizer's
#: own step on SmolLM2, mean predicted −0.222 against realized −0.245 (a 10% shortfall) with
#: z sd 1.10 over 100 repetitions (benchmarks/results/effects-smollm2.md)
FIRST_ORDER_REL_ERROR = 0.1

#: how a schedule's Ĥ(t) is estimated (``EntropyControl.estimate``)
ESTIMATES = ("filtered", "measured")


@dataclass(frozen=True)
class EntropyEstimate:
    """An estimate of the current entropy Ĥ(t) and its variance (nats per W, nats² per W²).

    The entropy a schedule is aimed from is measured on each step's batch, whose prompts
    change every step: its SE (0.1–0.2 nats on 8 prompts, docs/control.md) is larger than the
    predicted change of a step. ``advance`` carries an estimate over a step by that step's
    prediction (the mean moves by δH, the variance grows by SE² + (``FIRST_ORDER_REL_ERROR``·δH)²),
    ``fuse`` combines it with the next measurement by inverse-variance weights (a scalar
    Kalman filter whose process model is funcprobe's prediction of each step).

    Raises ``SettingsError`` naming ``estimate.mean``/``estimate.var`` for a non-finite mean
    or a negative or non-finite variance.
    """

    mean: float
    var: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _real(self.mean, "estimate.mean"))
        var = _real(self.var, "estimate.var")
        if var < 0:
            raise SettingsError(f"estimate.var: expected a variance >= 0, got {self.var!r}")
        object.__setattr__(self, "var", var)

    @property
    def se(self) -> float:
        return math.sqrt(self.var)

    def advance(self, delta_h: float, se: float) -> "EntropyEstimate":
        """The estimate after a step predicted to change the entropy by ``delta_h`` ± ``se``."""
        return EntropyEstimate(self.mean + delta_h,
                               self.var + se * se + (FIRST_ORDER_REL_ERROR * delta_h) ** 2)

    def fuse(self, measured: float, se: float) -> "EntropyEstimate":
        """This estimate combined with a measurement ``measured`` ± ``se`` (independent of it):
        the inverse-variance weighted mean. A zero variance on one side keeps that side."""
        total = self.var + se * se
        if total == 0.0:
            return EntropyEstimate(measured, 0.0)
        gain = self.var / total  # the Kalman gain
        return EntropyEstimate(self.mean + gain * (measured - self.mean), (1.0 - gain) * self.var)


@dataclass(frozen=True)
class EntropyTarget:
    """What the next step should do to the entropy (and its KL), checked once.

    Exactly one entropy target, or none with a KL budget:

    Attributes:
        delta_h: a per-step δH* (nats per W).
        band: (lo, hi), lo < hi, either end may be infinite (one-sided): the step's δH
            must lie in it; the knob moves only if the uncontrolled step is outside.
        schedule: ``EntropySchedule``; δH* = H*(t + 1) − Ĥ(t) with Ĥ(t) measured on E and
            t the ``step_index`` given to ``choose``.
        kl_budget: > 0, the most KL(π_old ‖ π_new) of the step (nats per response, second
            order: docs/derivations.md#predicted-effects); met by the step-size scale.
        risk: with a band, make the 95% interval δH ± 1.96·SE (not the mean) lie in it.

    Raises ``SettingsError`` naming ``target.<field>``.
    """

    delta_h: float | None = None
    band: tuple[float, float] | None = None
    schedule: EntropySchedule | None = None
    kl_budget: float | None = None
    risk: bool = False

    def __post_init__(self) -> None:
        given = [n for n in ("delta_h", "band", "schedule") if getattr(self, n) is not None]
        if len(given) > 1:
            raise SettingsError(f"target: give one of delta_h, band, schedule; got {given}")
        if not given and self.kl_budget is None:
            raise SettingsError("target: expected delta_h, band, schedule or kl_budget; got none")
        if self.delta_h is not None:
            object.__setattr__(self, "delta_h", _real(self.delta_h, "target.delta_h"))
        if self.band is not None:
            band = self.band
            if isinstance(band, (str, bytes)) or not hasattr(band, "__len__") or len(band) != 2:
                raise SettingsError(f"target.band: expected (lo, hi), got {band!r}")
            lo, hi = (_real(v, "target.band", allow_inf=True) for v in band)
            if not lo < hi or (lo == -math.inf and hi == math.inf):
                raise SettingsError(f"target.band: expected lo < hi with at least one finite end, got {band!r}")
            object.__setattr__(self, "band", (lo, hi))
        if self.schedule is not None and not isinstance(self.schedule, EntropySchedule):
            raise SettingsError(f"target.schedule: expected an EntropySchedule, got {type(self.schedule).__name__}")
        if self.kl_budget is not None:
            budget = _real(self.kl_budget, "target.kl_budget")
            if budget <= 0:
                raise SettingsError(f"target.kl_budget: expected a number > 0 (nats), got {self.kl_budget!r}")
            object.__setattr__(self, "kl_budget", budget)
        if not isinstance(self.risk, bool):
            raise SettingsError(f"target.risk: expected True or False, got {self.risk!r}")
        if self.risk and self.band is None:
            raise SettingsError("target.risk: the 95% interval is made to meet a band; give band=(lo, hi) "
                                "(one end may be infinite)")


@dataclass(frozen=True)
class ControlRequest:
    """The knob and its range for ``choose``, checked once.

    Attributes:
        target: the ``EntropyTarget``.
        knob: ``"beta"`` (entropy-bonus coefficient, range [beta_min, beta_max]) or
            ``"lr_scale"`` (the step's learning-rate scale c, range (0, 1]).
        beta_max: the largest β tried (> 0).
        beta_min: the smallest β tried (≤ 0; default 0: a bonus only; < 0 admits an entropy
            penalty −β·g_H, for targets below the policy gradient's own δH).
        step_index: the optimizer step t ≥ 0, needed by a schedule (None otherwise).
        gradient: a trainer's ascent gradient of U before clipping, name → tensor, used
            instead of funcprobe's own policy gradient (checked against the model by the
            caller, ``EntropyProbe.choose_for_step``); None: funcprobe's own.
        prior: an ``EntropyEstimate`` of Ĥ(t) carried from the previous step's decision
            (``ControlDecision.estimate_after``), fused with the measurement on E; a schedule
            only. None: Ĥ(t) is the measurement alone.

    Raises ``SettingsError`` naming ``knob``, ``beta_max``, ``beta_min``, ``step_index``, ``prior``
    or ``target``.
    """

    target: EntropyTarget
    knob: str = "lr_scale"
    beta_max: float = 1.0
    beta_min: float = 0.0
    step_index: int | None = None
    gradient: dict | None = field(default=None, compare=False, repr=False)
    prior: EntropyEstimate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, EntropyTarget):
            raise SettingsError(f"target: expected an EntropyTarget, got {type(self.target).__name__}")
        if self.knob not in KNOBS:
            raise SettingsError(f"knob: expected one of {list(KNOBS)}, got {self.knob!r}")
        beta_max = _real(self.beta_max, "beta_max")
        if beta_max <= 0:
            raise SettingsError(f"beta_max: expected a finite number > 0, got {self.beta_max!r}")
        object.__setattr__(self, "beta_max", beta_max)
        beta_min = _real(self.beta_min, "beta_min")
        if beta_min > 0:
            raise SettingsError(f"beta_min: expected a finite number <= 0 (0: a bonus only, < 0: an entropy "
                                f"penalty allowed), got {self.beta_min!r}")
        if beta_min != 0 and self.knob != "beta":
            raise SettingsError(f"beta_min: the range of knob='beta'; got knob={self.knob!r}")
        object.__setattr__(self, "beta_min", beta_min)
        if self.knob == "beta" and self.target.kl_budget is not None:
            raise SettingsError("target.kl_budget: a KL budget is met by the step size; use knob='lr_scale'")
        if self.target.schedule is not None:
            t = self.step_index
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise SettingsError(f"step_index: a schedule needs the optimizer step t (an int >= 0), got {t!r}")
        elif self.step_index is not None:
            raise SettingsError("step_index: only used with target.schedule; drop it or give a schedule")
        if self.prior is not None:
            if not isinstance(self.prior, EntropyEstimate):
                raise SettingsError(f"prior: expected an EntropyEstimate, got {type(self.prior).__name__}")
            if self.target.schedule is None:
                raise SettingsError("prior: an estimate of the current entropy is only used with target.schedule")


@dataclass(frozen=True)
class EntropyControl:
    """A controller for a trainer: the target and the knob it sets before every step
    (``ProbedGRPOTrainer(entropy_control=...)``), checked once when it is built.

    Attributes:
        target: the ``EntropyTarget`` (a schedule's t is the trainer's optimizer step).
        knob: ``"lr_scale"`` or ``"beta"`` (``ControlRequest``).
        beta_max: the largest β tried (> 0).
        beta_min: the smallest β tried (≤ 0; < 0 admits an entropy penalty).
        estimate: how a schedule's Ĥ(t) is estimated: ``"filtered"`` (default: the
            previous step's estimate carried forward by its prediction and fused with the
            measurement on the step's batch, ``EntropyEstimate``) or ``"measured"`` (the
            measurement alone, every step afresh).

    Raises ``SettingsError`` naming ``target``, ``knob``, ``beta_max``, ``beta_min`` (as
    ``ControlRequest``) or ``estimate``.
    """

    target: EntropyTarget
    knob: str = "lr_scale"
    beta_max: float = 1.0
    beta_min: float = 0.0
    estimate: str = "filtered"

    def __post_init__(self) -> None:
        if self.estimate not in ESTIMATES:
            raise SettingsError(f"estimate: expected one of {list(ESTIMATES)}, got {self.estimate!r}")
        checked = self.request(0)
        object.__setattr__(self, "beta_max", checked.beta_max)
        object.__setattr__(self, "beta_min", checked.beta_min)

    def request(self, step_index: int, gradient: dict | None = None,
                prior: EntropyEstimate | None = None) -> ControlRequest:
        """The ``ControlRequest`` of optimizer step ``step_index`` (t ≥ 0: steps taken so far),
        for the trainer's ``gradient`` and, with ``estimate="filtered"`` and a schedule, the
        ``prior`` carried from the previous decision (ignored otherwise; see ``ControlRequest``)."""
        scheduled = isinstance(self.target, EntropyTarget) and self.target.schedule is not None
        return ControlRequest(target=self.target, knob=self.knob, beta_max=self.beta_max, beta_min=self.beta_min,
                              step_index=step_index if scheduled else None, gradient=gradient,
                              prior=prior if scheduled and self.estimate == "filtered" else None)


@dataclass(frozen=True)
class Solution:
    """A solver's answer: the knob value, the δH* it aimed at (None: none needed), whether
    the target was met in range, why not, the δH range seen, the evaluations made."""

    value: float
    aimed: float | None
    reachable: bool
    reason: str
    span: tuple[float, float]
    evaluations: int


def bounds(delta_h: float, se: float, risk: bool) -> tuple[float, float]:
    """The interval that must lie in a band: (δH, δH), or the 95% interval with ``risk``."""
    return (delta_h - Z_95 * se, delta_h + Z_95 * se) if risk else (delta_h, delta_h)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


# ---------------------------------------------------------------------------- β: bracketing
def solve_bracketed(predict: Predict, aim: float | None, band: tuple[float, float] | None, risk: bool,
                    x_max: float, x_min: float = 0.0) -> Solution:
    """The x ∈ [x_min, x_max] (x_min ≤ 0 < x_max) of smallest magnitude meeting a point
    target ``aim`` or a ``band``, searched first on the side toward the target.

    From 0, a grid walks out along each side of the range (``GRID_POINTS`` geometric points
    from ``GRID_FIRST``·|end| to the end; the negative side only where x_min < 0): first the
    side that moves toward the target if δH rises with x (positive when δH(0) is below the
    target: an entropy bonus raises the entropy), the other only if that side never reaches
    it. The first sign change of h(x) = δH(x) − δH* (for a band: of the bound on the side the
    uncontrolled step misses, against that edge) is narrowed by bisection to adjacent floats
    (continuous h: the clipping, Adam's step and the dot products are). No sign change on
    either side: the grid point closest to the target, ``reachable=False``.
    """
    def ray(end: float) -> list[float]:
        return [end * GRID_FIRST ** (1 - k / (GRID_POINTS - 1)) for k in range(GRID_POINTS)] if end else []

    cache: dict[float, tuple[float, float]] = {}

    def at(x: float) -> tuple[float, float]:
        if x not in cache:
            cache[x] = predict(x)
        return cache[x]

    d0, se0 = at(0.0)
    if band is not None:
        lo_b, hi_b = bounds(d0, se0, risk)
        if lo_b >= band[0] and hi_b <= band[1]:
            return Solution(0.0, None, True, "", (d0, d0), len(cache))
        side, aim = (0, band[0]) if lo_b < band[0] else (1, band[1])

        def h(x: float) -> float:
            return bounds(*at(x), risk)[side] - aim
    else:
        def h(x: float) -> float:
            return at(x)[0] - aim

    h0 = h(0.0)
    sides = [ray(x_max), ray(x_min)] if h0 < 0 else [ray(x_min), ray(x_max)]
    found = None
    for rest in sides:
        path = [0.0] + rest
        values = [h(x) for x in path]
        k = next((k for k in range(len(path)) if values[k] == 0.0 or
                  (k > 0 and (values[k - 1] < 0) != (values[k] < 0))), None)
        if k is not None:
            found = (path, values, k)
            break
    seen = sorted(cache)
    span = (min(at(x)[0] for x in seen), max(at(x)[0] for x in seen))
    if found is None:
        hs = [h(x) for x in seen]
        best = seen[min(range(len(seen)), key=lambda k: abs(hs[k]))]
        what = "the 95% bound" if risk else "δH"
        return Solution(best, aim, False,
                        f"{what} over beta in [{_fmt(x_min)}, {_fmt(x_max)}] spans [{_fmt(min(hs) + aim)}, "
                        f"{_fmt(max(hs) + aim)}] on a grid of {len(seen)} points and never reaches "
                        f"{_fmt(aim)}; beta = {_fmt(best)} comes closest", span, len(cache))
    path, values, k = found
    if values[k] == 0.0:
        x = path[k]
    else:
        (a, ha), (b, _) = sorted([(path[k - 1], values[k - 1]), (path[k], values[k])])
        for _ in range(200):
            mid = 0.5 * (a + b)
            if mid <= a or mid >= b:
                break
            hm = h(mid)
            if hm == 0.0:
                a = b = mid
                break
            if (hm < 0) == (ha < 0):
                a, ha = mid, hm
            else:
                b = mid
        x = a if abs(h(a)) <= abs(h(b)) else b
    if band is not None:
        lo_b, hi_b = bounds(*at(x), risk)
        if not (lo_b >= band[0] - 1e-12 * abs(band[0]) and hi_b <= band[1] + 1e-12 * abs(band[1])):
            return Solution(x, aim, False, f"at beta = {_fmt(x)}, where one edge is met, the interval "
                            f"[{_fmt(lo_b)}, {_fmt(hi_b)}] is wider than the band {band}", span, len(cache))
    return Solution(x, aim, True, "", span, len(cache))


# ---------------------------------------------------------------------------- c: closed form
def solve_scale(delta_h: float, se: float, kl: float | None, target: EntropyTarget,
                aim: float | None) -> Solution:
    """The largest c ∈ (0, 1] meeting the target, from δH, SE and KL of the full step (c = 1):
    δH(c) = c·δH, SE(c) = c·SE, KL(c) = c²·KL. ``aim``: the point target δH* (``delta_h`` or
    the schedule's), None for a band or a KL budget alone. Not reachable: the c ∈ [0, 1]
    (within the KL budget) whose δH comes closest, with the reason."""
    c_max, why_max = 1.0, "1 (the full step)"
    if target.kl_budget is not None and kl is not None and kl > target.kl_budget:
        c_max, why_max = math.sqrt(target.kl_budget / kl), f"{_fmt(math.sqrt(target.kl_budget / kl))} (the KL budget)"
    span = (min(0.0, c_max * delta_h), max(0.0, c_max * delta_h))
    if aim is not None:
        if delta_h == 0.0:
            return Solution(c_max, aim, False, "the full step's δH is 0: no step size reaches the target", span, 0)
        c = aim / delta_h
        if 0 < c <= c_max:
            return Solution(c, aim, True, "", span, 0)
        if c <= 0:
            return Solution(0.0, aim, False, f"the target {_fmt(aim)} has the opposite sign of the full step's δH "
                            f"{_fmt(delta_h)}: only c -> 0 (no step) comes closer", span, 0)
        return Solution(c_max, aim, False, f"the target {_fmt(aim)} needs c = {_fmt(c)} > {why_max}", span, 0)
    if target.band is None:  # a KL budget alone
        return Solution(c_max, None, True, "", span, 0)
    lo, hi = target.band
    low_k, high_k = bounds(delta_h, se, target.risk)
    c_lo, c_hi, hi_edge = 0.0, math.inf, None  # {c > 0: c·low_k >= lo and c·high_k <= hi}
    for k, edge, sense in ((low_k, lo, 1), (high_k, hi, -1)):
        if not math.isfinite(edge):
            continue
        if k == 0.0:
            if sense * (0.0 - edge) < 0:
                c_lo, c_hi, hi_edge = math.inf, 0.0, edge
        elif (k > 0) == (sense > 0):
            c_lo = max(c_lo, edge / k)
        elif edge / k < c_hi:
            c_hi, hi_edge = edge / k, edge
    c = min(c_hi, c_max)
    if c > 0 and c >= c_lo:
        return Solution(c, hi_edge if c_hi <= c_max else None, True, "", span, 0)
    what = "the 95% interval" if target.risk else "δH"
    if c_lo > c_max:
        return Solution(c_max, None, False, f"the band {target.band} needs c >= {_fmt(c_lo)} > {why_max}", span, 0)
    if c_hi <= 0:
        return Solution(0.0, None, False, f"no c in (0, {_fmt(c_max)}] puts {what} of the step (c·[{_fmt(low_k)}, "
                        f"{_fmt(high_k)}]) in the band {target.band}: only c -> 0 (no step) comes closer", span, 0)
    return Solution(c_hi, hi_edge, False, f"{what} of the step (c·[{_fmt(low_k)}, {_fmt(high_k)}]) is wider than "
                    f"the band {target.band} at every c: it needs c >= {_fmt(c_lo)} and c <= {_fmt(c_hi)}",
                    span, 0)


# ---------------------------------------------------------------------------- the result
@dataclass(frozen=True)
class ControlDecision:
    """The knob value chosen for the next step, and the step's prediction at it.

    Attributes:
        knob: ``"beta"`` or ``"lr_scale"``.
        value: β (the entropy-bonus coefficient, dimensionless: the ascent gradient is
            g_pg + β·g_H) or c (the factor on every param group's learning rate).
        reachable: whether the target is met at ``value`` inside the knob's range; when
            False, ``value`` is the in-range value that comes closest and ``reason`` says why.
        reason: "" when reachable.
        target: the ``EntropyTarget``.
        aimed: the δH* solved for (nats per W): the point target, the schedule's
            H*(t+1) − Ĥ(t), or a band's edge that binds; None when the uncontrolled step
            already meets the band (or only the KL budget binds).
        delta_h, se: the predicted δH of the step at ``value`` and its SE over E (nats per W).
        kl, kl_se: the predicted KL(π_old ‖ π_new) of the step at ``value`` (nats per
            response, second order) and its SE; None unless ``effects=True`` or a KL budget.
        uncontrolled, uncontrolled_se: δH and SE of the step the optimizer would take
            without control (β = 0, c = 1).
        span: (min, max) of δH seen over the knob's range (the grid for β; c ∈ [0, c_max]).
        current_entropy, current_entropy_se: Ĥ(t), the estimate the schedule's δH* is
            aimed from, in the units of δH (a schedule only): the measurement on E, fused with
            the request's ``prior`` where one was given.
        measured_entropy, measured_entropy_se: the measurement on E alone (a schedule only).
        estimator: ``"independent"`` (E ≠ U) or ``"leave_one_out"`` (E = U, no prompt scores
            its own contribution; the biased same-batch value is never acted on).
        lr: η of the δH values (1.0 for ``step="optimizer_step"``, whose Δθ holds the rates).
        unit: the unit of δH (``entropy_unit``).
        evaluations: how many knob values were evaluated (step maps + dot products, no forward).
        step: the step at ``value`` per unit ``lr`` (``optimizer_step``: Δθ itself), name → tensor.
        gradient: ``knob="beta"`` only: the ascent gradient g_pg + β·g_H at ``value``, before
            clipping, name → tensor (a trainer applies β by writing ``−gradient`` into
            ``.grad`` ahead of its clipping); empty for ``"lr_scale"``.
    """

    knob: str
    value: float
    reachable: bool
    reason: str
    target: EntropyTarget
    aimed: float | None
    delta_h: float
    se: float
    uncontrolled: float
    uncontrolled_se: float
    span: tuple[float, float]
    estimator: str
    lr: float
    unit: str
    evaluations: int
    kl: float | None = None
    kl_se: float | None = None
    current_entropy: float | None = None
    current_entropy_se: float | None = None
    measured_entropy: float | None = None
    measured_entropy_se: float | None = None
    step: dict = field(default_factory=dict, repr=False)
    gradient: dict = field(default_factory=dict, repr=False)

    @property
    def ci95(self) -> tuple[float, float]:
        """δH ± 1.96·SE at ``value`` (nats per W)."""
        return (self.delta_h - Z_95 * self.se, self.delta_h + Z_95 * self.se)

    def estimate_after(self) -> EntropyEstimate | None:
        """The estimate of the entropy after the step taken at ``value``: Ĥ(t) carried by
        its prediction (``EntropyEstimate.advance``); the ``prior`` of the next step's request.
        None without a schedule."""
        if self.current_entropy is None:
            return None
        return EntropyEstimate(self.current_entropy, self.current_entropy_se ** 2).advance(self.delta_h, self.se)

    def to_dict(self) -> dict:
        """JSON-ready: every field but ``step``, ``gradient`` and ``target`` (its fields
        instead), plus ``ci95``."""
        t = self.target
        return {"knob": self.knob, "value": self.value, "reachable": self.reachable, "reason": self.reason,
                "target": {"delta_h": t.delta_h, "band": None if t.band is None else list(t.band),
                           "schedule": None if t.schedule is None else vars(t.schedule),
                           "kl_budget": t.kl_budget, "risk": t.risk},
                "aimed": self.aimed, "delta_h": self.delta_h, "se": self.se, "ci95": list(self.ci95),
                "kl": self.kl, "kl_se": self.kl_se, "uncontrolled": self.uncontrolled,
                "uncontrolled_se": self.uncontrolled_se, "span": list(self.span),
                "current_entropy": self.current_entropy, "current_entropy_se": self.current_entropy_se,
                "measured_entropy": self.measured_entropy, "measured_entropy_se": self.measured_entropy_se,
                "estimator": self.estimator, "lr": self.lr, "unit": self.unit, "evaluations": self.evaluations}
