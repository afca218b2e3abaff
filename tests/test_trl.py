"""TRL's own GRPO loss: funcprobe's ∇J equals the autograd gradient of ``GRPOTrainer._compute_loss``."""

import math

import pytest
import torch

pytest.importorskip("trl")

from funcprobe import update_direction  # noqa: E402
from funcprobe.integrations.trl import generation_batch_to_rollouts  # noqa: E402
from helpers import rel_err  # noqa: E402

VOCAB, G, LMAX = 32, 3, 5


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False)).to(torch.float64)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4 * G,
                      num_generations=G, max_completion_length=LMAX, report_to="none", use_cpu=True,
                      save_strategy="no", bf16=False)
    data = Dataset.from_dict({"prompt": ["w3 w4"] * 8})
    t = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                    train_dataset=data, processing_class=_tokenizer())
    t.model.train()
    t.current_gradient_accumulation_steps = 1
    return t


def _generation_batch(B=4, seed=3):
    """Left-padded prompts, right-padded completions of unequal lengths, advantages: TRL's layout."""
    gen = torch.Generator().manual_seed(seed)
    N, P = B * G, 4
    prompt_ids = torch.randint(3, VOCAB, (N, P), generator=gen)
    prompt_lens = torch.randint(1, P + 1, (B,), generator=gen).repeat_interleave(G)
    prompt_mask = (torch.arange(P) >= (P - prompt_lens)[:, None]).long()
    prompt_ids = torch.where(prompt_mask.bool(), prompt_ids, 0)
    completion_ids = torch.randint(3, VOCAB, (N, LMAX), generator=gen)
    completion_lens = torch.randint(1, LMAX + 1, (N,), generator=gen)
    completion_mask = (torch.arange(LMAX) < completion_lens[:, None]).long()
    completion_ids = torch.where(completion_mask.bool(), completion_ids, 0)
    advantages = torch.randn(N, generator=gen, dtype=torch.float64)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": advantages,
            "num_items_in_batch": completion_mask.sum()}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_policy_gradient_equals_the_gradient_of_trls_loss(trainer, loss_type):
    batch = _generation_batch()
    trainer.loss_type = loss_type
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    loss = trainer._compute_loss(trainer.model, dict(batch))
    grads = torch.autograd.grad(loss, params)
    U = generation_batch_to_rollouts(batch, G, float(LMAX))
    mu = update_direction(trainer.model, U, step="sgd", loss_type=loss_type, chunk_size=3)
    # TRL's log-prob head accumulates in float32: seen 2.1e-7 (~2 float32 ulps), bound 1e-5 (47x;
    # was 1e-6, under 5x); a wrong loss_type normalisation is >= 1e-2 off (grpo vs dapo: 0.64)
    for n, g in zip(names, grads):
        assert rel_err(mu[n], -g) < 1e-5, (loss_type, n, rel_err(mu[n], -g))


def test_loss_types_differ_where_they_should(trainer):
    """grpo (per-sequence token mean) and dapo (token sum / all tokens) are different steps here."""
    U = generation_batch_to_rollouts(_generation_batch(), G, float(LMAX))
    a = update_direction(trainer.model, U, step="sgd", loss_type="grpo")
    b = update_direction(trainer.model, U, step="sgd", loss_type="dapo")
    assert max(rel_err(a[k], b[k]) for k in a) > 1e-2  # seen 0.64


