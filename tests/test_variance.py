"""conditional_variance: s from jvp and vjp against per-prompt autograd and finite differences."""

import math

import pytest
import torch

from funcprobe import ParamRegistry, conditional_variance, entropy_surrogate, sequence_logprobs, weighted_logprobs
from funcprobe.edge.session import probe_session
from helpers import gpt2, qwen2, random_direction, random_rollouts, reference_s, rel_err


# GPT-2 float64: seen <= 6.3e-15, bound 1e-10 (> 1e4x). Qwen2: HF's eager attention takes its
# softmax in float32, which the autograd reference and the probe's JVP round differently: seen
# <= 1.0e-7 (~1 float32 ulp, eps 1.2e-7), bound 1e-5 (100x; was 1e-6, under 10x): float32
# softmax rounding reaches 3.3e-6 of s where only one side has it (test_blockwise_attention).
# A wrong term of s is O(1) relative off.
@pytest.mark.parametrize("build, tol", [(gpt2, 1e-10), (qwen2, 1e-5)])
@pytest.mark.parametrize("weighting", ["dr_grpo", "per_token_avg"])
def test_jvp_and_vjp_equal_per_prompt_autograd(build, tol, weighting):
    model = build()
    E = random_rollouts(B=5, G=3, seed=11)
    mu = random_direction(ParamRegistry.from_model(model))
    ref = reference_s(model, E, mu, weighting)
    for mode in ("jvp", "vjp"):
        r = conditional_variance(model, E, mu, lr=0.01, weighting=weighting, mode=mode, chunk_size=2)
        assert r.s.shape == (5,) and r.s.dtype == torch.float64
        assert rel_err(r.s, ref) < tol, mode


def test_statistics_and_independence_of_batch_size():
    model = gpt2()
    E = random_rollouts(B=7, G=2, seed=3)
    mu = random_direction(ParamRegistry.from_model(model))
    results = [conditional_variance(model, E, mu, lr=0.5, chunk_size=k) for k in (1, 3, 7, 8)]
    for r in results[1:]:  # float64, other chunkings: seen 4.3e-16, bound 1e-12 (> 1e3x)
        assert rel_err(r.s, results[0].s) < 1e-12
    r = results[0]
    s = r.s
    assert r.num_prompts == 7
    # float64 statistics of 7 values: seen <= 2.2e-16 relative (1 ulp); rel_tol 1e-12 (1e-9 for
    # the variance, a sum of squares) is far above rounding and far below any wrong formula (1/n vs
    # 1/(n-1) is 17% off)
    assert math.isclose(r.mean_s, float(s.mean()), rel_tol=1e-12)
    assert math.isclose(r.delta_h, 0.5 * float(s.mean()), rel_tol=1e-12)
    assert math.isclose(r.var, 0.25 * float(s.var(unbiased=True)) / 7, rel_tol=1e-9)
    assert math.isclose(r.se, math.sqrt(r.var), rel_tol=1e-12)
    lo, hi = r.ci95
    assert math.isclose((lo + hi) / 2, r.delta_h, rel_tol=1e-12) and math.isclose(hi - lo, 2 * 1.959963984540054 * r.se)
    d = r.to_dict()
    assert set(d) >= {"s", "sum_s", "sum_s2", "num_prompts", "mean_s", "delta_h", "var", "se", "ci95"}
    assert len(d["s"]) == 7


def test_finite_difference_of_LX_with_frozen_coefficients():
    model = gpt2()
    E = random_rollouts(B=4, G=3, seed=21)
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg)
    s = conditional_variance(model, E, mu, lr=1.0).s
    eps = 1e-6
    with probe_session(reg):
        S0 = sequence_logprobs(reg.module, reg.params(reg.trainable), E)
        Sw = weighted_logprobs(S0, E, "dr_grpo")
        coeff = Sw - (Sw.sum(1, keepdim=True) - Sw) / (E.group_size - 1)

        def lx_frozen(sign):
            theta = {k: v + sign * eps * mu[k] for k, v in reg.trainable.items()}
            return -(coeff * sequence_logprobs(reg.module, reg.params(theta), E)).mean(1)

        # central difference, eps = 1e-6: truncation ~eps² ~ 1e-12, rounding ~2.2e-16/eps ~ 2e-10
        fd = (lx_frozen(+1) - lx_frozen(-1)) / (2 * eps)
        # the library's LX holds the same coefficients fixed (stop-gradient)
        assert rel_err(entropy_surrogate(S0, E, "dr_grpo"), -(coeff * S0).mean(1)) < 1e-14  # seen exact
    assert rel_err(s, fd) < 1e-7  # seen 7.4e-10 (the difference's rounding), bound 135x


def test_muY_validation_lists_offending_names():
    model = gpt2()
    E = random_rollouts()
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg)
    name = next(iter(mu))
    missing = {k: v for k, v in mu.items() if k != name}
    with pytest.raises(KeyError, match="missing 1 name"):
        conditional_variance(model, E, missing, lr=1.0)
    with pytest.raises(KeyError, match="unexpected 1 name.*bogus.weight"):
        conditional_variance(model, E, {**mu, "bogus.weight": torch.zeros(1)}, lr=1.0)
    with pytest.raises(ValueError, match=f"shapes differ.*{name}"):
        conditional_variance(model, E, {**mu, name: torch.zeros(3, 3)}, lr=1.0)
    nan = mu[name].clone()
    nan.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"non-finite.*{name}"):
        conditional_variance(model, E, {**mu, name: nan}, lr=1.0)
    with pytest.raises(ValueError, match="floating point"):
        conditional_variance(model, E, {**mu, name: mu[name].long()}, lr=1.0)
    with pytest.raises(ValueError, match="zero everywhere"):
        conditional_variance(model, E, {k: torch.zeros_like(v) for k, v in mu.items()}, lr=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr: expected a finite number > 0"),
        (dict(lr=float("nan")), "lr: expected a finite number > 0"),
        (dict(lr=1.0, mode="fwd"), "mode: expected one of"),
        (dict(lr=1.0, weighting="token"), "weighting: expected one of"),
        (dict(lr=1.0, chunk_size=0), "chunk_size: expected an int >= 1"),
    ],
)
def test_argument_errors(kwargs, match):
    model = gpt2()
    mu = random_direction(ParamRegistry.from_model(model))
    with pytest.raises(ValueError, match=match):
        conditional_variance(model, random_rollouts(), mu, **kwargs)


def test_needs_two_prompts_and_signal():
    model = gpt2()
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg)
    with pytest.raises(ValueError, match="E: the conditional variance needs at least 2 prompts"):
        conditional_variance(model, random_rollouts(B=1), mu, lr=1.0)
    # a direction only on parameters the forward never uses: every s is 0 -> clear error
    model.base_model.model.transformer.wpe.weight.requires_grad_(True)
    reg = ParamRegistry.from_model(model, params=["base_model.model.transformer.wpe.weight"])
    unused = {"base_model.model.transformer.wpe.weight": torch.zeros_like(reg.trainable["base_model.model.transformer.wpe.weight"])}
    unused["base_model.model.transformer.wpe.weight"][-1] = 1.0  # the last position is never reached
    with pytest.raises(RuntimeError, match="every s\\[n\\] is exactly 0"):
        conditional_variance(reg, random_rollouts(), unused, lr=1.0)
