"""Entropy influence: δH = δH_baseline + Σ_i δH_i exactly, each δH_i and token share
against an independent per-sample autograd loop and the real optimizer's own step."""

import copy
import math

import pytest
import torch

from funcprobe import EntropyProbe, RolloutBatch, SettingsError
from funcprobe.core.influence import split_step
from funcprobe import AdamHyper, AdamState, StepMap, frozen_adam, optimizer_step_map, sgd
from funcprobe.api import entropy_influence
from bandit import SoftmaxBandit, bandit_rollouts
from helpers import gpt2, live_params, random_rollouts, reference_LX, reference_S, rel_err
import test_practitioner

workspace = test_practitioner.workspace  # fixture: a saved tiny Qwen2 + LoRA, tokenizer, optimizer state, rollouts

MAX_LEN = 6.0


def _grad(scalar, params, retain=False):
    return [g.detach() for g in torch.autograd.grad(scalar, params, retain_graph=retain)]


def real_step(params, opt, grads, max_norm):
    """(Δθ, the pre-clip norm or None): the optimizer's own step on ascent gradients ``grads``
    (clip_grad_norm_ first when ``max_norm``), parameters and optimizer state restored after."""
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    for p, gr in zip(params, grads):
        p.grad = -gr.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm else None
    opt.step()
    delta = [p.detach() - b for p, b in zip(params, before)]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
            p.grad = None
    opt.load_state_dict(state)
    return delta, total


