"""Validation against ground truth on enumerable models: calibration and first-order sweeps.

Benchmark and test code, not part of the library (``benchmarks/calibration.py`` and
``tests/test_validation.py`` import it; the exact values come from
``benchmarks/exact_entropy.py``).

* ``calibration_study``: repeat the probe on fresh evaluation batches E (prompts drawn
  i.i.d. from a fixed pool, responses sampled with ``generate``) and compare
  ``η·s̄ ± 1.96·SE_E`` with the exact ``η·⟨∇H_w, μY⟩`` from enumeration.
* ``objective_scalars``: the core transform
  (``funcprobe.core.transforms.directional_derivatives``) on any per-prompt objective a
  study wants (e.g. the biased surrogate below).
* ``first_order_sweep``: predicted ``η·⟨∇H_w, μY⟩`` against the exact change of the step
  actually taken, over learning rates.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from exact_entropy import enumeration_batch, exact_directional_derivative, exact_entropy_change
from funcprobe.core.objectives import Objective, entropy_objective, weighted_logprobs
from funcprobe.core.rollouts import RolloutBatch
from funcprobe.core.statistics import Z_95, EntropyPrediction, check_scalars, scalar_counts
from funcprobe.core.transforms import chunked, directional_derivatives
from funcprobe.forward.rules import jvp_rules
from funcprobe.edge.registry import ParamRegistry
from funcprobe.edge.rng import seeded
from funcprobe.edge.session import probe_session
from funcprobe.errors import SettingsError
from funcprobe.settings import ProbeSettings


# ------------------------------------------------------------------ transforms
def objective_scalars(registry: ParamRegistry, E: RolloutBatch, muY: Mapping[str, Tensor], objective: Objective,
                      *, mode: str = "jvp", chunk_size: int = 8) -> Tensor:
    """⟨∇θ objective[n], μY⟩ ``[B]`` float64 for any per-prompt ``objective`` (checked:
    finite and not all zero). With ``entropy_objective`` this is ``probe_scalars``."""
    tangent = {k: muY[k].to(device=v.device, dtype=v.dtype) for k, v in registry.trainable.items()}
    f = objective.on_logprobs(registry.logprob_fn())
    with probe_session(registry), jvp_rules() if mode == "jvp" else contextlib.nullcontext():
        s = directional_derivatives(f, mode=mode)(registry.trainable, tangent,
                                                   chunked(E.to(registry.device), chunk_size))
    check_scalars(s, scalar_counts(s))
    return s


# ------------------------------------------------------------------ sampling
def sample_fixed_length(model: nn.Module, prompts: Sequence[Sequence[int]], *, group_size: int,
                        response_len: int, seed: int, max_len: float | None = None) -> RolloutBatch:
    """G responses of exactly ``response_len`` tokens per prompt with ``model.generate``.

    Sampling at temperature 1 with no top-k/top-p truncation and no end-of-sequence
    token, under a forked RNG seeded with ``seed`` (the caller's RNG is untouched).
    Prompts must all have the same length.
    """
    from transformers import GenerationConfig

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts: sample_fixed_length needs prompts of equal length")
    if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is not None:
        raise ValueError(
            "model: has an end-of-sequence token; exact enumeration needs fixed-length responses, so build the "
            "validation model with eos_token_id=None (suppressing EOS would not sample from the policy)"
        )
    ids = torch.tensor([list(p) for p in prompts], device=next(model.parameters()).device)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=response_len,
                              num_return_sequences=group_size, pad_token_id=0, eos_token_id=None)
    with seeded(seed, ids.device), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    P = ids.shape[1]
    if out.shape != (len(prompts) * group_size, P + response_len):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected fixed-length responses")
    resp = out[:, P:].reshape(len(prompts), group_size, response_len).tolist()
    return RolloutBatch.from_lists([list(p) for p in prompts], resp, pad_token_id=0, max_len=max_len)


# ------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class CalibrationResult:
    """Repeated predictions against the exact first-order change.

    Attributes:
        exact: η·⟨∇H_w, μY⟩ averaged over the prompt pool (nats).
        predicted: ``[R]`` η·s̄ of each repetition.
        se: ``[R]`` SE_E of each repetition.
    """

    exact: float
    predicted: Tensor = field(repr=False)
    se: Tensor = field(repr=False)

    @property
    def z(self) -> Tensor:
        """``(predicted − exact) / SE_E`` per repetition."""
        return (self.predicted - self.exact) / self.se

    @property
    def coverage(self) -> float:
        """Fraction of repetitions whose 95% interval contains the exact value."""
        return float((self.z.abs() <= Z_95).double().mean())

    @property
    def mean_estimate(self) -> float:
        return float(self.predicted.mean())

    @property
    def se_of_mean(self) -> float:
        """Standard error of ``mean_estimate`` over the repetitions."""
        return float(self.predicted.std()) / math.sqrt(len(self.predicted))

    def summary(self) -> dict:
        z = self.z
        return {
            "repetitions": len(self.predicted),
            "exact": self.exact,
            "mean_estimate": self.mean_estimate,
            "se_of_mean": self.se_of_mean,
            "bias_in_se_of_mean": (self.mean_estimate - self.exact) / self.se_of_mean,
            "coverage_95": self.coverage,
            "mean_z": float(z.mean()),
            "std_z": float(z.std()),
            "mean_se": float(self.se.mean()),
        }


@dataclass(frozen=True)
class CalibrationDesign:
    """The design of a calibration or first-order study on an enumerable model.

    Attributes:
        vocab_size, response_len: responses are all ``vocab_size**response_len``
            fixed-length sequences (``exact_entropy.enumeration_batch``).
        repetitions: fresh evaluation batches E per study.
        prompts_per_batch: B of each E (drawn i.i.d. from the prompt pool).
        group_size: G responses per prompt, sampled with ``generate``.
        weighting: ``"dr_grpo"`` or ``"per_token_avg"``.
        max_len: Lmax for ``dr_grpo`` (default ``response_len``).
        mode: ``"jvp"`` or ``"vjp"``.
        seed: seeds the prompt draws and the sampling (forked RNG).

    Raises ``SettingsError`` naming a field that is not a positive int, or the
    ``ProbeSettings`` errors for ``weighting`` / ``mode``.
    """

    vocab_size: int
    response_len: int
    repetitions: int = 100
    prompts_per_batch: int = 32
    group_size: int = 4
    weighting: str = "dr_grpo"
    max_len: float | None = None
    mode: str = "jvp"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "response_len", "repetitions", "prompts_per_batch", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name}: expected an int >= 1, got {value!r}")
        ProbeSettings(weighting=self.weighting, mode=self.mode)
        if self.max_len is None and self.weighting == "dr_grpo":
            object.__setattr__(self, "max_len", float(self.response_len))

    def enumeration(self, prompt_pool: Sequence[Sequence[int]], device: torch.device) -> RolloutBatch:
        """Every response of every prompt of the pool."""
        return enumeration_batch(prompt_pool, self.vocab_size, self.response_len, device=device)


def calibration_study(
    model: nn.Module,
    prompt_pool: Sequence[Sequence[int]],
    muY: Mapping[str, Tensor],
    *,
    lr: float,
    design: CalibrationDesign,
    objective: Objective | None = None,
    progress: Callable[[int], None] | None = None,
) -> CalibrationResult:
    """Repeat the probe on fresh E and compare with the exact value (see module docstring).

    Each repetition draws ``design.prompts_per_batch`` prompts i.i.d. uniformly from
    ``prompt_pool`` and ``design.group_size`` responses per prompt by
    ``sample_fixed_length``. ``objective`` replaces LX (default
    ``entropy_objective(design.weighting)``; e.g. ``biased_entropy_objective`` to show
    that a biased baseline is detected). ``progress(r)`` is called after repetition r.
    """
    d = design
    objective = objective if objective is not None else entropy_objective(d.weighting)
    registry = ParamRegistry.from_model(model)
    enum = d.enumeration(prompt_pool, registry.device)
    _, dh = exact_directional_derivative(registry, enum, muY, weighting=d.weighting, max_len=d.max_len)
    exact = lr * float(dh.mean())
    gen = torch.Generator().manual_seed(d.seed)
    predicted, ses = [], []
    for r in range(d.repetitions):
        idx = torch.randint(len(prompt_pool), (d.prompts_per_batch,), generator=gen).tolist()
        E = sample_fixed_length(model, [prompt_pool[i] for i in idx], group_size=d.group_size,
                                response_len=d.response_len, seed=d.seed * 1_000_003 + r, max_len=d.max_len)
        s = objective_scalars(registry, E, muY, objective, mode=d.mode, chunk_size=d.prompts_per_batch)
        res = EntropyPrediction.from_sums(s, (float(s.sum()), float((s * s).sum()), len(s)), lr=lr, mode=d.mode,
                                          weighting=d.weighting)
        predicted.append(res.delta_h)
        ses.append(res.se)
        if progress is not None:
            progress(r)
    return CalibrationResult(exact, torch.tensor(predicted, dtype=torch.float64), torch.tensor(ses, dtype=torch.float64))


def biased_entropy_surrogate(S: Tensor, batch: RolloutBatch, weighting: str) -> Tensor:
    """LX with the baseline that includes the sample itself (b = mean over all G): biased.

    Its expected gradient is (G − 1)/G times ∇H_w; calibration studies must detect it.
    """
    Sw = weighted_logprobs(S, batch, weighting)
    coeff = (Sw - Sw.mean(-1, keepdim=True)).detach()
    return -(coeff * S).mean(-1)


def biased_entropy_objective(weighting: str) -> Objective:
    """``biased_entropy_surrogate`` as an ``Objective`` (for ``calibration_study``)."""
    return Objective("biased_entropy_surrogate", weighting, biased_entropy_surrogate)


# ------------------------------------------------------------------ first order
def first_order_sweep(
    model: nn.Module | ParamRegistry,
    prompt_pool: Sequence[Sequence[int]],
    muY: Mapping[str, Tensor],
    lrs: Sequence[float],
    *,
    design: CalibrationDesign,
) -> list[dict]:
    """For each η: predicted η·⟨∇H_w, μY⟩ and the exact H_w(θ + ημY) − H_w(θ), pool-averaged
    (``design``: ``vocab_size``, ``response_len``, ``weighting``, ``max_len``)."""
    d = design
    registry = model if isinstance(model, ParamRegistry) else ParamRegistry.from_model(model)
    enum = d.enumeration(prompt_pool, registry.device)
    _, dh = exact_directional_derivative(registry, enum, muY, weighting=d.weighting, max_len=d.max_len)
    slope = float(dh.mean())
    rows = []
    for lr in lrs:
        actual = exact_entropy_change(registry, enum, muY, lr=lr, weighting=d.weighting, max_len=d.max_len).delta_h
        predicted = lr * slope
        rows.append({"lr": lr, "predicted": predicted, "exact": actual,
                     "rel_error": abs(predicted - actual) / abs(actual) if actual != 0 else math.inf})
    return rows


def largest_first_order_lr(rows: Sequence[dict], tolerance: float = 0.1) -> float | None:
    """The largest η of the sweep up to which every η has relative error ≤ ``tolerance``."""
    best = None
    for row in sorted(rows, key=lambda r: r["lr"]):
        if row["rel_error"] > tolerance:
            break
        best = row["lr"]
    return best
