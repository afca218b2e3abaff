"""Choosing a knob before the step (funcprobe.control): the entropy-bonus coefficient β and the
step-size scale c meet a target through the exact step map, the real optimizer step at the
chosen value is the predicted one, unreachable targets are reported, the KL budget binds."""

import copy
import math

import pytest
import torch

from funcprobe import (EntropyControl, EntropyEstimate, EntropyProbe, EntropySchedule, EntropyTarget, ParamRegistry,
                       ProbeSettings, SettingsError, choose_knob)
from funcprobe.control import entropy_bonus_gradient
from funcprobe.core.control import ControlRequest
from funcprobe.passes import prediction_with_effects
from funcprobe.run import ProbeRun
from helpers import gpt2, live_params, random_rollouts, reference_policy_gradient, rel_err

MAX_NORM = 1e-3  # far below the gradient norms seen (~1e-1): clipping is active at every β


def reference_bonus_gradient(model, batch, names):
    """∇θ of TRL's bonus Σ m·H_t / Σ m by autograd: one unpadded forward per sequence."""
    params = live_params(model, names)
    model.eval()
    total, tokens = 0.0, 0
    B, G, _ = batch.input_ids.shape
    for n in range(B):
        for g in range(G):
            m = batch.attention_mask[n, g].bool()
            seq = batch.input_ids[n, g][m]
            n_prompt = int(m[:batch.response_start].sum())
            logits = model(input_ids=seq[None]).logits[0, n_prompt - 1:-1]
            logp = torch.log_softmax(logits, -1)
            total = total + (-(logp.exp() * logp).sum(-1)).sum()
            tokens += seq.numel() - n_prompt
    grads = torch.autograd.grad(total / tokens, params)
    return dict(zip(names, grads))


def _setup(opt_cls, **kw):
    """Tiny float64 GPT-2 + LoRA, LoRA+ groups (lora_B at 16x), two real warm-up steps."""
    model = gpt2()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    groups = [dict(params=[named[n] for n in names if "lora_B" not in n], lr=1e-3, **kw),
              dict(params=[named[n] for n in names if "lora_B" in n], lr=1.6e-2, **kw)]
    opt = opt_cls(groups)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for n in names:
            named[n].grad = torch.randn(named[n].shape, generator=gen, dtype=torch.float64) * 1e-4
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, names


def _taken_step(model, opt, names, gradient, scale=1.0):
    """θ_after − θ of a real clip_grad_norm_ + optimizer.step() on deep copies, with
    ``.grad = −gradient`` and every group's lr times ``scale``."""
    model2, opt2 = copy.deepcopy((model, opt))
    params = live_params(model2, names)
    before = [p.detach().clone() for p in params]
    for n, p in zip(names, params):
        p.grad = -gradient[n].clone()
    for group in opt2.param_groups:
        group["lr"] *= scale
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    assert float(norm) > 10 * MAX_NORM  # clipping is active
    opt2.step()
    return {n: p.detach() - b for n, p, b in zip(names, params, before)}


OPTIMIZERS = [(torch.optim.AdamW, dict(weight_decay=0.05)), (torch.optim.Adam, dict(weight_decay=0.01))]


def test_entropy_bonus_gradient_is_the_autograd_gradient_of_trls_bonus():
    model = gpt2()
    U = random_rollouts(B=3, G=3, seed=8)
    settings = ProbeSettings.from_options({"chunk_size": 2}, caller="test")
    registry = ParamRegistry.from_settings(model, settings)
    g_h = entropy_bonus_gradient(ProbeRun.of(registry, settings), U)
    ref = reference_bonus_gradient(model, U, list(g_h))
    for n in g_h:
        assert rel_err(g_h[n], ref[n]) < 1e-10, n  # float64: rounding only (seen ~1e-15)


