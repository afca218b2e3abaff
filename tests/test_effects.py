"""Predicted effects of a step (funcprobe.core.token_stats, funcprobe.core.effects) against
exact enumeration on a float64 GPT-2 with a 5-token vocabulary and responses of at most 3
tokens (end-of-sequence id 2), differentiated by autograd (``torch.func.jvp`` of the exact
enumerated quantities, computed by an unpadded per-sequence reference forward).

Bounds: 1e-10 for the exact identities (float64 sums over 85 sequences of O(1) terms: the
values seen are ~1e-15); 4 SE for the sampled estimators over 40,000 groups.
"""

import itertools

import pytest
import torch
from torch.func import functional_call, jvp

from funcprobe import EntropyProbe, ParamRegistry, RolloutBatch
from funcprobe.core import token_stats as token_stats_module
from funcprobe.core.effects import COMPONENTS, OPTIONAL, Effects, moment_sums, prompt_components, sequence_values
from funcprobe.core.token_stats import TOKEN_STATS, token_stats, vocab_reductions
from helpers import gpt2, random_direction, random_rollouts

V, LMAX, EOS, PAD = 5, 3, 2, 0
PROMPTS = [[1, 3], [1, 4, 0]]
EXACT = 1e-10  # float64 identities: seen <= 1.3e-14 (most <= 2e-15), > 7e3x


def _responses():
    """Every response: EOS-terminated of length 1..3, or 3 tokens without an earlier EOS (85)."""
    other = [v for v in range(V) if v != EOS]
    out = [[EOS]] + [[a, EOS] for a in other] + [[a, b, c] for a, b in itertools.product(other, repeat=2)
                                                 for c in range(V)]
    return out


