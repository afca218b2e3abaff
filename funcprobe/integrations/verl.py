"""verl integration: the probe inside verl's FSDP2 actor engine, enabled by configuration alone.

Enable it with one override (the module is imported in every worker before the engine is
built)::

    actor_rollout_ref.model.external_lib=funcprobe.integrations.verl

Importing this module replaces, in verl's ``EngineRegistry``, the language-model engine of the
``fsdp``/``fsdp2`` backends (for every device it is registered for) by a subclass that probes the
actor's optimizer steps; the engines of the other backends (Megatron, VeOmni, TorchTitan,
AutoModel) are replaced by subclasses that refuse to build a training engine (``SettingsError``:
the probe is not supported there; forward-only engines, the reference model's, build as before,
and the probed class leaves them unprobed). Nothing else of verl is changed, and nothing is patched when the module is not
imported. Options go in the engine config (``actor_rollout_ref.actor.fsdp_config``), through its
hydra ``_target_``::

    actor_rollout_ref.actor.fsdp_config._target_=funcprobe.integrations.verl.ProbedFSDPEngineConfig
    +actor_rollout_ref.actor.fsdp_config.funcprobe.every=10
    +actor_rollout_ref.actor.fsdp_config.funcprobe.gradient=trainer

(``every``, ``first_minibatch_only``, ``gradient``, ``raise`` and the fields of ``ProbeSettings``:
``funcprobe.integrations.verl_options.VerlProbeOptions``). Without them the defaults apply.

What happens at a probed step: verl's ``BaseEngine.train_batch`` zeroes the gradients, runs
forward/backward over the micro-batches, then ``optimizer_step()`` unscales (fp16), clips
(``fsdp2_clip_grad_norm_``), skips the step when the norm is not finite, and calls
``optimizer.step()``. The probe runs in a ``torch.optim`` step pre-hook registered around that
call, so it sees the clipped ``.grad``, runs only when the step is really taken, and reads the
current learning rate. It predicts the δH of that step (``step="optimizer_step"``: the Δθ AdamW is
about to take; with ``gradient="trainer"``, on the ``.grad`` verl's optimizer is about to use)
from the step's own mini-batch: E = U, regrouped by ``uid`` over the data-parallel group
(``funcprobe.integrations.verl_batch``), with the leave-one-out estimator of the TRL integration
(``EntropyProbe.predict(E, U, gradient=...)`` with E = U). The weighting and loss type follow
``loss_agg_mode`` (``verl_options.loss_settings``). The predicted Δθ of the last probed step is
kept in ``engine.funcprobe_step`` ({name: tensor}, the probe's parameter names), its values
(``delta_h``, ``se``, ...) in ``engine.funcprobe_metrics``, on every rank.

Metrics (verl ``Metric`` objects, averaged over data-parallel ranks, which all hold the same
values, and over the probed mini-batches of a training step; verl logs them as
``actor/funcprobe/*``), the keys and units of the TRL integration:

* ``funcprobe/delta_h``: the predicted δH (leave-one-out), in the unit of ``loss_agg_mode``'s
  weighting: nats per response token (``token-mean``, ``seq-mean-token-mean``), nats per R
  tokens (``seq-mean-token-sum``; R the padded response width), nats per ``loss_scale_factor``
  tokens (``seq-mean-token-sum-norm``);
* ``funcprobe/se``, ``funcprobe/ci95_low``, ``funcprobe/ci95_high``;
* ``funcprobe/delta_h_same_batch``: the plain mean over E = U (biased), for comparison;
* ``funcprobe/probed_steps`` (1 at a probed step) and ``funcprobe/failed`` (1 when the probe
  failed or refused the mini-batch: the reason is logged, and the step goes on as verl's);
* with ``effects=true``, the predicted effects (``funcprobe/pred/*`` with ``_se``,
  ``funcprobe.integrations.predicted``), leave-one-out like δH: the change of the token-mean
  entropy (verl's ``actor/entropy``), the KL per token, the response length and, where the batch
  has ``token_level_scores`` (verl's trainer puts them there), the score (``critic/score/mean``).
  On the FSDP2 model the effects pass runs its whole forward under one JVP (full logits of a
  chunk: use ``chunk_size`` to bound them).

Refused by name (``SettingsError``): when the engine config is built, bad options; when the
engine is built, FSDP1 (``strategy=fsdp``), Ulysses sequence parallelism (not tested: needs
flash-attn), parameter or optimizer offload (not tested), the other engines' training
engines, an optimizer that is not a ``torch.optim.Optimizer``; at the
first actor step, before verl's, a ``loss_agg_mode`` the probe does not model (``token-sum``;
``seq-mean-token-sum-norm`` without ``loss_scale_factor``) and, with ``gradient="recompute"``,
the KL loss, the entropy bonus, policy losses other than ``vanilla`` and ``seq-mean-token-sum``.
Per mini-batch (logged with the reason, ``funcprobe/failed``; verl's step goes on unchanged):
holes in ``response_mask`` (multi-turn tool tokens), token-level advantages, a rollout
temperature other than 1, incomplete prompt groups, rollout importance weights under
``"recompute"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..api import EntropyProbe, step_from_gradient
from ..core.statistics import Z_95
from ..edge.distributed import Communicator, failing_together
from ..edge.progress import log
from ..errors import NoSignalError, ProbeRankError, SettingsError
from .gradients import trainer_gradient
from .predicted import predicted_metrics
from .verl_batch import BatchRefused, gather_rows, local_rows, regroup
from .verl_options import LossModel, VerlProbeOptions, loss_settings, recompute_refusals

#: verl's engine backends that the probe supports (FSDP2; ``fsdp`` is refused at build unless FSDP2)
PROBED_BACKENDS = ("fsdp", "fsdp2")


try:  # the options' carrier: verl's FSDP engine config with a ``funcprobe`` mapping
    from verl.workers.config import FSDPEngineConfig as _FSDPEngineConfig
except ImportError as _err:  # pragma: no cover - this module is only used inside verl
    raise ImportError("funcprobe.integrations.verl needs verl (pip install verl==0.9.1)") from _err


@dataclass
class ProbedFSDPEngineConfig(_FSDPEngineConfig):
    """verl's ``FSDPEngineConfig`` with the plug-in's options in ``funcprobe`` (a mapping; see
    ``VerlProbeOptions.from_mapping``). Select it with ``fsdp_config._target_``."""

    funcprobe: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        VerlProbeOptions.from_mapping(self.funcprobe)  # a bad option is refused when the config is built


def engine_options(engine_config: Any) -> VerlProbeOptions:
    """The plug-in's options held by ``engine_config`` (defaults for a plain ``FSDPEngineConfig``)."""
    return VerlProbeOptions.from_mapping(getattr(engine_config, "funcprobe", None))


