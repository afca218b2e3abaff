"""The gradient a trainer's optimizer is about to use, read from the live ``.grad``s (shared by
the TRL and verl integrations)."""

from __future__ import annotations

import torch


def trainer_gradient(registry) -> dict[str, torch.Tensor]:
    """``{name: −p.grad}``: the ascent gradient the optimizer is about to use (read-only; a
    DTensor shard stays a DTensor, gathered by the probe).

    Raises ``ValueError`` naming probed parameters that have no ``.grad``.
    """
    live = registry.live_parameters()
    missing = [n for n, p in live.items() if p.grad is None]
    if missing:
        raise ValueError(f"model: {len(missing)} probed parameter(s) have no .grad at this step: {missing[:8]}")
    return {n: -p.grad.detach() for n, p in live.items()}
