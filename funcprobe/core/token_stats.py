"""Per-token statistics of the next-token distributions and their tangents along a direction.

The effects pass (docs/derivations.md#predicted-effects) needs, at every response position
t of every sequence, reductions over the vocabulary of the logits z_t and of their tangent
ż_t = d/dε z_t(θ + ε·Δ), with p_t = softmax(z_t), log p_t = log_softmax(z_t),
ż̄_t = Σ_v p_t(v) ż_t(v) (all in nats):

========================  ============================================  ==========
column (``TOKEN_STATS``)  value                                          order
========================  ============================================  ==========
``logprob``               log p_t(y_t)                                   primal
``entropy``               H_t = −Σ_v p_t(v) log p_t(v)                   primal
``logprob_tangent``       ṡ_t = ż_t(y_t) − ż̄_t  (d/dε log p_t(y_t))       tangent
``entropy_tangent``       Ḣ_t = −Σ_v p_t(v) (ż_t(v) − ż̄_t) log p_t(v)     tangent
``tangent_variance``      V_t = Σ_v p_t(v) (ż_t(v) − ż̄_t)²               quadratic
========================  ============================================  ==========

V_t is not a tangent of any function of θ (it is quadratic in Δ): it is the second
derivative of KL(p_t(θ) ‖ p_t(θ + εΔ)) in ε at 0, so ½ε²·V_t is that KL to second order.
It cannot come out of a ``torch.func.jvp`` of a function of θ, so the pass is cut where the
model is: one ``jvp`` of the body (θ ↦ the hidden states of response tokens, the costly
part) gives h and ḣ; then the LM head is applied ``token_chunk`` tokens at a time with its
own ``jvp`` (z, ż from h, ḣ and the head's tangent, if the head is probed), and the five
reductions are taken from z and ż in float32 or wider. No ``[N, T, V]`` logits or tangents
are held (as in ``funcprobe.core.lm_head``). A model the head split cannot drive runs its
whole forward under one ``jvp`` to response logits (exact, heavier).

Pure: no module state, no ``.grad``; the caller (``funcprobe.run``) runs it inside the
probe session. Sources: docs/derivations.md#predicted-effects.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Mapping

import torch
from torch import Tensor, nn
from torch.func import jvp

from .lm_head import head_split, token_chunk_size
from .logprobs import _prompt_lengths, _unsplit_token_values, aligned_inputs
from .rollouts import RolloutBatch

#: the columns of ``token_stats``'s last dimension
TOKEN_STATS = ("logprob", "entropy", "logprob_tangent", "entropy_tangent", "tangent_variance")
LOGPROB, ENTROPY, LOGPROB_TANGENT, ENTROPY_TANGENT, TANGENT_VARIANCE = range(len(TOKEN_STATS))


def vocab_reductions(z: Tensor, zdot: Tensor, targets: Tensor) -> Tensor:
    """The ``TOKEN_STATS`` of logits ``z`` ``[m, V]`` with tangent ``zdot`` ``[m, V]`` and
    targets ``[m]`` (int64 in ``[0, V)``): ``[m, 5]`` in the promoted dtype (float32 or wider).

    The inputs are not changed (this copies them once; ``token_stats`` calls
    ``_reductions_into`` on its own chunk tensors instead). A row with a logit of −inf (a
    masked vocabulary entry: p = 0, 0·log 0 taken as 0) never gives NaN.
    """
    dtype = _stats_dtype(z, zdot)
    return _reductions_into(z.to(dtype, copy=True), zdot.to(dtype, copy=True), targets, Workspace())


class Workspace:
    """Two ``[m, V]`` buffers reused across the token chunks of one pass.

    The reductions are bound by writing ``[m, V]`` tensors, and a fresh tensor of that size
    costs its page faults on every chunk (measured on one CPU thread, m = 256, V = 151,936:
    ``torch.exp(z)`` 0.10 s into a new tensor, 0.033 s into a reused one; an in-place
    subtraction 0.006 s). Local to one ``token_stats`` call: no state outlives it.
    """

    def __init__(self) -> None:
        self._buffers: tuple[Tensor, Tensor] | None = None

    def get(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Two uninitialised buffers of ``like``'s shape, dtype and device (views of the largest seen)."""
        m, V = like.shape
        b = self._buffers
        if b is None or b[0].shape[0] < m or b[0].shape[1] != V or b[0].dtype != like.dtype or b[0].device != like.device:
            b = self._buffers = (torch.empty_like(like), torch.empty_like(like))
        return b[0][:m], b[1][:m]


def _stats_dtype(z: Tensor, zdot: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(z.dtype, zdot.dtype), torch.float32)