@pytest.mark.parametrize("opt_cls, kw", OPTIMIZERS)
@pytest.mark.parametrize("same", [False, True])
def test_beta_hits_the_target_and_the_step_taken_is_the_predicted_one(opt_cls, kw, same):
    model, opt, names = _setup(opt_cls, **kw)
    U = random_rollouts(B=4, G=3, seed=8)
    E = U if same else random_rollouts(B=4, G=3, seed=5)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM)
    far = probe.choose(E, U, EntropyControl(EntropyTarget(delta_h=1.0), knob="beta", beta_max=50.0))
    assert not far.reachable and "never reaches 1" in far.reason and 0 <= far.value <= 50.0
    end = max(far.span, key=lambda v: abs(v - far.uncontrolled))
    assert abs(end - far.uncontrolled) > 1e-4 * abs(far.uncontrolled)  # β moves δH (seen 2e-3 to 13x)
    aim = far.uncontrolled + 0.5 * (end - far.uncontrolled)
    decision = probe.choose(E, U, EntropyControl(EntropyTarget(delta_h=aim), knob="beta", beta_max=50.0))
    assert decision.reachable and decision.reason == "" and 0 < decision.value <= 50.0
    assert decision.estimator == ("leave_one_out" if same else "independent")
    assert abs(decision.delta_h - aim) < 1e-8 * abs(aim)  # the done-when bound (seen 0: bisection to a float)
    if same:  # at β = 0 the dot products are predict()'s leave-one-out estimate (seen ~1e-15)
        assert rel_err(decision.uncontrolled, probe.predict(U, U).delta_h) < 1e-10
    else:  # one JVP along the chosen step gives the same δH (seen ~1e-15)
        assert abs(probe.conditional_variance(E, decision.step).delta_h - aim) < 1e-10 * abs(aim)
    g_pg = reference_policy_gradient(model, U, names)
    g_h = reference_bonus_gradient(model, U, names)
    taken = _taken_step(model, opt, names, {n: g_pg[n] + decision.value * g_h[n] for n in names})
    for n in names:
        assert rel_err(decision.step[n], taken[n]) < 1e-6, n  # the done-when bound (seen ~1e-12)


@pytest.mark.parametrize("knob", ["beta", "lr_scale"])
def test_a_trainers_gradient_replaces_funcprobes_own(knob):
    """``choose_for_step`` (a trainer's unclipped g_pg, E = U): given funcprobe's own gradient
    (by autograd, an independent route) the decision is ``choose``'s; given twice that
    gradient, the step taken with 2·g_pg (+ β·g_H) is the predicted one; a gradient the
    modelled loss does not explain is refused by name (float64; the bounds are those of the
    tests above)."""
    model, opt, names = _setup(torch.optim.AdamW, weight_decay=0.05)
    U = random_rollouts(B=4, G=3, seed=8)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM)
    g_pg = reference_policy_gradient(model, U, names)
    plain = probe.choose(U, U, EntropyControl(EntropyTarget(delta_h=1.0), knob=knob, beta_max=50.0))
    end = max(plain.span, key=lambda v: abs(v - plain.uncontrolled)) if knob == "beta" else 0.0
    aim = plain.uncontrolled + 0.5 * (end - plain.uncontrolled)  # halfway to β_max's δH, or c = 0.5
    control = EntropyControl(EntropyTarget(delta_h=aim), knob=knob, beta_max=50.0)
    mine = probe.choose(U, U, control)
    given = probe.choose_for_step(U, control, gradient=g_pg)
    assert given.estimator == "leave_one_out"
    assert rel_err(given.uncontrolled, mine.uncontrolled) < 1e-10  # seen 0 (both knobs)
    assert rel_err(given.value, mine.value) < 1e-8 and abs(given.delta_h - aim) < 1e-8 * abs(aim)  # seen 0
    twice = probe.choose_for_step(U, control, gradient={n: 2 * g for n, g in g_pg.items()})
    g_h = reference_bonus_gradient(model, U, names) if knob == "beta" else None
    beta = twice.value if knob == "beta" else 0.0
    taken = _taken_step(model, opt, names, {n: 2 * g_pg[n] + (beta * g_h[n] if g_h else 0) for n in names},
                        scale=1.0 if knob == "beta" else twice.value)
    for n in names:
        assert rel_err(twice.step[n], taken[n]) < 1e-6, n  # (seen 3.1e-14 for beta, 6.9e-14 for lr_scale)
    gen = torch.Generator().manual_seed(3)
    noisy = {n: g + torch.randn(g.shape, generator=gen, dtype=g.dtype) * float(g.norm()) for n, g in g_pg.items()}
    with pytest.raises(ValueError, match="gradient: funcprobe's model of the loss does not explain"):
        probe.choose_for_step(U, control, gradient=noisy)
    with pytest.raises(KeyError, match="gradient: keys do not match"):
        probe.choose_for_step(U, control, gradient={"nope": torch.zeros(1)})
    with pytest.raises(SettingsError, match="entropy_control: expected an EntropyControl"):
        probe.choose_for_step(U, control.target, gradient=g_pg)


