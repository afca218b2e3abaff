"""The library's entry points: the pure core run inside the edge, settings checked once.

``update_direction`` turns an update batch U and an optimizer into μY;
``conditional_variance`` gives every s[n] over an evaluation batch E along μY and the
prediction δH ± SE; ``EntropyProbe.predict(E, U)`` chains both.

Each entry point does the same four things, in this order, and nothing else:

1. settings: ``ProbeSettings.from_options`` checks every option once (bad input is
   refused here, before any forward);
2. edge: the registry, the optimizer's step map, the communicator and the probe
   session (``funcprobe.edge``);
3. core: ``Objective.on_logprobs`` composes LX or J with the registry's pure S(θ, batch),
   and a transform of ``funcprobe.core.transforms`` evaluates it;
4. statistics (``funcprobe.core.statistics``), reduced over ranks.
"""

from __future__ import annotations

import math
from dataclasses import replace
import numbers
import time
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import control as controller, passes
from .core.control import ControlDecision, ControlRequest, EntropyControl, EntropyEstimate, EntropyTarget
from .core.objectives import MODELLED_COSINE
from .core.effects import check_rewards
from .core.influence import EntropyInfluence
from .core.pytree import ParamTree, check_like, tree_sq_norm
from .core.rollouts import RolloutBatch, check_rollouts
from .core.statistics import EntropyPrediction, check_scalars, scalar_counts
from .core.steps import StepMap
from .edge.distributed import Communicator, checked_together, failing_together
from .edge.optim import check_adam, optimizer_lr, step_map, unwrap_optimizer
from .edge.progress import log
from .edge.registry import ParamRegistry
from .errors import SettingsError, StaleProbeError, UnreachableDirectionError
from .influence import InfluenceRequest, check_groups, check_matrix, influence
from .run import ProbeRun
from .settings import ProbeSettings

def update_direction(model: nn.Module | ParamRegistry, U: RolloutBatch, *,
                     optimizer: torch.optim.Optimizer | None = None,
                     **options: Any) -> ParamTree:
    """μY = P(∇θ mean_{n∈U} J[n]), the step per unit learning rate (θ ← θ + η·μY), or
    for ``step="optimizer_step"`` the step Δθ itself (learning rates and clipping inside).

    Args:
        model: ``nn.Module`` (HF / PEFT, possibly DDP-wrapped) or a ``ParamRegistry``.
        U: update rollouts with ``advantages`` ``[B_U, G]``; a data-parallel rank's shard
            may be empty (``RolloutBatch.empty``).
        optimizer: ``torch.optim.Adam``/``AdamW`` for ``step="frozen_adam"``/``"adam_step"``
            (read only).
        **options: the fields of ``ProbeSettings`` as keywords (``step``,
            ``weighting``, ``chunk_size``, ``params``, ``adapter``,
            ``allow_identity_fallback``, ``keep_dropout``, ``process_group``, ...). With
            ranks, the gradient sum and the prompt count are all-reduced before dividing
            and preconditioning, so every rank gets the global μY.

    Returns:
        name→tensor, the registry's trainable names, float32 or wider.

    Raises:
        SettingsError (``ValueError``): a bad setting, named.
        ValueError: U without advantages, missing optimizer or optimizer state, no
            prompts on any rank.
        NoSignalError (``ValueError``): μY is zero everywhere (all advantages 0?).
        NonFiniteError (``RuntimeError``): a NaN/inf policy gradient, naming the parameters
            (and those whose weights are non-finite).
        TypeError: a non-Adam optimizer for an Adam step; a keyword that is no setting.
        KeyError: probed parameters in no param group of the optimizer.
        UnsupportedModelError (``NotImplementedError``): an FSDP1 or DeepSpeed ZeRO-3 model (FSDP2 is probed in place).
        RankMismatchError (``RuntimeError``): ranks that disagree on registry or settings.
        ProbeRankError (``RuntimeError``): the probe failed on some ranks only (every rank
            raises it together; docs/sharding.md#rank-failures).
    """
    settings = ProbeSettings.from_options(options, caller="update_direction")
    comm = Communicator.for_group(settings.process_group)
    with failing_together(comm, _module(model)):
        with checked_together(comm):
            check_rollouts(U, "U").require_advantages("U")
            if settings.step != "sgd":
                check_adam(optimizer, settings)
        registry = ParamRegistry.from_settings(model, settings)
        with checked_together(comm):
            registry.check_batch(U, "U")
        return passes.update_direction(ProbeRun.of(registry, settings), U, optimizer).mu


