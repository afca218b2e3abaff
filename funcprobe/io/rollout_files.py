"""Rollout files: a JSONL schema for the evaluation batch E and the update batch U.

One line per prompt, a JSON object::

    {"prompt_ids": [15, 27, 3],                       # or "prompt": "text" (needs a tokenizer)
     "responses": [{"ids": [8, 9, 2], "reward": 1.0},   # or "text": "...", and
                   {"ids": [4, 2],    "reward": 0.0}]}  # "advantage": A instead of "reward"

* every line has the same number G ≥ 2 of responses;
* a line gives either rewards for all its responses or advantages for all of them;
* rewards are turned into group-normalised advantages as TRL's ``GRPOTrainer`` does,
  by ``funcprobe.core.advantages.group_advantages`` (``scale_rewards="group"``, TRL's
  default, or ``"none"``, Dr. GRPO);
* text is tokenized without special tokens, prompt and response separately.

Token ids are the exact format. Re-tokenizing a model-sampled response's text need not
give back the ids that were sampled (measured: 6 of 32 SmolLM2 responses came back as
other ids, and δH moved 4.7%): S is then the log-prob of other sequences than those
sampled. Responses given only as ``"text"`` are read with a ``UserWarning`` saying so; a
response may give both ``"ids"`` and ``"text"``: the ids are used, and with a tokenizer the
warning counts how many texts re-tokenize to other ids (special tokens such as a trailing
end-of-turn, which ``decode(skip_special_tokens=True)`` drops from the text, are not
counted as a difference).

Malformed lines raise ``ValueError`` with the file and line number; nothing is skipped.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..core.advantages import group_advantages
from ..core.rollouts import RolloutBatch

def read_rollouts(
    path: str | Path,
    *,
    tokenizer=None,
    max_len: float | None = None,
    scale_rewards: str = "group",
    pad_token_id: int | None = None,
) -> RolloutBatch:
    """Read a rollout file into a ``RolloutBatch`` (advantages included); arguments and errors
    as ``read_rollouts_and_rewards``."""
    return read_rollouts_and_rewards(path, tokenizer=tokenizer, max_len=max_len, scale_rewards=scale_rewards,
                                     pad_token_id=pad_token_id)[0]


def read_rollouts_and_rewards(
    path: str | Path,
    *,
    tokenizer=None,
    max_len: float | None = None,
    scale_rewards: str = "group",
    pad_token_id: int | None = None,
) -> tuple[RolloutBatch, torch.Tensor | None]:
    """Read a rollout file into a ``RolloutBatch`` (advantages included) and its rewards
    ``[B, G]`` float64 (None for a file that gives advantages).

    Args:
        path: the JSONL file.
        tokenizer: needed when lines hold text.
        max_len: Lmax for ``dr_grpo``.
        scale_rewards: ``"group"`` or ``"none"`` (see the module docstring).
        pad_token_id: id written in padding (default: the tokenizer's, else 0).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``"<file>:<line>: <what is wrong>"`` for the first malformed line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"rollouts: {str(p)!r} is not an existing file")
    prompts, responses, values, kinds = [], [], [], []
    counts = {"text": 0, "text_only": 0, "checked": 0, "differ": 0}
    G = None
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"rollouts: {str(p)!r} is not UTF-8 text (byte {err.start}): JSONL files are UTF-8") from None
    while lines and not lines[-1].strip():  # blank lines at the end of the file are allowed
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        where = f"{p}:{lineno}"
        if not line.strip():
            raise ValueError(f"{where}: empty line (every line must be one prompt's JSON object)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        prompt, resp, vals, kind = _parse_line(obj, where, tokenizer, counts)
        if G is None:
            G = len(resp)
        elif len(resp) != G:
            raise ValueError(f"{where}: {len(resp)} responses, but earlier lines have G = {G}")
        prompts.append(prompt)
        responses.append(resp)
        values.append(vals)
        kinds.append(kind)
    if not prompts:
        raise ValueError(f"{p}: the file holds no rollouts")
    _warn_retokenized(p, counts)
    if len(set(kinds)) != 1:
        first_adv = kinds.index("advantage") + 1
        raise ValueError(f"{p}:{first_adv}: mixes advantages with rewards given on other lines; use one kind per file")
    table = torch.tensor(values, dtype=torch.float64)
    adv = table if kinds[0] == "advantage" else group_advantages(table, scale_rewards)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0
    batch = RolloutBatch.from_lists(prompts, responses, pad_token_id=pad_token_id, advantages=adv, max_len=max_len)
    return batch, (table if kinds[0] == "reward" else None)


def _warn_retokenized(path: Path, counts: dict[str, int]) -> None:
    """Warn about responses read from text (see the module docstring)."""
    if counts["text_only"]:
        warnings.warn(
            f"{path}: {counts['text_only']} response(s) given only as 'text' were re-tokenized; for responses sampled "
            "from the model, re-tokenizing need not give back the sampled token ids (S would be the log-prob of other "
            "sequences): write 'ids', the exact format", UserWarning, stacklevel=3)
    if counts["differ"]:
        warnings.warn(
            f"{path}: {counts['differ']} of {counts['checked']} response(s) whose 'text' and 'ids' are both given "
            "re-tokenize to other ids than those given; the ids are used", UserWarning, stacklevel=3)


def _check_object(obj, where: str, pairs: tuple[tuple[str, str], ...], optional: tuple[str, ...] = ()) -> None:
    """``obj`` must be a JSON object with exactly one key of each pair and nothing else."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    allowed = [k for pair in pairs for k in pair] + list(optional)
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        layout = ", ".join([" | ".join(pair) for pair in pairs] + list(optional))
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {layout}")
    for a, b in pairs:
        if (a in obj) == (b in obj):
            raise ValueError(f"{where}: give exactly one of '{a}' and '{b}'")


def _parse_line(obj, where: str, tokenizer, counts: dict[str, int]):
    _check_object(obj, where, (("prompt_ids", "prompt"),), optional=("responses",))
    prompt = _ids(obj, "prompt_ids", "prompt", where, tokenizer)
    if not prompt:
        raise ValueError(f"{where}: the prompt is empty")
    resp = obj.get("responses")
    if not isinstance(resp, list) or len(resp) < 2:
        raise ValueError(f"{where}: 'responses' must be a list of at least 2 objects (G >= 2)")
    ids, vals, kinds = [], [], set()
    for g, r in enumerate(resp):
        w = f"{where}: response {g}"
        _check_object(r, w, (("reward", "advantage"),), optional=("ids", "text"))
        if "ids" not in r and "text" not in r:
            raise ValueError(f"{w}: give 'ids' (exact) or 'text' (re-tokenized), or both")
        if "text" in r and not isinstance(r["text"], str):
            raise ValueError(f"{w}: 'text' must be a string")
        toks = _ids(r, "ids", "text", w, tokenizer)
        if "text" in r:
            counts["text"] += 1
            if "ids" in r and tokenizer is not None and isinstance(r["text"], str):
                counts["checked"] += 1
                special = set(getattr(tokenizer, "all_special_ids", None) or ())  # dropped by decode(skip_special_tokens)
                counts["differ"] += (list(tokenizer(r["text"], add_special_tokens=False)["input_ids"])
                                     != [t for t in toks if t not in special])
            elif "ids" not in r:
                counts["text_only"] += 1
        if not toks:
            raise ValueError(f"{w}: the response is empty")
        kind = "reward" if "reward" in r else "advantage"
        v = r[kind]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{w}: '{kind}' must be a finite number, got {v!r}")
        ids.append(toks)
        vals.append(float(v))
        kinds.add(kind)
    if len(kinds) != 1:
        raise ValueError(f"{where}: mixes 'reward' and 'advantage' within one prompt")
    return prompt, ids, vals, kinds.pop()


def _ids(obj: dict, ids_key: str, text_key: str, where: str, tokenizer) -> list[int]:
    if ids_key in obj:
        v = obj[ids_key]
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
            raise ValueError(f"{where}: '{ids_key}' must be a list of non-negative integer token ids")
        return v
    text = obj[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: '{text_key}' must be a string")
    if tokenizer is None:
        raise ValueError(f"{where}: '{text_key}' is text, so a tokenizer is needed (--tokenizer DIR)")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def write_rollouts(
    path: str | Path,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int]]],
    *,
    rewards: Sequence[Sequence[float]] | None = None,
    advantages: Sequence[Sequence[float]] | None = None,
) -> None:
    """Write token-id rollouts in the schema above (exactly one of rewards/advantages)."""
    if (rewards is None) == (advantages is None):
        raise ValueError("write_rollouts: pass exactly one of rewards= and advantages=")
    kind, table = ("reward", rewards) if rewards is not None else ("advantage", advantages)
    with Path(path).open("w", encoding="utf-8") as fh:
        for prompt, group, vals in zip(prompts, responses, table):
            line = {"prompt_ids": list(map(int, prompt)),
                    "responses": [{"ids": list(map(int, r)), kind: float(v)} for r, v in zip(group, vals)]}
            fh.write(json.dumps(line) + "\n")