def build_refusals(engine: Any) -> list[str]:
    """What of ``engine``'s configuration the probe does not support (empty: none); read before
    the model is built."""
    cfg = engine.engine_config
    checks = [
        (getattr(cfg, "strategy", None) != "fsdp2", f"strategy={getattr(cfg, 'strategy', None)!r} (FSDP1; the probe "
                                                     "supports strategy=fsdp2)"),
        (int(getattr(cfg, "ulysses_sequence_parallel_size", 1) or 1) > 1,
         "ulysses_sequence_parallel_size > 1 (Ulysses sequence parallelism: not tested)"),
        (bool(getattr(cfg, "param_offload", False)), "param_offload=True (not tested)"),
        (bool(getattr(cfg, "optimizer_offload", False)), "optimizer_offload=True (not tested)"),
    ]
    return [what for bad, what in checks if bad]


@dataclass
class _Step:
    """What one probed step needs inside the optimizer's pre-hook, and what it produced."""

    data: Any
    loss: LossModel
    metrics: dict[str, float] | None = None
    failed: bool = False


class ProbedEngineMixin:
    """Mixed into verl's FSDP engine class by ``install``: probes the actor's optimizer steps
    (see the module docstring). Changes nothing of verl's step: the probe only reads the model,
    its ``.grad``s and the optimizer, and restores modes."""

    funcprobe_step: dict[str, torch.Tensor] | None = None
    funcprobe_metrics: dict[str, float] | None = None  # the last probed step's values, on this rank

    def initialize(self):
        self.funcprobe_options = engine_options(self.engine_config)
        self._funcprobe_on = not bool(getattr(self.engine_config, "forward_only", False))  # the reference model: off
        if not self._funcprobe_on:
            return super().initialize()
        refused = build_refusals(self)
        if refused:
            raise SettingsError("funcprobe.integrations.verl: the probe does not support " + "; ".join(refused))
        out = super().initialize()
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise SettingsError(f"optimizer: {type(self.optimizer).__name__} is not a torch.optim.Optimizer (the probe "
                                "reads torch.optim's AdamW state and hooks its step)")
        self._funcprobe_eligible = 0  # steps the options let be probed, so far
        self._funcprobe_first = True  # the next train_batch is the first mini-batch of an update
        self._funcprobe_loss: tuple | None = None  # (actor config id, LossModel) checked once
        self._funcprobe_pending: _Step | None = None
        return out

    # ------------------------------------------------------------ verl's calls
    def train_batch(self, data, loss_function):
        step = self._funcprobe_plan(data, loss_function) if getattr(self, "_funcprobe_on", False) else None
        self._funcprobe_pending = step
        try:
            outputs = super().train_batch(data, loss_function)
        finally:
            self._funcprobe_pending = None
        if step is not None and isinstance(outputs, dict) and isinstance(outputs.get("metrics"), dict):
            outputs["metrics"].update(_verl_metrics(step))
        return outputs

    def optimizer_step(self):
        step = self._funcprobe_pending
        if step is None:
            return super().optimizer_step()
        handle = self.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: self._funcprobe_run(step))
        try:
            return super().optimizer_step()
        finally:
            handle.remove()

    # ------------------------------------------------------------ the probe
    def _funcprobe_plan(self, data, loss_function: Callable) -> _Step | None:
        """The step about to be trained on ``data``, if it is probed (None: not this one)."""
        first = self._funcprobe_first
        self._funcprobe_first = _is_last_minibatch(data)
        options = self.funcprobe_options
        if options.first_minibatch_only and not first:
            return None
        loss = self._funcprobe_loss_model(loss_function)
        eligible = self._funcprobe_eligible
        self._funcprobe_eligible += 1
        return _Step(data, loss) if eligible % options.every == 0 else None

    def _funcprobe_loss_model(self, loss_function: Callable) -> LossModel:
        config = getattr(loss_function, "keywords", {}).get("config")
        if self._funcprobe_loss is not None and self._funcprobe_loss[0] is config:
            return self._funcprobe_loss[1]
        if config is None or not hasattr(config, "loss_agg_mode"):
            raise SettingsError("loss_function: the probe reads loss_agg_mode from the actor config of verl's "
                                f"ppo_loss (functools.partial(ppo_loss, config=...)); got {loss_function!r}")
        loss = loss_settings(config)
        if self.funcprobe_options.gradient == "recompute":
            refused = recompute_refusals(config)
            if not loss.recomputable:
                refused.append(f"loss_agg_mode={config.loss_agg_mode!r} (its gradient is not funcprobe's loss: see "
                               "funcprobe.integrations.verl_options.loss_settings)")
            name = getattr(getattr(loss_function, "func", None), "__name__", "")
            if name != "ppo_loss":
                refused.append(f"loss function {name or loss_function!r} (modelled: verl's ppo_loss)")
            if refused:
                raise SettingsError("funcprobe.gradient: 'recompute' does not model " + "; ".join(refused)
                                    + " (use gradient='trainer')")
        self._funcprobe_loss = (config, loss)
        return loss

    def _funcprobe_settings(self, loss: LossModel):
        base = self.funcprobe_options.settings
        group = self.get_data_parallel_group()
        clip = self.optimizer_config.clip_grad if self.funcprobe_options.gradient == "recompute" else None
        return replace(base, step="optimizer_step", weighting=loss.weighting, loss_type=loss.loss_type,
                       max_grad_norm=float(clip) if clip is not None and clip > 0 else None, process_group=group)

    def _funcprobe_batch(self, step: _Step):
        """E = U of this step on this rank, B (prompts over all ranks) and E's scores ``[B_local, G]``
        (the summed ``token_level_scores``; None where the batch has none)."""
        temperature = _non_tensor(step.data, "temperature", 1.0)
        if temperature is not None and float(temperature) != 1.0:
            raise BatchRefused(f"temperature: {temperature} != 1; verl's actor scores logits / T, funcprobe the "
                               "model's own distribution")
        if self.funcprobe_options.gradient == "recompute" and "rollout_is_weights" in step.data.keys():
            raise BatchRefused("rollout_is_weights: importance weights are not modelled by gradient='recompute'")
        try:
            rows = local_rows(step.data)
        except BatchRefused as err:  # sent to the other ranks: every rank refuses together
            rows = err
        all_rows = gather_rows(rows, self.get_data_parallel_group())
        world = len(all_rows)
        rank = torch.distributed.get_rank(self.get_data_parallel_group()) if world > 1 else 0
        max_len = float(all_rows[0].ids.shape[1] - all_rows[0].response_start) if step.loss.lmax_is_response_width \
            else step.loss.max_len
        return regroup(all_rows, rank, world, max_len)

    def _funcprobe_run(self, step: _Step) -> None:
        """The probe of the step about to be taken (inside the optimizer's step pre-hook)."""
        options = self.funcprobe_options
        settings = self._funcprobe_settings(step.loss)
        comm = Communicator.for_group(settings.process_group)
        try:
            with failing_together(comm, self.module):
                E, B, scores = self._funcprobe_batch(step)
                if B < 2:
                    raise BatchRefused(f"uid: the mini-batch holds {B} prompt(s); the standard error needs 2")
                probe = EntropyProbe(self.module, self.optimizer, **settings.options())
                if options.gradient == "trainer":
                    registry = probe.registry
                    gradient = trainer_gradient(registry)
                    taken = step_from_gradient(registry, gradient, optimizer=self.optimizer, **settings.options())
                else:
                    gradient = None
                    taken = probe.update_direction(E)
                rewards = scores if settings.effects else None
                r = probe.predict(E, E, gradient=gradient, rewards=rewards)  # E = U: leave-one-out
            self.funcprobe_step = taken
        except NoSignalError as err:
            log.warning("funcprobe: step not probed: %s", err)
            return
        except Exception as err:  # a diagnostic must not stop the training it watches
            if options.raise_ or (isinstance(err, ProbeRankError) and not err.agreed):
                raise
            log.error("funcprobe: the probe failed (training goes on; funcprobe.raise=true raises): %s: %s",
                      type(err).__name__, err)
            step.failed = True
            return
        metrics = {"delta_h": r.delta_h, "se": r.se}
        if r.delta_h_same_batch is not None:
            metrics["delta_h_same_batch"] = r.delta_h_same_batch
        metrics.update(predicted_metrics(r.effects))
        step.metrics = metrics
        self.funcprobe_metrics = metrics
        log.info("funcprobe: predicted dH %+.4e ± %.2e (%s)", r.delta_h, r.se, step.loss.unit)


