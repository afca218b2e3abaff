"""Realized changes of a step's effects (funcprobe.validation.effects_change) against exact
enumeration on a float64 GPT-2 with a 5-token vocabulary and responses of at most 3 tokens
(the setting of tests/test_effects.py): θ_new = θ + η·Δ for a random Δ.

Bounds: 1e-10 for the exact identities (float64 sums over 85 sequences of O(1) terms:
seen ≤ 5e-16); 4 SE for the sampled estimators; the coverage of the 95% intervals within
4 binomial SDs of 95%.
"""


import pytest
import torch

from funcprobe import ParamRegistry, RolloutBatch
from funcprobe.validation import effects_change
from funcprobe.validation.effects_change import (COMPARISON, REALIZED, TERMS, realized_effects, response_terms,
                                                 token_comparison, token_comparisons)
from helpers import gpt2, random_direction
from test_effects import LMAX, PAD, PROMPTS, V, _reference_logprobs, _responses  # the same enumeration

ETA = 0.3  # a step whose changes are far from 0 and not linear in η
EXACT = 1e-10  # float64 identities: seen ≤ 5e-16


@pytest.fixture(scope="module")
def setup():
    model = gpt2(vocab=V, seed=3)
    model.eval()
    registry = ParamRegistry.from_model(model)
    responses = _responses()
    batch = RolloutBatch.from_lists(PROMPTS, [responses] * len(PROMPTS), pad_token_id=PAD, max_len=float(LMAX))
    tangent = random_direction(registry, seed=4)
    old = registry.trainable
    new = {n: t + ETA * tangent[n] for n, t in old.items()}
    rewards = torch.randn(len(responses), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    comparison = token_comparison(registry.module, registry.params(old), registry.params(new), batch)
    return registry, batch, responses, old, new, rewards.expand(len(PROMPTS), -1), comparison


def _reference(registry, theta, responses):
    """Per prompt ``[85, LMAX, V]`` log-probs of ``theta``."""
    return [_reference_logprobs(registry, theta, responses, prompt).detach() for prompt in PROMPTS]


def test_token_comparison_equals_the_reference_per_position_values(setup):
    registry, batch, responses, old, new, _, comparison = setup
    rows = []
    for lp0, lp1 in zip(_reference(registry, old, responses), _reference(registry, new, responses)):
        for k, y in enumerate(responses):
            a, b, t = lp0[k, :len(y)], lp1[k, :len(y)], torch.tensor(y)[:, None]
            rows.append(torch.stack([a.gather(-1, t).squeeze(-1), b.gather(-1, t).squeeze(-1),
                                     -(a.exp() * a).sum(-1), -(b.exp() * b).sum(-1),
                                     (a.exp() * (a - b)).sum(-1)], -1))
    reference = torch.cat(rows)  # prompt, response, position order
    mine = comparison[batch.response_mask]
    assert mine.shape == reference.shape and mine.shape[-1] == len(COMPARISON)
    assert (mine - reference).abs().max() < EXACT
    assert reference[:, 4].min() >= 0 and reference[:, 4].max() > 1e-3  # a real KL
    assert comparison[~batch.response_mask].abs().max() == 0


@pytest.mark.parametrize("split", [True, False])
def test_several_steps_share_the_old_forward(setup, monkeypatch, split):
    """``token_comparisons`` of old against [new, old]: the first is ``token_comparison``,
    the second has KL 0 and equal old and new columns; without a head split (the model's
    own logits) the same."""
    registry, batch, _, old, new, _, comparison = setup
    if not split:
        monkeypatch.setattr(effects_change, "head_split", lambda *a, **k: None)
    a, b = token_comparisons(registry.module, registry.params(old), [registry.params(new), registry.params(old)],
                             batch)
    assert (a - comparison).abs().max() < EXACT
    assert b[..., 4].abs().max() < EXACT
    assert (b[..., 0] - b[..., 1]).abs().max() == 0 and (b[..., 2] - b[..., 3]).abs().max() == 0


def _exact_changes(registry, responses, old, new, rewards):
    """Each realized quantity's exact change for the uniform mix of the prompts, from
    expectations under π_old and under π_new directly (no importance weights)."""
    length = torch.tensor([float(len(y)) for y in responses], dtype=torch.float64)
    level = {}
    for key, theta in (("old", old), ("new", new)):
        rows = []
        for lp in _reference(registry, theta, responses):
            tok = torch.stack([lp[k, :len(y)].gather(-1, torch.tensor(y)[:, None]).squeeze(-1).sum()
                               for k, y in enumerate(responses)])
            hsum = torch.stack([-(lp[k, :len(y)].exp() * lp[k, :len(y)]).sum() for k, y in enumerate(responses)])
            rows.append((tok, hsum))
        level[key] = rows
    out = {name: 0.0 for name in ("len", "r", "hs", "hm", "kl")}
    mix = {"old": [0.0, 0.0], "new": [0.0, 0.0]}  # E[ΣH], E[ℓ] of the mix
    for (S0, h0), (S1, h1), r in zip(level["old"], level["new"], rewards):
        p0, p1 = S0.exp(), S1.exp()
        out["len"] += float((p1 * length).sum() - (p0 * length).sum()) / len(PROMPTS)
        out["r"] += float((p1 * r).sum() - (p0 * r).sum()) / len(PROMPTS)
        out["hs"] += float((p1 * h1).sum() - (p0 * h0).sum()) / len(PROMPTS)
        out["hm"] += float((p1 * h1 / length).sum() - (p0 * h0 / length).sum()) / len(PROMPTS)
        out["kl"] += float((p0 * (S0 - S1)).sum()) / len(PROMPTS)
        for key, p, h in (("old", p0, h0), ("new", p1, h1)):
            mix[key][0] += float((p * h).sum()) / len(PROMPTS)
            mix[key][1] += float((p * length).sum()) / len(PROMPTS)
    old_len = mix["old"][1]
    return {
        "completion_length": out["len"], "reward": out["r"], "entropy_seq_mean_token_sum": out["hs"],
        "entropy_seq_mean_token_sum_norm": out["hs"] / LMAX, "entropy_seq_mean_token_mean": out["hm"],
        "entropy_token_mean": mix["new"][0] / mix["new"][1] - mix["old"][0] / old_len,
        "kl": out["kl"], "kl_logratio": out["kl"], "kl_per_token": out["kl"] / old_len,
    }


@pytest.fixture(scope="module")
def exact(setup):
    registry, batch, responses, old, new, rewards, comparison = setup
    return _exact_changes(registry, responses, old, new, rewards)


def test_pi_weighted_terms_give_the_exact_changes(setup, exact):
    """Each prompt's terms weighted by π_old over every response (the expectation of the
    sampled mean) give every realized quantity's exact change."""
    registry, batch, responses, old, new, rewards, comparison = setup
    terms = response_terms(comparison, batch, rewards)  # [2, 85, K]
    pi_old = comparison[..., COMPARISON.index("logprob_old")].sum(-1).exp()
    assert (pi_old.sum(-1) - 1).abs().max() < EXACT
    realized = realized_effects((pi_old.unsqueeze(-1) * terms).sum(1), max_len=LMAX, has_rewards=True)
    assert set(realized) == set(REALIZED) == set(exact)
    for name, value in exact.items():
        assert abs(realized[name].value - value) < EXACT, (name, realized[name].value, value)
        assert abs(value) > 1e-3, (name, value)  # the step changes every quantity (smallest seen: 1.8e-3)


def _sampled_terms(setup, groups, G, seed):
    """Terms of ``groups`` groups of G responses drawn from π_old, the prompt of each group
    drawn uniformly: ``[groups, G, K]``."""
    registry, batch, responses, old, new, rewards, comparison = setup
    terms = response_terms(comparison, batch, rewards)
    pi_old = comparison[..., COMPARISON.index("logprob_old")].sum(-1).exp()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, len(PROMPTS), (groups,), generator=gen)
    idx = torch.multinomial(pi_old[prompt], G, replacement=True, generator=gen)  # [groups, G]
    return terms[prompt[:, None], idx]


