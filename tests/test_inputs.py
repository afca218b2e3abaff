"""Bad input is answered by name before any forward (hardening, part of issue 12)."""

import pytest
import torch

from funcprobe import ParamRegistry, RolloutBatch, conditional_variance, sequence_logprobs, update_direction
from funcprobe.edge.session import probe_session
from helpers import gpt2, qwen2, random_direction, random_rollouts, rel_err

P, R = [[3, 4], [5, 6, 7]], [[[8, 9], [10]], [[11], [12, 13]]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[1.7, 2]], responses=[[[3], [4]]]), r"prompts: prompt 0 has \[1.7\]"),
        (dict(responses=[[[8, 9.5], [10]], [[11], [12]]]), r"responses: response 0 of prompt 0 has \[9.5\]"),
        (dict(pad_token_id=2.5), "pad_token_id: expected an int token id"),
        (dict(pad_token_id=None), "pass its eos_token_id"),
        (dict(pad_token_id=-100), "pad_token_id: expected a token id >= 0"),
        (dict(max_len=True), "max_len: expected a number"),
        (dict(max_len="512"), "max_len: expected a number"),
        (dict(responses=[[], []]), "G = 0 responses"),
        (dict(prompts=[3, 4, 5]), "flat list"),
        (dict(advantages=[[1.0, 2.0], [1.0]]), "advantages: row 1 must hold G = 2 numbers"),
        (dict(advantages=[["a", "b"], [1.0, 2.0]]), r"advantages: row 0 holds \['a', 'b'\]"),
        (dict(max_len=1), "max_len: response 0 of prompt 0 has 2 tokens, more than Lmax = 1"),
    ],
)
def test_from_lists_names_the_argument(kwargs, message):
    args = dict(prompts=P, responses=R, pad_token_id=0, advantages=[[1.0, -1.0], [0.5, -0.5]], max_len=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RolloutBatch.from_lists(args.pop("prompts"), args.pop("responses"), **args)


def test_tensor_ids_must_be_int64_or_int32():
    b = random_rollouts()
    with pytest.raises(ValueError, match="input_ids: expected int64 \\(or int32\\) token ids, got torch.uint8"):
        RolloutBatch(b.input_ids.to(torch.uint8), b.attention_mask, b.response_start)
    with pytest.raises(ValueError, match="input_ids: expected int64"):
        RolloutBatch(b.input_ids.float(), b.attention_mask, b.response_start)


def test_token_ids_and_lengths_are_checked_against_the_model():
    model = gpt2()  # vocabulary 40, 64 learned positions
    mu = random_direction(ParamRegistry.from_model(model))
    big = RolloutBatch.from_lists([[3, 4], [3, 45]], [[[5], [6]], [[5], [6]]], pad_token_id=0, max_len=4)
    with pytest.raises(ValueError, match="E: token id 45 \\(prompt 1\\) is outside the model's vocabulary of 40"):
        conditional_variance(model, big, mu, lr=0.1)
    long = RolloutBatch.from_lists([list(range(1, 40)), [1]], [[list(range(1, 30))] * 2] * 2, pad_token_id=0)
    with pytest.raises(ValueError, match="E: a sequence has 68 tokens, more than the model's 64 learned positions"):
        conditional_variance(model, long, mu, lr=0.1, weighting="per_token_avg")
    U = RolloutBatch.from_lists([[3, 4], [3, 45]], [[[5], [6]], [[5], [6]]], pad_token_id=0,
                                advantages=[[1.0, -1.0], [1.0, -1.0]], max_len=4)
    with pytest.raises(ValueError, match="U: token id 45"):
        update_direction(model, U, step="sgd")


def test_a_pad_id_outside_the_vocabulary_is_never_looked_up():
    model = gpt2()
    reg = ParamRegistry.from_model(model)
    a = RolloutBatch.from_lists(P, R, pad_token_id=0, max_len=4)
    b = RolloutBatch.from_lists(P, R, pad_token_id=50_000, max_len=4)
    with probe_session(reg), torch.no_grad():
        Sa = sequence_logprobs(reg.module, reg.params(reg.trainable), a)
        Sb = sequence_logprobs(reg.module, reg.params(reg.trainable), b)
    assert torch.isfinite(Sb).all() and rel_err(Sb, Sa) < 1e-12  # float64, the pad id never read: seen 0


def test_muY_that_is_not_a_tree_of_real_tensors_is_named():
    model = gpt2()
    E = random_rollouts(B=3, G=2, seed=5)
    mu = random_direction(ParamRegistry.from_model(model))
    with pytest.raises(ValueError, match="muY: expected a dict name -> tensor"):
        conditional_variance(model, E, list(mu.values()), lr=0.1)
    with pytest.raises(ValueError, match="muY: tensors on the meta device"):
        conditional_variance(model, E, {k: v.to("meta") for k, v in mu.items()}, lr=0.1)


def test_dora_is_refused_with_the_reason():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=64, n_embd=32, n_layer=1, n_head=4))
    dora = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True))
    with pytest.raises(NotImplementedError, match="DoRA adapter.*detaches the weight norm"):
        ParamRegistry.from_model(dora)


def test_keep_dropout_with_gradient_checkpointing_is_refused_before_any_forward():
    model = qwen2(dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.train()
    E = random_rollouts(B=3, G=2, seed=5)
    mu = random_direction(ParamRegistry.from_model(model))
    with pytest.raises(ValueError, match="keep_dropout: the model is in train mode with gradient checkpointing"):
        conditional_variance(model, E, mu, lr=0.1, keep_dropout=True)
    assert torch.isfinite(conditional_variance(model, E, mu, lr=0.1).s).all()  # eval mode: fine