@pytest.mark.parametrize("opt_cls, kw", OPTIMIZERS)
def test_lr_scale_hits_the_target_and_scales_the_real_step(opt_cls, kw):
    model, opt, names = _setup(opt_cls, **kw)
    U, E = random_rollouts(B=4, G=3, seed=8), random_rollouts(B=4, G=3, seed=5)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM)
    full = probe.predict(E, U)
    aim = 0.3 * full.delta_h
    decision = probe.choose(E, U, EntropyTarget(delta_h=aim))
    assert decision.reachable and abs(decision.value - 0.3) < 1e-12
    assert abs(decision.uncontrolled - full.delta_h) < 1e-10 * abs(full.delta_h)  # dots vs the JVP (seen 1e-15)
    assert abs(decision.delta_h - aim) < 1e-8 * abs(aim)
    taken = _taken_step(model, opt, names, reference_policy_gradient(model, U, names), scale=decision.value)
    for n in names:  # Adam's step, weight decay and clipping included, is linear in the learning rate
        assert rel_err(decision.step[n], taken[n]) < 1e-6, n  # (seen ~1e-13)


def test_band_risk_and_unreachable_targets_are_reported_not_clamped():
    model, opt, names = _setup(torch.optim.AdamW, weight_decay=0.05)
    U, E = random_rollouts(B=4, G=3, seed=8), random_rollouts(B=4, G=3, seed=5)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM)
    d = probe.choose(E, U, EntropyTarget(delta_h=1.0))
    d1 = d.uncontrolled
    # twice the full step: c would be 2 > 1
    over = probe.choose(E, U, EntropyTarget(delta_h=2 * d1))
    assert not over.reachable and over.value == 1.0 and "needs c = 2" in over.reason
    # the opposite sign: no c in (0, 1]
    wrong = probe.choose(E, U, EntropyTarget(delta_h=-d1))
    assert not wrong.reachable and wrong.value == 0.0 and "opposite sign" in wrong.reason
    # a band already met by the full step: c = 1, nothing aimed
    wide = probe.choose(E, U, EntropyTarget(band=(-abs(d1) * 2, abs(d1) * 2)))
    assert wide.reachable and wide.value == 1.0 and wide.aimed is None
    # a one-sided band that binds: |δH| at most half the full step's
    edge = 0.5 * d1
    band = (edge, math.inf) if d1 < 0 else (-math.inf, edge)
    half = probe.choose(E, U, EntropyTarget(band=band))
    assert half.reachable and abs(half.value - 0.5) < 1e-12 and half.aimed == edge
    # risk: the 95% bound, not the mean, meets the edge
    risky = probe.choose(E, U, EntropyTarget(band=band, risk=True))
    bound = risky.ci95[0] if d1 < 0 else risky.ci95[1]
    assert risky.reachable and risky.value < half.value and abs(bound - edge) < 1e-12 * abs(edge)
    # β: a band on the far side of what any β gives is reported with the closest β
    beta = probe.choose(E, U, EntropyControl(EntropyTarget(band=(1e3, 2e3)), knob="beta", beta_max=2.0))
    assert not beta.reachable and "never reaches" in beta.reason and 0 <= beta.value <= 2.0


