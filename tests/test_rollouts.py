"""RolloutBatch: padding layout, derived masks and every validation error."""

import pytest
import torch

from funcprobe import RolloutBatch
from helpers import random_rollouts


def test_from_lists_pads_prompts_left_and_responses_right():
    b = RolloutBatch.from_lists([[5, 6], [7]], [[[1, 2, 3], [4]], [[8], [9, 9]]], pad_token_id=0, max_len=4)
    assert b.input_ids.shape == (2, 2, 5) and b.response_start == 2
    assert b.input_ids[1, 0].tolist() == [0, 7, 8, 0, 0]
    assert b.attention_mask[1, 0].tolist() == [0, 1, 1, 0, 0]
    assert b.response_lengths.tolist() == [[3, 1], [1, 2]]
    assert b.response_mask[0, 0].tolist() == [False, False, True, True, True]
    assert b.max_len_tensor(torch.float64).shape == (2, 1)


def test_select_keeps_per_prompt_max_len():
    b = random_rollouts(B=4, max_len=None)
    b = RolloutBatch(b.input_ids, b.attention_mask, b.response_start, b.advantages, torch.tensor([5.0, 6, 7, 8]))
    sub = b.select(1, 3)
    assert sub.num_prompts == 2 and sub.max_len.tolist() == [6.0, 7.0]
    assert torch.equal(sub.input_ids, b.input_ids[1:3])
    with pytest.raises(ValueError, match="select"):
        b.select(3, 2)


def _good():
    return random_rollouts(B=2, G=2)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda b: dict(input_ids=b.input_ids[0]), "input_ids"),
        (lambda b: dict(input_ids=b.input_ids.float()), "input_ids"),
        (lambda b: dict(input_ids=b.input_ids - 100), "input_ids: negative"),
        (lambda b: dict(input_ids=b.input_ids[:, :1], attention_mask=b.attention_mask[:, :1]), "G = 1"),
        (lambda b: dict(attention_mask=b.attention_mask[..., :-1]), "attention_mask"),
        (lambda b: dict(attention_mask=b.attention_mask * 2), "attention_mask: values"),
        (lambda b: dict(attention_mask=b.attention_mask.float()), "attention_mask"),
        (lambda b: dict(response_start=0), "response_start"),
        (lambda b: dict(response_start=b.seq_len), "response_start"),
        (lambda b: dict(response_start=2.0), "response_start"),
        (lambda b: dict(advantages=torch.zeros(3, 3)), "advantages"),
        (lambda b: dict(advantages=torch.tensor([[0.0, float("nan")], [0.0, 0.0]])), "advantages"),
        (lambda b: dict(advantages=torch.zeros(2, 2, dtype=torch.long)), "advantages"),
        (lambda b: dict(max_len=0.0), "max_len"),
        (lambda b: dict(max_len=torch.tensor([1.0, 2.0, 3.0])), "max_len"),
        (lambda b: dict(max_len=float("inf")), "max_len"),
    ],
)
def test_validation_errors_name_the_field(change, field):
    b = _good()
    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, response_start=b.response_start,
              advantages=b.advantages, max_len=b.max_len)
    kw.update(change(b))
    with pytest.raises(ValueError, match=field):
        RolloutBatch(**kw)


def test_layout_errors():
    ids = torch.ones(1, 2, 6, dtype=torch.long)
    ok = torch.tensor([[0, 1, 1, 1, 1, 0]] * 2)[None]
    RolloutBatch(ids, ok, 3)
    empty_resp = torch.tensor([[0, 1, 1, 0, 0, 0]] * 2)[None]
    with pytest.raises(ValueError, match="response is empty"):
        RolloutBatch(ids, empty_resp, 3)
    prompt_not_at_end = torch.tensor([[1, 1, 0, 1, 1, 0]] * 2)[None]
    with pytest.raises(ValueError, match="column response_start - 1"):
        RolloutBatch(ids, prompt_not_at_end, 3)
    hole_in_prompt = torch.tensor([[1, 0, 1, 1, 1, 0]] * 2)[None]
    with pytest.raises(ValueError, match="left-padded"):
        RolloutBatch(ids, hole_in_prompt, 3)
    hole_in_resp = torch.tensor([[0, 1, 1, 1, 0, 1]] * 2)[None]
    with pytest.raises(ValueError, match="right-padded"):
        RolloutBatch(ids, hole_in_resp, 3)