@pytest.mark.parametrize("gradient, dtype, bf16, lr, clip, logging_steps", [
    ("trainer", torch.float32, False, 0.1, 0.05, 1),
    ("trainer", torch.float32, True, 0.1, 0.05, 3),  # TRL's default mixed precision: autocast to bf16
    # recompute: funcprobe's own float64 gradient against TRL's fused log-prob head, which accumulates
    # in float32 (~2e-7 relative); clip and lr keep Adam's first step g/(|g| + eps) from amplifying it
    ("recompute", torch.float64, False, 1e-2, 0.1, 1),
])
def test_predicted_step_is_the_step_the_trainer_takes(tmp_path, gradient, dtype, bf16, lr, clip, logging_steps):
    """A real ProbedGRPOTrainer run (default loss_type dapo, clipping active, linear LR decay):
    the Δθ the probe predicted before each optimizer step equals the Δθ the step applied."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig

    from funcprobe.integrations.trl import ProbedGRPOTrainer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False)).to(dtype)
    # clip: active at every step; lr 0.1 keeps a float32 step well above float32's resolution of θ
    # itself (θ_after − θ_before is measured in the parameters' dtype)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=G,
                      max_completion_length=LMAX, max_steps=3, learning_rate=lr, max_grad_norm=clip,
                      weight_decay=0.01, lr_scheduler_type="linear", logging_steps=logging_steps, report_to="none",
                      use_cpu=True, save_strategy="no", seed=0, bf16=bf16)
    data = Dataset.from_dict({"prompt": [f"w{3 + i} w{4 + i} w{5 + i}" for i in range(12)]})
    trainer = ProbedGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [-float(len(c)) for c in completions],
                                args=args, train_dataset=data, processing_class=_tokenizer(), probe_gradient=gradient,
                                probe_raise=True)
    assert trainer.probe_settings.step == "optimizer_step" and trainer.probe_settings.loss_type == "dapo"
    assert trainer.probe_settings.max_grad_norm == (clip if gradient == "recompute" else None)

    class Recorder(TrainerCallback):
        def __init__(self):
            self.errors, self.lrs, self.norms = [], [], []

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.predicted = {k: v.clone() for k, v in trainer.funcprobe_step.items()}
            self.before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in self.predicted}
            self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

        def on_optimizer_step(self, args, state, control, **kw):
            named = dict(trainer.model.named_parameters())
            self.errors.append(max(rel_err(self.predicted[n], named[n].detach() - b) for n, b in self.before.items()))

    rec = Recorder()
    trainer.add_callback(rec)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(rec.errors) == 3 and len(set(rec.lrs)) == 3  # the schedule moved the lr every step
    assert min(norms) > clip, norms  # clipping was active at every step
    # 2e-4: over 10x the largest seen (1.22e-5: recompute, float64 against TRL's float32-accumulated head,
    # transformers 5.25; 9.2e-6 with 5.23); a wrong step is O(1) off
    assert max(rec.errors) < 2e-4, rec.errors
    logged = [h for h in trainer.state.log_history if "funcprobe/delta_h" in h]
    assert all("funcprobe/delta_h_same_batch" in h and "funcprobe/mean_s" not in h and "funcprobe/lr" not in h
               for h in logged)
    history = trainer.funcprobe_history
    assert [h["step"] for h in history] == [1, 2, 3] and all(abs(h["delta_h"]) < 1 for h in history)
    if logging_steps == 1:
        assert len(logged) == 3 and [h["step"] for h in logged] == [1, 2, 3]
    else:  # one window of 3 steps: the window's statistics, not TRL's averages of per-step ones
        from funcprobe.integrations.trl import window_metrics

        (entry,) = logged
        expected = window_metrics([{k: v for k, v in h.items() if k != "step"} for h in history], failed=0)
        assert {k: entry[k] for k in expected} == pytest.approx(expected, rel=1e-12)  # float64: seen equal


def test_window_metrics_are_the_window_statistics_not_averages_of_them():
    """Two steps −0.349 ± 0.183 and −0.030 ± 0.016 (issue 24's TRL window): the mean and the
    SE of the mean sqrt(Σ SE²)/n, counts as counts (float64 arithmetic: 1e-12)."""
    from funcprobe.integrations.trl import window_metrics

    out = window_metrics([{"delta_h": -0.349, "se": 0.183, "delta_h_same_batch": -0.5},
                          {"delta_h": -0.030, "se": 0.016, "delta_h_same_batch": -0.1}], failed=2)
    # float64 arithmetic on O(0.1) numbers: seen exact; ci95_low's 1e-6 covers the 6-digit 1.959964
    # (seen 1.4e-9 off)
    assert out["funcprobe/delta_h"] == pytest.approx(-0.1895, abs=1e-12)
    assert out["funcprobe/se"] == pytest.approx(math.sqrt(0.183**2 + 0.016**2) / 2, abs=1e-12)  # 0.0918, not 0.0997
    assert out["funcprobe/ci95_low"] == pytest.approx(-0.1895 - 1.959964 * out["funcprobe/se"], abs=1e-6)
    assert out["funcprobe/delta_h_same_batch"] == pytest.approx(-0.3, abs=1e-12)
    assert out["funcprobe/failed"] == 2.0 and out["funcprobe/probed_steps"] == 2.0 and "funcprobe/lr" not in out
    assert window_metrics([], failed=1) == {"funcprobe/probed_steps": 0.0, "funcprobe/failed": 1.0}


def test_effects_are_logged_beside_trls_metrics(tmp_path):
    """``ProbeSettings(effects=True)`` in a real ProbedGRPOTrainer run (TRL's default ``dapo``):
    the predicted effects are logged with their SEs, and the rewards they use are the step's
    own (their mean is the ``reward`` TRL logs for that step; float32 rewards: 1e-6)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig

    from funcprobe import ProbeSettings
    from funcprobe.integrations.trl import PREDICTED_KEYS, ProbedGRPOTrainer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, num_generations=G,
                      max_completion_length=LMAX, max_steps=2, learning_rate=0.05, logging_steps=1,
                      report_to="none", use_cpu=True, save_strategy="no", seed=0)
    data = Dataset.from_dict({"prompt": [f"w{3 + i} w{4 + i} w{5 + i}" for i in range(12)]})
    trainer = ProbedGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [-float(len(c)) for c in completions],
                                args=args, train_dataset=data, processing_class=_tokenizer(), probe_raise=True,
                                probe_settings=ProbeSettings(step="optimizer_step", effects=True))
    seen = []

    class Rewards(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            seen.append(trainer._funcprobe_rewards.clone())

    trainer.add_callback(Rewards())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "funcprobe/delta_h" in h]
    assert len(logged) == 2
    for entry, rewards in zip(logged, seen):
        for key in PREDICTED_KEYS:
            assert math.isfinite(entry[f"funcprobe/{key}"]) and entry[f"funcprobe/{key}_se"] >= 0, key
        assert entry["funcprobe/pred/kl"] > 0  # second order: positive for any non-zero step
        assert rewards.shape == (6 // G, G)
        assert float(rewards.mean()) == pytest.approx(entry["reward"], rel=1e-6)  # float32: seen 3.8e-8