def _reductions_into(z: Tensor, zdot: Tensor, targets: Tensor, work: Workspace) -> Tensor:
    """``vocab_reductions`` that overwrites ``z`` (with log p) and ``zdot`` (with ż − ż̄),
    both ``[m, V]`` of one float dtype (float32 or wider) and owned by the caller.

    No ``[m, V]`` tensor is allocated beyond ``work``'s two buffers: one exp, in-place
    shifts, and each reduction as an elementwise product into a buffer summed over V
    (torch's cascade summation): log p = z − max − log Σ exp, H = −Σ p log p,
    ż̄ = Σ p ż, d = ż − ż̄, Ḣ = −Σ (p∘d) log p, V = Σ (p∘d) d.
    """
    masked = z.amin(-1) == float("-inf")  # rows with a masked logit: recomputed below
    kept = (z[masked].clone(), zdot[masked].clone()) if bool(masked.any()) else None
    y = targets.unsqueeze(-1)
    p, prod = work.get(z)
    z.sub_(z.amax(-1, keepdim=True))
    torch.exp(z, out=p)
    total = p.sum(-1, keepdim=True)
    z.sub_(total.log())  # z is log p now
    p.div_(total)
    zbar = torch.mul(p, zdot, out=prod).sum(-1)
    entropy = -torch.mul(p, z, out=prod).sum(-1)
    zdot.sub_(zbar.unsqueeze(-1))  # zdot is d = ż − ż̄ now
    p.mul_(zdot)  # p is p∘d now
    out = torch.stack([z.gather(-1, y).squeeze(-1), entropy, zdot.gather(-1, y).squeeze(-1),
                       -torch.mul(p, z, out=prod).sum(-1), torch.mul(p, zdot, out=prod).sum(-1)], -1)
    if kept is not None:
        out[masked] = _masked_rows(*kept, targets[masked])
    return out


