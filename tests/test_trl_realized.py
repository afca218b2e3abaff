"""The realized companion of ``ProbedGRPOTrainer`` (``probe_realized``): held-out rollouts
sampled from π_θ before the step, their importance-sampling entropy change after it."""

import math

import pytest
import torch

pytest.importorskip("trl")

from funcprobe.integrations.realized import RealizedCompanion, realized_change, sample_held_out, sampling_config  # noqa: E402,E501
from funcprobe.validation.entropy_change import is_change  # noqa: E402
from test_trl import _tokenizer  # noqa: E402

VOCAB, G, LMAX, EOS = 32, 3, 5, 2


def _qwen(seed=0, dtype=torch.float64, dropout=0.1):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=EOS,
                      bos_token_id=None, attention_dropout=dropout)
    return get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False)).to(dtype)


def _trainer(tmp_path, realized=3, loss_type="dapo", seed=0, extra_callback=None, **kw):
    from datasets import Dataset
    from trl import GRPOConfig

    from funcprobe.integrations.trl import ProbedGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                      max_completion_length=LMAX, max_steps=2, learning_rate=0.05, loss_type=loss_type,
                      logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=seed, bf16=False)
    data = Dataset.from_dict({"prompt": [f"w{3 + i} w{4 + i} w{5 + i}" for i in range(8)]})
    held = Dataset.from_dict({"prompt": [f"w{20 + i} w{21 + i}" for i in range(6)]})
    trainer = ProbedGRPOTrainer(model=_qwen(seed), args=args, train_dataset=data, processing_class=_tokenizer(),
                                reward_funcs=lambda completions, **k: [-float(len(c)) for c in completions],
                                probe_raise=True,
                                probe_realized=RealizedCompanion(realized, held) if realized else None, **kw)
    if extra_callback is not None:
        trainer.add_callback(extra_callback(trainer))
    return trainer


