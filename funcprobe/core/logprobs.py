"""S(θ): teacher-forced sequence log-probs of the responses, as a pure function.

``S[n, g](θ) = Σ_{t ∈ response} log π_θ(y_t | x_n, y_<t)`` (docs/definitions.md#sequence-log-prob).

* temperature 1: logits are never divided by a sampling temperature (docs/failure-modes.md#4-temperature,
  seeds 001 §E and 004 §E);
* ``position_ids = cumsum(attention_mask) - 1``, so an absolute-position model (GPT-2)
  sees the positions it had at sampling time and S does not depend on the amount of
  left padding (failure 7);
* log-softmax in float32 or wider (the logits' dtype promoted with float32);
* padding is removed by selection (``torch.where``), never by multiplication, so a
  NaN at a padded position cannot leak into S or its tangent (failure 6);
* the forward is ``torch.func.functional_call(module, params, ...)`` (failure 1);
* the LM head and log-softmax run on response tokens only, in chunks
  (``funcprobe.core.lm_head``): no ``[N, T, V]`` logits at real vocabularies.

Sources: docs/definitions.md#sequence-log-prob, docs/failure-modes.md.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .lm_head import chunked_token_values, head_split, head_values, token_chunk_size
from .rollouts import RolloutBatch
from ..forward.head import linear_logprobs

#: what ``functional_call`` takes: one name→tensor dict, or several with disjoint names
Params = Union[Mapping[str, Tensor], Sequence[Mapping[str, Tensor]]]


def sequence_logprobs(module: nn.Module, params: Params, batch: RolloutBatch, *, token_chunk: int | None = None,
                      full_logits: bool = False) -> Tensor:
    """S for every response of ``batch``, as a function of ``params``.

    Each sequence is shifted so that its first real token sits in column 0 (the padding
    all trails). No query row is then fully masked, so attention implementations that
    turn a fully masked row into NaN (measured: Qwen2 eager attention in float64, whose
    float32 softmax sees ``-inf`` everywhere) cannot leak NaN from padding into real
    tokens; S is unchanged by this, as it does not depend on padding.

    Args:
        module: the canonical module (``ParamRegistry.module``), any ``nn.Module`` with the
            Hugging Face causal-LM calling convention: ``input_ids``, ``attention_mask`` and
            ``position_ids`` (each ``[N, T]``) in, an output with ``.logits`` (or a logits
            tensor, or a tuple whose first item is one) ``[N, T, V]`` out.
        params: name→tensor for ``functional_call``, or a tuple of such dicts with
            disjoint names (e.g. ``(frozen, theta)``; parameters not named come from the
            module itself).
        batch: the rollouts (B prompts × G responses × T columns).
        token_chunk: response tokens per LM-head chunk (``funcprobe.core.lm_head``);
            None: as many as fit ``LOGITS_CHUNK_BYTES`` of float32 logits.
        full_logits: run the model's own forward to full ``[N, T, V]`` logits instead
            of the chunked head (the reference the chunked path is tested against).

    Models that ``funcprobe.core.lm_head.head_split`` can cut into body and head never
    hold logits of more than ``token_chunk`` tokens at once; others are run whole.

    Returns:
        ``[B, G]`` tensor of summed log-probs (nats), dtype float32 or the logits' dtype
        if wider.

    Raises:
        ValueError: the module returns logits of an unexpected shape.
    """
    return response_sums(module, params, batch, token_logprobs, token_chunk=token_chunk, full_logits=full_logits)


def sequence_token_entropies(module: nn.Module, params: Params, batch: RolloutBatch, *,
                             token_chunk: int | None = None, full_logits: bool = False) -> Tensor:
    """``[B, G]`` Σ_t H_t: the next-token entropies (nats) summed over each response's positions.

    ``H_t = −Σ_v π_θ(v | x, y_<t) log π_θ(v | x, y_<t)``, teacher-forced on the sampled
    responses; the quantity TRL and verl log as ``entropy`` is its mean over completion
    tokens. By the chain rule of entropy, E_{y∼π_θ}[Σ_t H_t] = H(π_θ(· | x)), the
    sequence entropy funcprobe predicts (docs/definitions.md#logged-token-entropy).
    Arguments, chunking and dtype as ``sequence_logprobs``.
    """
    return response_sums(module, params, batch, token_entropies, token_chunk=token_chunk, full_logits=full_logits)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[target]``: ``[..., V]``, ``[...]`` → ``[...]``."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_entropies(logits: Tensor, targets: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)``: ``[..., V]`` → ``[...]`` (``targets`` unused)."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def logprobs_and_entropies(logits: Tensor, targets: Tensor) -> Tensor:
    """``[..., 2]``: the target's log-prob and the entropy, from one pass over the logits."""
    return torch.stack([token_logprobs(logits, targets), token_entropies(logits, targets)], -1)


#: ``(float32 logits [..., V], targets [...]) → [...]`` or ``[..., k]``
TokenFn = Callable[[Tensor, Tensor], Tensor]


def response_sums(module: nn.Module, params: Params, batch: RolloutBatch, token_fn: TokenFn, *,
                  token_chunk: int | None = None, full_logits: bool = False) -> Tensor:
    """``[B, G]`` (or ``[B, G, k]``) Σ over response tokens of ``token_fn(logits, target)``.

    The one forward behind ``sequence_logprobs`` (``token_logprobs``),
    ``sequence_token_entropies`` (``token_entropies``) and both at once
    (``logprobs_and_entropies``, ``[B, G, 2]``); the logits are float32 or wider, in
    chunks of ``token_chunk`` response tokens where the head can be split.
    """
    B, G, _ = batch.input_ids.shape
    per_column, _ = _response_columns(module, params, batch, token_fn, token_chunk, full_logits)
    return per_column.sum(1).reshape(B, G, *per_column.shape[2:])


def response_token_values(module: nn.Module, params: Params, batch: RolloutBatch, token_fn: TokenFn | None = None, *,
                          token_chunk: int | None = None, full_logits: bool = False) -> Tensor:
    """``[B, G, T]`` ``token_fn(logits, target)`` per response token, in ``batch.input_ids``'s columns.

    Entry ``[n, g, t]`` is the value for the token at column t (e.g. log π(y_t | x, y_<t)
    with the default ``token_logprobs``); 0 at prompt and padding columns (set by
    selection, never by multiplication). Summed over T it is ``response_sums``.
    """
    token_fn = token_fn or token_logprobs
    B, G, T = batch.input_ids.shape
    per_column, shift = _response_columns(module, params, batch, token_fn, token_chunk, full_logits)
    N, L1 = per_column.shape[:2]
    if per_column.ndim != 2:
        raise ValueError("response_token_values: token_fn must return one value per token")
    # aligned column j holds the target at aligned column j + 1, i.e. at column j + 1 + shift
    cols = (torch.arange(1, L1 + 1, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)).clamp(max=T - 1)
    out = per_column.new_zeros((N, T)).scatter_add(1, cols, per_column)  # padding adds exact zeros
    return out.reshape(B, G, T)


def aligned_inputs(module: nn.Module, batch: RolloutBatch) -> tuple[dict, Tensor, Tensor, nn.Module, dict]:
    """The forward's keyword inputs for ``batch`` with every row left-aligned (``_left_aligned``):
    (kwargs with ``input_ids``/``attention_mask``/``position_ids`` ``[N, L]`` and ``use_cache=False``
    where accepted, the response mask ``[N, L]``, the shift ``[N]`` of each row, the causal-LM
    module whose signature was read, the extra keywords)."""
    B, G, T = batch.input_ids.shape
    N = B * G
    ids, mask, resp, shift = _left_aligned(
        batch.input_ids.reshape(N, T), batch.attention_mask.reshape(N, T).long(), batch.response_mask.reshape(N, T)
    )
    owner = _forward_owner(module)
    extra = {"use_cache": False} if "use_cache" in _accepted_kwargs(owner) else {}
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), **extra}
    return kwargs, resp, shift, owner, extra


