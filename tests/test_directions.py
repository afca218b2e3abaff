"""Update directions: sgd = autograd policy gradient; adam_step = the real optimizer step / lr;
the step blocks (clip_by_global_norm, adam_next_step, scale_by_lr, chain) as typed values."""

import pytest
import torch

from funcprobe import (
    AdamHyper,
    AdamState,
    ClipByGlobalNorm,
    EntropyProbe,
    SettingsError,
    StepMap,
    adam_next_step,
    adam_preconditioner,
    chain,
    clip_by_global_norm,
    frozen_adam,
    optimizer_step_map,
    scale_by_lr,
    sgd,
    update_direction,
)
from funcprobe.core.influence import split_step
from helpers import gpt2, live_params, random_rollouts, reference_policy_gradient, rel_err


def test_sgd_direction_is_the_mean_policy_gradient():
    model = gpt2()
    U = random_rollouts(B=5, G=3, seed=4)
    for weighting in ("dr_grpo", "per_token_avg"):
        mu = update_direction(model, U, step="sgd", weighting=weighting, chunk_size=2)
        ref = reference_policy_gradient(model, U, list(mu), weighting)
        for k in mu:  # float64, batched vs per-sequence autograd: seen 1.5e-15, bound 1e-10 (> 1e4x)
            assert rel_err(mu[k], ref[k]) < 1e-10, k