def _is_last_minibatch(data) -> bool:
    """Whether ``data`` is the last mini-batch of an actor update (verl steps the lr scheduler
    after it: ``update_lr_scheduler``); a batch without the flag counts as a whole update."""
    return bool(_non_tensor(data, "update_lr_scheduler", True))


def _non_tensor(data, key: str, default):
    try:
        from verl.utils import tensordict_utils as tu

        return tu.get_non_tensor_data(data=data, key=key, default=default)
    except Exception:  # not a TensorDict with that key
        return default


def _verl_metrics(step: _Step) -> dict:
    """The step's metrics as verl ``Metric`` objects under ``funcprobe/*`` (verl prefixes ``actor/``)."""
    from verl.utils.metric.utils import AggregationType, Metric

    values = {"funcprobe/probed_steps": 0.0 if step.failed or step.metrics is None else 1.0,
              "funcprobe/failed": 1.0 if step.failed else 0.0}
    m = step.metrics
    if m is not None:
        values.update({"funcprobe/delta_h": m["delta_h"], "funcprobe/se": m["se"],
                       "funcprobe/ci95_low": m["delta_h"] - Z_95 * m["se"],
                       "funcprobe/ci95_high": m["delta_h"] + Z_95 * m["se"]})
        values.update({f"funcprobe/{k}": v for k, v in m.items() if k not in ("delta_h", "se")})
    for key, value in values.items():
        if not math.isfinite(value):
            log.warning("funcprobe: non-finite %s = %r", key, value)
    return {key: Metric(AggregationType.MEAN, float(value)) for key, value in values.items()}