def _masked_rows(z: Tensor, zdot: Tensor, targets: Tensor) -> Tensor:
    """The reductions of rows with logits of −inf, with 0·log 0 = 0 explicitly (small: a few rows)."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    dev = zdot - (p * zdot.masked_fill(p == 0, 0)).sum(-1, keepdim=True)
    dev = dev.masked_fill(p == 0, 0)
    lp0 = logp.masked_fill(p == 0, 0)
    y = targets.unsqueeze(-1)
    return torch.stack([logp.gather(-1, y).squeeze(-1), -(p * lp0).sum(-1), dev.gather(-1, y).squeeze(-1),
                        -(p * dev * lp0).sum(-1), (p * dev * dev).sum(-1)], -1)


def token_stats(module: nn.Module, frozen: Mapping[str, Tensor], theta: Mapping[str, Tensor],
                tangent: Mapping[str, Tensor], batch: RolloutBatch, *, token_chunk: int | None = None) -> Tensor:
    """``[B, G, T, 5]`` float64 ``TOKEN_STATS`` at every response token of ``batch`` along ``tangent``.

    Args:
        module: the canonical module (``ParamRegistry.module``), Hugging Face causal-LM
            calling convention (see ``funcprobe.core.logprobs.sequence_logprobs``).
        frozen: the parameters not probed, name → tensor (passed to ``functional_call``).
        theta: the probed parameters, name → tensor (the primal).
        tangent: Δ, with ``theta``'s names, shapes, dtypes and devices.
        batch: the rollouts (B prompts × G responses × T columns).
        token_chunk: response tokens per LM-head chunk; None: ``token_chunk_size`` of the
            vocabulary.

    Entry ``[n, g, t]`` belongs to the token at column t (predicted from the columns
    before it); prompt and padding columns are 0 (set by selection). Summed over T, the
    ``logprob`` column is S and the ``logprob_tangent`` column is dS/dε along ``tangent``.

    Raises:
        ValueError: the module returns hidden states or logits of an unexpected shape.
    """
    B, G, T = batch.input_ids.shape
    N = B * G
    kwargs, resp, shift, owner, extra = aligned_inputs(module, batch)
    ids = kwargs["input_ids"]
    theta, tangent, frozen = dict(theta), dict(tangent), dict(frozen)
    split = head_split(module, owner, extra)
    L = ids.shape[1]
    if split is None:
        prompt_lens = _prompt_lengths(batch).reshape(N)

        def response_logits(t: dict) -> Tensor:
            return _unsplit_token_values(module, (frozen, t), kwargs, resp, prompt_lens, _logits_only)

        return _placed(_whole_forward_stats(response_logits, theta, tangent, ids, resp), shift, batch)
    flat = resp[:, 1:].reshape(-1).nonzero().squeeze(-1)  # [M] response targets in [N * (L - 1)]

    def hidden(t: dict) -> Tensor:
        h = split.hidden({**frozen, **t}, kwargs)
        if h.ndim != 3 or h.shape[:2] != (N, L):
            raise ValueError(f"model: expected hidden states of shape [{N}, {L}, D], got {tuple(h.shape)}")
        return h[:, :-1].reshape(N * (L - 1), h.shape[-1]).index_select(0, flat)

    h, hdot = jvp(hidden, (theta,), (tangent,))
    targets = ids[:, 1:].reshape(-1).index_select(0, flat)
    head_names = [full for full in split.head_params.values() if full in theta]
    rest = {**frozen, **{n: v for n, v in theta.items() if n not in head_names}}
    head_theta = {n: theta[n] for n in head_names}
    head_tangent = {n: tangent[n] for n in head_names}

    def logits(hp: dict, x: Tensor) -> Tensor:
        return split.logits_fn({**rest, **hp})(x)

    chunk = token_chunk or token_chunk_size(split.vocab_size)
    out, work = [], Workspace()
    for a in range(0, h.shape[0], chunk):
        z, zdot = jvp(logits, (head_theta, h[a:a + chunk]), (head_tangent, hdot[a:a + chunk]))
        dtype = _stats_dtype(z, zdot)  # the chunk's own tensors: overwritten in place
        out.append(_reductions_into(z.to(dtype), zdot.to(dtype), targets[a:a + chunk], work).double())
    return _placed(_at_rows(out, flat, N * (L - 1), h.device).reshape(N, L - 1, len(TOKEN_STATS)), shift, batch)


def whole_forward_token_stats(module: nn.Module, install: Callable[[dict], ContextManager], theta: Mapping[str, Tensor],
                              tangent: Mapping[str, Tensor], batch: RolloutBatch) -> Tensor:
    """``token_stats`` through the model's own whole forward, θ put in place by ``install``:
    for models whose parameters only a forward hook can replace (FSDP2: ``funcprobe.edge.fsdp.
    installed``, after FSDP's all-gather). One ``jvp`` of θ ↦ the response logits
    ``[N, L - 1, V]`` (exact; holds that many logits and tangents per chunk).

    Args:
        module: the canonical module, called with no parameters passed (its own forward).
        install: ``install(t)`` is a context manager within which every forward of ``module``
            uses ``t[name]`` for the named parameters.
        theta, tangent, batch: as for ``token_stats``.

    Returns ``[B, G, T, 5]`` float64, as ``token_stats``. Raises ``ValueError`` for logits of
    an unexpected shape.
    """
    N = batch.num_prompts * batch.group_size
    kwargs, resp, shift, _, _ = aligned_inputs(module, batch)
    prompt_lens = _prompt_lengths(batch).reshape(N)

    def response_logits(t: dict) -> Tensor:
        with install(t):
            return _unsplit_token_values(module, ({}, {}), kwargs, resp, prompt_lens, _logits_only)

    return _placed(_whole_forward_stats(response_logits, dict(theta), dict(tangent), kwargs["input_ids"], resp),
                   shift, batch)


def _logits_only(z: Tensor, targets: Tensor) -> Tensor:
    return z


def _placed(per_column: Tensor, shift: Tensor, batch: RolloutBatch) -> Tensor:
    """``[B, G, T, 5]``: the aligned columns' ``[N, L - 1, 5]`` back in ``batch``'s columns."""
    B, G, T = batch.input_ids.shape
    N, L1, K = per_column.shape
    # aligned column j holds the target at aligned column j + 1, i.e. at column j + 1 + shift
    cols = (torch.arange(1, L1 + 1, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)).clamp(max=T - 1)
    index = cols.unsqueeze(-1).expand(-1, -1, K)
    placed = per_column.new_zeros((N, T, K)).scatter_add(1, index, per_column)  # padding adds 0
    return placed.reshape(B, G, T, K)


def _whole_forward_stats(response_logits: Callable[[dict], Tensor], theta: dict, tangent: dict, ids: Tensor,
                         resp: Tensor) -> Tensor:
    """``[N, L - 1, 5]`` from one ``jvp`` of ``response_logits`` (θ ↦ ``[N, L - 1, V]``, zeros
    off response targets) at the aligned inputs ``ids``/``resp`` ``[N, L]``: the response rows
    only, reduced ``token_chunk_size(V)`` at a time in one ``Workspace`` (beyond z and ż, no
    more than two chunks' worth of ``[m, V]`` buffers and the chunk's own copies)."""
    z, zdot = jvp(response_logits, (theta,), (tangent,))
    N, L1, V = z.shape
    flat = resp[:, 1:].reshape(-1).nonzero().squeeze(-1)  # [M] response targets in [N * (L - 1)]
    targets = ids[:, 1:].reshape(-1).index_select(0, flat)
    z, zdot = z.reshape(N * L1, V), zdot.reshape(N * L1, V)
    dtype = _stats_dtype(z, zdot)
    chunk, out, work = token_chunk_size(V), [], Workspace()
    for a in range(0, flat.numel(), chunk):
        rows = flat[a:a + chunk]  # index_select copies: the chunk's tensors are its own, overwritten in place
        out.append(_reductions_into(z.index_select(0, rows).to(dtype), zdot.index_select(0, rows).to(dtype),
                                    targets[a:a + chunk], work).double())
    return _at_rows(out, flat, N * L1, z.device).reshape(N, L1, len(TOKEN_STATS))


def _at_rows(parts: list[Tensor], flat: Tensor, rows: int, device: torch.device) -> Tensor:
    """``[rows, 5]`` float64: the chunks' ``[m, 5]`` statistics, concatenated, at the row
    indices ``flat`` (``[M]``), zeros elsewhere (prompt and padding rows)."""
    per_token = torch.cat(parts) if parts else torch.zeros((0, len(TOKEN_STATS)), dtype=torch.float64, device=device)
    return per_token.new_zeros((rows, len(TOKEN_STATS))).index_copy(0, flat, per_token)