@torch.no_grad()
def _sequence_logprobs_by_hand(model, H):
    """S ``[B, G]`` by a plain eval-mode forward of the padded rows, positions from the mask
    (independent of funcprobe's S: no shifting, no chunked head, no functional_call)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        B, Gs, T = H.input_ids.shape
        ids, mask = H.input_ids.reshape(B * Gs, T), H.attention_mask.reshape(B * Gs, T).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        resp = H.response_mask.reshape(B * Gs, T)[:, 1:]
        return (logp * resp).sum(-1).reshape(B, Gs)
    finally:
        for m, training in modes:
            m.train(training)


# ------------------------------------------------------------------ the arguments


@pytest.mark.parametrize("value", [1, -2, True, 2.0, "3"])
def test_bad_probe_realized_prompts_are_refused_by_name(value):
    with pytest.raises(ValueError, match="^probe_realized.prompts: expected an int >= 2"):
        RealizedCompanion(value, [{"prompt": "a"}] * 4)


@pytest.mark.parametrize("dataset, message", [
    (None, "expected a map-style dataset"),
    ([{"prompt": "a"}] * 2, "2 row.s., fewer than prompts=3"),
    ([{"text": "a"}] * 3, r"rows with a 'prompt'.*keys \['text'\]"),
    (["a", "b", "c"], "rows with a 'prompt'.*type str"),
    (iter([{"prompt": "a"}] * 3), "expected a map-style dataset"),
])
def test_bad_probe_realized_dataset_is_refused_by_name(dataset, message):
    with pytest.raises(ValueError, match="^probe_realized.dataset: .*" + message):
        RealizedCompanion(3, dataset)


def test_probe_realized_must_be_a_companion():
    from funcprobe import SettingsError
    from funcprobe.integrations.trl import ProbedGRPOTrainer

    with pytest.raises(SettingsError, match="^probe_realized: expected RealizedCompanion"):
        ProbedGRPOTrainer(probe_realized=3)


def test_unsupported_trainer_settings_are_named():
    from types import SimpleNamespace

    from funcprobe.integrations.trl import realized_refusals

    fake = SimpleNamespace(args=SimpleNamespace(max_completion_length=4), use_vllm=True, is_fsdp_enabled=True,
                           accelerator=SimpleNamespace(device=torch.device("meta")))
    assert realized_refusals(fake) == ["use_vllm=True", "FSDP", "device meta (cpu or cuda: their generators "
                                       "are restored)"]
    fake = SimpleNamespace(args=SimpleNamespace(max_completion_length=4), accelerator=SimpleNamespace(
        device=torch.device("cpu")))
    assert realized_refusals(fake) == []


# ------------------------------------------------------------------ the sampler and the estimator


def test_held_out_responses_are_drawn_from_the_temperature_one_policy():
    """Whatever the model's own generation_config says (top_k 2, temperature 0.3, typical_p
    0.5 here), the first response token's frequencies over 20000 draws match softmax of the
    eval-mode logits: total variation < 0.2 (10x the 0.019 seen; sampling alone gives about
    0.4·sqrt(V/n) = 0.016), where the model's top-2 sampler would give > 0.9.
    Modes, generation_config and the global RNG are left as they were."""
    model = _qwen(dropout=0.0).float()
    model.train()
    base = model.get_base_model()
    base.generation_config.top_k, base.generation_config.temperature = 2, 0.3
    base.generation_config.typical_p = 0.5
    saved_config = base.generation_config.to_dict()
    rng = torch.get_rng_state()
    prompt = [5, 6, 7]
    n = 20000
    H = sample_held_out(model, [prompt], sampling_config(group_size=n, max_new_tokens=1, eos_token_ids=[EOS],
                                                         pad_token_id=0), seed=1)
    assert torch.equal(torch.get_rng_state(), rng) and base.generation_config.to_dict() == saved_config
    assert all(m.training for m in model.modules())
    first = H.input_ids[0, :, H.response_start]
    freq = torch.bincount(first, minlength=VOCAB).double() / n
    with torch.no_grad():
        model.eval()
        p = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
        model.train()
    tv = 0.5 * float((freq - p).abs().sum())
    assert tv < 0.2, tv
    top2 = p.topk(2).values.sum()
    assert 1 - top2 > 0.9  # a top-2 sampler would be this far off (seen 0.92): the bound can fail


def test_held_out_responses_end_at_the_first_eos_kept():
    model = _qwen(dropout=0.0)
    config = sampling_config(group_size=40, max_new_tokens=LMAX, eos_token_ids=[EOS, 9], pad_token_id=0)
    H = sample_held_out(model, [[5, 6], [7]], config, seed=0, max_len=float(LMAX))
    lengths = H.response_lengths
    resp = H.input_ids[..., H.response_start:]
    for b in range(2):
        for g in range(40):
            tokens = resp[b, g, : int(lengths[b, g])].tolist()
            ends = [t for t, tok in enumerate(tokens) if tok in (EOS, 9)]
            assert ends == [len(tokens) - 1] if ends else len(tokens) == LMAX, tokens
    assert (lengths < LMAX).any() and float(H.max_len[0]) == LMAX  # some responses did end early


@pytest.mark.parametrize("weighting", ["dr_grpo", "per_token_avg"])
def test_realized_change_is_is_change_of_the_weighted_entropy(weighting):
    """float64 arithmetic on the same numbers: 1e-12."""
    model = _qwen(dropout=0.0)
    config = sampling_config(group_size=4, max_new_tokens=LMAX, eos_token_ids=[EOS], pad_token_id=0)
    H = sample_held_out(model, [[5, 6], [7], [8, 9, 10]], config, seed=3, max_len=float(LMAX))
    gen = torch.Generator().manual_seed(0)
    S0 = -3 * torch.rand(3, 4, generator=gen, dtype=torch.float64)
    S1 = S0 + 0.1 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    W = torch.full((3, 4), float(LMAX)) if weighting == "dr_grpo" else H.response_lengths.double()
    r = realized_change(S0, S1, H, weighting)
    ref = is_change(S0, S1, -S0 / W, -S1 / W)
    assert r.delta_h == pytest.approx(ref.delta_h, abs=1e-12) and r.se == pytest.approx(ref.se, abs=1e-12)  # seen equal
    if weighting == "per_token_avg":  # the lengths differ, so the weighting matters
        other = realized_change(S0, S1, H, "dr_grpo")
        assert abs(other.delta_h - r.delta_h) > 1e-3  # seen 2.7e-3 (seeded draws: fixed)


# ------------------------------------------------------------------ in the trainer


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_trainer_logs_the_realized_change_of_each_step_on_the_held_out_rollouts(tmp_path, loss_type):
    """The logged realized change is is_change of the weighted entropy, computed by hand on
    the same held-out rollouts from plain forwards before and after the step (float64 model;
    1e-9, over 10⁵x the 5e-15 seen: S agrees to ~4e-15 between the two forwards, exp(ΔS) and
    the means add rounding only)."""
    from transformers import TrainerCallback

    weighting = "dr_grpo" if loss_type == "dr_grpo" else "per_token_avg"

    class ByHand(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.values = trainer, []

        def on_pre_optimizer_step(self, args, state, control, **kw):
            _, _, self.H, _ = self.trainer._funcprobe_pending
            self.S0 = _sequence_logprobs_by_hand(self.trainer.model, self.H)

        def on_optimizer_step(self, args, state, control, **kw):
            S1 = _sequence_logprobs_by_hand(self.trainer.model, self.H)
            W = (torch.full(S1.shape, float(LMAX), dtype=torch.float64) if weighting == "dr_grpo"
                 else self.H.response_lengths.double())
            self.values.append(is_change(self.S0, S1, -self.S0 / W, -S1 / W))

    trainer = _trainer(tmp_path, loss_type=loss_type, extra_callback=ByHand)
    by_hand = trainer.callback_handler.callbacks[-1]
    trainer.train()
    history = trainer.funcprobe_history
    assert [h["step"] for h in history] == [1, 2] and len(by_hand.values) == 2
    for h, ref in zip(history, by_hand.values):
        # seen 5.4e-15 and 2.0e-15 (values ~0.4 and ~0.2): 1e-9 is > 1e5x (see the docstring)
        assert h["realized_delta_h"] == pytest.approx(ref.delta_h, abs=1e-9)
        assert h["realized_se"] == pytest.approx(ref.se, abs=1e-9) and h["realized_se"] > 0
        assert abs(ref.delta_h) > 1e-6  # the step moved the held-out entropy: the check has something to see
        # the same float64 formula: seen 1.2e-16 relative, rel 1e-12
        assert h["z"] == pytest.approx((h["delta_h"] - h["realized_delta_h"])
                                       / math.hypot(h["se"], h["realized_se"]), rel=1e-12)
    logged = [e for e in trainer.state.log_history if "funcprobe/realized_delta_h" in e]
    assert len(logged) == 2
    for e, h in zip(logged, history):  # one step per window: the window's values are the step's (seen equal)
        assert e["funcprobe/realized_steps"] == 1.0 and e["funcprobe/realized_failed"] == 0.0
        assert e["funcprobe/realized_delta_h"] == pytest.approx(h["realized_delta_h"], rel=1e-12)
        assert e["funcprobe/realized_se"] == pytest.approx(h["realized_se"], rel=1e-12)
        assert e["funcprobe/z"] == pytest.approx(h["z"], rel=1e-12)
        assert all(math.isfinite(v) for k, v in e.items() if k.startswith("funcprobe/"))


def _trained(trainer):
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_the_realized_companion_does_not_perturb_training(tmp_path):
    """Training with probe_realized on is bit-identical to training with it off (the sampling
    of H draws from the global generators, which are restored); drawing one random number
    more at the same point does change training, so the comparison can fail."""
    from transformers import TrainerCallback

    class DrawsOne(TrainerCallback):
        def __init__(self, trainer):
            pass

        def on_pre_optimizer_step(self, args, state, control, **kw):
            torch.rand(1)

    off = _trained(_trainer(tmp_path / "off", realized=0))
    on_trainer = _trainer(tmp_path / "on", realized=3)
    on = _trained(on_trainer)
    assert [("realized_delta_h" in h) for h in on_trainer.funcprobe_history] == [True, True]
    assert off.keys() == on.keys() and all(torch.equal(off[n], on[n]) for n in off)
    perturbed = _trained(_trainer(tmp_path / "perturbed", realized=0, extra_callback=DrawsOne))
    assert any(not torch.equal(off[n], perturbed[n]) for n in off)


def test_realized_window_statistics():
    """Two steps with realized values, one without (its realized part failed): the realized
    mean and SE over the two, z of the window's mean difference (float64 arithmetic: 1e-12)."""
    from funcprobe.integrations.trl import window_metrics

    steps = [{"delta_h": -0.3, "se": 0.1, "realized_delta_h": -0.2, "realized_se": 0.05},
             {"delta_h": 0.1, "se": 0.2, "realized_delta_h": 0.4, "realized_se": 0.1},
             {"delta_h": 0.5, "se": 0.3}]
    out = window_metrics(steps, failed=0, realized_failed=1)
    assert out["funcprobe/realized_steps"] == 2.0 and out["funcprobe/realized_failed"] == 1.0
    assert out["funcprobe/probed_steps"] == 3.0
    assert out["funcprobe/realized_delta_h"] == pytest.approx(0.1, abs=1e-12)
    assert out["funcprobe/realized_se"] == pytest.approx(math.sqrt(0.05**2 + 0.1**2) / 2, abs=1e-12)
    assert out["funcprobe/z"] == pytest.approx((-0.1 - 0.3) / math.sqrt(0.01 + 0.0025 + 0.04 + 0.01), abs=1e-12)
    assert "funcprobe/realized_steps" not in window_metrics(steps, failed=0)  # off: no realized keys
    assert window_metrics([], failed=0, realized_failed=2) == {
        "funcprobe/probed_steps": 0.0, "funcprobe/failed": 0.0, "funcprobe/realized_steps": 0.0,
        "funcprobe/realized_failed": 2.0}
