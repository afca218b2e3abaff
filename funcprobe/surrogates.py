"""Per-prompt surrogates built on S: the entropy surrogate LX and the policy-gradient J.

Pure functions of S ``[B, G]`` and the batch (SPEC "Definitions"; seed 001
``build_LX_vector_from_S``):

* ``Sw = S / Lmax`` (``dr_grpo``) or ``Sw = S / |y|`` (``per_token_avg``);
* ``b[n,g] = (Σ_g' Sw[n,g'] − Sw[n,g]) / (G − 1)`` (leave-one-out baseline);
* ``c = stopgrad(Sw − b)``; ``LX[n] = −(1/G) Σ_g c[n,g] · S[n,g]``, so that
  E[∇LX[n]] = ∇θ of the (weighted) response entropy of prompt n;
* ``J[n] = (1/G) Σ_g A[n,g] · Sw[n,g]``.
"""

from __future__ import annotations

from torch import Tensor

from .rollouts import RolloutBatch

WEIGHTINGS = ("dr_grpo", "per_token_avg")


def check_weighting(weighting: str) -> str:
    """Return ``weighting`` or raise ``ValueError`` naming the allowed values."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


def weighted_logprobs(S: Tensor, batch: RolloutBatch, weighting: str) -> Tensor:
    """``Sw`` ``[B, G]``: S divided by Lmax (``dr_grpo``) or by the response length."""
    check_weighting(weighting)
    if weighting == "dr_grpo":
        return S / batch.max_len_tensor(S.dtype)
    return S / batch.response_lengths.to(S.dtype)


def leave_one_out_baseline(Sw: Tensor) -> Tensor:
    """``b`` ``[B, G]``: mean of the other G − 1 weighted log-probs of the same prompt."""
    G = Sw.shape[-1]
    if G < 2:
        raise ValueError(f"S: the leave-one-out baseline needs G >= 2 responses per prompt, got {G}")
    return (Sw.sum(-1, keepdim=True) - Sw) / (G - 1)


def entropy_surrogate(S: Tensor, batch: RolloutBatch, weighting: str) -> Tensor:
    """LX ``[B]`` (nats, per prompt): its gradient is an unbiased estimate of ∇θ H.

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