def _warm_optimizer(model, opt_cls, skip_last=True, **kw):
    """Two real steps on random gradients; the last LoRA tensor gets no gradient (no state)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = live_params(model, names)
    opt = opt_cls(params, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in params[:-1] if skip_last else params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert params[-1] not in opt.state or not skip_last
    return opt, names, params


@pytest.mark.parametrize(
    "opt_cls, kw",
    [
        (torch.optim.Adam, dict(lr=1e-3)),
        (torch.optim.Adam, dict(lr=1e-3, weight_decay=0.1, amsgrad=True)),
        (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05)),
        (torch.optim.AdamW, dict(lr=2e-3, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6, maximize=True)),
    ],
)
def test_adam_step_equals_the_optimizer_step_per_unit_lr(opt_cls, kw):
    model = gpt2()
    U = random_rollouts(B=4, G=3, seed=8)
    opt, names, params = _warm_optimizer(model, opt_cls, **kw)
    mu = update_direction(model, U, optimizer=opt, step="adam_step")
    grad_j = reference_policy_gradient(model, U, names)
    before = [p.detach().clone() for p in params]
    sign = 1.0 if kw.get("maximize") else -1.0  # the trainer's loss is -J (or +J when maximizing)
    for n, p in zip(names, params):
        p.grad = sign * grad_j[n]
    opt.step()
    lr = kw["lr"]
    # float64; (p − b) / lr loses the digits of |p| / |Δp| ~ 1e3: seen 1.5e-13, bound 1e-6
    # (> 1e6x); a wrong moment, bias correction or decay is O(1e-3) relative or more
    for n, p, b in zip(names, params, before):
        assert rel_err(mu[n], (p.detach() - b) / lr) < 1e-6, n


def test_adam_preconditioner_reads_state_by_name_and_refuses_missing_state():
    model = gpt2()
    U = random_rollouts(B=3, G=2)
    opt, names, params = _warm_optimizer(model, torch.optim.Adam, lr=1e-3)
    with pytest.raises(ValueError, match=f"1 parameter\\(s\\) have no Adam state yet: \\['{names[-1]}'\\]"):
        update_direction(model, U, optimizer=opt, step="frozen_adam")
    mu = update_direction(model, U, optimizer=opt, step="frozen_adam", allow_identity_fallback=True)
    g = update_direction(model, U, step="sgd")
    st = opt.state[params[0]]
    v_hat = st["exp_avg_sq"] / (1 - 0.999 ** int(st["step"]))
    # the same float64 formula: seen exactly equal; bounds 1e-12 (a few ops' rounding) and 1e-15
    assert rel_err(mu[names[0]], g[names[0]] / (v_hat.sqrt() + 1e-8)) < 1e-12
    assert rel_err(mu[names[-1]], g[names[-1]]) < 1e-15  # identity fallback


def test_adam_preconditioner_pure_function():
    hyper = AdamHyper(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                      decoupled_weight_decay=False, amsgrad=False)
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    v = torch.tensor([4.0, 1.0], dtype=torch.float64)
    out = adam_preconditioner(g, AdamState(hyper=hyper, step=1, exp_avg_sq=v))
    assert torch.allclose(out, g / ((v / 0.01).sqrt() + 1e-8))  # float64: seen 2.8e-16 relative, rtol 1e-5
    with pytest.raises(ValueError, match="no Adam state"):
        adam_preconditioner(g, AdamState(hyper=hyper))


def test_step_blocks_are_typed_values_that_match_torch():
    """optimizer_step_map = chain(clip, adam_next_step, scale_by_lr) = clip_grad_norm_ +
    AdamW.step() on bare tensors; the clipping is a typed part of the map (split_step reads
    it); chains that are not clipping followed by a coordinate-wise map are refused."""
    gen = torch.Generator().manual_seed(3)
    theta = {"a": torch.randn(5, generator=gen, dtype=torch.float64),
             "b": torch.randn(2, 3, generator=gen, dtype=torch.float64)}
    g = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in theta.items()}
    params = [theta[n].clone().requires_grad_(True) for n in ("a", "b")]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 3e-3}],
                            weight_decay=0.05)
    hyper = AdamHyper(0.9, 0.999, 1e-8, 0.05, True, False)
    states = {n: AdamState(hyper) for n in theta}
    lrs = {"a": 1e-3, "b": 3e-3}
    step = optimizer_step_map(theta, states, lrs, max_grad_norm=0.5)
    assert step.name == "optimizer_step" and step.clip == ClipByGlobalNorm(0.5)
    same = chain(clip_by_global_norm(0.5), adam_next_step(theta, states), scale_by_lr(lrs))
    assert same.clip == step.clip and same.secant is not None and not same.linear
    delta, delta2 = step(g), same(g)
    for p, n in zip(params, ("a", "b")):
        p.grad = -g[n].clone()  # the trainer's loss is -J
    total = torch.nn.utils.clip_grad_norm_(params, 0.5)
    assert float(total) > 0.5  # clipping is active
    opt.step()
    for p, n in zip(params, ("a", "b")):
        assert torch.equal(delta[n], delta2[n])
        # float64; p − θ after the step loses |θ|/|Δ| ~ 1e2-1e3 in digits: seen 4.6e-14, bound 1e-12 (22x)
        assert rel_err(delta[n], p.detach() - theta[n]) < 1e-12, n
    split = split_step(step, g)
    assert split.clip == float(ClipByGlobalNorm(0.5).coefficient(g)) < 1
    # sgd and the clipping's own coordinate-wise part are identities: chain skips them
    lr_only = chain(sgd(), scale_by_lr(lrs))
    assert lr_only.clip is None and lr_only.linear and torch.equal(lr_only(g)["b"], g["b"] * 3e-3)
    assert chain(clip_by_global_norm(1.0)).clip.max_norm == 1.0
    v = {n: torch.rand(t.shape, generator=gen, dtype=torch.float64) for n, t in theta.items()}
    frozen = frozen_adam({n: AdamState(hyper, 2, torch.zeros_like(t), v[n]) for n, t in theta.items()})
    chained = chain(frozen, scale_by_lr(lrs), name="frozen_lr")
    _, q = chained.secant("b", g["b"])
    assert chained.name == "frozen_lr" and torch.equal(q, frozen.update("b", torch.ones_like(g["b"])) * 3e-3)
    assert isinstance(chained, StepMap) and chained.linear
    with pytest.raises(ValueError, match="maps: 'clip_by_global_norm' clips by the global norm after"):
        chain(scale_by_lr(lrs), clip_by_global_norm(1.0))
    with pytest.raises(ValueError, match="maps: 2 clip_by_global_norm maps"):
        chain(clip_by_global_norm(1.0), clip_by_global_norm(2.0))
    with pytest.raises(ValueError, match="maps: expected one or more StepMap"):
        chain()
    for bad in (0.0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="max_norm: expected a finite number > 0"):
            clip_by_global_norm(bad)


def test_direction_errors():
    model = gpt2()
    U = random_rollouts()
    with pytest.raises(ValueError, match="step: expected one of"):
        update_direction(model, U, step="rmsprop")
    with pytest.raises(ValueError, match="optimizer: step='adam_step' needs"):
        update_direction(model, U, step="adam_step")
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(TypeError, match="optimizer: expected torch.optim.Adam or AdamW"):
        update_direction(model, U, optimizer=sgd, step="frozen_adam")
    with pytest.raises(ValueError, match="U: the batch has no advantages"):
        update_direction(model, random_rollouts(advantages=False), step="sgd")
    zero = random_rollouts()
    zero = type(zero)(zero.input_ids, zero.attention_mask, zero.response_start, torch.zeros(4, 3), zero.max_len)
    with pytest.raises(ValueError, match="update direction \\(sgd\\) is zero everywhere; the policy gradient is zero"):
        update_direction(model, zero, step="sgd")
    other = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(KeyError, match="in no param group"):
        update_direction(model, U, optimizer=other, step="adam_step")


def _lora_plus_groups(model, lr, ratio=16.0, **kw):
    """LoRA+ param groups: lora_B at ``ratio`` times lora_A's learning rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    a = [p for n, p in named if "lora_B" not in n]
    b = [p for n, p in named if "lora_B" in n]
    return [dict(params=a, lr=lr, **kw), dict(params=b, lr=lr * ratio, **kw)]


