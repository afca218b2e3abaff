"""Entropy control inside a trainer: the knob chosen before a step, applied to that step.

``ProbedGRPOTrainer(entropy_control=EntropyControl(...))`` (``funcprobe.integrations.trl``)
calls these at one point of every optimizer step: after the gradient is complete (gradient
accumulation, mixed precision) and **before** the trainer clips it, so that the decision is
made on the raw gradient and the trainer's own clipping then acts on the gradient the
controller chose (docs/control.md#in-trl):

1. ``decide``: ``EntropyProbe.choose_for_step(U, control, gradient=raw)`` on the step's own batch
   (leave-one-out: the biased same-batch value is never acted on), through the exact step
   map of the live optimizer with ``max_grad_norm`` (the clipping the trainer is about to do);
2. ``apply``: ``lr_scale`` c multiplies every param group's learning rate (restored by
   ``restore`` right after ``optimizer.step()``, before the scheduler steps); ``beta`` writes
   ``−(g_pg + β·g_H)`` into ``.grad`` (the trainer then clips it);
3. the Δθ then taken is ``decision.step`` (tests/test_trl_control.py measures it around
   ``optimizer.step()``).

Refused by name when the trainer is built (``control_refusals``), since the controller would
act on a step it does not model: more than one process, ``probe_gradient="recompute"``, a
probe step other than ``optimizer_step``, and every setting ``trainer_settings`` refuses
for a recomputed loss (a KL term, TRL's own entropy bonus or adaptive entropy control, …).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..api import EntropyProbe
from ..core.control import ControlDecision, EntropyControl, EntropyEstimate
from ..core.rollouts import RolloutBatch
from ..edge.registry import ParamRegistry


def control_refusals(*, world_size: int, probe_gradient: str, step: str) -> list[str]:
    """What a trainer with ``entropy_control`` is refused for (empty: nothing)."""
    checks = [
        (world_size > 1, f"{world_size} processes (the controller runs in one process for now)"),
        (probe_gradient != "trainer", f"probe_gradient={probe_gradient!r} (the knob acts on the trainer's own "
                                      "gradient)"),
        (step != "optimizer_step", f"probe_settings.step={step!r} (the knob acts on the step the optimizer takes: "
                                   "'optimizer_step')"),
    ]
    return [what for bad, what in checks if bad]


def decide(probe: EntropyProbe, batch: RolloutBatch, gradient: dict[str, torch.Tensor], control: EntropyControl,
           step_index: int, prior: EntropyEstimate | None = None) -> ControlDecision:
    """The knob of the step about to be taken, chosen on its own batch (E = U, leave-one-out)
    from the trainer's ascent gradient before clipping (``{name: −p.grad}``);
    ``step_index``: optimizer steps taken so far (t); ``prior``: the previous decision's
    ``estimate_after()`` where that step was decided (a filtered schedule), else None."""
    return probe.choose_for_step(batch, control, gradient=gradient, step_index=step_index, prior=prior)


def apply(decision: ControlDecision, optimizer: torch.optim.Optimizer,
          registry: ParamRegistry) -> list[float] | None:
    """Apply ``decision`` to the step about to be taken; returns the learning rates to
    restore after ``optimizer.step()`` (``lr_scale``) or None (``beta``: ``.grad`` rewritten)."""
    if decision.knob == "lr_scale":
        saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * decision.value
        return saved
    for name, p in registry.live_parameters().items():
        p.grad.copy_(-decision.gradient[name].to(device=p.grad.device, dtype=p.grad.dtype))
    return None


def restore(optimizer: torch.optim.Optimizer, saved: list[float] | None) -> None:
    """Put back the learning rates ``apply`` scaled (no-op for None)."""
    if saved is not None:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


def decision_metrics(decision: ControlDecision) -> dict[str, float]:
    """The step's metrics: the probe's ``delta_h``/``se`` (the decision's leave-one-out
    prediction of the step taken) and ``control/*``: the knob's value (``control/beta`` or
    ``control/lr_scale``), ``control/delta_h`` and ``control/se`` at it, ``control/uncontrolled``
    (β = 0, c = 1), ``control/reachable`` (1 or 0), ``control/target`` (the δH* aimed at,
    absent when the uncontrolled step already met a band), ``control/entropy`` and
    ``control/measured_entropy`` and their ``_se`` (a schedule: Ĥ(t) aimed from, and the
    measurement on the batch alone), ``control/kl`` and ``_se`` (with
    ``effects=True`` or a KL budget), all in nats per the weighting's unit (KL: nats per response)."""
    out = {"delta_h": decision.delta_h, "se": decision.se, f"control/{decision.knob}": decision.value,
           "control/delta_h": decision.delta_h, "control/se": decision.se,
           "control/uncontrolled": decision.uncontrolled, "control/reachable": float(decision.reachable)}
    if decision.aimed is not None:
        out["control/target"] = decision.aimed
    if decision.current_entropy is not None:
        out["control/entropy"], out["control/entropy_se"] = decision.current_entropy, decision.current_entropy_se
        out["control/measured_entropy"] = decision.measured_entropy
        out["control/measured_entropy_se"] = decision.measured_entropy_se
    if decision.kl is not None:
        out["control/kl"], out["control/kl_se"] = decision.kl, decision.kl_se
    return out


def control_window(steps: list[dict[str, Any]], failed: int) -> dict[str, float]:
    """``funcprobe/control/*`` of one logging window: the mean of each ``control/`` value over
    the controlled steps that have it (``reachable``: the fraction reached), the SE of the
    mean δH (sqrt(Σ SE_k²)/n), and ``control/steps`` and ``control/failed`` counts."""
    controlled = [k for k in steps if any(key.startswith("control/") for key in k)]
    n = len(controlled)
    out = {"funcprobe/control/steps": float(n), "funcprobe/control/failed": float(failed)}
    if not n:
        return out
    keys = sorted({key for k in controlled for key in k if key.startswith("control/") and not key.endswith("se")})
    for key in keys:
        have = [k[key] for k in controlled if key in k]
        out[f"funcprobe/{key}"] = sum(have) / len(have)
    out["funcprobe/control/se"] = math.sqrt(sum(k["control/se"] ** 2 for k in controlled)) / n
    kl = [k for k in controlled if "control/kl_se" in k]
    if kl:
        out["funcprobe/control/kl_se"] = math.sqrt(sum(k["control/kl_se"] ** 2 for k in kl)) / len(kl)
    return out
