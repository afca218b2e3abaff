"""``RolloutBatch``: B prompts × G sampled responses, padded into one tensor.

Layout (as produced by left-padded generation):

    column:   0 ........ response_start-1 | response_start ........ T-1
    content:  [pad ... pad  prompt tokens] | [response tokens  pad ... pad]

Prompts are left-padded so that every prompt ends at column ``response_start - 1``;
responses are right-padded. ``attention_mask`` is 1 on real tokens and 0 on padding.
A pure value: validated once at construction (``__post_init__``), never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class RolloutBatch:
    """A batch of rollouts for the probe.

    Attributes:
        input_ids: ``[B, G, T]`` integer token ids (prompt left-padded, response right-padded);
            B may be 0 (an empty data-parallel shard, see ``empty``).
        attention_mask: ``[B, G, T]`` 0/1 (bool or integer); 1 marks a real token.
        response_start: column where every response starts (``1 <= response_start < T``).
        advantages: optional ``[B, G]`` floating advantages A[n, g] (needed for J and μY).
        max_len: optional Lmax for ``weighting="dr_grpo"``: a positive number (tokens) or a
            ``[B]`` tensor (per prompt), typically the trainer's ``max_completion_length``.

    Raises:
        ValueError: naming the field, for a wrong shape, dtype or value: G < 2, an empty
            response, a prompt region without a real last token, holes in the padding,
            non-finite advantages, or a non-positive ``max_len``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_start: int
    advantages: Tensor | None = None
    max_len: float | Tensor | None = None
    _checked: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._checked:
            _validate(self)

    # ----------------------------------------------------------------- shapes
    @property
    def num_prompts(self) -> int:
        """B."""
        return int(self.input_ids.shape[0])

    @property
    def group_size(self) -> int:
        """G, responses per prompt."""
        return int(self.input_ids.shape[1])

    @property
    def seq_len(self) -> int:
        """T, padded length of prompt + response."""
        return int(self.input_ids.shape[2])

    def __len__(self) -> int:
        return self.num_prompts

    @property
    def response_mask(self) -> Tensor:
        """``[B, G, T]`` bool: real response tokens (the tokens S sums over)."""
        cols = torch.arange(self.seq_len, device=self.input_ids.device)
        return self.attention_mask.bool() & (cols >= self.response_start)

    @property
    def response_lengths(self) -> Tensor:
        """``[B, G]`` int64: |y[n, g]|, number of real response tokens."""
        return self.response_mask.sum(-1)

    def max_len_tensor(self, dtype: torch.dtype) -> Tensor:
        """Lmax as a ``[B, 1]`` tensor of ``dtype``. Raises ``ValueError`` if absent."""
        if self.max_len is None:
            raise ValueError(
                "max_len: weighting='dr_grpo' needs Lmax (the trainer's max completion length); "
                "pass max_len= to RolloutBatch, or use weighting='per_token_avg'"
            )
        lmax = torch.as_tensor(self.max_len, dtype=dtype, device=self.input_ids.device)
        return lmax.reshape(-1, 1).expand(self.num_prompts, 1)

    # ------------------------------------------------------------ derivations
    def select(self, start: int, stop: int) -> "RolloutBatch":
        """Prompts ``start:stop`` as a batch (validated once already, so not re-checked)."""
        if not 0 <= start <= stop <= self.num_prompts:
            raise ValueError(f"select: need 0 <= start <= stop <= {self.num_prompts}, got {start}:{stop}")
        ml = self.max_len
        if isinstance(ml, Tensor) and ml.ndim == 1:
            ml = ml[start:stop]
        return replace(
            self,
            input_ids=self.input_ids[start:stop],
            attention_mask=self.attention_mask[start:stop],
            advantages=None if self.advantages is None else self.advantages[start:stop],
            max_len=ml,
            _checked=True,
        )

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The same batch on ``device``."""
        ml = self.max_len.to(device) if isinstance(self.max_len, Tensor) else self.max_len
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            advantages=None if self.advantages is None else self.advantages.to(device),
            max_len=ml,
            _checked=True,
        )

    def require_advantages(self, argname: str) -> Tensor:
        """The advantages, or ``ValueError`` naming ``argname`` when absent."""
        if self.advantages is None:
            raise ValueError(f"{argname}: the batch has no advantages; they are needed for the update direction")
        return self.advantages

    # ------------------------------------------------------------ construction
    @classmethod
    def empty(cls, group_size: int, *, advantages: bool = True, max_len: float | None = None) -> "RolloutBatch":
        """A batch with no prompts (B = 0): a data-parallel rank whose shard is empty."""
        ids = torch.zeros((0, group_size, 2), dtype=torch.long)
        adv = torch.zeros((0, group_size)) if advantages else None
        return cls(ids, torch.zeros_like(ids), 1, adv, max_len)

    @classmethod
    def from_lists(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[Sequence[int]]],
        *,
        pad_token_id: int,
        advantages: Sequence[Sequence[float]] | Tensor | None = None,
        max_len: float | Sequence[float] | Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> "RolloutBatch":
        """Pad token-id lists into a batch.

        Args:
            prompts: B prompts, each a list of token ids.
            responses: B lists of G responses each (G equal for all prompts), token ids.
            pad_token_id: the id written in padding (masked out; any valid id works).
            advantages: optional B × G advantages.
            max_len: optional Lmax (number or B numbers) for ``dr_grpo``.

        Raises ``ValueError`` naming the argument for ragged G, empty prompts/responses,
        or mismatched lengths.
        """
        if len(prompts) == 0:
            raise ValueError("prompts: need at least one prompt")
        if len(responses) != len(prompts):
            raise ValueError(f"responses: {len(responses)} groups for {len(prompts)} prompts")
        groups = {len(r) for r in responses}
        if len(groups) != 1:
            raise ValueError(f"responses: every prompt needs the same number G of responses, got {sorted(groups)}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts: prompt {i} is empty")
        for i, group in enumerate(responses):
            for g, r in enumerate(group):
                if len(r) == 0:
                    raise ValueError(f"responses: response {g} of prompt {i} is empty")
        B, G = len(prompts), groups.pop()
        P = max(len(p) for p in prompts)
        R = max(len(r) for group in responses for r in group)
        ids = torch.full((B, G, P + R), int(pad_token_id), dtype=torch.long)
        mask = torch.zeros((B, G, P + R), dtype=torch.long)
        for i, (p, group) in enumerate(zip(prompts, responses)):
            for g, r in enumerate(group):
                ids[i, g, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
                ids[i, g, P : P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
                mask[i, g, P - len(p) : P + len(r)] = 1
        adv = None if advantages is None else torch.as_tensor(advantages, dtype=torch.float64)
        if isinstance(max_len, (list, tuple)):
            max_len = torch.as_tensor(max_len, dtype=torch.float32)
        batch = cls(ids, mask, P, adv, max_len)
        return batch.to(device) if device is not None else batch


def check_rollouts(batch: object, argname: str) -> RolloutBatch:
    """``batch`` itself, or ``TypeError`` naming ``argname`` when it is not a ``RolloutBatch``."""
    if not isinstance(batch, RolloutBatch):
        raise TypeError(f"{argname}: expected a RolloutBatch, got {type(batch).__name__}")
    return batch


def _validate(b: RolloutBatch) -> None:
    ids, mask = b.input_ids, b.attention_mask
    if not isinstance(ids, Tensor) or ids.ndim != 3:
        raise ValueError(f"input_ids: expected a [B, G, T] tensor, got {_desc(ids)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"input_ids: expected an integer dtype, got {ids.dtype}")
    B, G, T = ids.shape
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("input_ids: negative token ids")
    if G < 2:
        raise ValueError(f"input_ids: G = {G} responses per prompt; the leave-one-out baseline needs G >= 2")
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, G, T):
        raise ValueError(f"attention_mask: expected shape {(B, G, T)}, got {_desc(mask)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"attention_mask: expected a bool or integer dtype, got {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask: values must be 0 or 1")
    if not isinstance(b.response_start, int) or isinstance(b.response_start, bool):
        raise ValueError(f"response_start: expected an int, got {type(b.response_start).__name__}")
    if not 1 <= b.response_start < T:
        raise ValueError(f"response_start: must satisfy 1 <= response_start < T = {T}, got {b.response_start}")
    m = mask.bool()
    rs = b.response_start
    if not bool(m[..., rs - 1].all()):
        raise ValueError(
            f"attention_mask: every prompt must end with a real token at column response_start - 1 = {rs - 1} "
            "(prompts left-padded, the prompt region within T)"
        )
    if not bool(m[..., rs].all()):
        raise ValueError("attention_mask: a response is empty (its first column response_start is padding)")
    prompt, resp = m[..., :rs].long(), m[..., rs:].long()
    if bool((prompt.diff(dim=-1) < 0).any()):
        raise ValueError("attention_mask: padding inside a prompt; prompts must be left-padded")
    if bool((resp.diff(dim=-1) > 0).any()):
        raise ValueError("attention_mask: padding inside a response; responses must be right-padded")
    if b.advantages is not None:
        a = b.advantages
        if not isinstance(a, Tensor) or tuple(a.shape) != (B, G):
            raise ValueError(f"advantages: expected shape {(B, G)}, got {_desc(a)}")
        if not a.is_floating_point():
            raise ValueError(f"advantages: expected a floating dtype, got {a.dtype}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError("advantages: contains NaN or inf")
    if b.max_len is not None:
        ml = torch.as_tensor(b.max_len)
        if ml.ndim > 1 or (ml.ndim == 1 and ml.shape[0] != B):
            raise ValueError(f"max_len: expected a number or a [B] = [{B}] tensor, got shape {tuple(ml.shape)}")
        if not bool(torch.isfinite(ml.double()).all()) or not bool((ml > 0).all()):
            raise ValueError("max_len: Lmax must be finite and > 0")


def _desc(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    return type(x).__name__
