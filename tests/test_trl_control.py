"""Entropy control in a real TRL GRPOTrainer (``ProbedGRPOTrainer(entropy_control=...)``):
the knob chosen before each step is applied to it, the Δθ taken is the predicted one
(measured around ``optimizer.step()``), clipping included, under TRL's defaults (bf16
autocast, ``dapo``); without control, training is TRL's own bit for bit; what the
controller does not model is refused by name."""

import math

import pytest
import torch

pytest.importorskip("trl")

from funcprobe import EntropyControl, EntropyTarget, SettingsError  # noqa: E402
from test_trl import G, LMAX, VOCAB, _tokenizer  # noqa: E402


def _qwen(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    return get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))


def _trainer(tmp_path, control=None, probed=True, steps=3, max_grad_norm=1.0, **kw):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from funcprobe.integrations.trl import ProbedGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3 * G, num_generations=G,
                      max_completion_length=LMAX, max_steps=steps, learning_rate=0.05, logging_steps=1,
                      report_to="none", use_cpu=True, save_strategy="no", seed=0, max_grad_norm=max_grad_norm)
    assert args.bf16 and args.loss_type == "dapo"  # TRL's defaults
    data = Dataset.from_dict({"prompt": [f"w{3 + i} w{4 + i} w{5 + i}" for i in range(12)]})
    common = dict(model=_qwen(), args=args, train_dataset=data, processing_class=_tokenizer(),
                  reward_funcs=lambda completions, **k: [-float(len(c)) for c in completions])
    if not probed:
        return GRPOTrainer(**common)
    return ProbedGRPOTrainer(**common, probe_raise=True, entropy_control=control, **kw)


class _StepsTaken:
    """θ before ``optimizer.step()`` and after it: the applied Δθ of each step, beside the
    controller's predicted Δθ (``trainer.funcprobe_step``), and the pre-clip gradient norm."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.rows, self.restored, self.precision, outer = [], [], [], self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                outer.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                                if p.requires_grad}

            def on_optimizer_step(self, args, state, control, **kw):
                after = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
                applied = {n: after[n] - outer.before[n] for n in after}
                predicted = {k.split("module.", 1)[-1]: v for k, v in trainer.funcprobe_step.items()}
                num = max(float((predicted[n].to(applied[n].dtype) - applied[n]).abs().max()) for n in applied)
                den = max(float(applied[n].abs().max()) for n in applied)
                # the precision of the measurement: θ + Δθ rounded to float32 moves each entry by
                # up to eps32/2·|θ|, so relative to max |Δθ| at most eps32·max|θ|/max|Δθ|
                theta = max(float(outer.before[n].abs().max()) for n in applied)
                outer.rows.append(num / den)
                outer.precision.append(torch.finfo(torch.float32).eps * theta / den)
                # after the step (our callback runs first), each group's lr is the scheduler's again
                outer.restored.append([g["lr"] for g in trainer.optimizer.param_groups]
                                      == list(trainer.lr_scheduler.get_last_lr()))

        trainer.add_callback(Callback())


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("knob", ["beta", "beta_signed", "lr_scale"])
def test_the_step_taken_is_the_step_predicted_at_the_chosen_knob(tmp_path, knob):
    """3 steps under TRL's defaults with clipping active (max_grad_norm 1e-3, far below the
    gradient norms logged, ~1e-1). ``beta`` aims at δH = +10 (out of reach: the closest β in
    [0, 50] is applied and reported unreachable, never clamped silently); ``beta_signed`` at
    δH = −10 with β in [−50, 50] (an entropy penalty: β < 0 applied, TRL's bonus with a
    negative coefficient, also out of reach); ``lr_scale`` at a
    KL budget of a quarter of the first step's predicted KL (c = 0.5 at step 1, the same
    first batch and gradient). Predicted vs applied Δθ relative to max |Δθ|: within 4x the
    precision of the measurement, eps32·max|θ|/max|Δθ| (θ + Δθ rounded to float32; seen 6e-7
    to 1.9e-6, 0.3-0.5x that precision), and within the issue's 1e-5."""
    if knob == "beta":
        control = EntropyControl(EntropyTarget(delta_h=10.0), knob="beta", beta_max=50.0)
    elif knob == "beta_signed":
        control = EntropyControl(EntropyTarget(delta_h=-10.0), knob="beta", beta_max=50.0, beta_min=-50.0)
    else:
        probe_kl = _trainer(tmp_path / "kl", EntropyControl(EntropyTarget(kl_budget=1e9)), steps=1,
                            max_grad_norm=1e-3)
        probe_kl.train()
        first = [h for h in probe_kl.state.log_history if "funcprobe/control/kl" in h][0]
        assert first["funcprobe/control/lr_scale"] == 1.0  # a budget that does not bind
        control = EntropyControl(EntropyTarget(kl_budget=first["funcprobe/control/kl"] / 4))
    trainer = _trainer(tmp_path / knob, control, max_grad_norm=1e-3)
    signed, knob = knob == "beta_signed", knob.removesuffix("_signed")
    taken = _StepsTaken(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if f"funcprobe/control/{knob}" in h]
    assert len(logged) == 3 and len(taken.rows) == 3
    assert all(h["grad_norm"] > 10 * 1e-3 for h in logged)  # clipping active at every step
    assert all(err < 4 * bound for err, bound in zip(taken.rows, taken.precision)), (taken.rows, taken.precision)
    assert max(taken.rows) < 1e-5, taken.rows  # the bound
    values = [h[f"funcprobe/control/{knob}"] for h in logged]
    for h in logged:
        assert math.isfinite(h["funcprobe/control/delta_h"]) and h["funcprobe/control/se"] >= 0
        assert h["funcprobe/delta_h"] == h["funcprobe/control/delta_h"]  # the prediction of the step taken
        assert h["funcprobe/control/failed"] == 0.0 and h["funcprobe/control/steps"] == 1.0
    if knob == "beta":
        assert all(h["funcprobe/control/reachable"] == 0.0 for h in logged)
        assert (min(values) < 0 and min(values) >= -50.0) if signed else max(values) > 0
    else:
        assert values[0] == pytest.approx(0.5, rel=1e-6)  # KL ∝ c²: float64 arithmetic on the same KL
        assert all(0 < v <= 1 for v in values)
        assert all(h["funcprobe/control/kl"] == pytest.approx(control.target.kl_budget, rel=1e-9)
                   for h in logged if h["funcprobe/control/lr_scale"] < 1.0)
    assert taken.restored == [True] * 3  # a scaled learning rate lasts one step


