"""A verifiable task for real chat models: integer arithmetic, answers checked by parsing.

Problems are generated in code at three difficulty levels (``LEVELS``), put to the model
through its chat template, and scored 1 when the last integer of the response equals the
answer, else 0 (a binary verifiable reward, as in RLVR/GRPO recipes). Rewards become
advantages by TRL's group normalisation (``funcprobe.core.advantages.group_advantages``);
a prompt whose G rewards are all equal has all-zero advantages and carries no signal in
the update batch U: ``funcprobe.core.advantages.no_signal_prompts`` lists them.

Sampling uses ``model.generate`` at temperature 1 with no top-k/top-p truncation, so
the responses are samples of π_θ, which the entropy estimators require.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.rollouts import RolloutBatch
from ..core.advantages import group_advantages

#: level → (operator, operand range); level 1: one-digit sums, 2: two-digit sums, 3: products
LEVELS = {1: ("+", (1, 9)), 2: ("+", (10, 99)), 3: ("*", (2, 19))}
_INT = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class Problem:
    """One arithmetic question with its integer answer."""

    question: str
    answer: int
    level: int


def sample_problems(num: int, gen: torch.Generator, levels: tuple[int, ...] = tuple(LEVELS)) -> list[Problem]:
    """``num`` problems, levels cycling through ``levels``, operands drawn with ``gen``.

    Raises ``ValueError`` for an unknown level or ``num`` < 1.
    """
    if num < 1:
        raise ValueError(f"num: expected at least 1 problem, got {num}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels: expected a non-empty subset of {sorted(LEVELS)}, got {levels!r}")
    problems = []
    for i in range(num):
        level = levels[i % len(levels)]
        op, (lo, hi) = LEVELS[level]
        a, b = (int(x) for x in torch.randint(lo, hi + 1, (2,), generator=gen))
        answer = a + b if op == "+" else a * b
        problems.append(Problem(f"What is {a} {op} {b}? Answer with a number.", answer, level))
    return problems


def parse_answer(text: str) -> int | None:
    """The last integer in ``text`` (thousands separators allowed), or None."""
    found = _INT.findall(text)
    if not found:
        return None
    digits = found[-1].replace(",", "")
    return int(digits) if digits.lstrip("-") else None


def reward(text: str, answer: int) -> float:
    """1.0 when the response's last integer is the answer, else 0.0."""
    return 1.0 if parse_answer(text) == answer else 0.0


def trl_dataset(problems: list[Problem]):
    """A ``datasets.Dataset`` of ``problems`` for TRL's ``GRPOTrainer``: a conversational
    ``"prompt"`` (one user turn: the question, put through the chat template by TRL) and the
    ``"answer"`` that ``trl_reward`` receives. Needs the ``datasets`` package."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p.question}] for p in problems],
                              "answer": [p.answer for p in problems]})


def trl_reward(completions: list, answer: list[int], **kwargs) -> list[float]:
    """The task's reward as a TRL reward function: ``reward`` of each completion (a
    conversational completion's first message content, or plain text) against its answer."""
    return [reward(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]


def prompt_ids(tokenizer, problems: list[Problem]) -> list[list[int]]:
    """Token ids of each question through the tokenizer's chat template (generation prompt added)."""
    out = []
    for p in problems:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@dataclass(frozen=True)
class Rollouts:
    """Sampled rollouts with their rewards.

    Attributes:
        batch: B prompts × G responses, advantages from the rewards (TRL group scaling).
        rewards: ``[B, G]`` float64 rewards in {0, 1}.
        texts: ``[B][G]`` decoded responses.
        problems: the B problems.
    """

    batch: RolloutBatch
    rewards: Tensor
    texts: list[list[str]]
    problems: list[Problem]


@torch.no_grad()
def sample_rollouts(model: nn.Module, tokenizer, problems: list[Problem], *, group_size: int,
                    max_new_tokens: int) -> Rollouts:
    """G responses per problem from ``model.generate`` (temperature 1, no truncation), scored.

    Responses end at the tokenizer's EOS (kept) or after ``max_new_tokens``; Lmax of the
    batch is ``max_new_tokens`` (Dr. GRPO's constant). Uses the global RNG.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = prompt_ids(tokenizer, problems)
    P = max(len(p) for p in ids)
    x = torch.tensor([[pad] * (P - len(p)) + p for p in ids])
    mask = (torch.arange(P) >= torch.tensor([P - len(p) for p in ids])[:, None]).long()
    device = next(model.parameters()).device
    out = model.generate(input_ids=x.to(device), attention_mask=mask.to(device), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=group_size,
                         pad_token_id=pad, eos_token_id=eos).cpu()
    responses, texts = [], []
    for i in range(len(problems)):
        group, group_text = [], []
        for g in range(group_size):
            tokens = out[i * group_size + g, P:].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            group.append(tokens)
            group_text.append(tokenizer.decode(tokens, skip_special_tokens=True))
        responses.append(group)
        texts.append(group_text)
    rewards = torch.tensor([[reward(t, p.answer) for t in row] for row, p in zip(texts, problems)], dtype=torch.float64)
    batch = RolloutBatch.from_lists(ids, responses, pad_token_id=pad, advantages=group_advantages(rewards),
                                    max_len=float(max_new_tokens))
    return Rollouts(batch, rewards, texts, problems)
