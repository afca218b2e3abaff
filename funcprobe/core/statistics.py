"""The prediction and its E-conditional standard error, from the probe scalars s.

docs/definitions.md#estimates (docs/seeds/001 §D): mean_s = Σs / B = ⟨μX, μY⟩,
δH = η·mean_s, Var_E = η²·sample_var(s)/B from Σs, Σs², B in float64,
SE = sqrt(Var_E), 95% interval δH ± 1.96·SE.

One result vocabulary across the project: ``delta_h``, ``se``, ``ci95``,
``per_prompt`` (each prompt's share in nats) for the prediction here, for the realized
change (``funcprobe.validation.entropy_change.EntropyChange``) and for the
validation studies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import NonFiniteError, UnreachableDirectionError

#: two-sided 97.5% quantile of N(0, 1)
Z_95 = 1.959963984540054



@dataclass(frozen=True)
class EntropyPrediction:
    """The predicted entropy change of the next step and its E-conditional error.

    Attributes:
        s: ``[B]`` float64, s[n] = ⟨∇θ LX[n], μY⟩ (nats per unit learning rate); this
            rank's unless ``gather_s``.
        sum_s, sum_s2: Σ s and Σ s² over all ranks (float64).
        num_prompts: B over all ranks.
        lr: η, the learning rate of the step.
        mean_s: Σs / B = ⟨μX, μY⟩ (the seeds' ``bars_dot``).
        delta_h: predicted entropy change η·mean_s (nats, per W: docs/definitions.md#weighting).
        var: Var_E = η²·sample_var(s)/B (nats²).
        se: SE_E = sqrt(Var_E) (nats).
        mode, weighting: how s was computed.
        step: the step map of μY (``"sgd"``, ``"frozen_adam"``, ``"adam_step"``), or
            None when μY was given by the caller.
        step_norm: ||μY||₂ when known.
        num_update_prompts: B_U when μY came from an update batch.
        seconds: wall time of each phase (``"step"``, ``"probe"``) when timed.
        policy_gradient_signal: whether U's policy gradient was non-zero (None when μY
            was given by the caller). False means every advantage was 0 (or the adapter
            was off): the step, and so δH, is only Adam's momentum and weight decay
            (``adam_step``/``optimizer_step``; ``sgd`` and ``frozen_adam`` raise
            ``NoSignalError`` instead).
        delta_h_baseline, se_baseline: with ``split_baseline``, the predicted entropy
            change of the part of the step that does not depend on U (the step of a zero
            gradient: Adam's momentum and weight decay) and its SE; ``delta_h −
            delta_h_baseline`` is the part the update batch drives
            (docs/derivations.md#baseline-split).
        estimator: how δH was estimated from E: ``"independent"`` (E is not the update
            batch: mean of s over E, SE conditional on U), ``"leave_one_out"`` (E is the
            update batch U itself: each prompt's s against the step without its own
            gradient, so no prompt scores its own contribution; docs/derivations.md#leave-one-out)
            or ``"same_batch"`` (E = U without that correction: biased by each prompt's own
            contribution; only where the correction could not be made, said where it is used).
        delta_h_same_batch, se_same_batch: with ``"leave_one_out"``, the value E = U gives
            without it (mean of s over U along the full step; biased upwards in magnitude by
            each prompt's own contribution) and its spread-based SE, for comparison.
        effects: with ``effects=True``, the step's predicted effects on the logged token
            entropy, KL, completion length and reward (``funcprobe.core.effects.Effects``),
            from the same pass and with the same estimator; else None.
    """

    s: Tensor = field(repr=False)
    sum_s: float
    sum_s2: float
    num_prompts: int
    lr: float
    mean_s: float
    delta_h: float
    var: float
    se: float
    mode: str
    weighting: str
    step: str | None = None
    step_norm: float | None = None
    num_update_prompts: int | None = None
    estimator: str = "independent"
    delta_h_same_batch: float | None = None
    se_same_batch: float | None = None
    policy_gradient_signal: bool | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    delta_h_baseline: float | None = None
    se_baseline: float | None = None
    effects: Any = field(default=None, repr=False)  # funcprobe.core.effects.Effects (which imports this module)

    @classmethod
    def from_sums(cls, s: Tensor, totals: Sequence[float], *, lr: float, mode: str,
                  weighting: str) -> "EntropyPrediction":
        """Assemble the statistics from ``totals`` = (Σs, Σs², B) over all ranks (``s``: this
        rank's scalars, kept as they are). Raises ``ValueError`` if B < 2."""
        sum_s, sum_s2, num_prompts = totals[:3]
        B = int(num_prompts)
        if B < 2:
            raise ValueError(f"E: the conditional variance needs at least 2 prompts, got {B}")
        mean, sample_var = mean_and_sample_var(sum_s, sum_s2, B)
        var = lr * lr * sample_var / B
        return cls(s=s, sum_s=float(sum_s), sum_s2=float(sum_s2), num_prompts=B, lr=float(lr), mean_s=mean,
                   delta_h=lr * mean, var=var, se=math.sqrt(var), mode=mode, weighting=weighting)

    def with_step(self, step: str, step_norm: float, num_update_prompts: int,
                  seconds: dict[str, float], policy_gradient_signal: bool | None = None) -> "EntropyPrediction":
        """This prediction annotated with where μY came from."""
        return replace(self, step=step, step_norm=step_norm, num_update_prompts=num_update_prompts,
                       seconds=dict(seconds), policy_gradient_signal=policy_gradient_signal)

    def with_baseline(self, baseline: "EntropyPrediction | None") -> "EntropyPrediction":
        """This prediction with the baseline part's δH and SE (0 and 0 for ``None``: a step
        map whose zero-gradient step is zero)."""
        if baseline is None:
            return replace(self, delta_h_baseline=0.0, se_baseline=0.0)
        return replace(self, delta_h_baseline=baseline.delta_h, se_baseline=baseline.se)

    @property
    def unit(self) -> str:
        """The unit of ``delta_h``, ``se`` and ``per_prompt`` (``entropy_unit``)."""
        return entropy_unit(self.weighting)

    @property
    def ci95(self) -> tuple[float, float]:
        """Normal 95% interval δH ± 1.96·SE (nats)."""
        return (self.delta_h - Z_95 * self.se, self.delta_h + Z_95 * self.se)

    @property
    def per_prompt(self) -> Tensor:
        """``[B]`` η·s[n] (nats): each prompt's estimate; their mean is ``delta_h``."""
        return self.s * self.lr

    def to_dict(self) -> dict:
        """JSON-ready dict of every field, ``s`` as a list of floats, plus ``ci95``."""
        out = {
            "delta_h": self.delta_h, "se": self.se, "ci95": list(self.ci95), "var": self.var,
            "mean_s": self.mean_s, "lr": self.lr, "num_prompts": self.num_prompts,
            "sum_s": self.sum_s, "sum_s2": self.sum_s2, "mode": self.mode, "weighting": self.weighting,
            "unit": self.unit,
            "s": [float(x) for x in self.s.tolist()],
        }
        out["estimator"] = self.estimator
        if self.delta_h_same_batch is not None:
            out.update(delta_h_same_batch=self.delta_h_same_batch, se_same_batch=self.se_same_batch)
        if self.delta_h_baseline is not None:
            out.update(delta_h_baseline=self.delta_h_baseline, se_baseline=self.se_baseline)
        if self.effects is not None:
            out["effects"] = self.effects.to_dict()
        if self.step is not None:
            out.update(step=self.step, step_norm=self.step_norm, num_update_prompts=self.num_update_prompts,
                       seconds=dict(self.seconds), policy_gradient_signal=self.policy_gradient_signal)
        return out


#: the unit of an entropy quantity under each weighting (docs/definitions.md#weighting)
UNITS = {"dr_grpo": "nats per Lmax tokens", "per_token_avg": "nats per response token"}


def entropy_unit(weighting: str) -> str:
    """The unit of δH, SE and s·η under ``weighting``: Dr. GRPO divides each sequence's
    entropy by Lmax, per_token_avg by the response's own length."""
    return UNITS[weighting]


def mean_and_sample_var(sum_s: float, sum_s2: float, num: int) -> tuple[float, float]:
    """(Σs / B, sample variance (Σs² − B·mean²) / (B − 1), floored at 0) from the sums over
    B ≥ 2 values (float64 arithmetic; ranks all-reduce the sums first)."""
    mean = sum_s / num
    return mean, max((sum_s2 - num * mean * mean) / (num - 1), 0.0)


def scalar_counts(s: Tensor) -> list[float]:
    """(B, #non-finite, #non-zero) of the local s: the inputs of ``check_scalars``."""
    return [float(s.numel()), float((~torch.isfinite(s)).sum()), float((s != 0).sum())]


def check_scalars(s: Tensor, counts: Sequence[float]) -> None:
    """Raise for non-finite or all-zero s, from (B, #non-finite, #non-zero) over all ranks.

    Raises:
        NonFiniteError: some s is NaN or inf (this rank's prompts listed).
        UnreachableDirectionError: every s is exactly 0.
    """
    total, non_finite, non_zero = counts
    if non_finite > 0:
        local = (~torch.isfinite(s)).nonzero().flatten().tolist()
        raise NonFiniteError(
            f"probe: s is NaN or inf for {int(non_finite)} prompt(s) (here: {local[:16]}): the model produced "
            "non-finite log-probs on real response tokens (check the inputs and the model's dtype)"
        )
    if total > 0 and non_zero == 0:
        raise UnreachableDirectionError(
            "probe: every s[n] is exactly 0: the direction does not reach the forward "
            "(are the probed parameters used, is the adapter enabled?)"
        )