def test_kl_budget_scale_makes_the_predicted_kl_equal_the_budget():
    model, opt, names = _setup(torch.optim.AdamW, weight_decay=0.05)
    U, E = random_rollouts(B=4, G=3, seed=8), random_rollouts(B=4, G=3, seed=5)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM, effects=True)
    full = probe.predict(E, U).effects["kl"].value
    for same in (False, True):
        d = probe.choose(U if same else E, U, EntropyTarget(kl_budget=full / 9))
        assert d.reachable and d.value < 1 and abs(d.kl - full / 9) < 1e-10 * full  # binds (seen ~1e-16)
    assert abs(d.value - 1 / 3) > 1e-3  # with E = U the leave-one-out KL(1) decides, not the E one
    d = probe.choose(E, U, EntropyTarget(kl_budget=full / 9))
    assert abs(d.value - 1 / 3) < 1e-10  # KL(c) = c²·KL(1)
    # an effects pass along the chosen (scaled) step gives the budget: the second-order KL is c²·KL(1)
    settings = probe.settings
    run = ProbeRun.of(ParamRegistry.from_settings(model, settings), settings)
    along = prediction_with_effects(run, E, d.step, 1.0, None)
    assert abs(along.effects["kl"].value - full / 9) < 1e-10 * full  # (seen ~1e-15)
    assert abs(along.delta_h - d.delta_h) < 1e-10 * abs(d.delta_h)
    loose = probe.choose(E, U, EntropyTarget(kl_budget=full * 4))
    assert loose.reachable and loose.value == 1.0 and abs(loose.kl - full) < 1e-10 * full
    # a band that needs more step than the budget allows: not reachable, the budget's c returned
    d1 = loose.uncontrolled
    band = (0.9 * d1, math.inf) if d1 > 0 else (-math.inf, 0.9 * d1)
    both = probe.choose(E, U, EntropyTarget(band=band, kl_budget=full / 4))
    assert not both.reachable and abs(both.value - 0.5) < 1e-10 and "KL budget" in both.reason


def test_schedule_aims_at_the_next_level_from_the_measured_entropy():
    model, opt, names = _setup(torch.optim.AdamW, weight_decay=0.05)
    U = random_rollouts(B=4, G=3, seed=8)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM)
    schedule = EntropySchedule(start=2.0, end=1.0, steps=10)
    before = copy.deepcopy((dict(model.named_parameters()), opt.state_dict()))
    d = probe.choose(U, U, EntropyControl(EntropyTarget(schedule=schedule), knob="beta", beta_max=1.0), step_index=3)
    after = (dict(model.named_parameters()), opt.state_dict())
    assert all(torch.equal(before[0][n], after[0][n]) and after[0][n].grad is None for n in before[0])
    assert all(torch.equal(before[1]["state"][k]["exp_avg"], after[1]["state"][k]["exp_avg"])
               and before[1]["state"][k]["step"] == after[1]["state"][k]["step"] for k in before[1]["state"])
    # Ĥ = mean over U of Σ_t H_t / Lmax (dr_grpo), by the plain model
    model.eval()
    per = []
    for n in range(4):
        row = []
        for g in range(3):
            m = U.attention_mask[n, g].bool()
            seq = U.input_ids[n, g][m]
            k = int(m[:U.response_start].sum())
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq[None]).logits[0, k - 1:-1], -1)
            row.append(float(-(logp.exp() * logp).sum()) / 6.0)
        per.append(sum(row) / 3)
    assert abs(d.current_entropy - sum(per) / 4) < 1e-12
    assert abs(d.aimed - (schedule.at(4) - d.current_entropy)) < 1e-15 and schedule.at(4) == 1.6
    assert schedule.at(40) == 1.0 and EntropySchedule(1.5).at(7) == 1.5