def _response_columns(module: nn.Module, params: Params, batch: RolloutBatch, token_fn: TokenFn,
                      token_chunk: int | None, full_logits: bool) -> tuple[Tensor, Tensor]:
    """(``[N, L - 1, ...]`` token values in left-aligned columns, zeros off response
    targets; ``[N]`` the left padding each row was shifted by)."""
    B, G, T = batch.input_ids.shape
    N = B * G
    kwargs, resp, shift, owner, extra = aligned_inputs(module, batch)
    ids = kwargs["input_ids"]
    split = None if full_logits else head_split(module, owner, extra)
    if split is None:
        prompt_lens = _prompt_lengths(batch).reshape(N)
        return _unsplit_token_values(module, params, kwargs, resp, prompt_lens, token_fn), shift
    merged = _merged(params)
    h = split.hidden(merged, kwargs)  # [N, L, D]
    L = ids.shape[1]
    if h.ndim != 3 or h.shape[:2] != (N, L):
        raise ValueError(f"model: expected hidden states of shape [{N}, {L}, D], got {tuple(h.shape)}")
    # the hidden state at column j predicts the token at column j + 1; keep response targets only
    flat = resp[:, 1:].reshape(-1).nonzero().squeeze(-1)  # [M] indices into [N * (L - 1)]
    h_sel = h[:, :-1].reshape(N * (L - 1), h.shape[-1]).index_select(0, flat)
    targets = ids[:, 1:].reshape(-1).index_select(0, flat)
    chunk = token_chunk or token_chunk_size(split.vocab_size)
    linear = split.linear_weights(merged) if token_fn is token_logprobs else None
    if linear is not None:  # one op, so that forward mode can use its own rule (funcprobe.forward.head)
        weight, bias = linear

        def values(hc: Tensor, tc: Tensor) -> Tensor:
            return linear_logprobs(hc, weight, bias, tc)
    else:
        values = head_values(split.logits_fn(merged), token_fn)
    per_token = chunked_token_values(values, h_sel, targets, chunk)
    per_column = per_token.new_zeros((N * (L - 1), *per_token.shape[1:])).index_copy(0, flat, per_token)
    return per_column.reshape(N, L - 1, *per_token.shape[1:]), shift


