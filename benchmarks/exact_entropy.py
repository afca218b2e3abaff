"""Ground truth on tiny models: the exact response entropy by enumerating every response,
the exact (and a sampled) entropy change of a step taken, and ⟨∇H_w, μY⟩ exactly.

Test and benchmark code, not part of the library (``tests/test_validation.py`` and
``benchmarks/calibration_study.py`` import it; the tests put ``benchmarks/`` on
``sys.path`` in ``tests/conftest.py``).

For a causal LM with a small vocabulary V and fixed-length responses (L tokens, no
end-of-sequence token), the response distribution of prompt x is a distribution over
the V^L sequences, and

    H_w(x; θ) = −Σ_y π_θ(y | x) · Sw(y) = H(x; θ) / W,

with W = Lmax (``dr_grpo``) or W = L (``per_token_avg``; every response has length L).
This is the quantity whose gradient the leave-one-out surrogate LX estimates without
bias (docs/definitions.md#entropy-surrogate: E[∇LX] = −E[Sw ∇log π] = ∇H_w, since E[∇log π] = 0 and
W does not depend on θ; docs/derivations.md#unbiased-surrogate). Everything here is
pure, so ⟨∇H_w, μY⟩ is one ``funcprobe.core.transforms.directional_derivatives`` of
``exact_entropy_objective`` (``exact_directional_derivative``).

The model is never mutated: stepped parameters are a new pytree passed to
``functional_call``.

* ``exact_entropy_change``: ΔH_w[k] = H_w(x_k; θ + ημY) − H_w(x_k; θ) by enumeration;
* ``sampled_entropy_change``: the self-normalised importance-sampling estimate over the
  responses of E, which were sampled from π_θ (``funcprobe.validation.entropy_change.snis_change``;
  consistent in G with an O(1/G) bias: to first order it shrinks the change by (G − 1)/G).
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from funcprobe.core.logprobs import Params, sequence_logprobs
from funcprobe.core.objectives import Objective, weighted_logprobs
from funcprobe.core.pytree import ParamTree, check_like
from funcprobe.core.rollouts import RolloutBatch
from funcprobe.core.transforms import chunked, directional_derivatives
from funcprobe.forward.rules import jvp_rules
from funcprobe.edge.registry import ParamRegistry
from funcprobe.edge.session import as_normal_batch, probe_session
from funcprobe.settings import ParamSelection, ProbeSettings
from funcprobe.validation.entropy_change import EntropyChange, snis_change

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


def exact_directional_derivative(
    registry: ParamRegistry,
    batch: RolloutBatch,
    direction: Mapping[str, Tensor],
    *,
    weighting: str = "per_token_avg",
    max_len: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(H_w ``[B]``, ⟨∇θ H_w, direction⟩ ``[B]``), float64, for an enumeration batch.

    One ``torch.func.jvp`` per chunk of prompts (the core transform) inside a probe
    session; H_w itself from one more no-grad forward.
    """
    objective = exact_entropy_objective(weighting, max_len)
    f = objective.on_logprobs(registry.logprob_fn())
    tangent = {k: direction[k].to(device=v.device, dtype=v.dtype) for k, v in registry.trainable.items()}
    with probe_session(registry), jvp_rules():
        dh = directional_derivatives(f)(registry.trainable, tangent, chunked(batch, max(1, batch.num_prompts)))
        with torch.no_grad():
            h = f(registry.trainable, batch)
    return h.detach().double(), dh


def stepped_params(registry: ParamRegistry, direction: Mapping[str, Tensor], lr: float) -> ParamTree:
    """θ + lr·direction as a new name→tensor dict (no mutation). Validates ``direction``."""
    check_like(registry.trainable, direction, "muY")
    return {k: v + lr * direction[k].to(device=v.device, dtype=v.dtype) for k, v in registry.trainable.items()}


def exact_entropy_change(
    model: nn.Module | ParamRegistry,
    enumeration: RolloutBatch,
    direction: Mapping[str, Tensor],
    *,
    lr: float,
    weighting: str = "per_token_avg",
    max_len: float | None = None,
    params: ParamSelection = "trainable",
    adapter: str | None = None,
) -> EntropyChange:
    """Exact ΔH_w per prompt of ``enumeration`` (``enumeration_batch``)."""
    registry = _registry(model, weighting, params, adapter)
    theta1 = stepped_params(registry, direction, lr)
    with probe_session(registry):
        kw = dict(weighting=weighting, max_len=max_len)
        h0 = exact_entropy(registry.module, registry.params(registry.trainable), enumeration, **kw).detach()
        h1 = exact_entropy(registry.module, registry.params(theta1), enumeration, **kw).detach()
    d = (h1 - h0).double()
    return EntropyChange(float(d.mean()), 0.0, d, "exact")


def sampled_entropy_change(
    model: nn.Module | ParamRegistry,
    E: RolloutBatch,
    direction: Mapping[str, Tensor],
    *,
    lr: float,
    weighting: str = "dr_grpo",
    params: ParamSelection = "trainable",
    adapter: str | None = None,
) -> EntropyChange:
    """Self-normalised importance-sampling estimate of ΔH_w over E's responses (B ≥ 2).

    Raises ``ValueError`` for B < 2 (no standard error) and the ``muY`` checks.
    """
    registry = _registry(model, weighting, params, adapter)
    if E.num_prompts < 2:
        raise ValueError(f"E: the importance-sampling standard error needs at least 2 prompts, got {E.num_prompts}")
    theta1 = stepped_params(registry, direction, lr)
    E = as_normal_batch(E, registry.device)
    with probe_session(registry), torch.no_grad():
        S0 = sequence_logprobs(registry.module, registry.params(registry.trainable), E).double()
        S1 = sequence_logprobs(registry.module, registry.params(theta1), E).double()
    return snis_change(S0, S1, -weighted_logprobs(S0, E, weighting), -weighted_logprobs(S1, E, weighting))


def _registry(model: nn.Module | ParamRegistry, weighting: str, params: ParamSelection,
              adapter: str | None) -> ParamRegistry:
    """The registry of ``model``, with ``weighting`` and the selection checked by ``ProbeSettings``."""
    return ParamRegistry.from_settings(model, ProbeSettings(weighting=weighting, params=params, adapter=adapter))