# ---------------------------------------------------------------- registration
_PROBED: dict[type, type] = {}


def _probed_class(cls: type) -> type:
    if issubclass(cls, ProbedEngineMixin):
        return cls
    if cls not in _PROBED:
        _PROBED[cls] = type(f"Probed{cls.__name__}", (ProbedEngineMixin, cls), {"__module__": __name__})
    return _PROBED[cls]


def _refusing_class(cls: type, backend: str) -> type:
    if getattr(cls, "_funcprobe_refuses", False):
        return cls

    def __init__(self, *args, **kwargs):
        if getattr(kwargs.get("engine_config"), "forward_only", False):  # a reference model: never probed
            return cls.__init__(self, *args, **kwargs)
        raise SettingsError(f"funcprobe.integrations.verl: the probe supports verl's FSDP2 engine only "
                            f"(strategy=fsdp2); the {backend!r} engine ({cls.__name__}) is not supported")

    return type(f"Refused{cls.__name__}", (cls,), {"__init__": __init__, "_funcprobe_refuses": True,
                                                   "__module__": __name__})


def install() -> None:
    """Put the probed engine in verl's ``EngineRegistry`` for the ``language_model`` engines of
    ``PROBED_BACKENDS`` (every device they are registered for) and refusing engines for the other
    backends. Idempotent; run when this module is imported (verl's ``external_lib``). A device
    registered after it is probed once ``install`` runs again."""
    from verl.workers.engine import EngineRegistry

    for backend, by_device in EngineRegistry._engines.get("language_model", {}).items():
        for key, cls in list(by_device.items()):
            by_device[key] = _probed_class(cls) if backend in PROBED_BACKENDS else _refusing_class(cls, backend)


install()