def test_from_lists_errors():
    with pytest.raises(ValueError, match="prompts"):
        RolloutBatch.from_lists([], [], pad_token_id=0)
    with pytest.raises(ValueError, match="responses: 1 groups for 2 prompts"):
        RolloutBatch.from_lists([[1], [2]], [[[1], [2]]], pad_token_id=0)
    with pytest.raises(ValueError, match="same number G"):
        RolloutBatch.from_lists([[1], [2]], [[[1], [2]], [[3]]], pad_token_id=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        RolloutBatch.from_lists([[1], []], [[[1], [2]], [[3], [4]]], pad_token_id=0)
    with pytest.raises(ValueError, match="response 1 of prompt 0 is empty"):
        RolloutBatch.from_lists([[1]], [[[1], []]], pad_token_id=0)
    with pytest.raises(ValueError, match="G >= 2"):
        RolloutBatch.from_lists([[1]], [[[1]]], pad_token_id=0)


def test_dr_grpo_needs_max_len():
    b = random_rollouts(max_len=None)
    with pytest.raises(ValueError, match="max_len: weighting='dr_grpo' needs Lmax"):
        b.max_len_tensor(torch.float32)
    with pytest.raises(ValueError, match="U: the batch has no advantages"):
        random_rollouts(advantages=False).require_advantages("U")


def test_max_len_is_one_type_whatever_was_passed():
    """Lmax is normalised at construction to a [B] float64 tensor (or None), exactly."""
    b = random_rollouts(B=3, max_len=None)
    args = (b.input_ids, b.attention_mask, b.response_start, b.advantages)
    for given in (6, 6.0, torch.tensor(6.0), torch.tensor([6.0, 6.0, 6.0], dtype=torch.float32),
                  torch.tensor([6, 6, 6])):
        ml = RolloutBatch(*args, given).max_len
        assert ml.dtype == torch.float64 and ml.shape == (3,) and ml.tolist() == [6.0, 6.0, 6.0], given
    per_prompt = RolloutBatch.from_lists([[1], [2]], [[[3], [4]], [[5], [6]]], pad_token_id=0, max_len=[4, 7.5])
    assert per_prompt.max_len.dtype == torch.float64 and per_prompt.max_len.tolist() == [4.0, 7.5]
    assert per_prompt.max_len_tensor(torch.float32).tolist() == [[4.0], [7.5]]
    assert RolloutBatch(*args).max_len is None
    sub = per_prompt.select(1, 2)
    assert sub.max_len.tolist() == [7.5] and per_prompt.to("cpu").max_len.tolist() == [4.0, 7.5]
    empty = RolloutBatch.empty(3, max_len=per_prompt.max_len)  # an empty shard of a per-prompt batch
    assert empty.num_prompts == 0 and empty.max_len.shape == (0,)
    assert RolloutBatch.empty(3).max_len is None and RolloutBatch.empty(3, max_len=4.0).max_len.shape == (0,)


def test_derived_batches_are_not_checked_again(monkeypatch):
    """A batch is validated once, at construction; select / to / with_tensors build theirs
    from the validated one."""
    import funcprobe.core.rollouts as rollouts

    b = random_rollouts(B=4)
    calls = []
    original = rollouts._validate
    monkeypatch.setattr(rollouts, "_validate", lambda batch: calls.append(batch) or original(batch))
    sub = b.select(1, 3).to("cpu")
    copied = sub.with_tensors(lambda t: t.clone())
    assert calls == []
    assert torch.equal(copied.input_ids, b.input_ids[1:3]) and torch.equal(copied.max_len, b.max_len[1:3])
    assert copied.input_ids.data_ptr() != sub.input_ids.data_ptr() and copied.response_start == b.response_start
    RolloutBatch(sub.input_ids, sub.attention_mask, sub.response_start, sub.advantages, sub.max_len)
    assert len(calls) == 1  # a batch built from its fields is checked


def test_group_advantages_is_trls_formula_and_names_bad_input():
    from funcprobe.core.advantages import group_advantages, no_signal_prompts

    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    a = group_advantages(r)
    assert torch.equal(a[0], (r[0] - r[0].mean()) / (r[0].std() + 1e-4)) and bool((a[1] == 0).all())
    assert torch.equal(group_advantages(r, "none"), r - r.mean(-1, keepdim=True))
    assert no_signal_prompts(r) == [1]
    with pytest.raises(ValueError, match="scale_rewards: expected one of"):
        group_advantages(r, "batch")
    with pytest.raises(ValueError, match="rewards: expected a \\[B, G\\] tensor"):
        group_advantages(r[0])
    with pytest.raises(ValueError, match="rewards: expected a floating dtype"):
        group_advantages(r.long())
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(r[:, :1])
