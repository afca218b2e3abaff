"""Exact response entropy of small models, by enumerating every response.

For a causal LM with a small vocabulary V and fixed-length responses (L tokens, no
end-of-sequence token), the response distribution of prompt x is a distribution over
the V^L sequences, and

    H_w(x; θ) = −Σ_y π_θ(y | x) · Sw(y) = H(x; θ) / W,

with W = Lmax (``dr_grpo``) or W = L (``per_token_avg``; every response has length L).
This is the quantity whose gradient the leave-one-out surrogate LX estimates without
bias (docs/definitions.md#entropy-surrogate: E[∇LX] = −E[Sw ∇log π] = ∇H_w, since E[∇log π] = 0 and
W does not depend on θ; docs/derivations.md#unbiased-surrogate). Everything here is
pure, so ⟨∇H_w, μY⟩ is one ``funcprobe.core.transforms.directional_derivatives`` of
``exact_entropy_objective`` (``funcprobe.validation.studies.exact_directional_derivative``).
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .logprobs import Params, sequence_logprobs
from .rollouts import RolloutBatch
from .objectives import Objective

#: enumeration refuses more sequences per prompt than this (memory and time guard)
MAX_SEQUENCES = 1 << 16


def enumerate_responses(vocab_size: int, length: int) -> Tensor:
    """Every response of ``length`` tokens over ``vocab_size`` ids: ``[V**L, L]`` int64.

    Raises ``ValueError`` for non-positive sizes or more than ``MAX_SEQUENCES`` responses.
    """
    if vocab_size < 1 or length < 1:
        raise ValueError(f"vocab_size and length must be >= 1, got {vocab_size} and {length}")
    if vocab_size**length > MAX_SEQUENCES:
        raise ValueError(
            f"vocab_size**length = {vocab_size}**{length} responses per prompt exceeds {MAX_SEQUENCES}; "
            "exact enumeration is for tiny vocabularies and short responses"
        )
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=length)), dtype=torch.long)


def enumeration_batch(prompts: Sequence[Sequence[int]], vocab_size: int, length: int,
                      device: torch.device | str | None = None) -> RolloutBatch:
    """A ``RolloutBatch`` with every response of every prompt (G = V**L)."""
    responses = enumerate_responses(vocab_size, length).tolist()
    return RolloutBatch.from_lists(list(prompts), [responses] * len(prompts), pad_token_id=0, device=device)


def exact_entropy(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    *,
    weighting: str = "per_token_avg",
    max_len: float | None = None,
) -> Tensor:
    """Weighted response entropy H_w per prompt, ``[B]`` (nats / W), from an enumeration batch.

    Args:
        module, params: as in ``sequence_logprobs`` (pure in ``params``).
        batch: ``enumeration_batch(...)``: every fixed-length response of each prompt.
        weighting: ``"per_token_avg"`` (W = L) or ``"dr_grpo"`` (W = ``max_len``).
        max_len: Lmax for ``dr_grpo``.

    Raises:
        ValueError: responses of unequal length, missing ``max_len``, or a probability
            mass that is not 1 (the batch is not a full enumeration, or the model puts
            mass on an end-of-sequence token).
    """
    return weighted_entropy(sequence_logprobs(module, params, batch), batch, weighting=weighting, max_len=max_len)


def weighted_entropy(S: Tensor, batch: RolloutBatch, *, weighting: str = "per_token_avg",
                     max_len: float | None = None) -> Tensor:
    """H_w ``[B]`` from the S ``[B, V**L]`` of an enumeration batch (see ``exact_entropy``)."""
    lengths = batch.response_lengths
    if not bool((lengths == lengths.flatten()[0]).all()):
        raise ValueError("batch: exact entropy needs fixed-length responses")
    if weighting == "dr_grpo":
        if max_len is None:
            raise ValueError("max_len: weighting='dr_grpo' needs Lmax")
        W = float(max_len)
    elif weighting == "per_token_avg":
        W = float(lengths.flatten()[0])
    else:
        raise ValueError(f"weighting: expected 'dr_grpo' or 'per_token_avg', got {weighting!r}")
    mass = S.detach().exp().sum(-1)
    if not bool(torch.allclose(mass, torch.ones_like(mass), atol=1e-5)):
        raise ValueError(f"batch: the responses carry probability mass {mass.tolist()}, not 1: not a full enumeration")
    return -(S.exp() * S).sum(-1) / W


def exact_entropy_objective(weighting: str = "per_token_avg", max_len: float | None = None) -> Objective:
    """H_w as an ``Objective`` over enumeration batches (for the core transforms)."""
    return Objective("exact_entropy", weighting,
                     lambda S, batch, w: weighted_entropy(S, batch, weighting=w, max_len=max_len))