def test_entropy_estimate_is_the_gaussian_posterior_and_a_prior_is_fused_with_the_measurement():
    """``EntropyEstimate``: ``advance`` adds δH and SE² + (0.1·δH)²; ``fuse`` is the product of
    the two Gaussians (precision-weighted mean, precisions added), checked against that form
    (float64 arithmetic: 1e-14). ``choose`` with a prior aims from the fused estimate and
    reports the measurement beside it (the measurement equals the prior-free decision's)."""
    from funcprobe.core.control import FIRST_ORDER_REL_ERROR

    e = EntropyEstimate(1.5, 0.04).advance(-0.2, 0.05)
    assert e.mean == pytest.approx(1.3, abs=1e-15)
    assert e.var == pytest.approx(0.04 + 0.05 ** 2 + (FIRST_ORDER_REL_ERROR * 0.2) ** 2, abs=1e-15)
    for prior, (m, se) in [(EntropyEstimate(1.3, 0.01), (1.9, 0.2)), (EntropyEstimate(-2.0, 3.0), (0.5, 0.01))]:
        precision = 1 / prior.var + 1 / se ** 2
        f = prior.fuse(m, se)
        assert f.var == pytest.approx(1 / precision, rel=1e-14)
        assert f.mean == pytest.approx((prior.mean / prior.var + m / se ** 2) / precision, rel=1e-14)
    assert EntropyEstimate(1.0, 0.0).fuse(2.0, 0.1) == EntropyEstimate(1.0, 0.0)  # an exact prior is kept
    assert EntropyEstimate(1.0, 0.1).fuse(2.0, 0.0) == EntropyEstimate(2.0, 0.0)  # an exact measurement wins

    model, opt, _ = _setup(torch.optim.AdamW)
    U = random_rollouts(B=4, G=3, seed=8)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM)
    control = EntropyControl(EntropyTarget(schedule=EntropySchedule(start=2.0)), knob="beta")
    plain = probe.choose(U, U, control, step_index=2)
    prior = EntropyEstimate(plain.measured_entropy + 0.3, 0.02)
    filtered = probe.choose(U, U, control, step_index=2, prior=prior)
    fused = prior.fuse(plain.measured_entropy, plain.measured_entropy_se)
    assert plain.current_entropy == plain.measured_entropy
    assert filtered.measured_entropy == plain.measured_entropy
    assert filtered.current_entropy == pytest.approx(fused.mean, rel=1e-14)
    assert filtered.current_entropy_se == pytest.approx(fused.se, rel=1e-14)
    assert filtered.aimed == pytest.approx(2.0 - fused.mean, rel=1e-14)
    after = filtered.estimate_after()
    assert after.mean == pytest.approx(fused.mean + filtered.delta_h, rel=1e-14)


def test_bad_input_is_refused_by_name_before_any_work():
    model, opt, _ = _setup(torch.optim.AdamW)
    U = random_rollouts(B=4, G=3, seed=8)
    cases = [
        (lambda: EntropyTarget(), "target: expected delta_h, band, schedule or kl_budget"),
        (lambda: EntropyTarget(delta_h=0.1, band=(0, 1)), "target: give one of"),
        (lambda: EntropyTarget(delta_h=float("nan")), "target.delta_h: expected a real number"),
        (lambda: EntropyTarget(band=(1, 0)), "target.band: expected lo < hi"),
        (lambda: EntropyTarget(band=(-math.inf, math.inf)), "target.band: expected lo < hi"),
        (lambda: EntropyTarget(kl_budget=0), "target.kl_budget: expected a number > 0"),
        (lambda: EntropyTarget(delta_h=0.1, risk=True), "target.risk: the 95% interval"),
        (lambda: EntropySchedule(1.0, end=0.5), "schedule.end, schedule.steps"),
        (lambda: EntropySchedule(1.0, end=0.5, steps=0), "schedule.steps: expected an int >= 1"),
        (lambda: ControlRequest(EntropyTarget(delta_h=0.1), knob="temperature"), "knob: expected one of"),
        (lambda: ControlRequest(EntropyTarget(delta_h=0.1), knob="beta", beta_max=-1), "beta_max"),
        (lambda: ControlRequest(EntropyTarget(delta_h=0.1), knob="beta", beta_min=0.5), "beta_min: expected"),
        (lambda: ControlRequest(EntropyTarget(delta_h=0.1), beta_min=-1.0), "beta_min: the range of knob='beta'"),
        (lambda: choose_knob(model, U, U, EntropyTarget(delta_h=0.1), optimizer=opt, beta_min=-1.0),
         "beta_min: give it in the control"),
        (lambda: ControlRequest(EntropyTarget(kl_budget=0.1), knob="beta"), "target.kl_budget: a KL budget"),
        (lambda: ControlRequest(EntropyTarget(schedule=EntropySchedule(1.0))), "step_index: a schedule needs"),
        (lambda: ControlRequest(EntropyTarget(delta_h=0.1), step_index=3), "step_index: only used"),
        (lambda: ControlRequest(EntropyTarget(delta_h=0.1), prior=EntropyEstimate(1.0, 0.1)), "prior: an estimate"),
        (lambda: ControlRequest(EntropyTarget(schedule=EntropySchedule(1.0)), step_index=0, prior=(1.0, 0.1)),
         "prior: expected an EntropyEstimate"),
        (lambda: EntropyControl(EntropyTarget(delta_h=0.1), estimate="kalman"), "estimate: expected one of"),
        (lambda: EntropyEstimate(1.0, -0.1), "estimate.var: expected a variance >= 0"),
        (lambda: EntropyEstimate(float("inf"), 0.1), "estimate.mean: expected a finite number"),
        (lambda: choose_knob(model, U, U, {"delta_h": 0.1}, optimizer=opt),
         "control: expected an EntropyControl or an EntropyTarget"),
        (lambda: choose_knob(model, U, U, EntropyTarget(delta_h=0.1), optimizer=opt, knob="beta"),
         "knob: give it in the control"),
        (lambda: choose_knob(model, U, U, EntropyControl(EntropyTarget(schedule=EntropySchedule(1.0)),
                                                          estimate="measured"),
                             optimizer=opt, step_index=0, prior=EntropyEstimate(1.0, 0.1)),
         "prior: given with estimate='measured'"),
        (lambda: choose_knob(model, U, U, EntropyTarget(delta_h=0.1), optimizer=opt, step_index=1),
         "step_index: only used"),
    ]
    for make, message in cases:
        with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
            make()