def step_from_gradient(model: nn.Module | ParamRegistry, gradient: Mapping[str, Tensor], *,
                       optimizer: torch.optim.Optimizer | None = None,
                       **options: Any) -> ParamTree:
    """The step of ``settings.step`` for a given ascent gradient ∇θ J (name→tensor).

    For a trainer that has already back-propagated its loss L = −J: pass
    ``{name: -p.grad}``; with ``step="optimizer_step"`` and ``max_grad_norm=None`` (the
    ``.grad`` is already clipped) this is exactly the Δθ that ``optimizer.step()`` will add,
    whatever the loss, precision, gradient accumulation or data parallelism that made the
    gradient. Nothing is read from or written to ``.grad`` here.

    Raises:
        KeyError, ValueError: ``gradient`` names or shapes that do not match the registry,
            non-finite values (listed).
        the errors of ``update_direction`` for the settings and the optimizer.
    """
    settings = ProbeSettings.from_options(options, caller="step_from_gradient")
    if settings.step != "sgd":
        check_adam(optimizer, settings)
    registry = ParamRegistry.from_settings(model, settings)
    return step_map(settings, optimizer, registry)(
        _full_gradient(registry, gradient, Communicator.for_group(settings.process_group)))


def _full_gradient(registry: ParamRegistry, gradient: Mapping[str, Tensor], comm: Communicator) -> ParamTree:
    """A trainer's gradient name → tensor, read in full (FSDP2: its DTensor ``.grad``),
    checked against the registry (``check_like``: names, shapes, finite) and cast to each
    parameter's device in float32 or wider. On FSDP2 the reads are collectives: an agreement
    point follows them, so a failed check is decided on by every rank together."""
    if isinstance(gradient, Mapping):
        gradient = {n: registry.sharding.read(g) if isinstance(g, Tensor) else g for n, g in gradient.items()}
    if registry.sharding.collective_forwards:
        comm.checkpoint()
    check_like(registry.trainable, gradient, "gradient")
    return {n: gradient[n].to(device=t.device, dtype=torch.promote_types(t.dtype, torch.float32))
            for n, t in registry.trainable.items()}


def probe_scalars(model: nn.Module | ParamRegistry, E: RolloutBatch, muY: Mapping[str, Tensor],
                  **options: Any) -> Tensor:
    """Every per-prompt s[n] = ⟨∇θ LX[n], μY⟩ of E, ``[B]`` float64 (nats per unit lr).

    The arguments, checks and errors are those of ``conditional_variance`` without
    ``lr``, for any B ≥ 1, in this process only (no collectives).
    """
    settings = ProbeSettings.from_options(options, caller="probe_scalars")
    check_rollouts(E, "E")
    registry = ParamRegistry.from_settings(model, settings)
    registry.check_batch(E, "E")
    s = passes.scalars(ProbeRun.of(registry, settings), E, muY)
    check_scalars(s, scalar_counts(s))
    return s


