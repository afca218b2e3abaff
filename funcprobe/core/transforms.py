"""The one core transform: per-prompt directional derivatives, in chunks, by jvp or vjp.

Like ``torch.func``'s transforms these take a function and return a function. The
function ``f(θ, batch) → [b]`` maps the probed parameters (a name→tensor dict) and a
``RolloutBatch`` of b prompts to one number per prompt (LX for the probe, J for the
update direction, the exact weighted entropy for validation, any surrogate a study
wants). Prompts are independent, so the batch is cut into chunks of ``chunk_size``
prompts and the results concatenated; results do not depend on the chunk size.

* ``directional_derivatives(f)`` → ``(θ, tangent, batch) ↦ d/dε f(θ + ε·tangent)[n]``
  ``[B]`` float64: ``mode="jvp"``: one ``torch.func.jvp`` per chunk (one primal plus one
  tangent pass), under ``funcprobe.forward.rules.jvp_rules`` unless ``rules=False``;
  ``mode="vjp"``: the seeds' α-trick, s = ∂/∂α ⟨∇θ Σ_n α_n f[n], tangent⟩ at α = 1,
  reverse over reverse (docs/definitions.md#alpha-trick).
* ``summed_gradient(f)`` → ``(θ, batch) ↦ Σ_n ∇θ f[n]`` (float32 or wider), one
  ``torch.autograd.grad`` on local leaves per chunk (a third of ``torch.func.grad``'s
  peak memory, same values).

Pure: no module state, no collectives, no ``.grad``; the caller (``funcprobe.api``) runs
them inside ``funcprobe.edge.session.probe_session``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .objectives import PromptFn
from .pytree import ParamTree, tree_map, tree_vdot
from .rollouts import RolloutBatch
from ..errors import UnreachableDirectionError
from ..forward.rules import jvp_rules, kernel_module

#: wraps the iterable of chunk start indices (e.g. a tqdm bar); identity by default
ChunkWrapper = Callable[[Iterable[int], int], Iterable[int]]


def _plain(starts: Iterable[int], total: int) -> Iterable[int]:
    return starts


def _chunks(batch: RolloutBatch, chunk_size: int, wrap: ChunkWrapper,
            min_chunks: int = 0) -> Iterator[tuple[RolloutBatch, bool]]:
    """``(chunk, real)``: the batch in consecutive chunks of at most ``chunk_size`` prompts
    (the loop ``wrap``ped), then placeholder chunks (``real`` False) up to ``min_chunks``."""
    B = batch.num_prompts
    count = chunk_count(batch, chunk_size)
    for start in wrap(range(0, B, chunk_size), count):
        yield batch.select(start, min(start + chunk_size, B)), True
    for _ in range(count, min_chunks):
        yield RolloutBatch.placeholder(batch.group_size).to(batch.input_ids.device), False


def chunk_count(batch: RolloutBatch, chunk_size: int) -> int:
    """How many calls of ``f`` the transforms make for ``batch`` (before ``min_chunks``)."""
    return -(-batch.num_prompts // chunk_size)


def directional_derivatives(
    f: PromptFn, *, mode: str = "jvp", chunk_size: int = 8, wrap: ChunkWrapper = _plain, min_chunks: int = 0,
    rules: bool | str = True,
) -> Callable[[ParamTree, Mapping[str, Tensor], RolloutBatch], Tensor]:
    """Return ``(theta, tangent, batch) ↦ [B]`` float64 directional derivatives of ``f``.

    Args:
        f: ``f(theta, batch) → [b]``, pure in ``theta``.
        mode: ``"jvp"`` (forward mode) or ``"vjp"`` (α-trick, reverse over reverse).
        chunk_size: prompts per call of ``f``.
        wrap: ``wrap(starts, total)`` wraps the chunk loop (progress bars).
        min_chunks: call ``f`` at least this often, on a placeholder batch whose results
            are discarded (ranks of a sharded model whose every forward is a collective).
        rules: in ``"jvp"`` mode, run ``torch.func.jvp`` under ``funcprobe.forward.rules.jvp_rules``
            (linear layers, matrix products, attention, SiLU and the LM head's log-probs with
            tangents that skip frozen tensors: same values, fewer products): True or ``"off"``
            without attention kernels, ``"triton"`` with the Triton attention kernels where they
            apply (the ``kernels`` setting); False: PyTorch's generic forward-AD formulas (the
            reference the rules are tested against).

    The returned function's ``tangent`` must have ``theta``'s names, shapes, dtypes and
    devices. An empty batch (B = 0, an empty data-parallel shard) gives an empty result.
    Raises ``ValueError`` for an unknown ``mode``, ``SettingsError`` naming ``kernels`` for an
    unknown string ``rules`` or ``"triton"`` without Triton, before any work.
    """
    if mode not in ("jvp", "vjp"):
        raise ValueError(f"mode: expected 'jvp' or 'vjp', got {mode!r}")
    kernels = rules if isinstance(rules, str) else "off"
    kernel_module(kernels)

    def derivatives(theta: ParamTree, tangent: Mapping[str, Tensor], batch: RolloutBatch) -> Tensor:
        out = []
        for chunk, real in _chunks(batch, chunk_size, wrap, min_chunks):

            def f_chunk(t: ParamTree, chunk: RolloutBatch = chunk) -> Tensor:
                return f(t, chunk)

            if mode == "jvp":
                with jvp_rules(kernels) if rules else contextlib.nullcontext():
                    _, d = jvp(f_chunk, (theta,), (dict(tangent),))
            else:
                d = _alpha_trick(f_chunk, theta, tangent, chunk.num_prompts)
            if real:
                out.append(d.detach().to(torch.float64))
        if not out:
            device = next(iter(theta.values())).device
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.cat(out)

    return derivatives


def summed_gradient(
    f: PromptFn, *, chunk_size: int = 8, wrap: ChunkWrapper = _plain, min_chunks: int = 0
) -> Callable[[ParamTree, RolloutBatch], ParamTree]:
    """Return ``(theta, batch) ↦ Σ_n ∇θ f(theta, batch)[n]`` as name→tensor.

    The sum (not the mean) so that data-parallel ranks can all-reduce it with their
    prompt counts; zeros for an empty batch. Accumulated in float32 or wider.

    Reverse mode by ``torch.autograd.grad`` on fresh leaves made from ``theta`` (detached
    views, no copy): the same gradient as ``torch.func.grad``, at about a third of its
    peak memory (measured on SmolLM2-135M + LoRA, 8 sequences: 1.09 GB against 3.92 GB;
    benchmarks/results/memory.md). Nothing outside is touched: the leaves are local and
    ``.grad`` is never written. A probed parameter the forward does not use raises
    ``UnreachableDirectionError`` naming it (never a silent zero gradient).
    ``min_chunks``: as ``directional_derivatives`` (placeholder forwards and backwards
    that add exact zeros).
    """

    def summed(theta: ParamTree, batch: RolloutBatch) -> ParamTree:
        acc = tree_map(lambda t: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)), theta)
        names = list(theta)
        for chunk, real in _chunks(batch, chunk_size, wrap, min_chunks):
            with torch.enable_grad():
                leaves = {n: theta[n].detach().requires_grad_(True) for n in names}
                total = f(leaves, chunk).sum() * (1.0 if real else 0.0)
                unused = _unreached(total, leaves)
                if unused:  # no allow_unused (docs/failure-modes.md, failure 5): say which, by name
                    raise UnreachableDirectionError(
                        f"U: {len(unused)} probed parameter(s) are not used by the forward, so they have no "
                        f"gradient: {unused[:8]} (are they on the forward's path, is the adapter enabled?)"
                    )
                grads = torch.autograd.grad(total, [leaves[n] for n in names])
            acc = {n: acc[n] + g.to(acc[n].dtype) for n, g in zip(names, grads)}
        return acc

    return summed


def _unreached(total: Tensor, leaves: Mapping[str, Tensor]) -> list[str]:
    """Names of ``leaves`` that ``total``'s autograd graph does not reach (walks the graph once)."""
    seen, reached, stack = set(), set(), [total.grad_fn] if total.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return [n for n, t in leaves.items() if id(t) not in reached]


def _alpha_trick(f_chunk: Callable[[ParamTree], Tensor], theta: ParamTree, tangent: Mapping[str, Tensor],
                 k: int) -> Tensor:
    """s = ∂/∂α ⟨∇θ Σ_n α_n f[n](θ), tangent⟩ at α = 1, by ``vjp`` over ``vjp``."""

    def h(alpha: Tensor) -> Tensor:
        _, pull = vjp(lambda t: (alpha * f_chunk(t)).sum(), theta)
        (g,) = pull(torch.ones((), dtype=alpha.dtype, device=alpha.device))
        return tree_vdot(g, tangent)

    ref = next(iter(theta.values()))
    alpha = torch.ones(k, dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device)
    value, pull_h = vjp(h, alpha)
    (s,) = pull_h(torch.ones((), dtype=value.dtype, device=value.device))
    return s
