"""Top level: predict the entropy change of the next optimizer step, with its standard error.

``update_direction`` turns an update batch U and an optimizer into μY;
``EntropyProbe.predict(E, U)`` chains it with ``conditional_variance`` on E.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from .directions import DIRECTIONS, optimizer_lr, policy_gradient_sum, precondition, read_adam_state
from .distributed import all_reduce_float64, all_reduce_sum_tree, handshake, resolve_group
from .guards import as_normal_batch, probe_session
from .pytree import ParamTree, tree_map, tree_sq_norm
from .registry import ParamRegistry, ParamSelection
from .rollouts import RolloutBatch, check_batch_size, check_rollouts
from .surrogates import WEIGHTINGS, check_weighting
from .variance import ConditionalVariance, as_registry, conditional_variance


def update_direction(
    model: nn.Module | ParamRegistry,
    U: RolloutBatch,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    direction: str = "adam_step",
    weighting: str = "dr_grpo",
    batch_size: int = 8,
    params: ParamSelection = "trainable",
    adapter: str | None = None,
    allow_identity_fallback: bool = False,
    keep_dropout: bool = False,
    process_group: object | None = None,
) -> ParamTree:
    """μY = P(∇θ mean_{n∈U} J[n]), the step per unit learning rate (θ ← θ + η·μY).

    Args:
        model: ``nn.Module`` or ``ParamRegistry``.
        U: update rollouts with ``advantages`` ``[B_U, G]``.
        optimizer: ``torch.optim.Adam``/``AdamW`` for ``adam``/``adam_step`` (read only).
        direction: ``"sgd"`` (P = identity), ``"adam"`` (frozen-state preconditioner of the
            seeds) or ``"adam_step"`` (the exact next Adam/AdamW step).
        weighting: ``"dr_grpo"`` or ``"per_token_avg"`` (J's Sw).
        batch_size: prompts per microbatch of the gradient.
        allow_identity_fallback: ``adam``: identity P for parameters without state.
        process_group: all-reduce the gradient sum and the prompt count over this
            ``torch.distributed`` group before dividing and preconditioning (default: the
            world group when initialised with > 1 rank), so every rank gets the global μY.
            A rank's shard of U may be empty (``RolloutBatch.empty``).

    Returns:
        name→tensor, the registry's trainable names, float32 or wider.

    Raises:
        ValueError: unknown direction/weighting, U without advantages, missing optimizer
            state for ``adam``, no prompts on any rank, a direction that is zero everywhere
            (no signal: advantages all 0?).
        TypeError: a non-Adam optimizer for an Adam direction.
        NotImplementedError: an FSDP-sharded model.
        RuntimeError: ranks that disagree on the registry or settings.
    """
    check_weighting(weighting)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if direction != "sgd" and optimizer is None:
        raise ValueError(f"optimizer: direction={direction!r} needs the torch.optim.Adam/AdamW optimizer")
    check_batch_size(batch_size)
    check_rollouts(U, "U")
    registry = as_registry(model, params, adapter)
    group = resolve_group(process_group)
    if group is not None:
        handshake(group, registry.names, registry.numel(),
                  [DIRECTIONS.index(direction), WEIGHTINGS.index(weighting)])
    states = read_adam_state(optimizer, registry) if direction != "sgd" else None
    U = as_normal_batch(U, registry.device)
    with probe_session(registry, keep_dropout=keep_dropout):
        total = policy_gradient_sum(registry, U, weighting=weighting, batch_size=batch_size)
    count = float(U.num_prompts)
    if group is not None:
        total = all_reduce_sum_tree(total, group)
        (count,) = all_reduce_float64([count], group)
    if count == 0:
        raise ValueError("U: there are no update prompts (on any rank)")
    gradient = tree_map(lambda t: t / count, total)
    mu = precondition(
        gradient,
        direction,
        params=registry.trainable,
        states=states,
        allow_identity_fallback=allow_identity_fallback,
    )
    if tree_sq_norm(mu) == 0.0:  # identical on every rank: decided after the all-reduce
        raise ValueError(
            f"U: the update direction ({direction}) is zero everywhere; the policy gradient is "
            f"{'zero too' if tree_sq_norm(gradient) == 0.0 else 'not'} (are all advantages 0, is the adapter disabled?)"
        )
    return mu


@dataclass(frozen=True)
class EntropyPrediction:
    """What the next step will do to the policy's entropy, per the probe.

    Attributes:
        result: the ``ConditionalVariance`` over E (s, δH, SE_E, ...).
        direction: ``"sgd"``, ``"adam"`` or ``"adam_step"``.
        mu_y_norm: ||μY||₂ (per unit learning rate).
        num_update_prompts: B_U.
        seconds: wall time of each phase (``direction``, ``probe``).
    """

    result: ConditionalVariance
    direction: str
    mu_y_norm: float
    num_update_prompts: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def delta_h(self) -> float:
        """Predicted entropy change η·s̄ (nats)."""
        return self.result.delta_h

    @property
    def se_e(self) -> float:
        """Its standard error conditional on U (nats)."""
        return self.result.se_e

    @property
    def ci95(self) -> tuple[float, float]:
        return self.result.ci95

    def to_dict(self) -> dict:
        return {
            **self.result.to_dict(),
            "direction": self.direction,
            "mu_y_norm": self.mu_y_norm,
            "num_update_prompts": self.num_update_prompts,
            "seconds": dict(self.seconds),
        }


class EntropyProbe:
    """Predicts the entropy change of the next optimizer step with its standard error.

    Example::

        probe = EntropyProbe(peft_model, optimizer, direction="adam_step")
        pred = probe.predict(E, U)         # RolloutBatch each
        print(pred.delta_h, pred.se_e, pred.ci95)

    The registry is extracted once, here; in-place optimizer steps are seen (the
    registry holds views of the live parameters). Nothing about the model, its
    ``.grad``s or the optimizer is changed by the probe.

    Args:
        model: ``nn.Module`` (HF / PEFT, possibly DDP-wrapped).
        optimizer: ``torch.optim.Adam``/``AdamW`` (needed for ``adam``/``adam_step`` and to
            read the learning rate).
        lr: η; default: the optimizer's learning rate for the probed parameters.
        direction, weighting, batch_size, mode, params, adapter, keep_dropout,
        allow_identity_fallback, process_group, gather_s, progress: as in
        ``update_direction`` / ``conditional_variance``.

    Raises:
        ValueError: no ``lr`` and no optimizer to read it from, and the errors of
            ``ParamRegistry.from_model``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float | None = None,
        direction: str = "adam_step",
        weighting: str = "dr_grpo",
        batch_size: int = 8,
        mode: str = "jvp",
        params: ParamSelection = "trainable",
        adapter: str | None = None,
        keep_dropout: bool = False,
        allow_identity_fallback: bool = False,
        process_group: object | None = None,
        gather_s: bool = False,
        progress: bool | None = None,
    ) -> None:
        check_weighting(weighting)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
        self.registry = ParamRegistry.from_model(model, params=params, adapter=adapter)
        if lr is None:
            if optimizer is None:
                raise ValueError("lr: pass the learning rate, or an optimizer to read it from")
            lr = optimizer_lr(optimizer, self.registry)
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        self.optimizer = optimizer
        self.lr = float(lr)
        self.direction = direction
        self.weighting = weighting
        self.batch_size = batch_size
        self.mode = mode
        self.keep_dropout = keep_dropout
        self.allow_identity_fallback = allow_identity_fallback
        self.process_group = process_group
        self.gather_s = gather_s
        self.progress = progress

    def update_direction(self, U: RolloutBatch) -> ParamTree:
        """μY for the update batch U (see ``update_direction``)."""
        return update_direction(
            self.registry,
            U,
            optimizer=self.optimizer,
            direction=self.direction,
            weighting=self.weighting,
            batch_size=self.batch_size,
            allow_identity_fallback=self.allow_identity_fallback,
            keep_dropout=self.keep_dropout,
            process_group=self.process_group,
        )

    def conditional_variance(self, E: RolloutBatch, muY: Mapping[str, Tensor]) -> ConditionalVariance:
        """s over E along ``muY`` and its statistics (see ``conditional_variance``)."""
        return conditional_variance(
            self.registry,
            E,
            muY,
            lr=self.lr,
            weighting=self.weighting,
            batch_size=self.batch_size,
            mode=self.mode,
            keep_dropout=self.keep_dropout,
            process_group=self.process_group,
            gather_s=self.gather_s,
            progress=self.progress,
        )

    def predict(self, E: RolloutBatch, U: RolloutBatch) -> EntropyPrediction:
        """Predicted entropy change of the step the optimizer would take on U, measured on E."""
        t0 = time.perf_counter()
        mu = self.update_direction(U)
        t1 = time.perf_counter()
        result = self.conditional_variance(E, mu)
        t2 = time.perf_counter()
        return EntropyPrediction(
            result=result,
            direction=self.direction,
            mu_y_norm=math.sqrt(tree_sq_norm(mu)),
            num_update_prompts=U.num_prompts,
            seconds={"direction": t1 - t0, "probe": t2 - t1},
        )
