"""The library's entry points: the pure core run inside the edge, settings checked once.

``update_direction`` turns an update batch U and an optimizer into μY;
``conditional_variance`` gives every s[n] over an evaluation batch E along μY and the
prediction δH ± SE; ``EntropyProbe.predict(E, U)`` chains both.

Each entry point does the same four things, in this order, and nothing else:

1. settings: ``ProbeSettings.resolve`` checks every option once (bad input is
   refused here, before any forward);
2. edge: the registry, the optimizer's step map, the communicator and the probe
   session (``funcprobe.edge``);
3. core: ``Objective.on_logprobs`` composes LX or J with the registry's pure S(θ, batch),
   and a transform of ``funcprobe.core.transforms`` evaluates it;
4. statistics (``funcprobe.core.statistics``), reduced over ranks.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor, nn

from .core.objectives import Objective, entropy_objective, policy_gradient_objective, token_sum_objective
from .core.pytree import ParamTree, check_like, tree_map, tree_sq_norm
from .core.rollouts import RolloutBatch, check_rollouts
from .core.statistics import EntropyPrediction, check_scalars, scalar_counts
from .core.steps import StepMap
from .core.transforms import chunk_count, directional_derivatives, summed_gradient
from .edge.distributed import Communicator, checked_together
from .edge.fsdp import full_tensor
from .edge.memory import chunk_size_for
from .edge.optim import check_adam, optimizer_lr, step_map
from .edge.precision import compute_dtype, primal
from .edge.progress import chunk_progress, log
from .edge.registry import ParamRegistry
from .edge.session import as_normal_batch, as_normal_tensor, session_for
from .errors import NonFiniteError, NoSignalError, SettingsError, StaleProbeError
from .settings import ProbeSettings

if TYPE_CHECKING:
    from .core.influence import EntropyInfluence


def update_direction(model: nn.Module | ParamRegistry, U: RolloutBatch, *,
                     optimizer: torch.optim.Optimizer | None = None, settings: ProbeSettings | None = None,
                     **options: Any) -> ParamTree:
    """μY = P(∇θ mean_{n∈U} J[n]), the step per unit learning rate (θ ← θ + η·μY), or
    for ``step="optimizer_step"`` the step Δθ itself (learning rates and clipping inside).

    Args:
        model: ``nn.Module`` (HF / PEFT, possibly DDP-wrapped) or a ``ParamRegistry``.
        U: update rollouts with ``advantages`` ``[B_U, G]``; a data-parallel rank's shard
            may be empty (``RolloutBatch.empty``).
        optimizer: ``torch.optim.Adam``/``AdamW`` for ``step="frozen_adam"``/``"adam_step"``
            (read only).
        settings, **options: a ``ProbeSettings`` and/or its fields as keywords (``step``,
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
    """
    settings = ProbeSettings.resolve(settings, options, caller="update_direction")
    comm = Communicator.for_group(settings.process_group)
    with checked_together(comm):
        check_rollouts(U, "U").require_advantages("U")
        if settings.step != "sgd":
            check_adam(optimizer, settings)
    registry = ParamRegistry.from_settings(model, settings)
    with checked_together(comm):
        registry.check_batch(U, "U")
    return _update_direction(registry, U, optimizer, settings)[0]


def _update_direction(registry: ParamRegistry, U: RolloutBatch, optimizer: torch.optim.Optimizer | None,
                      settings: ProbeSettings) -> tuple[ParamTree, StepMap, bool]:
    """(μY, the step map that made it, whether U's policy gradient was non-zero).

    A zero policy gradient with a non-zero step (Adam's momentum or weight decay under
    ``adam_step``/``optimizer_step``) is not an error: it is logged, and ``predict`` says
    so in ``EntropyPrediction.policy_gradient_signal``.
    """
    comm = Communicator.for_group(settings.process_group)
    comm.handshake(registry.names, registry.numel(), settings.direction_code())
    step = step_map(settings, optimizer, registry)
    gradient, _, _ = _mean_policy_gradient(registry, U, settings, comm)
    mu = step(gradient)
    if tree_sq_norm(mu) == 0.0:  # identical on every rank: decided after the all-reduce
        raise NoSignalError(
            f"U: the update direction ({step.name}) is zero everywhere; the policy gradient is "
            f"{'zero too' if tree_sq_norm(gradient) == 0.0 else 'not'} (are all advantages 0, is the adapter disabled?)"
        )
    signal = tree_sq_norm(gradient) > 0.0
    if not signal:
        log.warning("U carries no policy-gradient signal (all advantages 0?): the %s step is Adam's momentum and "
                    "weight decay only", step.name)
    return mu, step, signal


def _mean_policy_gradient(registry: ParamRegistry, U: RolloutBatch, settings: ProbeSettings,
                          comm: Communicator) -> tuple[ParamTree, int, Objective]:
    """(g = mean_{n∈U} ∇θ J[n] over all ranks, the global prompt count |U|, the objective J).

    Raises ``ValueError`` when no rank has a prompt and ``NonFiniteError`` for a NaN/inf
    gradient (naming the parameters), identically on every rank.
    """
    U = as_normal_batch(U, registry.device)
    objective = _policy_gradient(settings, U, comm)
    f = objective.on_logprobs(registry.logprob_fn())
    chunk = chunk_size_for(settings, registry, U, "gradient")
    gradient_sum = summed_gradient(f, chunk_size=chunk, min_chunks=min_chunks(registry, comm, U, chunk))
    dtype = compute_dtype(registry, settings.precision)
    with session_for(registry, settings, dtype, forward_mode=False):
        total = gradient_sum(primal(registry, dtype), U)
    total = comm.sum_tree(total)
    (count,) = comm.sum_floats([float(U.num_prompts)])
    if count == 0:
        raise ValueError("U: there are no update prompts (on any rank)")
    gradient = tree_map(lambda t: t / count, total)
    bad = sorted(n for n, g in gradient.items() if not bool(torch.isfinite(g).all()))
    if bad:  # identical on every rank: decided after the all-reduce
        weights = sorted(n for n in bad if not bool(torch.isfinite(registry.trainable[n]).all()))
        raise NonFiniteError(
            f"U: the policy gradient is NaN or inf at {len(bad)} parameter(s): {bad[:8]}"
            + (f"; the weights themselves are non-finite at {weights[:8]}" if weights else
               " (check U's advantages and the model's dtype)")
        )
    return gradient, int(count), objective


def step_from_gradient(model: nn.Module | ParamRegistry, gradient: Mapping[str, Tensor], *,
                       optimizer: torch.optim.Optimizer | None = None, settings: ProbeSettings | None = None,
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
    settings = ProbeSettings.resolve(settings, options, caller="step_from_gradient")
    if settings.step != "sgd":
        check_adam(optimizer, settings)
    registry = ParamRegistry.from_settings(model, settings)
    if isinstance(gradient, Mapping):  # FSDP2: the trainer's DTensor .grad, in full
        gradient = {n: full_tensor(g) if isinstance(g, Tensor) else g for n, g in gradient.items()}
    check_like(registry.trainable, gradient, "gradient")
    grad = {n: gradient[n].to(device=t.device, dtype=torch.promote_types(t.dtype, torch.float32))
            for n, t in registry.trainable.items()}
    return step_map(settings, optimizer, registry)(grad)


def _policy_gradient(settings: ProbeSettings, U: RolloutBatch, comm: Communicator) -> Objective:
    """J of ``settings.loss_type`` (docs/definitions.md#trl-loss-types), or of the weighting.

    ``dapo``/``bnpo`` need the completion-token count T and sequence count N of the whole
    U: all-reduced here for ``dapo``; ``bnpo`` (TRL normalises each rank's micro-batch by
    its own tokens) is refused across ranks.
    """
    loss_type = settings.loss_type
    if loss_type is None:
        return policy_gradient_objective(settings.weighting)
    if loss_type in ("grpo", "dr_grpo"):
        return policy_gradient_objective("per_token_avg" if loss_type == "grpo" else "dr_grpo")
    if loss_type == "bnpo" and comm.distributed:
        raise SettingsError("loss_type: 'bnpo' normalises each rank's micro-batch by its own token count, which "
                            "is not modelled across ranks; use 'dapo' (TRL's default) or one process")
    tokens, sequences = comm.sum_floats([float(U.response_lengths.sum()), float(U.num_prompts * U.group_size)])
    if tokens == 0:
        raise ValueError("U: there are no completion tokens (on any rank)")
    return token_sum_objective(sequences / tokens)


def probe_scalars(model: nn.Module | ParamRegistry, E: RolloutBatch, muY: Mapping[str, Tensor], *,
                  settings: ProbeSettings | None = None, **options: Any) -> Tensor:
    """Every per-prompt s[n] = ⟨∇θ LX[n], μY⟩ of E, ``[B]`` float64 (nats per unit lr).

    The arguments, checks and errors are those of ``conditional_variance`` without
    ``lr``, for any B ≥ 1, in this process only (no collectives).
    """
    settings = ProbeSettings.resolve(settings, options, caller="probe_scalars")
    check_rollouts(E, "E")
    registry = ParamRegistry.from_settings(model, settings)
    registry.check_batch(E, "E")
    s = _local_scalars(registry, E, muY, settings)
    check_scalars(s, scalar_counts(s))
    return s


def conditional_variance(model: nn.Module | ParamRegistry, E: RolloutBatch, muY: Mapping[str, Tensor], *,
                         lr: float, settings: ProbeSettings | None = None, **options: Any) -> EntropyPrediction:
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
        settings, **options: a ``ProbeSettings`` and/or its fields as keywords
            (``weighting``, ``mode``, ``chunk_size``, ``params``, ``adapter``,
            ``keep_dropout``, ``process_group``, ``gather_s``, ``progress``).

    Returns:
        ``EntropyPrediction`` (``delta_h``, ``se``, ``ci95``, ``s``, ``mean_s``, ...); the
        statistics are global, ``s`` is this rank's unless ``gather_s``.

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
    """
    settings = ProbeSettings.resolve(settings, options, caller="conditional_variance")
    comm = Communicator.for_group(settings.process_group)
    with checked_together(comm):
        lr = check_lr(lr)
        check_rollouts(E, "E")
    registry = ParamRegistry.from_settings(model, settings)
    with checked_together(comm):
        registry.check_batch(E, "E")
    return _conditional_variance(registry, E, muY, lr, settings)


def _conditional_variance(registry: ParamRegistry, E: RolloutBatch, muY: Mapping[str, Tensor], lr: float,
                          settings: ProbeSettings) -> EntropyPrediction:
    comm = Communicator.for_group(settings.process_group)
    if not comm.distributed and E.num_prompts < 2:
        raise ValueError(f"E: the conditional variance needs at least 2 prompts, got {E.num_prompts}")
    comm.handshake(registry.names, registry.numel(), [lr, *settings.probe_code()])
    s = _local_scalars(registry, E, muY, settings, comm)
    totals = comm.sum_floats([float(s.sum()), float((s * s).sum()), *scalar_counts(s)])
    check_scalars(s, totals[2:])
    if settings.gather_s:
        s = comm.gather(s)
    return EntropyPrediction.from_sums(s, totals[0], totals[1], int(totals[2]), lr=lr, mode=settings.mode,
                                       weighting=settings.weighting)


def min_chunks(registry: ParamRegistry, comm: Communicator, batch: RolloutBatch, chunk_size: int) -> int:
    """The forwards every rank must run over its shard of ``batch``: on FSDP2 each forward
    is a collective, so the most chunks of any rank; 0 (no constraint) otherwise."""
    if not registry.sharded:
        return 0
    return comm.max_int(chunk_count(batch, chunk_size))


def _local_scalars(registry: ParamRegistry, E: RolloutBatch, muY: Mapping[str, Tensor],
                   settings: ProbeSettings, comm: Communicator | None = None) -> Tensor:
    """s ``[B_local]`` float64 of this rank's E along μY (checked: names, shapes, finite, non-zero)."""
    comm = comm or Communicator.for_group(settings.process_group)
    if registry.sharded and settings.mode == "vjp":
        raise SettingsError("mode: 'vjp' (reverse over reverse) does not run through FSDP2's hooks (torch.func's "
                            "reverse transforms see the all-gathered parameters, not the probe's); use mode='jvp'")
    check_like(registry.trainable, muY, "muY")
    if tree_sq_norm(muY) == 0.0:  # μY is the same on every rank (update_direction all-reduces it)
        raise NoSignalError("muY: the update direction is zero everywhere; there is no step to probe")
    dtype = compute_dtype(registry, settings.precision)
    theta = primal(registry, dtype)
    tangent = tree_map(lambda m, p: as_normal_tensor(m).to(device=p.device, dtype=p.dtype), dict(muY), theta)
    E = as_normal_batch(E, registry.device)
    f = entropy_objective(settings.weighting).on_logprobs(registry.logprob_fn())
    chunk_size = chunk_size_for(settings, registry, E, settings.mode)
    derivatives = directional_derivatives(f, mode=settings.mode, chunk_size=chunk_size,
                                          wrap=chunk_progress(f"funcprobe s[n] ({settings.mode})", settings.progress),
                                          min_chunks=min_chunks(registry, comm, E, chunk_size),
                                          rules=False if settings.generic_jvp else settings.kernels)
    with session_for(registry, settings, dtype, forward_mode=settings.mode == "jvp"):
        return derivatives(theta, tangent, E)


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

    By default (no ``settings`` and no ``step``) the probe predicts ``step="optimizer_step"``:
    the Δθ that ``optimizer.step()`` will take now, with each param group's current
    learning rate (pass ``max_grad_norm`` for the trainer's clipping). The settings are
    checked here, once. At each ``predict`` the probe looks at the
    model and the optimizer as they are then: the registry is re-extracted (tensors
    replaced by ``.to()`` or ``load_state_dict`` are seen) and the learning rate is
    re-read from the optimizer (LR schedulers are followed). Nothing about the model,
    its ``.grad``s or the optimizer is changed by the probe.

    Args:
        model: ``nn.Module`` (HF / PEFT, possibly DDP-wrapped).
        optimizer: ``torch.optim.Adam``/``AdamW`` (needed for the Adam steps and to read
            the learning rate).
        lr: η; default: the optimizer's current learning rate for the probed parameters.
        settings, **options: a ``ProbeSettings`` and/or its fields as keywords.

    Raises:
        SettingsError (``ValueError``): a bad setting or ``lr``; no ``lr`` and no
            optimizer to read it from.
        ValueError, TypeError, KeyError: an Adam step without an Adam/AdamW optimizer, an
            optimizer that holds none of the probed parameters, and the errors of
            ``ParamRegistry.from_model``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 lr: float | None = None, settings: ProbeSettings | None = None, **options: Any) -> None:
        if settings is None and not {"step", "direction"} & set(options):
            options = {"step": "optimizer_step", **options}  # the step the optimizer will take, by default
        self.settings = ProbeSettings.resolve(settings, options, caller="EntropyProbe")
        self.model = model
        self.optimizer = optimizer
        self._lr = None if lr is None else check_lr(lr)
        if self.settings.step != "sgd":
            check_adam(optimizer, self.settings)
        registry = ParamRegistry.from_settings(model, self.settings)
        self._layout = _layout(registry)
        if self.settings.step == "optimizer_step":
            if self._lr is not None:
                raise SettingsError("lr: step='optimizer_step' (EntropyProbe's default) takes each param group's "
                                    "current lr from the optimizer; do not pass lr=, or pass step='adam_step' "
                                    "(or 'sgd') to predict the step of one learning rate lr")
        elif self._lr is None:
            if optimizer is None:
                raise SettingsError("lr: pass the learning rate, or an optimizer to read it from")
            optimizer_lr(optimizer, registry)

    @property
    def registry(self) -> ParamRegistry:
        """The registry of the model as it is now (re-extracted; names and shapes checked)."""
        registry = ParamRegistry.from_settings(self.model, self.settings)
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
        return optimizer_lr(self.optimizer, registry)

    def update_direction(self, U: RolloutBatch) -> ParamTree:
        """μY for the update batch U (see ``update_direction``)."""
        registry = self._checked(U=U)
        return _update_direction(registry, U, self.optimizer, self.settings)[0]

    def conditional_variance(self, E: RolloutBatch, muY: Mapping[str, Tensor]) -> EntropyPrediction:
        """s over E along ``muY`` and the prediction (see ``conditional_variance``)."""
        registry = self._checked(E=E)
        lr = self._current_lr(registry)
        return _conditional_variance(registry, E, muY, lr, self.settings)

    def predict(self, E: RolloutBatch, U: RolloutBatch) -> EntropyPrediction:
        """Predicted entropy change of the step the optimizer would take on U, measured on E."""
        registry = self._checked(E=E, U=U)
        lr = self._current_lr(registry)
        t0 = time.perf_counter()
        mu, step, signal = _update_direction(registry, U, self.optimizer, self.settings)
        t1 = time.perf_counter()
        result = _conditional_variance(registry, E, mu, lr, self.settings)
        t2 = time.perf_counter()
        seconds = {"step": t1 - t0, "probe": t2 - t1}
        if self.settings.split_baseline:
            result = result.with_baseline(self._baseline(registry, E, step, lr))
            seconds["baseline"] = time.perf_counter() - t2
        return result.with_step(self.settings.step, math.sqrt(tree_sq_norm(mu)), U.num_prompts, seconds, signal)

    def influence(self, E: RolloutBatch, U: RolloutBatch, *, groups: Mapping[str, Tensor] | None = None,
                  matrix: bool = False) -> "EntropyInfluence":
        """The prediction of ``predict(E, U)`` split over U's prompts, responses and tokens
        (``funcprobe.influence.entropy_influence`` documents the arguments, cost and result)."""
        from .influence import check_groups, influence  # the influence layer builds on this module

        named: dict[str, Tensor] = {}
        registry = self._checked(E=E, U=U, extra=lambda: named.update(check_groups(groups, U)))
        return influence(registry, E, U, self.optimizer, self._current_lr(registry), self.settings, named, matrix)

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

    def _baseline(self, registry: ParamRegistry, E: RolloutBatch, step: StepMap,
                  lr: float) -> EntropyPrediction | None:
        """The prediction along Δθ(0), the step of a zero gradient (None where it is 0)."""
        zero = step({n: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32))
                     for n, t in registry.trainable.items()})
        if tree_sq_norm(zero) == 0.0:
            return None
        return _conditional_variance(registry, E, zero, lr, self.settings)


def _layout(registry: ParamRegistry) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in registry.trainable.items()}
