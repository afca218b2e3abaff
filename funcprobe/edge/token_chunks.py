"""The MLPs of a model run on a bounded number of tokens at a time (forward mode's memory).

In a no-grad forward the largest buffers of a decoder layer are the MLP's
``[tokens × intermediate]`` activations (gate, up, their product: 46 MiB each for 32
sequences x 256 tokens x 1408 in float32). Forward mode holds each of them twice (primal
and tangent) plus the tangent's temporaries, so the MLP sets the probe's peak memory.
An MLP is token-wise (each token's output depends on that token's input only), so
running it on ``rows`` tokens at a time and concatenating gives the same values and
tangents with those buffers bounded by ``rows`` (memory, not work: the products are the
same, in row blocks that stay large enough for full-speed matrix kernels).

``chunked_mlps(module, rows)`` does this for the duration of a probe forward: every
submodule whose class name ends in ``MLP`` (``Qwen2MLP``, ``LlamaMLP``, ``GPT2MLP``, ...;
mixture-of-experts blocks are named otherwise and left alone), in eval mode, gets an
instance-level ``forward`` that splits its input's tokens into chunks of at most
``rows``; on exit the instance attribute is removed again (the class's ``forward`` is
never touched), even on error. Train-mode MLPs (``keep_dropout``) keep their own forward:
chunking would change the order in which dropout masks are drawn.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import Tensor, nn


def _token_wise(module: nn.Module) -> bool:
    """An MLP block whose forward takes exactly one tensor argument."""
    if not type(module).__name__.endswith("MLP") or module.training:
        return False
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _chunked(forward, rows: int):
    def chunked_forward(x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim < 2:
            return forward(x)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= rows:
            return forward(x)
        out = torch.cat([forward(part) for part in flat.split(rows)])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return chunked_forward


@contextlib.contextmanager
def chunked_mlps(module: nn.Module, rows: int | None) -> Iterator[int]:
    """Run the body with ``module``'s MLP blocks on at most ``rows`` tokens per call.

    Yields how many blocks were chunked (0 when ``rows`` is None or none qualify).
    """
    if rows is None:
        yield 0
        return
    patched = []
    try:
        for m in module.modules():
            if _token_wise(m) and "forward" not in m.__dict__:
                m.forward = _chunked(m.forward, rows)
                patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