def _reference(model, E, U, opt, max_norm):
    """Everything by plain autograd on the live parameters and the real optimizer:
    ∇LX[n], ∇J_i per prompt, the real step Δ(g) (clip_grad_norm_ + step) and Δ(0), c, q."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = live_params(model, names)
    model.eval()
    grad_lx = []
    for n in range(E.num_prompts):
        sub = E.select(n, n + 1)
        grad_lx.append(_grad(reference_LX(reference_S(model, sub), sub, "dr_grpo")[0], params))
    grad_j = []
    for i in range(U.num_prompts):
        sub = U.select(i, i + 1)
        S = reference_S(model, sub)
        grad_j.append(_grad((sub.advantages * S / MAX_LEN).mean(1)[0], params))
    g = [sum(gj[k] for gj in grad_j) / U.num_prompts for k in range(len(params))]

    delta_g, total = real_step(params, opt, g, max_norm)
    delta_0, _ = real_step(params, opt, [torch.zeros_like(t) for t in g], max_norm)
    c = 1.0 if max_norm is None else min(1.0, max_norm / (float(total) + 1e-6))
    assert all(bool((t != 0).all()) for t in g)
    q = [(dg - d0) / (c * gk) for dg, d0, gk in zip(delta_g, delta_0, g)]
    return dict(names=names, params=params, grad_lx=grad_lx, grad_j=grad_j, delta_g=delta_g, delta_0=delta_0,
                c=c, q=q)


def _dot(a, b):
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def trained():
    """GPT-2 + LoRA (float64), AdamW with LoRA+ groups and weight decay, 3 steps of a LambdaLR."""
    model = gpt2()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for n, p in named if "lora_B" not in n], lr=1e-3, weight_decay=0.1),
              dict(params=[p for n, p in named if "lora_B" in n], lr=1.6e-2, weight_decay=0.1)]
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    E = random_rollouts(B=5, G=3, seed=21, max_len=MAX_LEN)
    U = random_rollouts(B=4, G=3, seed=22, max_len=MAX_LEN)
    return model, opt, E, U


@pytest.mark.parametrize("max_norm", [None, 1e-3])
def test_influence_is_an_exact_split_and_matches_the_per_sample_reference(trained, max_norm):
    model, opt, E, U = trained
    probe = EntropyProbe(model, opt, max_grad_norm=max_norm, chunk_size=2)
    pred = probe.predict(E, U)
    inf = probe.influence(E, U)
    # Tolerances here, float64 throughout. Same-code agreements (the split, predict vs influence,
    # sums of shares) are rounding only: seen <= 1.4e-19 absolute (1e-15 relative), bounds 1e-10
    # relative (>= 1e5x). Against the reference (autograd per sample + the real optimizer's step):
    # its secant (Δ(g) − Δ(0))/g cancels digits, seen 9.4e-11 relative (tokens), 6.9e-11 (matrix),
    # 4.5e-11 (SEs), 1.5e-10 (per prompt, of the max); bounds 1e-8 (>= 65x). A wrong
    # preconditioner, clip factor or weighting is off by O(1) relative.
    # the split is exact: baseline + Σ_i δH_i = δH (float64)
    assert abs(inf.delta_h_baseline + float(inf.per_prompt.sum()) - inf.delta_h) < 1e-10 * max(abs(inf.delta_h), 1e-3)
    assert abs(inf.delta_h - pred.delta_h) < 1e-10 * abs(pred.delta_h)
    assert abs(inf.se - pred.se) < 1e-10 * pred.se
    # seen exactly equal (values up to 1.3e-4; 1e-16 is ~3000 float64 ulps of them)
    assert torch.allclose(inf.per_response.sum(-1), inf.per_prompt, rtol=0, atol=1e-16)
    assert torch.allclose(inf.per_token.sum(-1), inf.per_response, rtol=0, atol=1e-16)
    assert bool((inf.per_token[~U.response_mask] == 0).all())
    ref = _reference(model, E, U, opt, max_norm)
    if max_norm is not None:
        # clipping is active here; c ~ 7e-3, seen 1.7e-18 off (float64 rounding), bound 1e-12
        assert ref["c"] < 1 and abs(inf.clip - ref["c"]) < 1e-12
    mu_x = [sum(gl[k] for gl in ref["grad_lx"]) / E.num_prompts for k in range(len(ref["params"]))]
    # δH from the real step, and its baseline from the real step of a zero gradient
    assert rel_err(inf.delta_h, _dot(mu_x, ref["delta_g"])) < 1e-8
    assert rel_err(inf.delta_h_baseline, _dot(mu_x, ref["delta_0"])) < 1e-8
    # every δH_i: per-sample gradient, preconditioned by the real optimizer's secant, dotted with μX
    qmu = [q * m for q, m in zip(ref["q"], mu_x)]
    dh_ref = torch.tensor([ref["c"] / U.num_prompts * _dot(qmu, gj) for gj in ref["grad_j"]], dtype=torch.float64)
    assert float((inf.per_prompt - dh_ref).abs().max()) < 1e-8 * float(dh_ref.abs().max())
    # token shares: each token's log-prob gradient by autograd on the unpadded sequence
    i, g = 1, 2
    row = U.attention_mask[i, g].bool()
    seq = U.input_ids[i, g][row]
    n_prompt = int(row[: U.response_start].sum())
    logp = torch.log_softmax(model(input_ids=seq[None]).logits[0], -1)
    a = float(U.advantages[i, g]) / (U.group_size * MAX_LEN)
    token_ref = []
    for t in range(n_prompt, len(seq)):
        token_ref.append(a * ref["c"] / U.num_prompts * _dot(qmu, _grad(logp[t - 1, seq[t]], ref["params"], retain=True)))
    cols = row.nonzero().flatten()[n_prompt:]
    got = inf.per_token[i, g, cols]
    assert rel_err(got, torch.tensor(token_ref, dtype=torch.float64)) < 1e-8
    # the evaluation x update matrix, both ways round (rows over E, columns over U)
    q_scale = ref["c"] / U.num_prompts
    s_ref = torch.tensor([[q_scale * _dot([q * x for q, x in zip(ref["q"], gl)], gj) for gj in ref["grad_j"]]
                          for gl in ref["grad_lx"]], dtype=torch.float64)
    wide = probe.influence(E, U, matrix=True)  # rows over E whichever batch is larger: B_E = 5 > B_U = 4
    narrow = probe.influence(E.select(0, 3), U, matrix=True)  # and B_E = 3 < 4
    assert rel_err(wide.matrix, s_ref) < 1e-8 and rel_err(narrow.matrix, s_ref[:3]) < 1e-8
    assert float((wide.matrix.mean(0) - wide.per_prompt).abs().max()) < 1e-12  # seen 6.8e-20 (values ~1e-6)
    assert torch.allclose(wide.per_prompt_se, s_ref.std(0) / math.sqrt(5), rtol=1e-8, atol=0)


def _twice(E, n):
    """Prompt n of E twice: a B_E = 2 batch whose μX is ∇LX[n] (the API needs B_E >= 2)."""
    idx = torch.tensor([n, n])
    return RolloutBatch(E.input_ids[idx], E.attention_mask[idx], E.response_start,
                        None if E.advantages is None else E.advantages[idx], E.max_len[idx])


def test_per_token_and_response_ses_are_the_spread_of_single_prompt_evaluations(trained):
    """The SE of every share with ``matrix=True`` against a loop of the default path over
    E batches of one prompt (twice): x_n = that run's shares, SE = sd_n(x_n)/sqrt(B_E)."""
    model, opt, E, U = trained
    probe = EntropyProbe(model, opt, max_grad_norm=1e-3, chunk_size=2)
    inf = probe.influence(E, U, matrix=True)
    runs = [probe.influence(_twice(E, n), U) for n in range(E.num_prompts)]
    x_token = torch.stack([r.per_token for r in runs])  # [B_E, B_U, G, T]
    x_response, x_prompt = x_token.sum(-1), x_token.sum((-1, -2))
    root_b = math.sqrt(E.num_prompts)
    # both sides are float64 sums of the same products in other orders and chunkings, so they
    # differ by rounding: a few eps = 2.2e-16 of max |x| per term, times the ~30 terms of a
    # prompt's share. Seen (of max |x|): means 1.6e-16, SEs 2.0e-16, matrix 1.2e-15; bound 1e-13
    scale = float(x_token.abs().max())
    assert float((x_token.mean(0) - inf.per_token).abs().max()) < 1e-13 * scale
    # (an SE is an sd over B_E = 5 values: its rounding error is the values', not amplified)
    for got, x in ((inf.per_token_se, x_token), (inf.per_response_se, x_response), (inf.per_prompt_se, x_prompt)):
        ref = x.std(0, correction=1) / root_b
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) < 1e-13 * scale, float((got - ref).abs().max()) / scale
    assert float(inf.per_token_se[U.response_mask].min()) > 0  # a real spread on every response token
    assert bool((inf.per_token_se[~U.response_mask] == 0).all())
    assert torch.allclose(inf.matrix, x_prompt, rtol=0, atol=1e-13 * scale)
    d = inf.to_dict()
    assert torch.tensor(d["per_response_se"], dtype=torch.float64).equal(inf.per_response_se)
    plain = probe.influence(E, U)
    assert plain.per_token_se is None and plain.per_response_se is None and "per_response_se" not in plain.to_dict()