@pytest.fixture(scope="module")
def setup():
    model = gpt2(vocab=V, seed=3)
    model.eval()
    registry = ParamRegistry.from_model(model)
    responses = _responses()
    batch = RolloutBatch.from_lists(PROMPTS, [responses] * len(PROMPTS), pad_token_id=PAD, max_len=float(LMAX))
    tangent = random_direction(registry, seed=4)
    rewards = torch.randn(len(responses), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = token_stats(registry.module, registry.frozen, registry.trainable, tangent, batch)
    return model, registry, batch, responses, tangent, rewards, stats


def _reference_logprobs(registry, theta, responses, prompt):
    """``[85, LMAX, V]`` next-token log-probs at the response positions of every response of
    ``prompt``: one unpadded-prompt forward of the model over all of them (responses
    right-padded with EOS; the model is causal and no mask is passed, so a position never
    sees the padding after it)."""
    ids = torch.tensor([prompt + y + [EOS] * (LMAX - len(y)) for y in responses])
    logits = functional_call(registry.module, {**registry.frozen, **theta}, (), {"input_ids": ids}).logits
    return torch.log_softmax(logits[:, len(prompt) - 1:-1], -1)


def _reference_tokens(model, registry, theta, responses):
    """Per prompt, per response: ``[len, 2]`` (log p(y_t), H_t) from the reference forward."""
    out = []
    for prompt in PROMPTS:
        logp = _reference_logprobs(registry, theta, responses, prompt)
        rows = []
        for k, y in enumerate(responses):
            lp = logp[k, :len(y)]
            rows.append(torch.stack([lp.gather(-1, torch.tensor(y)[:, None]).squeeze(-1),
                                     -(lp.exp() * lp).sum(-1)], -1))
        out.append(rows)
    return out


def _exact(model, registry, theta, responses, rewards):
    """Exact per-prompt expectations ``[2, 5]``: E[|y|], E[Σ_t H_t], E[Σ_t H_t / |y|], E[r], and
    the log-probs of every response ``[2, 85]``."""
    tokens = _reference_tokens(model, registry, theta, responses)
    length = torch.tensor([float(len(y)) for y in responses], dtype=torch.float64)
    rows, logps = [], []
    for per_prompt in tokens:
        logpi = torch.stack([t[:, 0].sum() for t in per_prompt])
        hsum = torch.stack([t[:, 1].sum() for t in per_prompt])
        pi = logpi.exp()
        rows.append(torch.stack([(pi * length).sum(), (pi * hsum).sum(), (pi * hsum / length).sum(),
                                 (pi * rewards).sum(), pi.sum()]))
        logps.append(logpi)
    return torch.stack(rows), torch.stack(logps)


def test_probabilities_of_the_enumeration_sum_to_one(setup):
    *_, stats = setup
    pi = stats[..., TOKEN_STATS.index("logprob")].sum(-1).exp()
    assert (pi.sum(-1) - 1).abs().max() < EXACT


def test_token_statistics_equal_autograd_of_the_exact_per_position_quantities(setup):
    model, registry, batch, responses, tangent, _, stats = setup
    theta = registry.trainable

    def per_token(t):
        return torch.cat([torch.cat(rows) for rows in _reference_tokens(model, registry, t, responses)])

    primal, dot = jvp(per_token, (theta,), (tangent,))  # [M, 2] in prompt, response, position order
    mask = batch.response_mask
    mine = stats[mask]  # the same order: prompt, response, column
    assert (mine[:, 0] - primal[:, 0]).abs().max() < EXACT
    assert (mine[:, 1] - primal[:, 1]).abs().max() < EXACT
    assert (mine[:, 2] - dot[:, 0]).abs().max() < EXACT
    assert (mine[:, 3] - dot[:, 1]).abs().max() < EXACT

    # V_t = d²/dε² KL(p_t(θ) ‖ p_t(θ + εΔ)) at 0, by forward over forward mode
    p0 = [_reference_logprobs(registry, theta, responses, prompt).detach() for prompt in PROMPTS]

    def kl(eps):
        t = {n: theta[n] + eps * tangent[n] for n in theta}
        out = []
        for prompt, logp in zip(PROMPTS, p0):
            logq = _reference_logprobs(registry, t, responses, prompt)
            per_position = (logp.exp() * (logp - logq)).sum(-1)  # [85, LMAX]
            out += [per_position[k, :len(y)] for k, y in enumerate(responses)]
        return torch.cat(out)

    zero = torch.zeros((), dtype=torch.float64)
    second = jvp(lambda e: jvp(kl, (e,), (torch.ones_like(e),))[1], (zero,), (torch.ones_like(zero),))[1]
    assert (mine[:, 4] - second).abs().max() < EXACT


def test_exact_expectation_forms_equal_the_derivatives_of_the_exact_expectations(setup):
    model, registry, batch, responses, tangent, rewards, stats = setup
    theta = registry.trainable
    _, d_exact = jvp(lambda t: _exact(model, registry, t, responses, rewards)[0], (theta,), (tangent,))
    seq = sequence_values(stats, batch)
    pi = seq["logprob"].exp()  # [2, 85]

    def expect(x):
        return (pi * x).sum(-1)

    sdot = seq["logprob_tangent"]
    d_len = expect(seq["length"] * sdot)
    d_hsum = expect(seq["entropy_sum_tangent"] + seq["entropy_sum"] * sdot)
    d_hmean = expect(seq["entropy_mean_tangent"] + seq["entropy_mean"] * sdot)
    d_reward = expect(rewards * sdot)
    assert (d_len - d_exact[:, 0]).abs().max() < EXACT
    assert (d_hsum - d_exact[:, 1]).abs().max() < EXACT
    assert (d_hmean - d_exact[:, 2]).abs().max() < EXACT
    assert (d_reward - d_exact[:, 3]).abs().max() < EXACT
    assert d_exact[:, 4].abs().max() < EXACT  # Σ π = 1 stays 1
    assert expect(sdot).abs().max() < EXACT  # E[Ṡ] = 0: the baseline adds nothing in expectation


def _exact_derivatives(setup):
    """The exact first-order derivatives of every first-order effect for the uniform mix of
    the two prompts, and the levels (E[|y|], E[ΣH]) of the mix."""
    model, registry, batch, responses, tangent, rewards, stats = setup
    level, d = jvp(lambda t: _exact(model, registry, t, responses, rewards)[0], (registry.trainable,), (tangent,))
    level, d = level.mean(0), d.mean(0)
    return {
        "completion_length": float(d[0]),
        "entropy_seq_mean_token_sum": float(d[1]),
        "entropy_seq_mean_token_sum_norm": float(d[1]) / LMAX,
        "entropy_seq_mean_token_mean": float(d[2]),
        "reward": float(d[3]),
        "entropy_token_mean": float(d[1] / level[0] - level[1] * d[0] / level[0] ** 2),
    }


def test_sampled_effects_are_within_4_se_of_the_exact_derivatives(setup):
    """40,000 groups of G = 4 responses drawn from π (20,000 per prompt): each first-order
    effect's estimate (score function with the leave-one-out baseline, plus the pathwise
    part) is within 4 SE of the exact derivative; and its mean is not trivially 0."""
    model, registry, batch, responses, tangent, rewards, stats = setup
    exact = _exact_derivatives(setup)
    groups, G = 20_000, 4
    pi = stats[..., TOKEN_STATS.index("logprob")].sum(-1).exp()  # [2, 85]
    gen = torch.Generator().manual_seed(11)
    idx = torch.stack([torch.multinomial(pi[n].float(), groups * G, replacement=True, generator=gen)
                       for n in range(2)]).reshape(2, groups, G)  # [2, groups, G]
    prompt = torch.arange(2)[:, None, None].expand_as(idx)
    sampled = RolloutBatch(batch.input_ids[prompt, idx].reshape(2 * groups, G, -1),
                           batch.attention_mask[prompt, idx].reshape(2 * groups, G, -1), batch.response_start,
                           None, float(LMAX))
    st = stats[prompt, idx].reshape(2 * groups, G, *stats.shape[2:])
    r = rewards[idx].reshape(2 * groups, G)
    comps = prompt_components(st, sampled, r)
    eff = Effects.from_moments(moment_sums(comps), lr=1.0, components=comps, logprob_change=torch.zeros(1),
                               optional=OPTIONAL)
    for name, value in exact.items():
        e = eff[name]
        # statistical, 4 SE: the draws are seeded (manual_seed(11)), so the outcome is fixed (seen
        # |z| 0.07-0.44 for five effects, 1.9 for entropy_seq_mean_token_mean); with other draws a
        # correct estimator fails one of the 6 at most 6 x 6.3e-5 = 4e-4 of the time
        assert abs(e.value - value) < 4 * e.se, (name, e.value, value, e.se)
        assert abs(value) > 4 * e.se / 10, (name, value, e.se)  # a real signal, resolved by the test


def test_predicted_kl_over_exact_kl_tends_to_one_at_first_order(setup):
    model, registry, batch, responses, tangent, rewards, stats = setup
    theta = registry.trainable
    seq = sequence_values(stats, batch)
    pi = seq["logprob"].exp()
    coeff = float((pi * 0.5 * seq["variance_sum"]).sum(-1).mean())  # E[½ Σ_t V_t] over the prompt mix
    _, logp0 = _exact(model, registry, theta, responses, rewards)
    errors = []
    for eta in (6.25e-5, 3.125e-5, 1.5625e-5):
        _, logp1 = _exact(model, registry, {n: theta[n] + eta * tangent[n] for n in theta}, responses, rewards)
        kl = float((logp0.exp() * (logp0 - logp1)).sum(-1).mean())
        errors.append(abs(eta ** 2 * coeff / kl - 1))
    # the relative error is O(η): it halves when η halves. Seen here err ≈ 1.13 η + 570 η², so the
    # ratios are 2 + O(η): seen 2.032 and 2.028 (about 10x inside the ±0.3 window; a wrong
    # order gives 1 or 4); float64 cancellation in the KL is ~1e-11 relative, far below err ~2e-5
    for a, b in zip(errors, errors[1:]):
        assert 1.7 < a / b < 2.3, errors
    assert errors[-1] < 0.2  # seen 1.5e-4; an error not O(η) (a wrong V_t) would not shrink


def test_logprob_change_of_given_sequences_is_the_autograd_directional_derivative():
    model = gpt2(seed=1)
    model.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    E, U = random_rollouts(B=3, G=3, seed=21), random_rollouts(B=3, G=3, seed=22)
    probe = EntropyProbe(model, opt, step="sgd", effects=True)
    mu = probe.update_direction(U)
    result = probe.predict(E, U)
    registry = ParamRegistry.from_model(model)

    def S(t):
        params = {**registry.frozen, **t}
        rows = []
        for n in range(E.num_prompts):
            for g in range(E.group_size):
                m = E.attention_mask[n, g].bool()
                seq = E.input_ids[n, g][m]
                k = int(m[:E.response_start].sum())
                logp = torch.log_softmax(functional_call(registry.module, params, (), {"input_ids": seq[None]})
                                         .logits[0], -1)
                rows.append(logp[k - 1:-1].gather(-1, seq[k:, None]).sum())
        return torch.stack(rows).reshape(E.num_prompts, E.group_size)

    _, dS = jvp(S, (registry.trainable,), (mu,))
    assert (result.effects.logprob_change - 0.5 * dS).abs().max() < EXACT


def test_effects_pass_gives_the_same_delta_h_as_the_delta_h_only_pass():
    model = gpt2(seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    E, U = random_rollouts(B=4, G=3, seed=31), random_rollouts(B=3, G=3, seed=32)
    plain = EntropyProbe(model, opt, step="adam_step").predict(E, U)
    with_effects = EntropyProbe(model, opt, step="adam_step", effects=True).predict(E, U)
    assert torch.allclose(with_effects.s, plain.s, rtol=1e-12, atol=0)  # float64: seen exactly equal
    assert with_effects.effects is not None and plain.effects is None
    same = EntropyProbe(model, opt, step="adam_step", effects=True).predict(U, U)  # E = U: leave-one-out
    assert same.estimator == "leave_one_out" and same.effects.estimator == "leave_one_out"
    # float64, values ~1e-2: seen 1.7e-18 (one ulp), bound 1e-14 (5e3x)
    assert abs(same.delta_h - EntropyProbe(model, opt, step="adam_step").predict(U, U).delta_h) < 1e-14


def test_a_model_without_a_head_split_gives_the_same_statistics(setup, monkeypatch):
    _, registry, batch, _, tangent, _, stats = setup
    monkeypatch.setattr(token_stats_module, "head_split", lambda *a, **k: None)
    unsplit = token_stats(registry.module, registry.frozen, registry.trainable, tangent, batch)
    assert (unsplit - stats).abs().max() < EXACT


def test_vocab_reductions_treat_a_masked_logit_as_a_dropped_entry_and_leave_inputs_alone():
    """A logit of −inf (p = 0) gives the statistics of the same row without that entry: an
    exact reference, float64 (seen 8.9e-16, bound 1e-12: float64 sums over V = 7); float32
    rows against float64 within 1e-5 relative (float32 rounding over V = 7, seen 1.2e-7)."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 7, generator=gen, dtype=torch.float64) * 3
    zdot = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    targets = torch.tensor([0, 6, 2, 3])
    masked = z.clone()
    masked[1, 4] = masked[2, 0] = masked[2, 5] = float("-inf")
    before = (masked.clone(), zdot.clone())
    got = vocab_reductions(masked, zdot, targets)
    assert torch.equal(masked, before[0]) and torch.equal(zdot, before[1])  # inputs untouched
    for row, dropped in ((0, []), (1, [4]), (2, [0, 5]), (3, [])):
        keep = [v for v in range(7) if v not in dropped]
        want = vocab_reductions(z[row:row + 1, keep], zdot[row:row + 1, keep],
                                torch.tensor([keep.index(int(targets[row]))]))
        assert (got[row] - want[0]).abs().max() < 1e-12
    single = vocab_reductions(masked.float(), zdot.float(), targets)
    assert single.dtype == torch.float32 and torch.isfinite(single).all()
    assert ((single.double() - got).abs() / got.abs().clamp(min=1)).max() < 1e-5


@pytest.mark.parametrize("rewards, effects, match", [
    (torch.zeros(3, 3), False, "rewards: only used"),
    (torch.zeros(2, 3), True, r"rewards: expected shape \[B, G\] = \[3, 3\]"),
    (torch.full((3, 3), float("nan")), True, "rewards: non-finite"),
    ([["a"] * 3] * 3, True, "rewards: expected"),
])
def test_bad_rewards_are_refused_by_name(rewards, effects, match):
    model = gpt2(seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    E, U = random_rollouts(B=3, G=3, seed=31), random_rollouts(B=3, G=3, seed=32)
    with pytest.raises(ValueError, match=match):
        EntropyProbe(model, opt, step="adam_step", effects=effects).predict(E, U, rewards=rewards)


def test_components_are_named():
    assert len(COMPONENTS) == len(set(COMPONENTS))
