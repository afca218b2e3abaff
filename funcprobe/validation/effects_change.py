"""The realized changes of a step's effects, measured after the step on held-out rollouts.

The effects funcprobe predicts (``funcprobe.core.effects.EFFECTS``) are expectations under
the policy of per-response values; after a step θ_old → θ_new their changes are measured
on a held-out batch H sampled from π_old (B prompts × G responses, temperature 1), per
prompt, without bias for every G:

* a value f(y) that does not depend on θ (the completion length |y|, a reward):
  E_new[f] − E_old[f] = E_old[(w − 1)·f], with w = π_new(y)/π_old(y) = exp(S_new − S_old)
  the sequence importance weight;
* the summed next-token entropy Σ_t H_t (which does depend on θ, through the per-position
  distributions at y's prefixes): E_new[Σ_t H_t^new] − E_old[Σ_t H_t^old] =
  E_old[w·Σ_t H_t^new − Σ_t H_t^old] (likewise Σ_t H_t / |y| and Σ_t H_t / Lmax);
* the token-mean entropy (TRL's ``entropy``), a ratio of expectations:
  E_old[w·Σ H^new]/E_old[w·|y|] − E_old[Σ H^old]/E_old[|y|], consistent (the delta
  method's SE; bias O(1/B));
* KL(π_old ‖ π_new) of the response distribution = E_old[Σ_t KL(p_t^old ‖ p_t^new)] (the
  chain rule of KL over positions, full-vocabulary KLs at y's prefixes), and the plainer
  E_old[S_old − S_new] with the same expectation and a larger variance (``kl_logratio``);
  per token: Σ KL / Σ |y| (ratio, delta method).

``token_comparison`` gives the per-position values of both parameter sets on H
(``token_comparisons``: one old against several new, the old forward run once); ``response_terms`` turns them into per-response terms (``TERMS``) whose per-prompt
means ``realized_effects`` turns into each effect's realized change and its standard
error over H's prompts (the prompts are i.i.d., so the SE is their standard deviation /
sqrt(B), by the delta method for the ratios). With each prompt's terms weighted by π_old
over every response instead of averaged over G samples, the per-prompt means are the
exact expectations and the changes are exact (tests/test_effects_change.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..core.effects import EFFECTS
from ..core.lm_head import head_split, token_chunk_size
from ..core.logprobs import Params, _merged, _prompt_lengths, aligned_inputs
from ..core.logprobs import _unsplit_token_values
from ..core.rollouts import RolloutBatch

#: the columns of ``token_comparison``'s last dimension (nats)
COMPARISON = ("logprob_old", "logprob_new", "entropy_old", "entropy_new", "kl")

#: per-response terms (``response_terms``), in the order of its last dimension
TERMS = ("d_length", "d_reward", "d_entropy_sum", "d_entropy_mean", "w_entropy_sum_new", "w_length",
         "entropy_sum_old", "length", "kl_sum", "kl_logratio")
_T = {name: k for k, name in enumerate(TERMS)}

#: the realized quantities: the effects of ``EFFECTS`` and ``kl_logratio`` (KL by E_old[S_old − S_new])
REALIZED = (*EFFECTS, "kl_logratio")


@dataclass(frozen=True)
class Change:
    """A realized change of one effect on H.

    Attributes:
        value: the estimate (units of ``EFFECTS[name]``; the KLs in nats per response).
        se: its standard error over H's prompts.
        per_prompt: ``[B]`` float64 per-prompt estimates for the linear quantities; empty
            for the ratios (token-mean entropy, KL per token), whose per-prompt values are
            not unbiased.
    """

    value: float
    se: float
    per_prompt: Tensor = field(repr=False)

    def to_dict(self) -> dict:
        return {"value": self.value, "se": self.se}


def token_comparison(module: nn.Module, old: Params, new: Params, batch: RolloutBatch, *,
                     token_chunk: int | None = None) -> Tensor:
    """``[B, G, T, 5]`` float64 ``COMPARISON`` at every response token of ``batch``.

    Args:
        module: the canonical module (``ParamRegistry.module``), Hugging Face causal-LM
            calling convention (``funcprobe.core.logprobs.sequence_logprobs``).
        old, new: the parameters before and after the step, as ``functional_call`` takes
            them (``ParamRegistry.params(theta)``).
        batch: the held-out rollouts (B prompts × G responses × T columns).
        token_chunk: response tokens per LM-head chunk; None: ``token_chunk_size`` of V.

    Entry ``[n, g, t]`` belongs to the token at column t: log p_t^old(y_t), log p_t^new(y_t),
    H_t^old, H_t^new and KL(p_t^old ‖ p_t^new) over the whole vocabulary, the logits of
    both promoted to float64 before the log-softmax (a small step's KL is a difference of
    nearly equal terms); prompt and padding columns are 0 (set by selection). One forward
    of the body per parameter set; no ``[N, T, V]`` logits where the head can be split.

    Raises:
        ValueError: the module returns hidden states of an unexpected shape.
    """
    return token_comparisons(module, old, [new], batch, token_chunk=token_chunk)[0]


@torch.no_grad()
def token_comparisons(module: nn.Module, old: Params, news: Sequence[Params], batch: RolloutBatch, *,
                      token_chunk: int | None = None) -> list[Tensor]:
    """``token_comparison`` of ``old`` against each of ``news`` (e.g. the steps of several
    learning rates), with the old forward run once: a list of ``[B, G, T, 5]``."""
    B, G, T = batch.input_ids.shape
    N = B * G
    kwargs, resp, shift, owner, extra = aligned_inputs(module, batch)
    ids = kwargs["input_ids"]
    split = head_split(module, owner, extra)
    L = ids.shape[1]
    K = len(COMPARISON)
    # aligned column j holds the target at aligned column j + 1, i.e. at column j + 1 + shift
    cols = (torch.arange(1, L, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)).clamp(max=T - 1)
    index = cols.unsqueeze(-1).expand(-1, -1, K)

    def placed(per_column: Tensor) -> Tensor:
        return per_column.new_zeros((N, T, K)).scatter_add(1, index, per_column).reshape(B, G, T, K)  # padding adds 0

    out = []
    if split is None:
        prompt_lens = _prompt_lengths(batch).reshape(N)
        targets = ids[:, 1:].reshape(-1)
        keep = resp[:, 1:].reshape(-1, 1)
        z0 = _unsplit_token_values(module, old, kwargs, resp, prompt_lens, lambda z, y: z)
        for new in news:
            z1 = _unsplit_token_values(module, new, kwargs, resp, prompt_lens, lambda z, y: z)
            stats = compare(z0.reshape(-1, z0.shape[-1]), z1.reshape(-1, z1.shape[-1]), targets)
            out.append(placed(torch.where(keep, stats, torch.zeros((), dtype=stats.dtype)).reshape(N, L - 1, K)))
        return out
    flat = resp[:, 1:].reshape(-1).nonzero().squeeze(-1)  # [M] response targets in [N * (L - 1)]
    targets = ids[:, 1:].reshape(-1).index_select(0, flat)
    chunk = token_chunk or token_chunk_size(split.vocab_size)

    def side(p: Params):
        merged = _merged(p)
        h = split.hidden(merged, kwargs)
        if h.ndim != 3 or h.shape[:2] != (N, L):
            raise ValueError(f"model: expected hidden states of shape [{N}, {L}, D], got {tuple(h.shape)}")
        return h[:, :-1].reshape(N * (L - 1), h.shape[-1]).index_select(0, flat), split.logits_fn(merged)

    h0, head0 = side(old)
    for new in news:
        h1, head1 = side(new)
        parts = [compare(head0(h0[a:a + chunk]), head1(h1[a:a + chunk]), targets[a:a + chunk])
                 for a in range(0, flat.numel(), chunk)]
        per_token = torch.cat(parts) if parts else torch.zeros((0, K), dtype=torch.float64)
        out.append(placed(per_token.new_zeros((N * (L - 1), K)).index_copy(0, flat, per_token).reshape(N, L - 1, K)))
    return out


def compare(z_old: Tensor, z_new: Tensor, targets: Tensor) -> Tensor:
    """``[m, 5]`` float64 ``COMPARISON`` of logits ``z_old``, ``z_new`` ``[m, V]`` at ``targets`` ``[m]``.

    A vocabulary entry with p_old = 0 adds 0 to H^old and the KL; one with p_new = 0 (−inf
    logit) under p_old > 0 makes the KL +inf (as it is)."""
    lp0 = torch.log_softmax(z_old.double(), -1)
    lp1 = torch.log_softmax(z_new.double(), -1)
    p0, p1 = lp0.exp(), lp1.exp()
    zero = torch.zeros((), dtype=torch.float64, device=lp0.device)
    y = targets.unsqueeze(-1)
    return torch.stack([
        lp0.gather(-1, y).squeeze(-1),
        lp1.gather(-1, y).squeeze(-1),
        -torch.where(p0 > 0, p0 * lp0, zero).sum(-1),
        -torch.where(p1 > 0, p1 * lp1, zero).sum(-1),
        torch.where(p0 > 0, p0 * (lp0 - lp1), zero).sum(-1),
    ], -1)


def response_terms(comparison: Tensor, batch: RolloutBatch, rewards: Tensor | None = None) -> Tensor:
    """``[B, G, len(TERMS)]`` float64 per-response terms of ``comparison`` (``[B, G, T, 5]``
    ``token_comparison`` of ``batch``): each term's mean over π_old is one of the
    expectations the realized changes are made of.

    With w = exp(S_new − S_old), ΣH = Σ_t H_t, ℓ = |y|: ``d_length`` (w − 1)·ℓ, ``d_reward``
    (w − 1)·r (0 without ``rewards``), ``d_entropy_sum`` w·ΣH^new − ΣH^old, ``d_entropy_mean``
    (w·ΣH^new − ΣH^old)/ℓ, ``w_entropy_sum_new`` w·ΣH^new, ``w_length`` w·ℓ, ``entropy_sum_old``
    ΣH^old, ``length`` ℓ, ``kl_sum`` Σ_t KL_t, ``kl_logratio`` S_old − S_new.

    Raises:
        ValueError: ``comparison`` or ``rewards`` not of ``batch``'s shape.
    """
    B, G, T = batch.input_ids.shape
    if tuple(comparison.shape) != (B, G, T, len(COMPARISON)):
        raise ValueError(f"comparison: expected shape {[B, G, T, len(COMPARISON)]} (token_comparison of the batch), "
                         f"got {list(comparison.shape)}")
    if rewards is not None and tuple(rewards.shape) != (B, G):
        raise ValueError(f"rewards: expected shape [B, G] = {[B, G]}, got {list(rewards.shape)}")
    s = comparison.double().sum(2)
    S0, S1, h0, h1, kl = s.unbind(-1)
    length = batch.response_lengths.double()
    w = torch.exp(S1 - S0)
    r = rewards.double() if rewards is not None else torch.zeros_like(length)
    columns = {
        "d_length": (w - 1) * length,
        "d_reward": (w - 1) * r,
        "d_entropy_sum": w * h1 - h0,
        "d_entropy_mean": (w * h1 - h0) / length,
        "w_entropy_sum_new": w * h1,
        "w_length": w * length,
        "entropy_sum_old": h0,
        "length": length,
        "kl_sum": kl,
        "kl_logratio": S0 - S1,
    }
    return torch.stack([columns[name] for name in TERMS], -1)


def realized_effects(per_prompt: Tensor, *, max_len: float | None = None,
                     has_rewards: bool = False) -> dict[str, Change]:
    """The realized change of each effect from per-prompt means of ``response_terms``.

    Args:
        per_prompt: ``[B, len(TERMS)]``: each prompt's mean of its responses' terms (over its
            G samples; or, for the exact change, weighted by π_old over every response).
        max_len: Lmax of the ``-norm`` entropy (omitted without it).
        has_rewards: whether ``d_reward`` holds rewards (``reward`` is omitted otherwise).

    Returns:
        name → ``Change`` for the names of ``REALIZED`` that apply: the linear ones are the
        mean over prompts with SE sd/sqrt(B); the token-mean entropy and the KL per token are
        ratios of means with the delta method's SE (per_prompt empty).

    Raises:
        ValueError: B < 2 or a wrong number of columns.
    """
    x = per_prompt.double()
    if x.ndim != 2 or x.shape[1] != len(TERMS):
        raise ValueError(f"per_prompt: expected shape [B, {len(TERMS)}] (TERMS), got {list(x.shape)}")
    B = x.shape[0]
    if B < 2:
        raise ValueError(f"per_prompt: the standard errors need at least 2 prompts, got {B}")
    m = x.mean(0).tolist()
    xc = x - x.mean(0)
    cov = ((xc.T @ xc) / (B - 1)).tolist()
    empty = x.new_zeros(0)

    def linear(name: str, scale: float = 1.0) -> Change:
        k = _T[name]
        return Change(scale * m[k], abs(scale) * math.sqrt(max(cov[k][k], 0.0) / B), scale * x[:, k])

    def ratio(value: float, grad: Mapping[str, float]) -> Change:
        var = sum(gi * gj * cov[_T[i]][_T[j]] for i, gi in grad.items() for j, gj in grad.items())
        return Change(value, math.sqrt(max(var, 0.0) / B), empty)

    out = {"entropy_seq_mean_token_sum": linear("d_entropy_sum"),
           "entropy_seq_mean_token_mean": linear("d_entropy_mean")}
    if max_len is not None:
        out["entropy_seq_mean_token_sum_norm"] = linear("d_entropy_sum", 1.0 / float(max_len))
    out["completion_length"] = linear("d_length")
    if has_rewards:
        out["reward"] = linear("d_reward")
    out["kl"] = linear("kl_sum")
    out["kl_logratio"] = linear("kl_logratio")
    c = {name: m[_T[name]] for name in TERMS}
    a, b, h, ell = c["w_entropy_sum_new"], c["w_length"], c["entropy_sum_old"], c["length"]
    # a/b − h/ℓ: the token-mean entropy after (IS-weighted) minus before
    out["entropy_token_mean"] = ratio(a / b - h / ell, {"w_entropy_sum_new": 1 / b, "w_length": -a / b ** 2,
                                                       "entropy_sum_old": -1 / ell, "length": h / ell ** 2})
    kl = c["kl_sum"]
    out["kl_per_token"] = ratio(kl / ell, {"kl_sum": 1 / ell, "length": -kl / ell ** 2})
    return {name: out[name] for name in REALIZED if name in out}