def test_share_spread_is_the_sample_se_without_cancellation():
    """Shifted sums: values 1e8 + O(1) whose sd is O(1), where Σx² − (Σx)²/B in float64 gives
    0 instead of 0.42 (every digit lost)."""
    from funcprobe.core.influence import ShareSpread

    gen = torch.Generator().manual_seed(4)
    x = 1e8 + torch.randn(7, 3, generator=gen, dtype=torch.float64)
    spread = ShareSpread(x.mean(0) + 1e-3)  # a centre a little off the mean: the correction term
    for row in x:
        spread.add(row)
    ref = x.std(0, correction=1) / math.sqrt(7)
    # float64: d_n = x_n − centre is rounded by eps·1e8 ≈ 2e-8, relative ~1e-8 of an sd of 0.3-0.4;
    # seen 2.4e-9, bound 1e-6
    assert rel_err(spread.se(), ref) < 1e-6
    with pytest.raises(ValueError, match="at least 2 prompts"):
        ShareSpread(x[0]).se()


def test_groups_carry_their_share_with_an_se(trained):
    model, opt, E, U = trained
    probe = EntropyProbe(model, opt, chunk_size=3)
    first = torch.zeros(U.input_ids.shape, dtype=torch.bool)
    first[..., U.response_start] = True  # the first response token of every response
    inf = probe.influence(E, U, groups={"positive": U.advantages > 0, "negative": U.advantages < 0,
                                        "first_tokens": first})
    pos, neg, tok = inf.groups["positive"], inf.groups["negative"], inf.groups["first_tokens"]
    # float64 rounding only (values ~1e-4): seen 0 (first), 5.4e-20 (loop), 0 (last); bounds >= 1e5x
    assert abs(pos.delta_h + neg.delta_h - inf.delta_h_update) < 1e-12
    for group in (pos, neg, tok):  # independent paths: token JVP over U = backward over U then JVP over E
        assert abs(float(group.s.mean()) - group.delta_h) < 1e-10 * max(abs(group.delta_h), 1e-6)
        assert group.se > 0
    assert tok.num_tokens == int(U.response_mask[..., U.response_start].sum())
    assert abs(tok.delta_h - float(inf.per_token[..., U.response_start].sum())) < 1e-14
    d = inf.to_dict()
    assert set(d["groups"]) == {"positive", "negative", "first_tokens"} and len(d["per_prompt"]) == 4
    top = inf.top_tokens(3, by="negative")
    assert len(top) == 3 and top[0][3] == float(inf.per_token.min())


