"""The in-trainer estimate: E = U predicted by leave-one-out, against a per-prompt autograd
loop with the real optimizer's own step(), and unbiased over draws of the batch on a softmax
bandit whose entropy derivative is known in closed form."""

import math

import pytest
import torch

from funcprobe import EntropyProbe
from bandit import SoftmaxBandit, bandit_rollouts, covariance_entropy_derivative
from helpers import random_rollouts
from test_influence import MAX_LEN, _dot, _reference, real_step, trained  # noqa: F401  (fixture)


@pytest.mark.parametrize("max_norm", [None, 1e-3])
def test_leave_one_out_is_each_prompt_against_the_real_step_without_it(trained, max_norm):  # noqa: F811
    """t[n] = ⟨∇LX[n], Δ(g_{-n})⟩ with Δ the real AdamW step (clipping, LoRA+ groups, weight
    decay, scheduled lr) taken by AdamW's own step() on the mean gradient of U without prompt
    n, per-prompt autograd gradients throughout: float64, bound 1e-9 relative (seen 3.1e-14:
    float64 rounding; torch's clip_grad_norm_ adds 1e-6 to the norm, funcprobe does too)."""
    model, opt, _, U = trained
    ref = _reference(model, U, U, opt, max_norm)
    probe = EntropyProbe(model, opt, max_grad_norm=max_norm, weighting="dr_grpo")
    pred = probe.predict(U, U)
    assert pred.estimator == "leave_one_out"
    B = U.num_prompts
    params = ref["params"]

    g = [sum(gj[k] for gj in ref["grad_j"]) / B for k in range(len(params))]
    t = []
    for n in range(B):
        without = [(B * g[k] - ref["grad_j"][n][k]) / (B - 1) for k in range(len(params))]
        t.append(_dot(ref["grad_lx"][n], real_step(params, opt, without, max_norm)[0]))
    t = torch.tensor(t, dtype=torch.float64)
    scale = float(t.abs().max())
    assert float((pred.s - t).abs().max()) <= 1e-9 * scale, float((pred.s - t).abs().max()) / scale
    # the same bound for the statistics: seen 1.0e-13 (mean), 1.4e-14 (SE), 1.2e-12 (same batch)
    assert pred.delta_h == pytest.approx(float(t.mean()) * pred.lr, rel=1e-9)
    assert pred.se == pytest.approx(float(t.std(correction=1)) / math.sqrt(B) * pred.lr, rel=1e-9)
    # the plain E = U value is the full step's, kept beside it
    same = [_dot(ref["grad_lx"][n], ref["delta_g"]) for n in range(B)]
    assert pred.delta_h_same_batch == pytest.approx(sum(same) / B, rel=1e-9)
    # an independent E is still the plain mean (estimator named)
    E = random_rollouts(B=3, G=3, seed=5, max_len=MAX_LEN)
    assert probe.predict(E, U).estimator == "independent"


def _draws(step: str, draws: int, seed: int):
    """(leave-one-out δH, same-batch δH, exact first-order δH of the step) per draw of U on
    a softmax bandit: K = 5 actions, B = 4 prompts × G = 4, reward r(a), GRPO advantages."""
    K, B, G, lr = 5, 4, 4, 0.1
    z = torch.tensor([0.5, -1.0, 1.5, 0.0, 0.3], dtype=torch.float64)
    reward = torch.tensor([1.0, 0.0, 0.2, 0.7, 0.0], dtype=torch.float64)
    bandit = SoftmaxBandit(z)
    opt = torch.optim.Adam(bandit.parameters(), lr=lr)
    if step != "sgd":  # a warmed-up Adam state (frozen_adam needs the second moment)
        bandit.z.grad = torch.tensor([0.3, -0.2, 0.1, 0.05, -0.4], dtype=torch.float64)
        opt.step()
        with torch.no_grad():
            bandit.z.copy_(z)
        bandit.z.grad = None
    probe = EntropyProbe(bandit, opt, step=step, **({"lr": lr} if step != "optimizer_step" else {}),
                         weighting="per_token_avg", chunk_size=B)
    p = torch.softmax(z, -1)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        actions = torch.multinomial(p.expand(B, K), G, replacement=True, generator=gen)
        r = reward[actions]
        U = bandit_rollouts(actions, r - r.mean(1, keepdim=True))
        if bool((U.advantages == 0).all()):
            continue
        pred = probe.predict(U, U)
        mu = probe.update_direction(U)["z"]
        exact = float(covariance_entropy_derivative(z, mu * pred.lr))
        out.append((pred.delta_h, pred.delta_h_same_batch, exact))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["sgd", "frozen_adam"])
def test_leave_one_out_is_unbiased_over_draws_where_the_same_batch_value_is_not(step):
    """Over 2,000 draws of U (= E), mean(δH_loo − δH_exact) is within 4 Monte-Carlo SE of 0
    (steps linear in g, where the estimate is a U-statistic), while the same-batch value's mean
    error is over 4 SE away (each prompt scores its own contribution). The real Adam step
    (``optimizer_step``, nonlinear in g) is measured, not asserted: docs/derivations.md#leave-one-out."""
    rows = _draws(step, 2000, seed=11)
    loo, same, exact = rows.unbind(-1)
    err_loo, err_same = loo - exact, same - exact
    se_loo = float(err_loo.std()) / math.sqrt(len(rows))
    se_same = float(err_same.std()) / math.sqrt(len(rows))
    assert abs(float(err_loo.mean())) < 4 * se_loo, (float(err_loo.mean()), se_loo)
    assert abs(float(err_same.mean())) > 4 * se_same, (float(err_same.mean()), se_same)


def test_a_trainers_gradient_gives_the_same_estimate_and_an_unmodelled_one_falls_back_by_name(trained, caplog):  # noqa: F811
    """``predict(U, U, gradient=g)`` with funcprobe's own mean gradient is the default path
    (float64, 1e-10 relative: the same arithmetic in another order); a gradient the modelled
    loss does not explain (random) gives the same-batch value, named and warned."""
    from funcprobe import update_direction

    model, opt, _, U = trained
    probe = EntropyProbe(model, opt)  # optimizer_step, no clipping
    g = update_direction(model, U, step="sgd")  # sgd's μY is the mean policy gradient itself
    a = probe.predict(U, U)
    b = probe.predict(U, U, gradient=g)
    assert a.estimator == b.estimator == "leave_one_out"
    # seen 0 (bit-identical); 1e-10 allows float64 reordering by another torch build
    assert float((a.s - b.s).abs().max()) <= 1e-10 * float(a.s.abs().max()), float((a.s - b.s).abs().max())
    gen = torch.Generator().manual_seed(0)
    noise = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) * float(t.abs().max()) for n, t in g.items()}
    with caplog.at_level("WARNING", logger="funcprobe"):
        c = probe.predict(U, U, gradient=noise)
    assert c.estimator == "same_batch" and c.delta_h_same_batch is None
    assert "not explained by the modelled loss" in caplog.text
    caplog.clear()
    zero = {n: torch.zeros_like(t) for n, t in g.items()}
    with caplog.at_level("WARNING", logger="funcprobe"):
        d = probe.predict(U, U, gradient=zero)  # AdamW still steps (momentum, decay); no prompt has a share
    assert "not explained" not in caplog.text and d.estimator == "leave_one_out"
    # every prompt scored against the same step: the same-batch value (float64 sums in another
    # order: seen 1.5e-14 relative, bound 1e-12)
    assert abs(d.delta_h - d.delta_h_same_batch) <= 1e-12 * abs(d.delta_h_same_batch)