def _unsplit_token_values(module: nn.Module, params: Params, kwargs: dict, resp: Tensor, prompt_lens: Tensor,
                          token_fn: TokenFn) -> Tensor:
    """``[N, L - 1, ...]`` values from the model's own full ``[N, T', V]`` logits (models the
    head split cannot drive), in the aligned columns of ``_response_columns``."""
    ids = kwargs["input_ids"]
    N, T = ids.shape
    first = int(prompt_lens.min()) - 1  # earliest column whose logits predict a response token
    keep = T - first
    if "logits_to_keep" in _accepted_kwargs(_forward_owner(module)):
        kwargs = dict(kwargs, logits_to_keep=keep)
    logits = _logits(functional_call(module, _as_dicts(params), (), kwargs, tie_weights=True, strict=False))
    if logits.ndim != 3 or logits.shape[0] != N or logits.shape[1] not in (T, keep):
        raise ValueError(
            f"model: expected logits of shape [{N}, {T}, V] (or [{N}, {keep}, V]), got {tuple(logits.shape)}; "
            "prompt-learning adapters that add virtual tokens are not supported"
        )
    logits = logits[:, -keep:-1]  # columns first .. T-2 predict the tokens at first+1 .. T-1
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_token = token_fn(logits, ids[:, first + 1 :])  # [N, T'', ...]
    selected = resp[:, first + 1 :].reshape(*resp[:, first + 1 :].shape, *([1] * (per_token.ndim - 2)))
    per_token = torch.where(selected, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if first == 0:
        return per_token
    return torch.cat([per_token.new_zeros((N, first, *per_token.shape[2:])), per_token], 1)


def logprob_function(module: nn.Module, frozen: Mapping[str, Tensor], *,
                     per_token: bool = False) -> Callable[[dict, RolloutBatch], Tensor]:
    """S as a pure function of the probed parameters: ``(theta, batch) ↦ [B, G]``.

    ``sequence_logprobs`` closed over ``module`` and the ``frozen`` parameters (passed to
    ``functional_call`` beside ``theta``); what the edge hands the core's transforms.
    With ``per_token``: the token log-probs ``[B, G, T]`` of ``response_token_values``.
    """
    frozen = dict(frozen)

    def logprobs(theta: dict, batch: RolloutBatch) -> Tensor:
        if per_token:
            return response_token_values(module, (frozen, theta), batch, token_logprobs)
        return sequence_logprobs(module, (frozen, theta), batch)

    return logprobs


def _merged(params: Params) -> dict[str, Tensor]:
    if isinstance(params, Mapping):
        return dict(params)
    out: dict[str, Tensor] = {}
    for p in params:
        out.update(p)
    return out


def _as_dicts(params: Params) -> dict[str, Tensor] | tuple[dict[str, Tensor], ...]:
    if isinstance(params, Mapping):
        return dict(params)
    return tuple(dict(p) for p in params)


def _prompt_lengths(batch: RolloutBatch) -> Tensor:
    """``[B, G]`` number of real prompt tokens."""
    return batch.attention_mask[..., : batch.response_start].long().sum(-1)


def _left_aligned(ids: Tensor, mask: Tensor, resp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shift every row left by its amount of left padding and cut the all-padding tail.

    ``ids``/``mask``/``resp``: ``[N, T]``. Returns the same three, ``[N, L]`` with L the
    longest real length (moved-in columns are padding: mask 0, ``resp`` False), and the
    shift ``[N]`` of each row.
    """
    N, T = mask.shape
    cols = torch.arange(T, device=mask.device)
    shift = (mask.cumsum(-1) == 0).sum(-1)  # leading padding per row
    lengths = mask.sum(-1)
    L = int(lengths.max())
    src = (cols[:L].unsqueeze(0) + shift.unsqueeze(1)).clamp(max=T - 1)
    inside = cols[:L].unsqueeze(0) < lengths.unsqueeze(1)
    shifted = ids.gather(1, src)
    ids = torch.where(inside, shifted, shifted[:, :1].expand(N, L))  # padding: the row's first real token
    mask = torch.where(inside, mask.gather(1, src), torch.zeros_like(mask[:, :L]))
    resp = inside & resp.gather(1, src)
    return ids, mask, resp, shift


def _logits(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"model: the forward returned {type(out).__name__}; expected .logits or a logits tensor")


def _forward_owner(module: nn.Module) -> nn.Module:
    """The module whose ``forward`` signature tells which keywords reach the LM.

    ``peft.PeftModel`` forwards ``**kwargs`` to its base model, so look there.
    """
    if hasattr(module, "get_base_model"):
        return module.get_base_model()
    return module


def _accepted_kwargs(module: nn.Module) -> frozenset[str]:
    return _signature_names(type(module))


@functools.lru_cache(maxsize=None)
def _signature_names(cls: type) -> frozenset[str]:
    try:
        sig = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