def test_split_step_is_exact_and_the_secant_is_the_preconditioner_for_linear_steps():
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.randn(6, generator=gen, dtype=torch.float64)}
    g["w"][2] = 0.0  # a coordinate with no gradient: the derivative there
    split = split_step(sgd(), g)
    assert split.clip == 1.0 and bool((split.secant["w"] == 1).all()) and bool((split.baseline["w"] == 0).all())
    v = torch.rand(6, generator=gen, dtype=torch.float64)
    hyper = AdamHyper(0.9, 0.999, 1e-8, 0.0, True, False)
    state = {"w": AdamState(hyper, step=3, exp_avg=torch.zeros(6, dtype=torch.float64), exp_avg_sq=v)}
    split = split_step(frozen_adam(state), g)
    # rtol 1e-14 ~ 50 float64 eps for a few-operation formula; seen exactly equal
    assert torch.allclose(split.secant["w"], 1 / ((v / (1 - 0.999**3)).sqrt() + 1e-8), rtol=1e-14, atol=0)
    # Adam at step 0 with weight decay and clipping: Δ(g) = Δ(0) + q ⊙ c·g, and at g_k = 0 q is A'(0),
    # finite although sqrt(v) has no derivative there (v = 0)
    theta = {"w": torch.randn(6, generator=gen, dtype=torch.float64)}
    hyper = AdamHyper(0.9, 0.999, 1e-8, 0.01, True, False)
    step = optimizer_step_map(theta, {"w": AdamState(hyper)}, {"w": 1e-3}, max_grad_norm=0.5)
    split = split_step(step, g)
    full = step(g)["w"]
    assert split.clip < 1
    # rtol 1e-14 ~ 50 float64 eps; seen 4.3e-16 relative (the linear step's rounding)
    assert torch.allclose(split.baseline["w"] + split.secant["w"] * split.clip * g["w"], full, rtol=1e-14, atol=0)
    # Adam's first step is lr·g/(|g| + ε) (bias-corrected), whose derivative at g = 0 is lr/ε
    # (float64, a few operations: seen exact, bound 1e-12)
    assert rel_err(split.secant["w"][2], 1e-3 / 1e-8) < 1e-12
    # a coordinate-wise map without a closed-form secant: the difference, and one JVP at g_k = 0
    custom = StepMap("tanh_step", lambda name, g: torch.tanh(g) + 0.5)
    split = split_step(custom, g)
    # float64 of O(1) values: seen 1.1e-16 absolute (one ulp), bounds rtol 1e-14 / atol 1e-15 (~10 ulps)
    assert torch.allclose(split.baseline["w"] + split.secant["w"] * g["w"], custom(g)["w"], rtol=1e-14, atol=1e-15)
    assert float(split.secant["w"][2]) == 1.0  # tanh'(0)


def _adam_mp(g, p, m0, v0, vmax, step, hyper):
    """The Adam/AdamW step per unit lr for one coordinate in 60-digit arithmetic (mpmath)."""
    import mpmath

    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.dps = 60
    b1, b2, eps, wd = (mp.mpf(x) for x in (hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay))
    g, p, m0, v0, vmax = (mp.mpf(float(x)) for x in (g, p, m0, v0, vmax))
    lg = -g + (wd * p if not hyper.decoupled_weight_decay else 0)
    t = step + 1
    m = b1 * m0 + (1 - b1) * lg
    v = b2 * v0 + (1 - b2) * lg * lg
    if hyper.amsgrad:
        v = max(vmax, v)
    out = -(m / (1 - b1**t)) / (mp.sqrt(v) / mp.sqrt(1 - b2**t) + eps)
    return out - wd * p if hyper.decoupled_weight_decay else out


