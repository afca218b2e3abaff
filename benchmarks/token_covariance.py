"""The covariance heuristic of Cui et al. (2025) for the tokens that drive entropy collapse,
set against funcprobe's exact token shares of the predicted entropy change.

Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617: the first-order entropy change of a softmax policy is
−Cov(log π(y), A); their Clip-Cov and KL-Cov (as verl implements them in
``compute_policy_loss_clip_cov`` / ``_kl_cov``) score each response token by

    cov[t] = (A[t] − mean_tokens A) · (log π(y_t) − mean_tokens log π)

over the response tokens of the batch, and act on the top 0.02% (Clip-Cov's
``clip_cov_ratio``) or 0.2% (KL-Cov's ``kl_cov_ratio``). Here: that score, a rank
correlation, and the share of a total carried by the top fraction of tokens.

Benchmark and test code, not part of the library (``benchmarks/influence_smollm2.py``,
``tests/test_influence.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_covariance(logprobs: Tensor, advantages: Tensor, response_mask: Tensor) -> Tensor:
    """``[B, G, T]`` verl's per-token covariance score (0 off response tokens).

    Args:
        logprobs: ``[B, G, T]`` token log-probs (nats) in the batch's columns.
        advantages: ``[B, G]`` sequence advantages (every token of a response shares it).
        response_mask: ``[B, G, T]`` bool, the response tokens.
    """
    mask = response_mask.bool()
    adv = advantages.to(torch.float64).unsqueeze(-1).expand(mask.shape)
    logp = logprobs.to(torch.float64)
    adv_mean = adv[mask].mean()
    logp_mean = logp[mask].mean()
    cov = (adv - adv_mean) * (logp - logp_mean)
    return torch.where(mask, cov, torch.zeros((), dtype=torch.float64))


def ranks(x: Tensor) -> Tensor:
    """Average ranks (1..n, ties averaged) of a 1-d tensor, float64."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    return average[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-d tensors of the same length (≥ 2)."""
    if a.shape != b.shape or a.ndim != 1 or a.numel() < 2:
        raise ValueError(f"spearman: expected two 1-d tensors of one length >= 2, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / torch.sqrt((ra * ra).sum() * (rb * rb).sum()))


def top_fraction_mask(score: Tensor, fraction: float) -> Tensor:
    """Bool mask of the top ``fraction`` of entries of a 1-d ``score`` (at least one)."""
    k = max(1, int(fraction * score.numel()))
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[torch.topk(score, k).indices] = True
    return mask
