"""Predicted effects of a step on what practitioners log: token entropy, KL, length, reward.

From the per-token statistics of one JVP pass over an evaluation batch E
(``funcprobe.core.token_stats``: log p_t(y_t), H_t, their tangents ṡ_t, Ḣ_t, and the
tangent variance V_t, all along the step Δ), each prompt n of E gives *components*
(``COMPONENTS``, float64 ``[B]``), each an unbiased estimate, over its G sampled responses,
of a derivative or a level at θ (docs/derivations.md#predicted-effects):

* score-function terms, for a per-response value f(y) (the response length, a reward, the
  summed or averaged token entropy at θ): SF[f] = (1/G) Σ_g (f_g − b_g)·Ṡ_g with
  Ṡ_g = Σ_t ṡ_t and the leave-one-out baseline b_g = mean of the other G − 1 values;
  E[SF[f]] = d/dε E_π[f] (the baseline adds nothing in expectation and is independent of y_g);
* pathwise terms, for values that depend on θ at fixed prefixes (the token entropies):
  mean_g Σ_t Ḣ_t (or Σ_t Ḣ_t / |y|);
* levels: mean_g |y|, mean_g Σ_t H_t (for the ratio quantities);
* the KL's coefficient ½·mean_g Σ_t V_t: E of it times η² is KL(π_θ ‖ π_θ+ηΔ) of the
  response distribution to second order (chain rule of KL over positions).

``Effects.from_moments`` turns the components' mean vector and covariance over the prompts
of E (summed over ranks: ``moment_sums``) into each effect's value and its standard error
conditional on the step (delta method for the ratios): ``EFFECTS`` lists them, their units
and orders. Pure functions of tensors; no model, no collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch
from torch import Tensor

from .rollouts import RolloutBatch
from .statistics import Z_95
from .token_stats import ENTROPY, ENTROPY_TANGENT, LOGPROB, LOGPROB_TANGENT, TANGENT_VARIANCE

#: per-prompt components, in the order of ``prompt_components``'s columns
COMPONENTS = ("d_entropy_sum", "d_entropy_mean", "d_entropy_sum_norm", "d_length", "d_reward",
              "entropy_sum", "length", "kl_sum")
_C = {name: k for k, name in enumerate(COMPONENTS)}

#: the effects: name → (unit, order in η, what it is)
EFFECTS = {
    "entropy_token_mean": ("nats per token", 1, "mean next-token entropy over the batch's completion tokens: "
                           "TRL's `entropy`, verl's `actor/entropy` under loss_agg_mode='token-mean'"),
    "entropy_seq_mean_token_mean": ("nats per token", 1, "mean over responses of their mean token entropy: "
                                    "verl's loss_agg_mode='seq-mean-token-mean'"),
    "entropy_seq_mean_token_sum": ("nats per response", 1, "mean over responses of their summed token "
                                   "entropy (the sequence entropy): verl's loss_agg_mode='seq-mean-token-sum'"),
    "entropy_seq_mean_token_sum_norm": ("nats per Lmax tokens", 1, "mean over responses of their summed token "
                                        "entropy / Lmax: verl's loss_agg_mode='seq-mean-token-sum-norm' per "
                                        "response (verl sums over the micro-batch's responses)"),
    "kl": ("nats per response", 2, "KL(π_old ‖ π_new) of the response distribution"),
    "kl_per_token": ("nats per token", 2, "the step's KL per completion token (summed KL / summed length)"),
    "completion_length": ("tokens", 1, "mean completion length"),
    "reward": ("reward units", 1, "mean reward of a response"),
}

#: the effects that need an input besides E and the step (rewards; E's ``max_len``)
OPTIONAL = ("reward", "entropy_seq_mean_token_sum_norm")

#: how the logged-entropy aggregations are named by verl (``loss_agg_mode``) and TRL
AGGREGATIONS = {"token-mean": "entropy_token_mean", "seq-mean-token-mean": "entropy_seq_mean_token_mean",
                "seq-mean-token-sum": "entropy_seq_mean_token_sum",
                "seq-mean-token-sum-norm": "entropy_seq_mean_token_sum_norm", "trl": "entropy_token_mean"}


def check_rewards(rewards: object, E: RolloutBatch, *, effects: bool) -> Tensor | None:
    """``rewards`` as a ``[B, G]`` float64 tensor on E's device, or None.

    Accepts a tensor or an array-like (a nested list, a numpy array) of real numbers.
    Raises ``ValueError`` naming ``rewards``: given without ``effects=True`` (it would be
    unused), not ``[B, G]`` of E, not real, or not finite.
    """
    if rewards is None:
        return None
    if not effects:
        raise ValueError("rewards: only used for the predicted effects; pass effects=True with it (or drop it)")
    try:
        r = torch.as_tensor(rewards)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"rewards: expected a [B, G] tensor or array of real numbers, got "
                         f"{type(rewards).__name__} ({err})") from None
    if r.dtype == torch.bool or r.is_complex() or not (r.is_floating_point() or r.dtype in
                                                       (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"rewards: expected real numbers, got dtype {r.dtype}")
    shape = (E.num_prompts, E.group_size)
    if tuple(r.shape) != shape:
        raise ValueError(f"rewards: expected shape [B, G] = {list(shape)} (E's prompts x responses), "
                         f"got {list(r.shape)}")
    r = r.to(device=E.input_ids.device, dtype=torch.float64)
    if not bool(torch.isfinite(r).all()):
        bad = (~torch.isfinite(r)).nonzero()[0].tolist()
        raise ValueError(f"rewards: non-finite value at [prompt, response] = {bad}")
    return r


def score_function(f: Tensor, sdot: Tensor) -> Tensor:
    """``[B]`` (1/G) Σ_g (f_g − b_g)·ṡ_g with the leave-one-out baseline b_g = (Σ f − f_g)/(G − 1):
    an unbiased estimate of d/dε E_π[f] per prompt. ``f``, ``sdot``: ``[B, G]``, G ≥ 2."""
    G = f.shape[-1]
    baseline = (f.sum(-1, keepdim=True) - f) / (G - 1)
    return ((f - baseline) * sdot).mean(-1)


def sequence_values(stats: Tensor, batch: RolloutBatch) -> dict[str, Tensor]:
    """Per-response sums of ``stats`` (``[B, G, T, 5]`` ``token_stats`` of ``batch``), each ``[B, G]``
    float64: ``logprob`` S, ``logprob_tangent`` Ṡ, ``entropy_sum`` Σ_t H_t and its tangent,
    ``entropy_mean`` Σ_t H_t / |y| and its tangent, ``variance_sum`` Σ_t V_t, ``length`` |y|."""
    st = stats.double()
    length = batch.response_lengths.double()
    h_sum, hdot_sum = st[..., ENTROPY].sum(-1), st[..., ENTROPY_TANGENT].sum(-1)
    return {"logprob": st[..., LOGPROB].sum(-1), "logprob_tangent": st[..., LOGPROB_TANGENT].sum(-1),
            "entropy_sum": h_sum, "entropy_sum_tangent": hdot_sum, "entropy_mean": h_sum / length,
            "entropy_mean_tangent": hdot_sum / length, "variance_sum": st[..., TANGENT_VARIANCE].sum(-1),
            "length": length}


def prompt_components(stats: Tensor, batch: RolloutBatch, rewards: Tensor | None = None) -> Tensor:
    """``[B, len(COMPONENTS)]`` float64 per-prompt components of ``stats`` (``[B, G, T, 5]``
    ``token_stats`` of ``batch``).

    ``rewards``: ``[B, G]`` finite rewards of the responses, or None (``d_reward`` is then 0
    and unused). ``d_entropy_sum_norm`` divides by the batch's ``max_len`` (0 and unused
    without it).
    """
    v = sequence_values(stats, batch)
    sdot = v["logprob_tangent"]
    d_sum = v["entropy_sum_tangent"].mean(-1) + score_function(v["entropy_sum"], sdot)
    zeros = torch.zeros_like(d_sum)
    norm = batch.max_len_tensor(torch.float64).reshape(-1) if batch.max_len is not None else None
    columns = {
        "d_entropy_sum": d_sum,
        "d_entropy_mean": v["entropy_mean_tangent"].mean(-1) + score_function(v["entropy_mean"], sdot),
        "d_entropy_sum_norm": d_sum / norm if norm is not None else zeros,
        "d_length": score_function(v["length"], sdot),
        "d_reward": score_function(rewards.to(sdot), sdot) if rewards is not None else zeros,
        "entropy_sum": v["entropy_sum"].mean(-1),
        "length": v["length"].mean(-1),
        "kl_sum": 0.5 * v["variance_sum"].mean(-1),
    }
    return torch.stack([columns[name] for name in COMPONENTS], -1)


def moment_sums(components: Tensor) -> list[float]:
    """``[Σ_n x_n (K), Σ_n x_n x_nᵀ (K², row-major), B]`` of ``components`` ``[B, K]``: what
    ranks all-reduce before ``Effects.from_moments``."""
    x = components.double()
    return [*x.sum(0).tolist(), *(x.T @ x).flatten().tolist(), float(x.shape[0])]


@dataclass(frozen=True)
class Effect:
    """One predicted effect of the step.

    Attributes:
        value: the predicted change (η·d for order 1; η²·(½ Var) for the KL).
        se: its standard error over the prompts of E, conditional on the step.
        unit: ``EFFECTS[name][0]``.
        order: 1 (first-order change) or 2 (the KL, second order in η).
    """

    value: float
    se: float
    unit: str
    order: int

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.value - Z_95 * self.se, self.value + Z_95 * self.se)

    def to_dict(self) -> dict:
        return {"value": self.value, "se": self.se, "ci95": list(self.ci95), "unit": self.unit, "order": self.order}


@dataclass(frozen=True)
class Effects:
    """The predicted effects of one step (``EFFECTS``), from E's per-prompt components.

    Attributes:
        effects: name → ``Effect`` (``reward`` only with rewards; the ``-norm`` aggregation
            only with E's ``max_len``).
        lr: η.
        num_prompts: B of E over all ranks.
        components: ``[B_local, K]`` this rank's per-prompt components (``COMPONENTS``).
        logprob_change: ``[B_local, G]`` η·Ṡ: each response's predicted change of log π(y|x)
            (nats), first order.
        estimator: ``"independent"`` or ``"leave_one_out"`` (as ``EntropyPrediction``).
    """

    effects: dict[str, Effect]
    lr: float
    num_prompts: int
    components: Tensor = field(repr=False)
    logprob_change: Tensor = field(repr=False)
    estimator: str = "independent"

    def __getitem__(self, name: str) -> Effect:
        return self.effects[name]

    def entropy(self, aggregation: str = "trl") -> Effect:
        """The logged-entropy effect of ``aggregation`` (``AGGREGATIONS``: verl's
        ``loss_agg_mode`` values or ``"trl"``). Raises ``KeyError`` naming the choices."""
        if aggregation not in AGGREGATIONS:
            raise KeyError(f"aggregation: expected one of {sorted(AGGREGATIONS)}, got {aggregation!r}")
        return self.effects[AGGREGATIONS[aggregation]]

    @classmethod
    def from_moments(cls, sums: Sequence[float], *, lr: float, components: Tensor, logprob_change: Tensor,
                     optional: Collection[str] = (), estimator: str = "independent") -> "Effects":
        """The effects from ``sums`` = ``moment_sums`` over all ranks (``[Σx, Σxxᵀ, B]``).

        ``optional``: which of ``OPTIONAL`` to include (``"reward"`` with rewards,
        ``"entropy_seq_mean_token_sum_norm"`` with the batch's ``max_len``).

        Linear effects: η·mean, SE η·sqrt(var/B); ratios (token-mean entropy, KL per token)
        by the delta method: the gradient a of the ratio at the means, SE = sqrt(aᵀ C a / B)
        with C the sample covariance of the components. Raises ``ValueError`` for B < 2.
        """
        K = len(COMPONENTS)
        B = int(sums[-1])
        if B < 2:
            raise ValueError(f"E: the effects' standard errors need at least 2 prompts, got {B}")
        total = torch.tensor(sums[:K], dtype=torch.float64)
        cross = torch.tensor(sums[K:K + K * K], dtype=torch.float64).reshape(K, K)
        m = total / B
        cov = (cross - B * torch.outer(m, m)) / (B - 1)

        def linear(weights: dict[str, float], scale: float) -> tuple[float, float]:
            a = torch.zeros(K, dtype=torch.float64)
            for name, w in weights.items():
                a[_C[name]] = w
            value = float(a @ m)
            var = max(float(a @ cov @ a), 0.0) / B
            return scale * value, abs(scale) * math.sqrt(var)

        c = {name: float(m[_C[name]]) for name in COMPONENTS}
        out: dict[str, tuple[float, float]] = {}
        eta, eta2 = float(lr), float(lr) ** 2
        out["entropy_seq_mean_token_sum"] = linear({"d_entropy_sum": 1.0}, eta)
        out["entropy_seq_mean_token_mean"] = linear({"d_entropy_mean": 1.0}, eta)
        if "entropy_seq_mean_token_sum_norm" in optional:
            out["entropy_seq_mean_token_sum_norm"] = linear({"d_entropy_sum_norm": 1.0}, eta)
        out["completion_length"] = linear({"d_length": 1.0}, eta)
        if "reward" in optional:
            out["reward"] = linear({"d_reward": 1.0}, eta)
        out["kl"] = linear({"kl_sum": 1.0}, eta2)
        ell, hs, dl, dh = c["length"], c["entropy_sum"], c["d_length"], c["d_entropy_sum"]
        # token mean R = E[Σ_t H_t] / E[|y|]: dR = dE[ΣH]/ℓ − E[ΣH]·dE[|y|]/ℓ²
        value = dh / ell - hs * dl / ell ** 2
        grad = {"d_entropy_sum": 1 / ell, "d_length": -hs / ell ** 2, "entropy_sum": -dl / ell ** 2,
                "length": -dh / ell ** 2 + 2 * hs * dl / ell ** 3}
        _, se = linear(grad, eta)
        out["entropy_token_mean"] = (eta * value, se)
        kl = c["kl_sum"]
        _, se = linear({"kl_sum": 1 / ell, "length": -kl / ell ** 2}, eta2)
        out["kl_per_token"] = (eta2 * kl / ell, se)
        effects = {name: Effect(v, s, EFFECTS[name][0], EFFECTS[name][1])
                   for name in EFFECTS if name in out for v, s in [out[name]]}
        return cls(effects=effects, lr=float(lr), num_prompts=B, components=components,
                   logprob_change=logprob_change, estimator=estimator)

    def to_dict(self) -> dict:
        """JSON-ready: every effect's ``Effect.to_dict``, ``lr``, ``num_prompts``, ``estimator``."""
        return {"effects": {n: e.to_dict() for n, e in self.effects.items()}, "lr": self.lr,
                "num_prompts": self.num_prompts, "estimator": self.estimator}