@pytest.mark.parametrize("same", [False, True])
def test_a_negative_beta_min_reaches_what_the_bonus_alone_cannot(same):
    """β_min < 0 (an entropy penalty): a target outside the δH range of β ∈ [0, β_max], so
    unreachable with the default range (reported), is met at some β < 0 through the exact
    step map, and the real clipped AdamW step with −(g_pg + β·g_H) in ``.grad`` is the
    predicted one (float64; the done-when bounds of the tests above). On the real model the
    penalty lowers the entropy (docs/control.md); on this random one, with E = U, it raises
    it: the target is put on whichever side the penalty extends."""
    model, opt, names = _setup(torch.optim.AdamW, weight_decay=0.05)
    U = random_rollouts(B=4, G=3, seed=8)
    E = U if same else random_rollouts(B=4, G=3, seed=5)
    probe = EntropyProbe(model, opt, max_grad_norm=MAX_NORM)
    signed = dict(knob="beta", beta_max=50.0, beta_min=-50.0)
    lo_b, hi_b = probe.choose(E, U, EntropyControl(EntropyTarget(delta_h=-1.0), knob="beta", beta_max=50.0)).span
    far = [probe.choose(E, U, EntropyControl(EntropyTarget(delta_h=d), **signed)) for d in (-1.0, 1.0)]
    assert all(not f.reachable and "beta in [-50, 50]" in f.reason for f in far)
    low, high = min(far[0].span + far[1].span), max(far[0].span + far[1].span)
    margin = 1e-2 * (hi_b - lo_b)  # the penalty moves δH past the bonus's range (seen 1.6x and 1.3x that range)
    assert lo_b - low > margin or high - hi_b > margin
    aim = 0.5 * (low + lo_b) if lo_b - low > margin else 0.5 * (high + hi_b)
    bonus_only = probe.choose(E, U, EntropyControl(EntropyTarget(delta_h=aim), knob="beta", beta_max=50.0))
    assert not bonus_only.reachable and "beta in [0, 50]" in bonus_only.reason
    decision = probe.choose(E, U, EntropyControl(EntropyTarget(delta_h=aim), **signed))
    assert decision.reachable and -50.0 <= decision.value < 0
    assert abs(decision.delta_h - aim) < 1e-8 * abs(aim)  # the done-when bound (bisection to a float)
    g_pg = reference_policy_gradient(model, U, names)
    g_h = reference_bonus_gradient(model, U, names)
    taken = _taken_step(model, opt, names, {n: g_pg[n] + decision.value * g_h[n] for n in names})
    for n in names:
        assert rel_err(decision.step[n], taken[n]) < 1e-6, n  # the done-when bound


def test_the_signed_search_prefers_the_side_toward_the_target():
    """``solve_bracketed`` on a scalar δH(x) = x (no model): a target above 0 is met at
    x > 0 and one below at x < 0 with x_min < 0, each to a float; a target below with
    x_min = 0 is reported unreachable with x = 0 closest."""
    from funcprobe.core.control import solve_bracketed

    def line(x):
        return x, 0.0

    for aim in (0.3, -0.3):
        sol = solve_bracketed(line, aim, None, False, 1.0, -1.0)
        assert sol.reachable and sol.value == pytest.approx(aim, rel=1e-15)
    sol = solve_bracketed(line, -0.3, None, False, 1.0)
    assert not sol.reachable and sol.value == 0.0 and "beta in [0, 1]" in sol.reason
