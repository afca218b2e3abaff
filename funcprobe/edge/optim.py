"""The optimizer edge: read a live ``torch.optim.Adam``/``AdamW`` by parameter name.

``torch.optim`` keys its state by parameter object; this is the only module that
touches those objects (read-only, no copies). It turns them into the pure values of
``funcprobe.core.steps`` (``AdamState`` per name, then the ``StepMap`` of ``settings.step``
built from the blocks ``sgd``, ``frozen_adam``, ``adam_next_step`` and
``optimizer_step_map``), keyed by the
registry's names, never by ``id()`` (docs/failure-modes.md, failure 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.steps import AdamHyper, AdamState, StepMap, adam_next_step, frozen_adam, optimizer_step_map, sgd
from ..errors import SettingsError
from ..settings import ProbeSettings
from .registry import ParamRegistry

ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(optimizer, ADAM_TYPES) or not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def check_adam(optimizer: object, settings: ProbeSettings) -> torch.optim.Optimizer:
    """The unwrapped Adam/AdamW ``optimizer``, checked against ``settings.step``.

    Raises:
        ValueError: no optimizer for a step that needs one.
        TypeError: an optimizer other than ``torch.optim.Adam``/``AdamW``.
    """
    if optimizer is None:
        raise ValueError(f"optimizer: step={settings.step!r} needs the torch.optim.Adam/AdamW optimizer")
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, ADAM_TYPES):
        raise TypeError(
            f"optimizer: expected torch.optim.Adam or AdamW for step={settings.step!r}, got {type(inner).__name__}"
        )
    return inner


def read_adam_state(optimizer: torch.optim.Optimizer, registry: ParamRegistry) -> dict[str, AdamState]:
    """Name→``AdamState`` for the registry's trainable parameters (read-only, no copies).

    Wrappers (accelerate) are looked through.

    Raises:
        TypeError: an optimizer other than ``torch.optim.Adam``/``AdamW``.
        KeyError: probed parameters that are in no param group of ``optimizer`` (listed).
    """
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, ADAM_TYPES):
        raise TypeError(f"optimizer: expected torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    group_of: dict[Tensor, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[p] = group
    live = registry.live_parameters()
    missing = [n for n, p in live.items() if p not in group_of]
    if missing:
        raise KeyError(
            f"optimizer: {len(missing)} of the {len(live)} probed parameter(s) are in no param group of the "
            f"optimizer: {missing[:8]}"
        )
    out: dict[str, AdamState] = {}
    for name, p in live.items():
        group = group_of[p]
        beta1, beta2 = (float(b) for b in group["betas"])
        hyper = AdamHyper(
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(
                group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
            ),
            amsgrad=bool(group.get("amsgrad", False)),
        )
        st = optimizer.state.get(p, {})
        full_tensor = registry.sharding.read  # FSDP2 keeps the moments as DTensor shards: gathered in full
        if "exp_avg_sq" in st:
            out[name] = AdamState(
                hyper=hyper,
                step=int(full_tensor(st["step"]) if torch.is_tensor(st["step"]) else st["step"]),
                exp_avg=full_tensor(st["exp_avg"].detach()),
                exp_avg_sq=full_tensor(st["exp_avg_sq"].detach()),
                max_exp_avg_sq=full_tensor(st["max_exp_avg_sq"].detach()) if "max_exp_avg_sq" in st else None,
            )
        else:
            out[name] = AdamState(hyper=hyper)
    return out


def step_map(settings: ProbeSettings, optimizer: torch.optim.Optimizer | None,
             registry: ParamRegistry) -> StepMap:
    """The ``StepMap`` of ``settings.step`` for the registry's parameters, read from ``optimizer``.

    Raises the errors of ``check_adam``, ``read_adam_state`` and
    ``funcprobe.core.steps.frozen_adam``.
    """
    if settings.step == "sgd":
        return sgd()
    states = read_adam_state(check_adam(optimizer, settings), registry)
    if settings.step == "frozen_adam":
        return frozen_adam(states, allow_identity_fallback=settings.allow_identity_fallback)
    if settings.step == "optimizer_step":
        return optimizer_step_map(registry.trainable, states, group_lrs(optimizer, registry, settings.optimizer_lr),
                                  settings.max_grad_norm)
    return adam_next_step(registry.trainable, states)


def group_lrs(optimizer: torch.optim.Optimizer, registry: ParamRegistry, source: str = "current") -> dict[str, float]:
    """Name → the learning rate of the param group that holds each probed parameter: its
    current ``lr`` (schedulers and per-group rates such as LoRA+ included), or for
    ``source="initial"`` the scheduler's base rate ``initial_lr``.

    Raises ``SettingsError`` naming ``optimizer_lr`` where a group has no ``initial_lr`` (no
    scheduler was attached)."""
    optimizer = unwrap_optimizer(optimizer)
    key = "lr" if source == "current" else "initial_lr"
    missing = [i for i, g in enumerate(optimizer.param_groups) if key not in g]
    if missing:
        raise SettingsError(f"optimizer_lr: 'initial' reads each param group's initial_lr, which a learning-rate "
                            f"scheduler sets; param group(s) {missing} have none (no scheduler attached?)")
    lr_of = {p: float(g[key]) for g in optimizer.param_groups for p in g["params"]}
    return {n: lr_of[p] for n, p in registry.live_parameters().items()}


def optimizer_lr(optimizer: torch.optim.Optimizer, registry: ParamRegistry, source: str = "current") -> float:
    """The learning rate the optimizer uses now (``source="initial"``: the scheduler's base
    rate) for the registry's parameters.

    Raises:
        KeyError: the optimizer holds none of the probed parameters.
        ValueError: they sit in param groups with different learning rates (use
            ``step="optimizer_step"`` then), or the rate is 0.
        SettingsError: ``source="initial"`` without a scheduler's ``initial_lr``.
    """
    optimizer = unwrap_optimizer(optimizer)
    live = set(registry.live_parameters().values())
    key = "lr" if source == "current" else "initial_lr"
    if key != "lr":
        group_lrs(optimizer, registry, source)  # SettingsError naming optimizer_lr where a group has none
    lrs = {float(g[key]) for g in optimizer.param_groups if any(p in live for p in g["params"])}
    if not lrs:
        raise KeyError("optimizer: it holds none of the probed parameters (was it built for another model?)")
    if len(lrs) != 1:
        raise ValueError(
            f"lr: the probed parameters are in param groups with learning rates {sorted(lrs)}; use "
            "step='optimizer_step', which takes each group's rate"
        )
    lr = lrs.pop()
    if lr == 0.0:
        raise ValueError(
            "lr: the optimizer's current learning rate is 0 for the probed parameters (a schedule at its end or "
            "in warm-up): the step it takes now is zero, so its entropy change is 0. Pass lr= to predict a step "
            "of another rate, or optimizer_lr='initial' for the scheduler's base rate"
        )
    return lr