@pytest.mark.parametrize("decoupled, amsgrad, step", [(True, False, 5), (False, False, 5), (False, True, 5),
                                                      (True, True, 0)])
def test_adam_secant_has_no_cancellation(decoupled, amsgrad, step):
    """q = (f(g) − f(0))/g against 60-digit arithmetic, where the momentum and weight decay
    f(0) dominate f(g) − f(0) by up to 1e12 (the float64 difference of the two steps is off by up
    to 4.7e-4 relative on these coordinates; the secant by 5.5e-16)."""
    from funcprobe.core.steps import _adam_secant, _adam_update

    gen = torch.Generator().manual_seed(1)
    n = 8
    g = torch.randn(n, generator=gen, dtype=torch.float64) * torch.logspace(-12, 0, n, dtype=torch.float64)
    g[3] = 0.0
    p = torch.randn(n, generator=gen, dtype=torch.float64)
    hyper = AdamHyper(0.9, 0.999, 1e-8, 0.1, decoupled, amsgrad)
    if step:
        m0 = torch.randn(n, generator=gen, dtype=torch.float64)
        v0 = torch.rand(n, generator=gen, dtype=torch.float64)
        vmax = v0 * torch.rand(n, generator=gen, dtype=torch.float64) * 2
        state = AdamState(hyper, step, m0, v0, vmax if amsgrad else None)
    else:
        m0 = v0 = vmax = torch.zeros(n, dtype=torch.float64)
        state = AdamState(hyper)
    at_zero, q = _adam_secant(g, p, state)
    assert torch.equal(at_zero, _adam_update(torch.zeros_like(g), p, state))
    for k in range(n):
        if float(g[k]) == 0.0:
            h = 1e-25  # f'(0) as the limit of the secant
            ref = (_adam_mp(h, p[k], m0[k], v0[k], vmax[k], step, hyper)
                   - _adam_mp(0, p[k], m0[k], v0[k], vmax[k], step, hyper)) / h
        else:
            ref = (_adam_mp(g[k], p[k], m0[k], v0[k], vmax[k], step, hyper)
                   - _adam_mp(0, p[k], m0[k], v0[k], vmax[k], step, hyper)) / float(g[k])
        # float64 secant vs 60 digits: seen <= 5.5e-16 relative (a few eps), bound 1e-12 (> 1e3x);
        # the float64 difference of the two steps would be off by up to 4.7e-4
        assert abs(float(q[k]) - float(ref)) <= 1e-12 * abs(float(ref)), (k, float(q[k]), float(ref))


def test_bandit_per_action_influence_is_the_closed_form():
    """π = softmax(z), SGD: δH_{i,g} = η/|U| · A[i,g]/G · ⟨μX, e_a − π⟩ with μX in closed form."""
    K, G = 5, 4
    z = torch.tensor([0.5, -1.0, 1.5, 0.0, 0.3], dtype=torch.float64)
    bandit = SoftmaxBandit(z)
    p = torch.softmax(z, -1)
    gen = torch.Generator().manual_seed(3)
    e_actions = torch.multinomial(p.expand(6, K), G, replacement=True, generator=gen)
    u_actions = torch.multinomial(p.expand(5, K), G, replacement=True, generator=gen)
    adv = torch.randn(5, G, generator=gen, dtype=torch.float64)
    E, U = bandit_rollouts(e_actions), bandit_rollouts(u_actions, adv)
    lr = 0.3
    inf = entropy_influence(bandit, E, U, lr=lr, step="sgd", weighting="per_token_avg", chunk_size=3)
    # closed form: ∇z log π(a) = e_a − π; LX[n] = −(1/G) Σ_g c[n,g] log π(a), c = log π(a) − leave-one-out mean
    logp = torch.log_softmax(z, -1)
    onehot = torch.nn.functional.one_hot(e_actions, K).double()
    S = logp[e_actions]
    c = S - (S.sum(1, keepdim=True) - S) / (G - 1)
    mu_x = (-(c.unsqueeze(-1) * (onehot - p)).mean(1)).mean(0)
    closed = lr / 5 * adv / G * ((mu_x[u_actions]) - (p * mu_x).sum())
    # float64 closed form, a few operations: seen 8e-17 of the max (a few ulps), bound 1e-12 (1e4x)
    assert float((inf.per_response - closed).abs().max()) < 1e-12 * float(closed.abs().max())
    assert inf.delta_h_baseline == 0.0 and inf.se_baseline == 0.0


