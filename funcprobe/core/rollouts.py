"""``RolloutBatch``: B prompts × G sampled responses, padded into one tensor.

Layout (as produced by left-padded generation):

    column:   0 ........ response_start-1 | response_start ........ T-1
    content:  [pad ... pad  prompt tokens] | [response tokens  pad ... pad]

Prompts are left-padded so that every prompt ends at column ``response_start - 1``;
responses are right-padded. ``attention_mask`` is 1 on real tokens and 0 on padding.
A pure value: validated once at construction (``__post_init__``), never mutated; the
batches derived from it (``select``, ``to``, ``with_tensors``) are built by the class
without checking again.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
import numbers
from typing import Callable, Sequence

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
        max_len: optional Lmax for ``weighting="dr_grpo"`` (tokens), typically the trainer's
            ``max_completion_length``: pass a positive number (every prompt) or a ``[B]``
            tensor (per prompt); stored as a ``[B]`` float64 tensor on ``input_ids``'
            device (or ``None``), whatever was passed.

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

    def __post_init__(self) -> None:
        for name in ("input_ids", "attention_mask", "advantages", "max_len"):  # numpy arrays as tensors, same dtype
            value = getattr(self, name)
            converted = _array_like(value)
            if converted is not value:
                object.__setattr__(self, name, converted)
        _validate(self)
        if self.max_len is not None:
            object.__setattr__(self, "max_len", _max_len_tensor(self.max_len, self.num_prompts, self.input_ids.device))

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
        return self.max_len.to(device=self.input_ids.device, dtype=dtype).reshape(-1, 1)

    # ------------------------------------------------------------ derivations
    def select(self, start: int, stop: int) -> "RolloutBatch":
        """Prompts ``start:stop`` as a batch (validated once already, so not re-checked)."""
        if not 0 <= start <= stop <= self.num_prompts:
            raise ValueError(f"select: need 0 <= start <= stop <= {self.num_prompts}, got {start}:{stop}")
        return self._derived(lambda t: t[start:stop])

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The same batch on ``device``. Raises ``ValueError`` naming ``device`` for a
        device torch does not know or this machine does not have (``check_device``)."""
        device = check_device(device, "device")
        return self._derived(lambda t: t.to(device))

    def with_tensors(self, fn: Callable[[Tensor], Tensor]) -> "RolloutBatch":
        """The same batch with ``fn`` applied to each of its tensors (``input_ids``,
        ``attention_mask``, ``advantages``, ``max_len``), not checked again: ``fn`` must
        keep every value, shape and dtype (a copy out of inference mode, a move between
        devices)."""
        return self._derived(fn)

    def _derived(self, fn: Callable[[Tensor], Tensor]) -> "RolloutBatch":
        """A batch with ``fn`` applied to every tensor field, built without ``__post_init__``
        (this batch was validated and normalised at construction; ``fn`` keeps that)."""
        new = object.__new__(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(new, f.name, fn(value) if isinstance(value, Tensor) else value)
        return new

    def require_advantages(self, argname: str) -> Tensor:
        """The advantages, or ``ValueError`` naming ``argname`` when absent."""
        if self.advantages is None:
            raise ValueError(f"{argname}: the batch has no advantages; they are needed for the update direction")
        return self.advantages

    # ------------------------------------------------------------ construction
    @classmethod
    def empty(cls, group_size: int, *, advantages: bool = True,
              max_len: float | Tensor | None = None) -> "RolloutBatch":
        """A batch with no prompts (B = 0): a data-parallel rank whose shard is empty.

        ``max_len``: Lmax as for the other shards, a number or the ``[B]`` ``max_len`` of the
        batch being sharded (an empty batch has no prompts: only whether Lmax is given
        matters, so a tensor's values are not kept).
        """
        if isinstance(max_len, Tensor):
            max_len = max_len.reshape(-1)[:0]
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
            prompts: B prompts, each a list of token ids (or a ``[B, P]`` integer tensor /
                numpy array, or B integer tensors / arrays).
            responses: B lists of G responses each (G equal for all prompts), token ids
                (lists, integer tensors or numpy arrays, as ``prompts``).
            pad_token_id: the id written in padding (masked out; any valid id works).
            advantages: optional B × G advantages: lists of real numbers, or a floating
                ``[B, G]`` tensor / numpy array (rows may be floating 1-d arrays).
            max_len: optional Lmax (a number, numpy scalar, 0-d or ``[B]`` tensor / array,
                or B numbers) for ``dr_grpo``.
            device: where the batch is put (``torch.device`` or its string; default: CPU).

        Arrays are converted explicitly: integer dtypes only for token ids, floating
        dtypes only for advantages (an integer or bool array is refused, never cast).

        Raises ``ValueError`` naming the argument (and the prompt / response) for: a flat
        or ragged layout, empty prompts or responses, token ids that are not non-negative
        integers (floats are never truncated), a ``pad_token_id`` that is not a
        non-negative int (``None``: tokenizers without a pad token, e.g. GPT-2 and Llama,
        should pass ``eos_token_id``; padding is masked out), advantages that are not
        B × G real numbers, a ``max_len`` that is not a positive number or B of them, and a
        ``device`` torch does not know or this machine does not have.
        """
        if device is not None:
            device = check_device(device, "device")
        pad = _token_id(pad_token_id, "pad_token_id")
        prompts = _id_lists(prompts, "prompts", "prompt {i}")
        if len(prompts) == 0:
            raise ValueError("prompts: need at least one prompt")
        responses = _array_like(responses)
        if isinstance(responses, Tensor) and responses.ndim >= 1:  # [B, G, R]: one [G, R] per prompt
            responses = list(responses)
        if not isinstance(responses, Sequence) or isinstance(responses, (str, bytes)):
            raise ValueError(f"responses: expected B lists of G token-id lists, got {_desc(responses)}")
        if len(responses) != len(prompts):
            raise ValueError(f"responses: {len(responses)} groups for {len(prompts)} prompts")
        responses = [_id_lists(group, "responses", f"response {{i}} of prompt {n}", group_of=n)
                     for n, group in enumerate(responses)]
        groups = {len(r) for r in responses}
        if len(groups) != 1:
            raise ValueError(f"responses: every prompt needs the same number G of responses, got {sorted(groups)}")
        if groups == {0}:
            raise ValueError("responses: every prompt has G = 0 responses; the leave-one-out baseline needs G >= 2")
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
        ids = torch.full((B, G, P + R), pad, dtype=torch.long)
        mask = torch.zeros((B, G, P + R), dtype=torch.long)
        for i, (p, group) in enumerate(zip(prompts, responses)):
            for g, r in enumerate(group):
                ids[i, g, P - len(p) : P] = torch.as_tensor(p, dtype=torch.long)
                ids[i, g, P : P + len(r)] = torch.as_tensor(r, dtype=torch.long)
                mask[i, g, P - len(p) : P + len(r)] = 1
        adv = None if advantages is None else _real_table(advantages, B, G)
        max_len = _max_len_value(max_len, B)
        batch = cls(ids, mask, P, adv, max_len)
        return batch.to(device) if device is not None else batch


def _token_id(value: object, argname: str) -> int:
    if value is None:
        raise ValueError(f"{argname}: None; for a tokenizer without a pad token (GPT-2, Llama) pass its "
                         "eos_token_id: padding is masked out, any valid id works")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value)
        else:
            raise ValueError(f"{argname}: expected an int token id >= 0, got {value!r}")
    if int(value) < 0:
        raise ValueError(f"{argname}: expected a token id >= 0, got {value}")
    return int(value)


def _id_lists(rows: object, argname: str, what: str, group_of: int | None = None) -> list[list[int]]:
    """``rows`` as lists of int token ids, or ``ValueError`` naming ``argname`` and the row."""
    given, rows = rows, _array_like(rows)
    if isinstance(rows, Tensor):
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise ValueError(f"{argname}: got {_desc(given)}; token ids are integers (floats are not truncated)")
        rows = rows.tolist()
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        where = "" if group_of is None else f" for prompt {group_of}"
        raise ValueError(f"{argname}: expected a list of token-id lists{where}, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        given, row = row, _array_like(row)
        if isinstance(row, Tensor):
            if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
                raise ValueError(f"{argname}: {what.format(i=i)} holds {_dtype(given)} values; token ids are integers")
            row = row.tolist()
        if isinstance(row, numbers.Number) or not isinstance(row, Sequence) or isinstance(row, (str, bytes)):
            raise ValueError(
                f"{argname}: {what.format(i=i)} is {type(row).__name__}, not a list of token ids"
                + (" (a flat list? pass one token-id list per prompt)" if isinstance(row, numbers.Number) else "")
            )
        bad = [t for t in row if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0]
        if bad:
            raise ValueError(f"{argname}: {what.format(i=i)} has {bad[:3]!r}: token ids must be ints >= 0 "
                             "(floats are not truncated)")
        out.append([int(t) for t in row])
    return out


def _real_table(values: object, B: int, G: int) -> Tensor:
    """B × G real numbers as float64, or ``ValueError`` naming ``advantages``."""
    given, values = values, _array_like(values)
    if isinstance(values, Tensor):
        if not values.is_floating_point():
            raise ValueError(f"advantages: expected floating values, got {_desc(given)} (convert explicitly, "
                             "e.g. .astype(float) or .double(); integer and bool values are not cast)")
        if tuple(values.shape) != (B, G):
            raise ValueError(f"advantages: expected shape [B, G] = [{B}, {G}], got {_desc(given)}")
        return values.to(torch.float64)
    rows = list(values) if isinstance(values, Sequence) and not isinstance(values, (str, bytes)) else None
    if rows is None or len(rows) != B:
        raise ValueError(f"advantages: expected B = {B} rows of G = {G} numbers, got {type(values).__name__}"
                         + (f" of {len(rows)} rows" if rows is not None else ""))
    table = []
    for n, row in enumerate(rows):
        given, row = row, _array_like(row)
        if isinstance(row, Tensor):
            if not row.is_floating_point() or row.ndim != 1:
                raise ValueError(f"advantages: row {n} is {_desc(given)}; expected G = {G} floating values")
            row = row.tolist()
        if not isinstance(row, Sequence) or isinstance(row, (str, bytes)) or len(row) != G:
            raise ValueError(f"advantages: row {n} must hold G = {G} numbers, got {row!r}")
        bad = [v for v in row if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad:
            raise ValueError(f"advantages: row {n} holds {bad[:3]!r}; expected real numbers")
        table.append([float(v) for v in row])
    return torch.tensor(table, dtype=torch.float64)


def _max_len_value(value: object, B: int) -> float | Tensor | None:
    """Lmax: None, a positive number, or B positive numbers (as a float64 tensor)."""
    value = _array_like(value)
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
            raise ValueError(f"max_len: expected a number or B = {B} numbers (Lmax, tokens), got {value!r}")
        return torch.as_tensor([float(v) for v in value], dtype=torch.float64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"max_len: expected a number (Lmax, tokens), got {value!r}")
    return float(value)


def _max_len_tensor(value: float | Tensor, B: int, device: torch.device) -> Tensor:
    """A validated Lmax (a number, a 0-d or a ``[B]`` tensor) as a ``[B]`` float64 tensor on
    ``device`` (exact: float64 holds every float32 and Python float)."""
    return torch.as_tensor(value, dtype=torch.float64).to(device).reshape(-1).expand(B).clone()


def _array_like(value: object) -> object:
    """A numpy array (any object with ``__array__`` that is not a tensor, number or string)
    as a tensor of the same dtype (``torch.as_tensor``: nothing cast); an object array
    (ragged rows) as the list of its rows; anything else, and arrays of a dtype torch has
    no tensor for, unchanged (the caller's check names them)."""
    if isinstance(value, (Tensor, numbers.Number, str, bytes, list, tuple)) or not hasattr(value, "__array__"):
        return value
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype == object:
        return list(arr) if arr.ndim >= 1 else value
    try:
        return torch.as_tensor(arr)
    except (TypeError, RuntimeError):
        return value


def check_device(device: object, argname: str) -> torch.device:
    """``device`` as a ``torch.device``: one torch knows (``"cpu"``, ``"cuda:1"``, a
    ``torch.device``) and this machine has (CUDA/MPS/XPU available, the index in range).

    Raises ``ValueError`` naming ``argname`` and what was expected."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"{argname}: expected a torch device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{argname}: {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if dev.type in ("cpu", "meta"):
        return dev
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(dev.type, getattr(torch, dev.type, None))
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ValueError(f"{argname}: {device!r} but this torch build has no {dev.type.upper()} device available "
                         "(use 'cpu')")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ValueError(f"{argname}: {device!r} but there are {count()} {dev.type.upper()} device(s) "
                         f"(indices 0..{count() - 1})")
    return dev


def check_rollouts(batch: object, argname: str) -> RolloutBatch:
    """``batch`` itself, or ``TypeError`` naming ``argname`` when it is not a ``RolloutBatch``."""
    if not isinstance(batch, RolloutBatch):
        raise TypeError(f"{argname}: expected a RolloutBatch, got {type(batch).__name__}")
    return batch


def _validate(b: RolloutBatch) -> None:
    ids, mask = b.input_ids, b.attention_mask
    if not isinstance(ids, Tensor) or ids.ndim != 3:
        raise ValueError(f"input_ids: expected a [B, G, T] tensor, got {_desc(ids)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected int64 (or int32) token ids, got {ids.dtype}")
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
        if not isinstance(b.max_len, Tensor) and (isinstance(b.max_len, bool) or not isinstance(b.max_len, numbers.Real)):
            raise ValueError(f"max_len: expected a number or a [B] tensor (Lmax, tokens), got {b.max_len!r}")
        ml = torch.as_tensor(b.max_len)
        if ml.dtype == torch.bool or ml.is_complex():
            raise ValueError(f"max_len: expected real numbers (Lmax, tokens), got {_dtype(ml)} values")
        if ml.ndim > 1 or (ml.ndim == 1 and ml.shape[0] != B):
            raise ValueError(f"max_len: expected a number or a [B] = [{B}] tensor, got shape {tuple(ml.shape)}")
        if not bool(torch.isfinite(ml.double()).all()) or not bool((ml > 0).all()):
            raise ValueError("max_len: Lmax must be finite and > 0")
        lengths = (m[..., rs:]).sum(-1)
        over = (lengths.double() > ml.double().reshape(-1, 1).expand(B, G)).nonzero().tolist() if B else []
        if over:
            n, g = over[0]
            raise ValueError(
                f"max_len: response {g} of prompt {n} has {int(lengths[n, g])} tokens, more than Lmax = "
                f"{float(ml.reshape(-1)[n if ml.ndim else 0]):g} ({len(over)} response(s) exceed it); Dr. GRPO's "
                "S / Lmax needs Lmax >= every response length (the trainer's max_completion_length)"
            )


def _dtype(x: object) -> str:
    """The dtype of a tensor or array, without torch's ``torch.`` prefix."""
    return str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")


def _desc(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {_dtype(x)}"
    if hasattr(x, "__array__") and hasattr(x, "dtype") and hasattr(x, "shape"):
        return f"a {type(x).__module__}.{type(x).__name__} of shape {tuple(x.shape)} and dtype {_dtype(x)}"
    return type(x).__name__
