"""Per-prompt objectives built on S: the entropy surrogate LX and the policy-gradient J.

Pure functions of S ``[B, G]`` and the batch (docs/definitions.md#entropy-surrogate and
#policy-gradient-surrogate; docs/seeds/001 ``build_LX_vector_from_S``):

* ``Sw = S / Lmax`` (``dr_grpo``) or ``Sw = S / |y|`` (``per_token_avg``);
* ``b[n,g] = (Σ_g' Sw[n,g'] − Sw[n,g]) / (G − 1)`` (leave-one-out baseline);
* ``c = stopgrad(Sw − b)``; ``LX[n] = −(1/G) Σ_g c[n,g] · S[n,g]``, so that
  E[∇LX[n]] = ∇θ of the (weighted) response entropy of prompt n
  (docs/derivations.md#unbiased-surrogate);
* ``J[n] = (1/G) Σ_g A[n,g] · Sw[n,g]``;
* TRL's token-sum losses (``dapo``, ``bnpo``): ``mean_n J[n] = Σ_{n,g} A·S / T`` with T
  the completion tokens of the batch, i.e. ``Sw = S · N / T`` with N = B·G sequences
  (``token_sum_objective``; docs/definitions.md#trl-loss-types).

An ``Objective`` is such a function closed over its weighting (a small value, built
once); ``on_logprobs`` composes it with a pure S(θ, batch) into the per-prompt function
θ ↦ f(θ, batch) ``[B]`` that the transforms of ``funcprobe.core.transforms`` take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .rollouts import RolloutBatch

#: the cosine between a trainer's gradient and funcprobe's model of its loss above which
#: each prompt's own share is removed in the trainer's units (``EntropyProbe.predict``,
#: ``EntropyProbe.choose`` with a trainer's gradient): below it the loss has terms funcprobe
#: does not model (a KL term, an entropy bonus, ...)
MODELLED_COSINE = 0.99

#: a pure S(θ, batch) → ``[B, G]`` (the edge builds it: ``ParamRegistry.logprob_fn``)
LogProbFn = Callable[[dict, RolloutBatch], Tensor]
#: a per-prompt function θ, batch → ``[B]``
PromptFn = Callable[[dict, RolloutBatch], Tensor]


def weighted_logprobs(S: Tensor, batch: RolloutBatch, weighting: str) -> Tensor:
    """``Sw`` ``[B, G]``: S divided by Lmax (``dr_grpo``) or by the response length.

    ``weighting`` is checked by ``ProbeSettings``; an unknown value raises ``ValueError``.
    """
    if weighting == "dr_grpo":
        return S / batch.max_len_tensor(S.dtype)
    if weighting == "per_token_avg":
        return S / batch.response_lengths.to(S.dtype)
    raise ValueError(f"weighting: expected 'dr_grpo' or 'per_token_avg', got {weighting!r}")


def leave_one_out_baseline(Sw: Tensor) -> Tensor:
    """``b`` ``[B, G]``: mean of the other G − 1 weighted log-probs of the same prompt."""
    G = Sw.shape[-1]
    if G < 2:
        raise ValueError(f"S: the leave-one-out baseline needs G >= 2 responses per prompt, got {G}")
    return (Sw.sum(-1, keepdim=True) - Sw) / (G - 1)


def entropy_surrogate(S: Tensor, batch: RolloutBatch, weighting: str) -> Tensor:
    """LX ``[B]`` (nats, per prompt): its gradient is an unbiased estimate of ∇θ H_w.

    Args:
        S: ``[B, G]`` sequence log-probs from ``sequence_logprobs``.
        batch: the rollouts S came from (lengths, Lmax).
        weighting: ``"dr_grpo"`` or ``"per_token_avg"``.
    """
    Sw = weighted_logprobs(S, batch, weighting)
    coeff = (Sw - leave_one_out_baseline(Sw)).detach()
    return -(coeff * S).mean(-1)


def policy_gradient_surrogate(S: Tensor, batch: RolloutBatch, weighting: str) -> Tensor:
    """J ``[B]``: ``(1/G) Σ_g A[n,g] · Sw[n,g]``; raises ``ValueError`` without advantages."""
    A = batch.require_advantages("U").to(S.dtype)
    return (A * weighted_logprobs(S, batch, weighting)).mean(-1)


@dataclass(frozen=True)
class Objective:
    """A per-prompt objective ``(S [B, G], batch) → [B]`` closed over its weighting.

    Attributes:
        name: ``"entropy_surrogate"``, ``"policy_gradient"`` or a caller's name.
        weighting: ``"dr_grpo"`` or ``"per_token_avg"``.
        fn: ``fn(S, batch, weighting) → [B]``.
    """

    name: str
    weighting: str
    fn: Callable[[Tensor, RolloutBatch, str], Tensor]

    def __call__(self, S: Tensor, batch: RolloutBatch) -> Tensor:
        return self.fn(S, batch, self.weighting)

    def on_logprobs(self, logprob_fn: LogProbFn) -> PromptFn:
        """θ, batch ↦ this objective of ``logprob_fn(θ, batch)``: the function the transforms take."""

        def f(theta: dict, batch: RolloutBatch) -> Tensor:
            return self(logprob_fn(theta, batch), batch)

        return f


def entropy_objective(weighting: str) -> Objective:
    """LX with ``weighting`` (the probe's f; docs/definitions.md#entropy-surrogate)."""
    return Objective("entropy_surrogate", weighting, entropy_surrogate)


def policy_gradient_objective(weighting: str) -> Objective:
    """J with ``weighting`` (the update direction's f; docs/definitions.md#policy-gradient-surrogate)."""
    return Objective("policy_gradient", weighting, policy_gradient_surrogate)


def token_sum_objective(sequences_per_token: float) -> Objective:
    """J with ``Sw = S · sequences_per_token`` (N / T of the whole update batch), so that
    ``mean_n J[n] = Σ A·S / T``: the policy loss of TRL's ``dapo`` (T over the whole
    generation batch, all processes) and ``bnpo`` (T of one micro-batch), at ratio 1.

    Raises ``ValueError`` for a non-positive or non-finite ``sequences_per_token``.
    """
    scale = float(sequences_per_token)
    if not 0 < scale < float("inf"):
        raise ValueError(f"sequences_per_token: expected a finite number > 0, got {sequences_per_token!r}")

    def fn(S: Tensor, batch: RolloutBatch, weighting: str) -> Tensor:
        A = batch.require_advantages("U").to(S.dtype)
        return (A * S * scale).mean(-1)

    return Objective("policy_gradient", "token_sum", fn)