@pytest.mark.parametrize(
    "opt_cls, kw, max_norm, lora_plus",
    [
        (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05), 1e-3, False),  # clipping active
        (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05, amsgrad=True), 1e-3, True),
        (torch.optim.Adam, dict(lr=2e-3, weight_decay=0.1, foreach=True), 1e-2, True),
        (torch.optim.AdamW, dict(lr=1e-3, betas=(0.8, 0.95), eps=1e-6, maximize=True), None, True),
    ],
)
def test_optimizer_step_equals_clip_grad_norm_and_optimizer_step(opt_cls, kw, max_norm, lora_plus):
    """Δθ predicted before the step = θ after a real clip_grad_norm_ + optimizer.step() − θ,
    after several steps of a LambdaLR schedule, with per-group learning rates (LoRA+)."""
    model = gpt2()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = live_params(model, names)
    lr = kw.pop("lr")
    groups = _lora_plus_groups(model, lr, **kw) if lora_plus else [dict(params=params, lr=lr, **kw)]
    opt = opt_cls(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # real state, and a learning rate the scheduler has cut
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    U = random_rollouts(B=4, G=3, seed=8)
    delta = update_direction(model, U, optimizer=opt, step="optimizer_step", max_grad_norm=max_norm)
    grad_j = reference_policy_gradient(model, U, names)
    before = [p.detach().clone() for p in params]
    sign = 1.0 if kw.get("maximize") else -1.0
    for n, p in zip(names, params):
        p.grad = sign * grad_j[n]
    if max_norm is not None:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        assert float(total) > max_norm  # clipping is active in this case
    opt.step()
    # float64; p − b loses |p|/|Δp| in digits: seen 5.5e-13, bound 1e-6 (> 1e6x); a wrong lr,
    # clip or state is O(1e-3) relative or more
    for n, p, b in zip(names, params, before):
        assert rel_err(delta[n], p.detach() - b) < 1e-6, n


def test_optimizer_step_settings_are_checked():
    model = gpt2()
    U = random_rollouts()
    with pytest.raises(ValueError, match="max_grad_norm: clipping is part of step='optimizer_step' only"):
        update_direction(model, U, step="sgd", max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm: expected a finite number > 0"):
        update_direction(model, U, step="optimizer_step", max_grad_norm=0.0)
    opt = torch.optim.AdamW(_lora_plus_groups(model, 1e-3))
    from funcprobe import EntropyProbe

    with pytest.raises(ValueError, match="lr: step='optimizer_step' \\(EntropyProbe's default\\) takes each param group"):
        EntropyProbe(model, opt, lr=1e-3, step="optimizer_step")
    with pytest.raises(ValueError, match="use step='optimizer_step', which takes each group's rate"):  # per-unit-lr steps need one lr
        EntropyProbe(model, opt, step="adam_step")
    probe = EntropyProbe(model, opt, step="optimizer_step", max_grad_norm=1.0)
    pred = probe.predict(random_rollouts(B=3, G=3, seed=2), U)
    assert pred.lr == 1.0 and pred.step == "optimizer_step"


def test_baseline_split_is_exact_and_is_the_step_of_a_zero_gradient():
    """δH = δH(0) + δH(U): the part of the step that does not depend on U (momentum, weight
    decay) is the real optimizer's step on a zero gradient, and s is linear in the tangent."""
    from funcprobe import EntropyProbe, conditional_variance

    model = gpt2()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = live_params(model, names)
    opt = torch.optim.AdamW(_lora_plus_groups(model, 1e-3, weight_decay=0.1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    opt.zero_grad(set_to_none=True)
    E, U = random_rollouts(B=5, G=3, seed=12), random_rollouts(B=4, G=3, seed=13)
    pred = EntropyProbe(model, opt, split_baseline=True).predict(E, U)
    delta = update_direction(model, U, optimizer=opt, step="optimizer_step")
    # the zero-gradient step, from the real optimizer
    before = [p.detach().clone() for p in params]
    saved = {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()} for k, v in opt.state.items()}
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    delta0 = {n: p.detach() - b for n, p, b in zip(names, params, before)}
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    opt.state.clear()
    opt.state.update(saved)
    opt.zero_grad(set_to_none=True)
    base = conditional_variance(model, E, delta0, lr=1.0)
    rest = conditional_variance(model, E, {n: delta[n] - delta0[n] for n in names}, lr=1.0)
    assert pred.step == "optimizer_step" and pred.lr == 1.0
    # float64: seen 1.4e-15 relative (delta0 from the real step, p − b), bound 1e-6; the sum: seen
    # 5e-16 relative, bound 1e-10
    assert abs(pred.delta_h_baseline - base.delta_h) <= 1e-6 * abs(base.delta_h)
    assert abs(pred.delta_h - (base.delta_h + rest.delta_h)) <= 1e-10 * (abs(base.delta_h) + abs(rest.delta_h))
    assert pred.se_baseline > 0 and "delta_h_baseline" in pred.to_dict()
    sgd = EntropyProbe(model, lr=0.1, step="sgd", split_baseline=True).predict(E, U)
    assert sgd.delta_h_baseline == 0.0 and sgd.se_baseline == 0.0


def test_a_baseline_that_cannot_reach_the_output_is_a_zero_baseline():
    """A fresh LoRA (B = 0): AdamW's weight decay moves A, which reaches nothing while B = 0,
    so the zero-gradient step changes no log-prob to first order: baseline 0 and SE 0, not
    an error."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(gpt2(lora=False), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for p in params:  # one step of state, B stays 0: only A's gradient is non-zero
        p.grad = torch.randn_like(p) * (0.0 if p.abs().max() == 0 else 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    E, U = random_rollouts(B=3, G=2, seed=4), random_rollouts(B=3, G=2, seed=5)
    pred = EntropyProbe(model, opt, split_baseline=True).predict(E, U)
    assert pred.delta_h_baseline == 0.0 and pred.se_baseline == 0.0 and pred.se > 0


def test_a_learning_rate_of_zero_is_named_not_a_silent_zero():
    """TRL's linear schedule ends (and warm-up starts) at lr = 0: every step map says so."""
    from funcprobe import NoSignalError

    model = gpt2()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    E, U = random_rollouts(B=3, G=2, seed=4), random_rollouts(B=3, G=2, seed=5)
    with pytest.raises(ValueError, match="lr: the optimizer's current learning rate is 0"):
        EntropyProbe(model, opt, step="adam_step")
    with pytest.raises(NoSignalError, match="learning rate is 0 for every probed parameter"):
        EntropyProbe(model, opt).predict(E, U)
    assert EntropyProbe(model, opt, step="adam_step", lr=1e-3).predict(E, U).lr == 1e-3  # a given rate


def test_optimizer_lr_initial_predicts_the_step_at_the_schedules_base_rate():
    """At the end of a linear schedule (lr 0) ``optimizer_lr="initial"`` predicts the step at
    each group's ``initial_lr``: the same Δθ as the optimizer at that rate (float64, the same
    arithmetic: 1e-12); without a scheduler it is refused by name."""
    model = gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0 if k else 1.0)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[0]["initial_lr"] == 1e-3
    U = random_rollouts(B=3, G=2, seed=5)
    at_base = update_direction(model, U, optimizer=opt, step="optimizer_step", optimizer_lr="initial")
    opt.param_groups[0]["lr"] = 1e-3  # the same optimizer at its base rate
    now = update_direction(model, U, optimizer=opt, step="optimizer_step")
    # seen 0 (bit-identical); 1e-12 allows float64 reordering by another torch build
    assert max(rel_err(at_base[n], now[n]) for n in now) < 1e-12, max(rel_err(at_base[n], now[n]) for n in now)
    assert EntropyProbe(model, opt, step="adam_step", optimizer_lr="initial").lr == 1e-3
    bare = torch.optim.AdamW(params, lr=1e-3)
    with pytest.raises(SettingsError, match="optimizer_lr: 'initial' reads each param group's initial_lr"):
        update_direction(model, U, optimizer=bare, step="optimizer_step", optimizer_lr="initial")