def test_influence_arguments_are_checked_before_any_work(trained):
    model, opt, E, U = trained
    probe = EntropyProbe(model, opt)
    with pytest.raises(SettingsError, match=r"groups\['x'\]: expected a bool tensor"):
        probe.influence(E, U, groups={"x": U.advantages})
    with pytest.raises(SettingsError, match=r"groups\['x'\]: expected shape \[4, 3\] or \[4, 3, \d+\]"):
        probe.influence(E, U, groups={"x": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(SettingsError, match="groups: expected a dict"):
        probe.influence(E, U, groups=[U.advantages > 0])
    with pytest.raises(SettingsError, match="matrix: expected True or False"):
        probe.influence(E, U, matrix="yes")
    with pytest.raises(ValueError, match="U: the batch has no advantages"):
        probe.influence(E, random_rollouts(B=2, G=3, advantages=False))


def test_influence_leaves_model_grads_and_optimizer_alone(trained):
    model, opt, E, U = trained
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    EntropyProbe(model, opt).influence(E, U, groups={"pos": U.advantages > 0})
    assert model.training and all(p.grad is None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = opt.state_dict()
    for k, v in state["state"].items():
        assert all(torch.equal(v[kk], after["state"][k][kk]) for kk in v)
    model.eval()


def test_token_covariance_is_verls_score_and_spearman_handles_ties():
    from token_covariance import spearman, token_covariance, top_fraction_mask

    gen = torch.Generator().manual_seed(5)
    logp = -torch.rand(2, 3, 5, generator=gen, dtype=torch.float64)
    adv = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 3, 5, generator=gen) > 0.3
    cov = token_covariance(logp, adv, mask)
    tokens = [(i, g, t) for i in range(2) for g in range(3) for t in range(5) if mask[i, g, t]]
    mean_a = sum(float(adv[i, g]) for i, g, t in tokens) / len(tokens)  # token-weighted, as verl's masked_mean
    mean_l = sum(float(logp[i, g, t]) for i, g, t in tokens) / len(tokens)
    # float64 products of O(1) values: seen 1.2e-16 (one ulp); bound 1e-14 (~50 ulps); an
    # unweighted or per-response mean would be O(0.1) off
    for i, g, t in tokens:
        assert abs(float(cov[i, g, t]) - (float(adv[i, g]) - mean_a) * (float(logp[i, g, t]) - mean_l)) < 1e-14
    assert bool((cov[~mask] == 0).all())
    a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    assert abs(spearman(a, a ** 3) - 1.0) < 1e-15 and abs(spearman(a, -a) + 1.0) < 1e-15  # seen exact (float64)
    b = torch.tensor([5.0, 3.0, 4.0, 1.0, 2.0], dtype=torch.float64)
    # ranks of a with the tie averaged: 1, 2.5, 2.5, 4, 5; of b: 5, 3, 4, 1, 2 -> Pearson of the ranks
    ra, rb = (torch.tensor(x, dtype=torch.float64) for x in ([1, 2.5, 2.5, 4, 5], [5.0, 3, 4, 1, 2]))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    # float64, a 5-term correlation: seen exact, bound 1e-12; ties not averaged give −0.8 (0.07 off)
    assert abs(spearman(a, b) - float((ra * rb).sum() / ((ra * ra).sum() * (rb * rb).sum()).sqrt())) < 1e-12
    assert top_fraction_mask(b, 0.4).tolist() == [True, False, True, False, False]
    assert int(top_fraction_mask(b, 1e-9).sum()) == 1


class _LetterTokenizer:
    """Token id k decodes to the k-th letter (id 1 is 'a'), id 27 to a newline."""

    @staticmethod
    def decode(ids):
        return "".join("\n" if k == 27 else chr(ord("a") + k - 1) for k in ids)


def _hand_made(per_token, U, *, se=False):
    """An ``EntropyInfluence`` with given token shares (and SEs = |share|/10 when ``se``)."""
    from funcprobe.core.influence import EntropyInfluence

    per_response = per_token.sum(-1)
    return EntropyInfluence(
        delta_h=float(per_token.sum()), se=1e-3, delta_h_baseline=0.0, se_baseline=0.0,
        delta_h_update=float(per_token.sum()), se_update=1e-3, per_prompt=per_response.sum(-1),
        per_response=per_response, per_token=per_token, clip=1.0, step="sgd", lr=1.0, num_eval_prompts=2,
        num_update_prompts=U.num_prompts,
        per_prompt_se=per_response.sum(-1).abs() / 10 if se else None,
        per_response_se=per_response.abs() / 10 if se else None, per_token_se=per_token.abs() / 10 if se else None)


def _letters_batch():
    """One prompt 'xy', responses 'abcdefghij⏎klmnopqrstu' (22 tokens) and 'zz'."""
    long = list(range(1, 11)) + [27] + list(range(11, 22))
    return RolloutBatch.from_lists([[24, 25]], [[long, [26, 26]]], pad_token_id=0,
                                   advantages=torch.tensor([[1.0, -1.0]], dtype=torch.float64))


def test_report_shows_each_top_token_in_its_response_text_with_its_se():
    from funcprobe.apps.influence_report import format_influence, token_context

    U = _letters_batch()
    tok, start = _LetterTokenizer(), U.response_start
    per_token = torch.zeros(U.input_ids.shape, dtype=torch.float64)
    per_token[0, 0, start + 12] = -0.5  # 'l', after the newline: 8 tokens either side and more beyond
    per_token[0, 0, start + 1] = 0.25  # 'b': one token before it
    per_token[0, 1, start + 1] = 0.15  # the last 'z' of the short response
    inf = _hand_made(per_token, U, se=True)
    assert token_context(tok, U, 0, 0, start + 12) == "…efghij\\nk⟦l⟧mnopqrst…"
    assert token_context(tok, U, 0, 0, start + 1) == "a⟦b⟧cdefghij…"
    assert token_context(tok, U, 0, 1, start + 1) == "z⟦z⟧"
    with pytest.raises(ValueError, match="column: 0 is not a response token"):
        token_context(tok, U, 0, 0, 0)
    text = format_influence(inf, U, tokenizer=tok, top=3)
    lines = text.splitlines()
    tokens = lines[lines.index(next(x for x in lines if x.startswith("top 3 tokens"))) + 1:]
    assert "share ± SE_E" in text and "in its response" in text
    assert "-5.000e-01 ± 5.0e-02" in tokens[0] and "'l'" in tokens[0]
    assert tokens[0].endswith("…efghij\\nk⟦l⟧mnopqrst…")
    assert "+2.500e-01 ± 2.5e-02" in tokens[1] and tokens[1].endswith("a⟦b⟧cdefghij…")
    assert tokens[2].endswith("z⟦z⟧") and "position    1" in tokens[2]
    responses = lines[lines.index(next(x for x in lines if x.startswith("top 3 responses"))) + 1:][:2]
    assert "-2.500e-01 ± 2.5e-02" in responses[0] and responses[0].endswith("abcdefghij\\nklmnopqrstu")
    assert "+1.500e-01 ± 1.5e-02" in responses[1] and responses[1].endswith("zz")
    # without a tokenizer: ids, no text; without the matrix: no SEs, and the report says where they are
    plain = format_influence(_hand_made(per_token, U), U, top=3)
    assert "#12" in plain and "⟦" not in plain and "±" not in plain and "matrix=True" in plain


def test_report_cuts_a_long_response_text():
    from funcprobe.apps.influence_report import response_text

    U = _letters_batch()
    assert response_text(_LetterTokenizer(), U, 0, 0, max_chars=5) == "abcde…"
    assert response_text(_LetterTokenizer(), U, 0, 0, max_chars=11) == "abcdefghij\\n…"
    assert response_text(_LetterTokenizer(), U, 0, 1, max_chars=2) == "zz"


def _right_panel(monkeypatch, inf, U, path):
    """The token-concentration axes of ``plot_influence`` (its figure captured)."""
    import funcprobe.apps.influence_report as report

    figures = []

    def capture(size):
        figures.append(report_new_figure(size))
        return figures[-1]

    report_new_figure = report.new_figure
    monkeypatch.setattr(report, "new_figure", capture)
    report.plot_influence(inf, U, path)
    return figures[0].axes[1]


def test_plot_normalises_the_token_concentration_by_the_sum_of_absolute_shares(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    U = _letters_batch()
    start = U.response_start
    per_token = torch.zeros(U.input_ids.shape, dtype=torch.float64)
    per_token[0, 0, start:start + 4] = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)  # Σ share = 0
    ax = _right_panel(monkeypatch, _hand_made(per_token, U), U, tmp_path / "cancel.png")
    y = torch.tensor(ax.lines[0].get_ydata(), dtype=torch.float64)
    # |shares| 1, 1, .5, .5 of Σ 3, then 20 zeros: 1/3, 2/3, 5/6, 1, 1, ... (exact in float64 to rounding:
    # seen exact; atol 1e-15 ~ 5 ulps of 1)
    assert len(y) == int(U.response_mask.sum()) == 24
    assert torch.allclose(y[:4], torch.tensor([1 / 3, 2 / 3, 5 / 6, 1.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert float(y.min()) >= 0 and float(y.max()) <= 1 + 1e-15 and bool((y.diff() >= 0).all())  # 1e-15: ~5 ulps of 1
    assert ax.get_ylabel() == "cumulative |share| / Σ|share|"
    assert (tmp_path / "cancel.png").stat().st_size > 5000
    # every share 0: no curve (no division by zero), the panel says why
    ax = _right_panel(monkeypatch, _hand_made(torch.zeros_like(per_token), U), U, tmp_path / "zero.png")
    assert [list(line.get_ydata()) for line in ax.lines] == [[1.0, 1.0]]  # the y = 1 guide only
    assert any("Σ|share| = 0" in t.get_text() for t in ax.texts)


def test_cli_influence_matrix_writes_the_ses_and_the_response_text(workspace, tmp_path, capsys):
    """``funcprobe influence --matrix --tokenizer``: the library's SEs in the JSON's top
    entries, "± SE" and ⟦token⟧ windows in the text."""
    import json

    from funcprobe.apps.cli import main
    from funcprobe.io.checkpoints import load_optimizer_state, load_policy
    from funcprobe.io.rollout_files import read_rollouts

    w, out, lmax = workspace, tmp_path / "influence.json", test_practitioner.LMAX
    args = ["influence", "--model", w / "model", "--adapter", w / "adapter", "--tokenizer", w / "tokenizer",
            "--eval", w / "E.jsonl", "--update", w / "U.jsonl", "--optimizer-state", w / "optimizer.pt",
            "--max-completion-length", lmax, "--dtype", "float64", "--top", 3, "--json", out, "--matrix",
            "--no-progress"]
    assert main([str(a) for a in args]) == 0
    text = capsys.readouterr().out
    assert "share ± SE_E" in text and "⟦w" in text and "response text" in text
    got = json.loads(out.read_text())
    model = load_policy(w / "model", w / "adapter", dtype="float64")
    opt = load_optimizer_state(w / "optimizer.pt", model)
    U = read_rollouts(w / "U.jsonl", max_len=lmax)
    ref = EntropyProbe(model, opt, step="adam_step").influence(read_rollouts(w / "E.jsonl", max_len=lmax), U,
                                                               matrix=True)
    # the same float64 computation in the same order (JSON keeps a float64 exactly): seen equal;
    # bound 1e-12 relative, room for float64 reordering
    for entry in got["top_tokens"]:
        se = float(ref.per_token_se[entry["prompt"], entry["response"], entry["column"]])
        assert se > 0 and abs(entry["se"] - se) <= 1e-12 * se
    for entry in got["top_responses"]:
        se = float(ref.per_response_se[entry["prompt"], entry["response"]])
        assert se > 0 and abs(entry["se"] - se) <= 1e-12 * se
    assert len(got["per_response_se"]) == U.num_prompts