def conditional_variance(model: nn.Module | ParamRegistry, E: RolloutBatch, muY: Mapping[str, Tensor], *,
                         lr: float, rewards: Any = None, **options: Any) -> EntropyPrediction:
    """Every s[n] over the evaluation batch E along μY, and δH with its E-conditional SE.

    Args:
        model: an ``nn.Module`` (HF / PEFT, possibly DDP-wrapped) or a ``ParamRegistry``.
        E: evaluation rollouts, B ≥ 2 prompts × G ≥ 2 responses (across all ranks when
            distributed; a rank's shard may be empty, ``RolloutBatch.empty``).
        muY: name→tensor update direction per unit learning rate (``update_direction``),
            with exactly the registry's names and shapes; cast to each parameter's
            dtype and device.
        lr: η > 0, the learning rate of the step (a real number: float, int, numpy
            scalar or 0-d tensor).
        rewards: with ``effects=True``, ``[B, G]`` rewards of this rank's E (see
            ``EntropyProbe.predict``).
        **options: the fields of ``ProbeSettings`` as keywords
            (``weighting``, ``mode``, ``chunk_size``, ``params``, ``adapter``,
            ``keep_dropout``, ``effects``, ``process_group``, ``gather_s``, ``progress``).

    Returns:
        ``EntropyPrediction`` (``delta_h``, ``se``, ``ci95``, ``s``, ``mean_s``, ...; with
        ``effects=True`` also ``effects``); the statistics are global, ``s`` is this rank's
        unless ``gather_s``.

    Raises:
        SettingsError (``ValueError``): a bad setting or ``lr``, named.
        KeyError: μY names missing from or unknown to the registry (listed).
        ValueError: μY shapes or non-finite values (listed), B < 2 (over all ranks).
        NoSignalError (``ValueError``): μY identically zero.
        TypeError: E is not a ``RolloutBatch``; a keyword that is no setting.
        UnsupportedModelError (``NotImplementedError``): an FSDP1 or DeepSpeed ZeRO-3 model (FSDP2 is probed in place).
        NonFiniteError, UnreachableDirectionError, RankMismatchError (``RuntimeError``):
            non-finite s (prompts listed), every s exactly 0, ranks that disagree;
            raised on every rank together.
        ProbeRankError (``RuntimeError``): the probe failed on some ranks only (every rank
            raises it together; docs/sharding.md#rank-failures).
    """
    settings = ProbeSettings.from_options(options, caller="conditional_variance")
    comm = Communicator.for_group(settings.process_group)
    with failing_together(comm, _module(model)):
        with checked_together(comm):
            lr = check_lr(lr)
            check_rollouts(E, "E")
            rewards = check_rewards(rewards, E, effects=settings.effects)
        registry = ParamRegistry.from_settings(model, settings)
        with checked_together(comm):
            registry.check_batch(E, "E")
        return _predicted(ProbeRun.of(registry, settings), E, muY, lr, settings.effects, rewards)


def check_optimizer_holds(optimizer: torch.optim.Optimizer, registry: ParamRegistry) -> None:
    """Every probed parameter of ``registry`` is in a param group of ``optimizer`` (looked
    through wrappers such as accelerate's), by identity: the optimizer steps this model.

    Raises ``TypeError`` naming ``optimizer`` for an object without ``param_groups``, and
    ``KeyError`` naming ``optimizer`` with the missing parameters (all of them: built for
    another model, or for a copy of this one)."""
    inner = unwrap_optimizer(optimizer)
    groups = getattr(inner, "param_groups", None)
    if not isinstance(groups, list):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for g in groups for p in g["params"]}
    live = registry.live_parameters()
    missing = [n for n, p in live.items() if id(p) not in held]
    if missing:
        what = ("it holds none of them: was it built for another model, or for a copy of this one?"
                if len(missing) == len(live) else f"{len(missing)} of them are in none of its param groups")
        raise KeyError(f"optimizer: it must hold the model's {len(live)} probed parameter(s) (the same tensors), "
                       f"but {what} ({missing[:4]})")