def test_sampled_estimates_are_within_4_se_of_the_exact_changes(setup, exact):
    registry, batch, responses, old, new, rewards, comparison = setup
    sampled = _sampled_terms(setup, 250_000, 4, seed=11)  # enough to resolve the smallest change (1.8e-3)
    realized = realized_effects(sampled.mean(1), max_len=LMAX, has_rewards=True)
    for name, value in exact.items():
        r = realized[name]
        assert abs(r.value - value) < 4 * r.se, (name, r.value, value, r.se)
        assert abs(value) > 4 * r.se, (name, value, r.se)  # resolved by the test


def test_standard_errors_cover_the_exact_change(setup, exact):
    """1,000 batches of B = 128 prompts × G = 4: each quantity's 95% interval covers the exact
    change in 95% ± 4 binomial SDs (2.8%) of them (seen: 93.2%–95.6%; the t-correction at 127
    degrees of freedom, 0.2%, and the ratios' O(1/B) bias are smaller than the band; at B = 32
    the skewed importance weights and the t-correction bring it to 92.4%)."""
    registry, batch, responses, old, new, rewards, comparison = setup
    n, B = 1000, 128
    sampled = _sampled_terms(setup, n * B, 4, seed=12).mean(1).reshape(n, B, len(TERMS))
    covered = {name: 0 for name in exact}
    for k in range(n):
        realized = realized_effects(sampled[k], max_len=LMAX, has_rewards=True)
        for name, value in exact.items():
            covered[name] += abs(realized[name].value - value) < 1.959964 * realized[name].se
    band = 4 * (0.95 * 0.05 / n) ** 0.5
    for name, c in covered.items():
        assert abs(c / n - 0.95) < band, (name, c / n)


def test_bad_shapes_are_refused_by_name(setup):
    _, batch, _, _, _, rewards, comparison = setup
    with pytest.raises(ValueError, match="comparison: expected shape"):
        response_terms(comparison[..., :4], batch)
    with pytest.raises(ValueError, match="rewards: expected shape"):
        response_terms(comparison, batch, rewards[:1])
    with pytest.raises(ValueError, match="per_prompt: the standard errors need at least 2 prompts"):
        realized_effects(torch.zeros(1, len(TERMS)))
    with pytest.raises(ValueError, match=r"per_prompt: expected shape \[B, 10\]"):
        realized_effects(torch.zeros(3, 4))