def test_without_control_training_is_trls_own_bit_for_bit(tmp_path):
    plain = _trainer(tmp_path / "trl", probed=False)
    plain.train()
    probed = _trainer(tmp_path / "probed", None)
    probed.train()
    a, b = _params(plain), _params(probed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    controlled = _trainer(tmp_path / "controlled", EntropyControl(EntropyTarget(delta_h=10.0), knob="beta",
                                                                   beta_max=50.0))
    controlled.train()  # the comparison can fail: control changes the steps
    c = _params(controlled)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_what_the_controller_does_not_model_is_refused_by_name(tmp_path):
    control = EntropyControl(EntropyTarget(delta_h=0.0))
    with pytest.raises(SettingsError, match="entropy_control: expected an EntropyControl"):
        _trainer(tmp_path / "a", EntropyTarget(delta_h=0.0))
    with pytest.raises(SettingsError, match="entropy_control: not supported with probe_gradient='recompute'"):
        _trainer(tmp_path / "b", control, probe_gradient="recompute")
    from funcprobe import ProbeSettings

    with pytest.raises(SettingsError, match=r"entropy_control: not supported with probe_settings.step='adam_step'"):
        _trainer(tmp_path / "c", control, probe_settings=ProbeSettings(step="adam_step"))
    with pytest.raises(SettingsError, match="entropy_control: GRPOConfig: funcprobe does not model beta != 0"):
        from datasets import Dataset
        from trl import GRPOConfig

        from funcprobe.integrations.trl import ProbedGRPOTrainer

        args = GRPOConfig(output_dir=str(tmp_path / "d"), per_device_train_batch_size=3 * G, num_generations=G,
                          max_completion_length=LMAX, max_steps=1, report_to="none", use_cpu=True,
                          save_strategy="no", beta=0.1)
        ProbedGRPOTrainer(model=_qwen(), args=args, processing_class=_tokenizer(),
                          train_dataset=Dataset.from_dict({"prompt": ["w3 w4"] * 6}),
                          reward_funcs=lambda completions, **k: [0.0] * len(completions), entropy_control=control)
    with pytest.raises(SettingsError, match="knob: expected one of"):
        EntropyControl(EntropyTarget(delta_h=0.0), knob="temperature")


@pytest.mark.parametrize("estimate", ["filtered", "measured"])
def test_a_schedule_is_aimed_from_the_estimate_carried_over_the_steps(tmp_path, estimate):
    """A hold schedule with ``lr_scale``, 3 steps: step 1 aims from the measurement on its
    batch; with ``estimate="filtered"`` each later step aims from the previous step's
    estimate advanced by its prediction (``ControlDecision.estimate_after``) and fused with
    the measurement (``EntropyEstimate``), recomputed here from the logged values (float64
    arithmetic on the same numbers: 1e-12); with ``"measured"`` from the measurement alone."""
    from funcprobe import EntropyEstimate, EntropySchedule

    control = EntropyControl(EntropyTarget(schedule=EntropySchedule(start=1.0)), estimate=estimate)
    trainer = _trainer(tmp_path, control)
    trainer.train()
    steps = [h for h in trainer.funcprobe_history if "control/entropy" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    for k, h in enumerate(steps):
        assert h["control/target"] == pytest.approx(1.0 - h["control/entropy"], abs=1e-12)
        if k == 0 or estimate == "measured":
            assert h["control/entropy"] == h["control/measured_entropy"]
            assert h["control/entropy_se"] == h["control/measured_entropy_se"]
            continue
        p = steps[k - 1]
        prior = EntropyEstimate(p["control/entropy"], p["control/entropy_se"] ** 2).advance(p["control/delta_h"],
                                                                                            p["control/se"])
        fused = prior.fuse(h["control/measured_entropy"], h["control/measured_entropy_se"])
        assert h["control/entropy"] == pytest.approx(fused.mean, abs=1e-12)
        assert h["control/entropy_se"] == pytest.approx(fused.se, abs=1e-12)
        assert h["control/entropy_se"] < min(h["control/measured_entropy_se"], prior.se)  # fusing narrows it