def check_lr(lr: object) -> float:
    """``lr`` as a float: a finite real number > 0 (Python, numpy or a 0-d tensor).

    Raises ``SettingsError`` naming ``lr``.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_complex() or lr.dtype == torch.bool:
            raise SettingsError(f"lr: expected a real number > 0, got a tensor of shape {tuple(lr.shape)}")
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise SettingsError(f"lr: expected a real number > 0, got {lr!r}")
    value = float(lr)
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"lr: expected a finite number > 0, got {lr!r}")
    return value


class EntropyProbe:
    """Predicts the entropy change of the next optimizer step with its standard error.

    Example::

        probe = EntropyProbe(peft_model, optimizer)   # step="optimizer_step" by default
        pred = probe.predict(E, U)         # RolloutBatch each
        print(pred.delta_h, pred.se, pred.ci95)
        inf = probe.influence(E, U)        # the same δH split over U's prompts, responses, tokens

    By default (no ``step``) the probe predicts ``step="optimizer_step"``:
    the Δθ that ``optimizer.step()`` will take now, with each param group's current
    learning rate (pass ``max_grad_norm`` for the trainer's clipping). The settings are
    checked here, once. At each ``predict`` the probe looks at the
    model and the optimizer as they are then: the registry is re-extracted (tensors
    replaced by ``.to()`` or ``load_state_dict`` are seen) and the learning rate is
    re-read from the optimizer (LR schedulers are followed). Nothing about the model,
    its ``.grad``s or the optimizer is changed by the probe.

    With ranks, each method that communicates (``update_direction``,
    ``conditional_variance``, ``predict``, ``influence``) is left by every rank together:
    a failure on some ranks only (an out-of-memory in one rank's forward) makes every rank
    raise ``ProbeRankError`` at the same point, with no collective of the probe left
    pending (docs/sharding.md#rank-failures).

    Args:
        model: ``nn.Module`` (HF / PEFT, possibly DDP-wrapped).
        optimizer: ``torch.optim.Adam``/``AdamW`` (needed for the Adam steps and to read
            the learning rate).
        lr: η; default: the optimizer's current learning rate for the probed parameters.
        **options: the fields of ``ProbeSettings`` as keywords (a holder of a ``ProbeSettings``
            passes ``**settings.options()``).

    Raises:
        SettingsError (``ValueError``): a bad setting or ``lr``; no ``lr`` and no
            optimizer to read it from.
        ValueError, TypeError: an Adam step without an Adam/AdamW optimizer, and the
            errors of ``ParamRegistry.from_model``.
        KeyError: an ``optimizer`` that does not hold every probed parameter (the same
            objects as the model's, by identity: an optimizer built for another model or
            a copy of it), the missing names listed.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 lr: float | None = None, **options: Any) -> None:
        options = {"step": "optimizer_step", **options}  # the step the optimizer will take, by default
        self.settings = ProbeSettings.from_options(options, caller="EntropyProbe")
        self.model = model
        self.optimizer = optimizer
        self._lr = None if lr is None else check_lr(lr)
        if self.settings.step != "sgd":
            check_adam(optimizer, self.settings)
        registry = ParamRegistry.from_settings(model, self.settings)
        self._layout = _layout(registry)
        if optimizer is not None:
            check_optimizer_holds(optimizer, registry)
        if self.settings.step == "optimizer_step":
            if self._lr is not None:
                raise SettingsError("lr: step='optimizer_step' (EntropyProbe's default) takes each param group's "
                                    "current lr from the optimizer; do not pass lr=, or pass step='adam_step' "
                                    "(or 'sgd') to predict the step of one learning rate lr")
        elif self._lr is None:
            if optimizer is None:
                raise SettingsError("lr: pass the learning rate, or an optimizer to read it from")
            optimizer_lr(optimizer, registry, self.settings.optimizer_lr)

    @property
    def registry(self) -> ParamRegistry:
        """The registry of the model as it is now (re-extracted; names and shapes checked)."""
        registry = ParamRegistry.from_settings(self.model, self.settings)
        if registry.sharding.collective_forwards:  # θ was all-gathered: agree before the checks
            Communicator.for_group(self.settings.process_group).checkpoint()
        layout = _layout(registry)
        if layout != self._layout:
            changed = sorted(set(layout.items()) ^ set(self._layout.items()))
            raise StaleProbeError(
                f"model: the probed parameters changed since the EntropyProbe was built ({len(changed)} "
                f"name/shape difference(s), e.g. {[name for name, _ in changed[:4]]}); build a new EntropyProbe"
            )
        return registry

    @property
    def lr(self) -> float:
        """η: the ``lr`` given at construction, else the optimizer's current learning rate
        (1.0 for ``step="optimizer_step"``, whose Δθ holds the learning rates)."""
        return self._current_lr(self.registry)

    def _current_lr(self, registry: ParamRegistry) -> float:
        if self.settings.step == "optimizer_step":
            return 1.0
        if self._lr is not None:
            return self._lr
        return optimizer_lr(self.optimizer, registry, self.settings.optimizer_lr)

    def update_direction(self, U: RolloutBatch) -> ParamTree:
        """μY for the update batch U (see ``update_direction``)."""
        with self._together():
            registry = self._checked(U=U)
            return passes.update_direction(ProbeRun.of(registry, self.settings), U, self.optimizer).mu

    def conditional_variance(self, E: RolloutBatch, muY: Mapping[str, Tensor]) -> EntropyPrediction:
        """s over E along ``muY`` and the prediction (see ``conditional_variance``)."""
        with self._together():
            registry = self._checked(E=E)
            return passes.prediction(ProbeRun.of(registry, self.settings), E, muY, self._current_lr(registry))

    def predict(self, E: RolloutBatch, U: RolloutBatch, *,
                gradient: Mapping[str, Tensor] | None = None, rewards: Any = None) -> EntropyPrediction:
        """Predicted entropy change of the step the optimizer would take on U, measured on E.

        Args:
            E, U: ``RolloutBatch`` es (U with advantages).
            gradient: the ascent gradient the optimizer will use, name → tensor (a trainer's
                ``{name: −p.grad}``, already clipped); default: funcprobe's own policy
                gradient of U. The step is then the settings' step map of this gradient
                without clipping.
            rewards: with ``effects=True``, ``[B_E, G]`` finite rewards of E's responses (a
                tensor or array-like; this rank's E), for the predicted change of the mean
                reward (``result.effects["reward"]``).

        With the setting ``effects=True`` the result's ``effects`` holds the step's predicted
        effects on the logged token entropy (every aggregation), the KL, the completion
        length and the reward (``funcprobe.core.effects.Effects``), from the same JVP pass
        over E as δH and with the same estimator (docs/derivations.md#predicted-effects).

        When E is the update batch itself (the same object, or equal token ids and masks, as
        in a trainer that probes its own batch), the estimate is the leave-one-out one
        (``funcprobe.passes.leave_one_out``; ``estimator="leave_one_out"``), unbiased where
        the plain mean over E = U counts each prompt's own contribution to the step; that
        value stays in ``delta_h_same_batch``. With ``gradient`` each prompt's share is put
        in the trainer's units by fitting funcprobe's model of the loss to it
        (``passes.given_direction``); where the model does not explain the trainer's gradient
        (cosine < 0.99: loss terms funcprobe does not model) the plain same-batch value is
        returned, ``estimator="same_batch"``, with a warning.
        """
        with self._together():
            return self._predict(E, U, gradient, rewards)

    def _predict(self, E: RolloutBatch, U: RolloutBatch, gradient: Mapping[str, Tensor] | None,
                 rewards: Any) -> EntropyPrediction:
        checked_rewards: list = []
        run = ProbeRun.of(self._checked(E=E, U=U, extra=lambda: checked_rewards.append(
            check_rewards(rewards, E, effects=self.settings.effects))), self.settings)
        rewards = checked_rewards[0]
        effects = self.settings.effects
        lr = self._current_lr(run.registry)
        t0 = time.perf_counter()
        (differ,) = run.comm.sum_floats([0.0 if same_batch(E, U) else 1.0])  # one decision for every rank
        same, modelled = differ == 0.0, True  # (an empty shard's E and U are equal)
        if gradient is None:
            direction = passes.update_direction(run, U, self.optimizer)
        else:
            direction, cosine = passes.given_direction(run, U, _full_gradient(run.registry, gradient, run.comm),
                                                       self.optimizer)
            modelled = cosine >= MODELLED_COSINE
        t1 = time.perf_counter()
        if same and modelled:  # the trainer's own batch: no prompt may score its own contribution
            result = passes.leave_one_out(run, U, direction, lr, effects=effects, rewards=rewards)
        elif same:
            log.warning("funcprobe: the trainer's gradient is not explained by the modelled loss (cosine %.4f < "
                        "%.2f): the same-batch value is reported, biased by each prompt's own contribution",
                        cosine, MODELLED_COSINE)
            result = replace(_predicted(run, E, direction.mu, lr, effects, rewards), estimator="same_batch")
            if result.effects is not None:
                result = replace(result, effects=replace(result.effects, estimator="same_batch"))
        else:
            result = _predicted(run, E, direction.mu, lr, effects, rewards)
        t2 = time.perf_counter()
        seconds = {"step": t1 - t0, "probe": t2 - t1}
        if self.settings.split_baseline:
            result = result.with_baseline(_baseline(run, E, direction.step, lr))
            seconds["baseline"] = time.perf_counter() - t2
        return result.with_step(self.settings.step, math.sqrt(tree_sq_norm(direction.mu)), U.num_prompts, seconds,
                                direction.signal)

    def influence(self, E: RolloutBatch, U: RolloutBatch, *, groups: Mapping[str, Tensor] | None = None,
                  matrix: bool = False) -> "EntropyInfluence":
        """The prediction of ``predict(E, U)`` split over U's prompts, responses and tokens
        (``entropy_influence`` documents the arguments, cost and result)."""
        named: dict[str, Tensor] = {}
        comm = Communicator.for_group(self.settings.process_group)
        with failing_together(comm, self.model):
            registry = self._checked(E=E, U=U, extra=lambda: (check_matrix(matrix, comm),
                                                              named.update(check_groups(groups, U))))
            run = ProbeRun.of(registry, self.settings)
            lr = self._current_lr(registry)
            step = step_map(self.settings, self.optimizer, registry)
            return influence(run, E, U, step, lr, InfluenceRequest(groups=named, matrix=matrix))

    def _together(self):
        """``failing_together`` over this probe's process group and model."""
        return failing_together(Communicator.for_group(self.settings.process_group), self.model)

    def choose(self, E: RolloutBatch, U: RolloutBatch, control: EntropyControl | EntropyTarget, *,
               step_index: int | None = None, prior: EntropyEstimate | None = None) -> ControlDecision:
        """The value of a knob of the next step that meets the control's target, chosen before the step
        (docs/control.md), and the step's predicted δH ± SE (and KL) at it.

        Args:
            E, U: ``RolloutBatch`` es (U with advantages). When E is U (the same object or
                the same tokens, as in a trainer), every decision uses the leave-one-out
                estimate: each prompt of U is scored against the step without its own
                gradient (never the same-batch value, which each prompt's own contribution
                biases).
            control: ``EntropyControl(target, knob=..., beta_max=..., beta_min=..., estimate=...)``,
                or an ``EntropyTarget`` alone (δH*, a band, a schedule, a KL budget, ``risk``)
                for ``EntropyControl(target)``: knob ``"lr_scale"``. Knobs: ``"lr_scale"`` (c ∈
                (0, 1] on every param group's learning rate, this step only; LoRA+ ratios
                kept) or ``"beta"`` (the entropy-bonus coefficient β ∈ [beta_min, beta_max],
                default [0, 1]; beta_min < 0 admits an entropy penalty, in the ascent gradient
                g_pg + β·g_H, g_H the gradient of TRL's bonus, the mean token entropy over U:
                ``funcprobe.control.entropy_bonus_gradient``).
            step_index: the optimizer step t (an int ≥ 0), for a schedule only.
            prior: an ``EntropyEstimate`` of Ĥ(t) (a schedule with ``estimate="filtered"``
                only: the previous decision's ``estimate_after()``), fused with the
                measurement on E; None: the measurement.

        Returns:
            ``ControlDecision``: ``value`` (β or c), ``reachable`` (and ``reason`` when not:
            the value is then the in-range one that comes closest, never clamped silently),
            ``delta_h``/``se`` at the value (nats per W), ``kl``/``kl_se`` (with the setting
            ``effects=True`` or a KL budget), the uncontrolled step's δH, ``step`` (Δ at
            the value: under ``optimizer_step`` the Δθ that ``optimizer.step()`` adds with
            the learning rates scaled by c, or with ``−(g_pg + β·g_H)`` in ``.grad``).

        Cost: one backward over U (g_pg), one more for β (g_H), one single-prompt backward
        per prompt of E (with E = U: two or three per prompt of U), memory for that many
        flat gradient copies (float64); then step-map evaluations and dot products only;
        one effects JVP pass for the KL.

        Raises:
            SettingsError (``ValueError``): a bad ``control``, ``step_index`` or ``prior``
                (named), a KL budget with ``knob="beta"``, a process group or a sharded model.
            the errors of ``predict``.
        """
        request = _request(control, step_index, prior)
        run = ProbeRun.of(self._checked(E=E, U=U), self.settings)
        same = same_batch(E, U)
        return controller.choose(run, None if same else E, U, self.optimizer, request, self._current_lr(run.registry))

    def choose_for_step(self, U: RolloutBatch, entropy_control: EntropyControl, *, gradient: Mapping[str, Tensor],
                        step_index: int = 0, prior: EntropyEstimate | None = None) -> ControlDecision:
        """A trainer's decision: the knob of the step about to be taken on U, chosen on U
        itself (E = U: the leave-one-out estimate) from the trainer's own gradient.

        Args:
            U: the step's ``RolloutBatch`` (with advantages).
            entropy_control: ``EntropyControl`` (target, knob, β range).
            gradient: the trainer's ascent gradient g_pg of U *before* clipping, name →
                tensor (``{name: −p.grad}`` read ahead of ``clip_grad_norm_``), used instead
                of funcprobe's own (the step map clips it, with ``max_grad_norm``); each
                prompt's own share is fitted in its units (as ``predict``'s ``gradient``).
            step_index: optimizer steps taken so far (t ≥ 0; used by a schedule).
            prior: the previous decision's ``estimate_after()`` (a schedule with
                ``estimate="filtered"``: fused with the measurement on U; ignored otherwise);
                None after a step that was not decided (the measurement alone).

        Returns and raises: as ``choose``; also ``KeyError``/``ValueError`` for a
        ``gradient`` with other names (KeyError) or shapes than the probed parameters or
        non-finite, ``ValueError`` where funcprobe's model of the loss does not explain it
        (cosine < ``MODELLED_COSINE``), ``NoSignalError`` where it is zero.
        """
        if not isinstance(entropy_control, EntropyControl):
            raise SettingsError(f"entropy_control: expected an EntropyControl, got {type(entropy_control).__name__}")
        entropy_control.request(step_index, prior=prior)  # checked before any model work
        run = ProbeRun.of(self._checked(E=U, U=U), self.settings)
        request = entropy_control.request(step_index, _full_gradient(run.registry, gradient, run.comm), prior)
        return controller.choose(run, None, U, self.optimizer, request, self._current_lr(run.registry))

    def _checked(self, *, E: RolloutBatch | None = None, U: RolloutBatch | None = None,
                 extra=None) -> ParamRegistry:
        """Check the batches (U needs advantages) and ``extra()``, then re-extract the
        registry and check the batches against the model; with ranks, every rank passes
        each round together or all raise (``checked_together``), before any collective
        that would wait for a rank that stopped."""
        comm = Communicator.for_group(self.settings.process_group)
        with checked_together(comm):
            if E is not None:
                check_rollouts(E, "E")
            if U is not None:
                check_rollouts(U, "U").require_advantages("U")
            if extra is not None:
                extra()
        registry = self.registry
        with checked_together(comm):
            for batch, name in ((E, "E"), (U, "U")):
                if batch is not None:
                    registry.check_batch(batch, name)
        return registry



def _predicted(run: ProbeRun, E: RolloutBatch, muY: Mapping[str, Tensor], lr: float, effects: bool,
               rewards: Tensor | None) -> EntropyPrediction:
    """``passes.prediction``, or with ``effects`` ``passes.prediction_with_effects``."""
    if effects:
        return passes.prediction_with_effects(run, E, muY, lr, rewards)
    return passes.prediction(run, E, muY, lr)


def entropy_influence(model: nn.Module, E: RolloutBatch, U: RolloutBatch, *,
                      optimizer: torch.optim.Optimizer | None = None, lr: float | None = None,
                      request: InfluenceRequest | None = None, **options: Any) -> EntropyInfluence:
    """The predicted entropy change of the step on U, split over U's prompts, responses
    and tokens, with E-conditional standard errors.

    Args:
        model: ``nn.Module`` (HF / PEFT, possibly DDP-wrapped).
        E: evaluation rollouts, B_E ≥ 2 prompts (over all ranks).
        U: update rollouts with ``advantages`` ``[B_U, G]``.
        optimizer, lr, **options: as ``EntropyProbe`` (default
            ``step="optimizer_step"``: the Δθ ``optimizer.step()`` takes now).
        request: ``InfluenceRequest(groups=..., matrix=...)``, what is split besides the
            prompts, responses and tokens (default: nothing):
            ``groups``: name → bool mask over this rank's U, ``[B_U, G]`` (responses) or
            ``[B_U, G, T]`` (tokens; only response tokens count), e.g.
            ``{"correct": rewards > 0}``: each gets δH_S (the sum of its tokens' shares)
            and SE_E; ``matrix``: also compute s[n, i] ``[B_E, B_U]`` and the SE of every update
            prompt's, response's and token's share (one process only; cost in ``funcprobe.influence``).

    Returns:
        ``EntropyInfluence``: ``delta_h`` = ``delta_h_baseline`` + ``per_prompt.sum()``
        (nats), ``per_response`` ``[B_U, G]``, ``per_token`` ``[B_U, G, T]``, ``groups``,
        ``matrix``, the SEs.

    Raises:
        SettingsError (``ValueError``): a bad ``groups`` or ``matrix`` (named), and the
            errors of ``EntropyProbe`` and ``EntropyProbe.predict``.
    """
    request = request or InfluenceRequest()
    probe = EntropyProbe(model, optimizer, lr=lr, **options)
    return probe.influence(E, U, groups=request.groups or None, matrix=request.matrix)


def _request(control: object, step_index: object, prior: object) -> ControlRequest:
    """The checked ``ControlRequest`` of ``choose`` (``SettingsError`` naming the argument)."""
    if isinstance(control, EntropyTarget):
        control = EntropyControl(control)
    if not isinstance(control, EntropyControl):
        raise SettingsError(f"control: expected an EntropyControl or an EntropyTarget, got {type(control).__name__}")
    if prior is not None and control.estimate != "filtered":
        raise SettingsError(f"prior: given with estimate={control.estimate!r}, which aims from the measurement "
                            "alone; drop it or use estimate='filtered'")
    return ControlRequest(target=control.target, knob=control.knob, beta_max=control.beta_max,
                          beta_min=control.beta_min, step_index=step_index, prior=prior)


def choose_knob(model: nn.Module, E: RolloutBatch, U: RolloutBatch, control: EntropyControl | EntropyTarget, *,
                optimizer: torch.optim.Optimizer | None = None, lr: float | None = None,
                **options: Any) -> ControlDecision:
    """The knob value of the next step that meets the target (``EntropyProbe.choose``).

    Args:
        model, optimizer, lr: as ``EntropyProbe`` (default ``step="optimizer_step"``).
        E, U, control: as ``EntropyProbe.choose``.
        **options: ``step_index``, ``prior`` (``EntropyProbe.choose``) and the fields of
            ``ProbeSettings`` as keywords.

    Returns and raises: as ``EntropyProbe.choose`` and ``EntropyProbe``.
    """
    for moved in ("knob", "beta_max", "beta_min", "estimate"):
        if moved in options:
            raise SettingsError(f"{moved}: give it in the control, EntropyControl(target, {moved}=...)")
    step_index = options.pop("step_index", None)
    prior = options.pop("prior", None)
    _request(control, step_index, prior)  # checked before any model work
    probe = EntropyProbe(model, optimizer, lr=lr, **options)
    return probe.choose(E, U, control, step_index=step_index, prior=prior)


def _baseline(run: ProbeRun, E: RolloutBatch, step: StepMap, lr: float) -> EntropyPrediction | None:
    """The prediction along Δθ(0), the step of a zero gradient (None where it is 0)."""
    zero = step({n: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))
                 for n, t in run.registry.trainable.items()})
    if tree_sq_norm(zero) == 0.0:
        return None
    try:
        return passes.prediction(run, E, zero, lr)
    except UnreachableDirectionError:  # e.g. weight decay on a fresh LoRA's A while B = 0: no first-order change
        return None


def same_batch(E: RolloutBatch, U: RolloutBatch) -> bool:
    """Whether E is the update batch U: the same object, or the same token ids and masks
    (advantages are not compared: E's may be absent)."""
    if E is U:
        return True
    return (E.input_ids.shape == U.input_ids.shape and torch.equal(E.input_ids.cpu(), U.input_ids.cpu())
            and torch.equal(E.attention_mask.cpu(), U.attention_mask.cpu()))


def _module(model: nn.Module | ParamRegistry) -> nn.Module:
    return model.module if isinstance(model, ParamRegistry) else model


def _layout(registry: ParamRegistry) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in registry.trainable.items()}
