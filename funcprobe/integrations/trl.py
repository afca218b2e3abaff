"""TRL integration: the probe inside a real ``trl.GRPOTrainer`` loop.

``ProbedGRPOTrainer`` is a drop-in ``GRPOTrainer`` that, every ``probe_every`` optimizer
steps, right before ``optimizer.step()`` (the ``on_pre_optimizer_step`` callback, after
gradient clipping), predicts the entropy change of that step from that step's own
generation batch (E = U = the completions just generated and scored, grouped G =
``num_generations`` per prompt), and logs into ``trainer.state.log_history`` (hence
TensorBoard / W&B) next to the ``entropy`` TRL itself logs:

* ``funcprobe/delta_h``: predicted δH of the step, in nats per response token (the
  ``per_token_avg`` weighting: TRL's default ``dapo`` and ``grpo``/``bnpo``) or nats per Lmax
  tokens (``loss_type="dr_grpo"``; docs/definitions.md#weighting),
  the leave-one-out estimate: E is the step's own batch, so each prompt is scored against
  the step without its own gradient (docs/derivations.md#leave-one-out); where funcprobe's
  model of the loss does not explain the trainer's gradient it is the plain same-batch value
  (a warning says so);
* ``funcprobe/se`` and ``funcprobe/ci95_low`` / ``funcprobe/ci95_high``;
* ``funcprobe/delta_h_same_batch``: the plain mean over E = U (each prompt's own
  contribution included; biased), for comparison;
* ``funcprobe/lr``: η, only for steps with one learning rate (not ``optimizer_step``,
  whose Δθ holds each group's rate);
* ``funcprobe/probed_steps`` and ``funcprobe/failed``: counts over the logging window.

TRL averages its own metrics over a logging window (``logging_steps``); the probe's keys are
computed per window instead (``window_metrics``): δH is the mean per probed step, its SE
the SE of that mean, the counts are counts. Every probed step's own values are in
``trainer.funcprobe_history`` (with TRL's step number).

A diagnostic must never stop the training it watches: a batch with no signal
(``NoSignalError``: all advantages 0) is skipped with a log line, and any other failure
of the probe is logged with its reason (``funcprobe/failed`` counts them) while
training goes on, unless ``probe_raise=True``. With ranks, a failure on one rank only
(an out-of-memory in its forward) is decided on by every rank before any of them
returns to the trainer's collectives: every rank skips the probe (or, with
``probe_raise``, raises ``ProbeRankError`` naming the failing rank and cause). Where the
ranks cannot agree (a rank failed inside a forward of an FSDP2 model) every rank raises
``ProbeRankError(agreed=False)`` whatever ``probe_raise``: the process group cannot go on
(docs/sharding.md#rank-failures).

What is predicted: the step the trainer takes now, ``step="optimizer_step"`` (unless
``probe_settings`` names another step), through the live AdamW with each param group's
current learning rate. Its gradient comes from (``probe_gradient``):

* ``"trainer"`` (default): the ``.grad`` the optimizer is about to use (read-only; after
  TRL's loss, gradient accumulation, mixed precision, DDP's all-reduce and the
  trainer's ``max_grad_norm`` clipping), so Δθ is exactly the step taken, whatever the
  configuration;
* ``"recompute"``: funcprobe's own gradient of TRL's loss for the configured
  ``loss_type`` (``grpo``, ``dr_grpo``, ``dapo`` — TRL's default — or ``bnpo``;
  docs/definitions.md#trl-loss-types) on the generation batch at ratio 1, clipped by
  ``max_grad_norm``, computed in the weights' dtype (without the trainer's autocast).

The predicted Δθ of the last probed step is kept in ``trainer.funcprobe_step``. The entropy is weighted ``dr_grpo`` (Lmax =
``max_completion_length``) for ``loss_type="dr_grpo"``, else ``per_token_avg``.
With ``probe_gradient="recompute"``, settings whose loss terms are not modelled are
refused by name when the trainer is built (``SettingsError``): ``beta != 0`` (KL to a reference model), ``entropy_coef`` /
adaptive entropy control, ``top_entropy_quantile < 1``, ``num_iterations > 1``,
``steps_per_generation != gradient_accumulation_steps``, ``mask_truncated_completions``,
vLLM importance-sampling correction, ``off_policy_mask_threshold``, other loss types,
and ``bnpo`` with gradient accumulation. The same batch serves as E and U; the
leave-one-out estimate removes each prompt's own contribution to the step (its cost: one
one-prompt backward and one one-prompt JVP per prompt besides the usual passes).

Tested with trl 1.16 (``pyproject.toml`` pins ``trl>=1.16,<2``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from ..api import EntropyProbe, step_from_gradient
from ..core.rollouts import RolloutBatch
from ..core.statistics import Z_95
from ..edge.distributed import Communicator, failing_together
from ..edge.progress import log
from ..errors import NoSignalError, ProbeRankError, SettingsError
from ..settings import LOSS_TYPES, ProbeSettings


def generation_batch_to_rollouts(batch: dict[str, Any], group_size: int, max_len: float | None) -> RolloutBatch:
    """TRL's generation batch (``prompt_ids``/``prompt_mask`` left-padded ``[N, P]``,
    ``completion_ids``/``completion_mask`` ``[N, C]``, ``advantages`` ``[N]``; G consecutive
    rows per prompt, as produced before TRL shuffles it) as a ``RolloutBatch``."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    N = prompt_ids.shape[0]
    if N % group_size:
        raise ValueError(f"generation batch: {N} rows is not a multiple of num_generations = {group_size}")
    B = N // group_size
    ids = torch.cat([prompt_ids, completion_ids], 1).reshape(B, group_size, -1)
    mask = torch.cat([prompt_mask, completion_mask], 1).long().reshape(B, group_size, -1)
    adv = batch["advantages"].reshape(B, group_size).double()
    return RolloutBatch(ids, mask, int(prompt_ids.shape[1]), adv, max_len)


#: where the step's gradient comes from in ``ProbedGRPOTrainer``
PROBE_GRADIENTS = ("trainer", "recompute")


class ProbedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` that logs funcprobe's prediction of each (N-th) step.

    Args (besides ``GRPOTrainer``'s):
        probe_every: probe every N optimizer steps (1: every step).
        probe_settings: ``ProbeSettings`` of the probe (``step``, ``mode``,
            ``chunk_size``, ...; default ``ProbeSettings(step="optimizer_step")``);
            ``weighting`` is taken from the trainer's ``loss_type``; ``progress`` is off.
        probe_raise: raise the probe's errors instead of logging them and training on.
        probe_gradient: ``"trainer"`` (the ``.grad`` the optimizer will use) or
            ``"recompute"`` (funcprobe's gradient of the modelled loss); see the module
            docstring.

    Raises:
        ValueError: a bad ``probe_every``; ``SettingsError`` (a ``ValueError``): a bad
            ``probe_gradient`` or ``probe_settings`` (not a ``ProbeSettings``), and the
            errors of ``trainer_settings``.
    """

    def __init__(self, *args, probe_every: int = 1, probe_settings: ProbeSettings | None = None,
                 probe_raise: bool = False, probe_gradient: str = "trainer", **kwargs):
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every: expected an int >= 1, got {probe_every!r}")
        if probe_gradient not in PROBE_GRADIENTS:
            raise SettingsError(f"probe_gradient: expected one of {PROBE_GRADIENTS}, got {probe_gradient!r}")
        if probe_settings is not None and not isinstance(probe_settings, ProbeSettings):
            raise SettingsError(f"probe_settings: expected a ProbeSettings, got {type(probe_settings).__name__}")
        base = probe_settings if probe_settings is not None else ProbeSettings(step="optimizer_step")
        base = replace(base, progress=False)
        super().__init__(*args, **kwargs)
        self.probe_gradient = probe_gradient
        self.probe_settings = trainer_settings(self, base, recompute=probe_gradient == "recompute")
        self.probe_every = probe_every
        self.probe_raise = bool(probe_raise)
        self.funcprobe_step: dict[str, torch.Tensor] | None = None
        self.funcprobe_history: list[dict[str, float]] = []  # every probed step's metrics, with "step"
        self._funcprobe_batch: dict[str, Any] | None = None
        self._funcprobe_window: list[dict[str, float]] = []
        self._funcprobe_failed = 0
        self.add_callback(_ProbeCallback(self))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's ``log`` with the probe's statistics of the logging window added
        (``window_metrics``: never averaged by TRL, so the SE is the SE of the window's mean)."""
        if self.model.training and (self._funcprobe_window or self._funcprobe_failed):
            logs.update(window_metrics(self._funcprobe_window, self._funcprobe_failed))
            self._funcprobe_window, self._funcprobe_failed = [], 0
        super().log(logs, start_time)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._funcprobe_batch = {k: out[k].detach() for k in
                                     ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
        return out

    def run_probe(self) -> dict[str, float] | None:
        """Probe the step about to be taken on the current generation batch; returns the metrics."""
        if self._funcprobe_batch is None:
            return None
        step_number = self.state.global_step + 1  # the step about to be taken, as TRL numbers it
        batch = generation_batch_to_rollouts(self._funcprobe_batch, self.num_generations,
                                             float(self.args.max_completion_length))
        comm = Communicator.for_group(self.probe_settings.process_group)
        if batch.num_prompts < 2 and not comm.distributed:  # with ranks, every rank must take part (collectives)
            log.warning("funcprobe: skipped, the step's batch has %d prompt(s); the SE needs 2", batch.num_prompts)
            return None
        try:
            # every rank leaves together (docs/sharding.md#rank-failures): a failure on one rank is
            # raised on all before any rank reaches the trainer's next collective
            with failing_together(comm, self.model):
                probe = EntropyProbe(self.model, self.optimizer, **self.probe_settings.options())
                if self.probe_gradient == "trainer":
                    registry = probe.registry
                    gradient = trainer_gradient(registry)
                    step = step_from_gradient(registry, gradient, optimizer=self.optimizer,
                                              **self.probe_settings.options())
                else:
                    gradient = None
                    step = probe.update_direction(batch)
                r = probe.predict(batch, batch, gradient=gradient)  # E = U: leave-one-out (no self-influence)
            self.funcprobe_step = step
        except NoSignalError as err:  # a batch with no signal (all advantages 0): nothing to predict
            log.warning("funcprobe: skipped step %d: %s", step_number, err)
            return None
        except Exception as err:  # a diagnostic must not stop the training it watches
            if self.probe_raise or (isinstance(err, ProbeRankError) and not err.agreed):
                raise  # not agreed: a collective is left pending, the process group cannot go on
            log.error("funcprobe: the probe failed at step %d (training goes on; probe_raise=True raises): "
                      "%s: %s", step_number, type(err).__name__, err)
            self._funcprobe_failed += 1
            return None
        metrics = {"delta_h": r.delta_h, "se": r.se}
        if r.delta_h_same_batch is not None:
            metrics["delta_h_same_batch"] = r.delta_h_same_batch
        if self.probe_settings.step != "optimizer_step":  # optimizer_step: the group lrs are inside Δθ
            metrics["lr"] = r.lr
        self._funcprobe_window.append(metrics)
        self.funcprobe_history.append({"step": float(step_number), **metrics})
        log.info("funcprobe: predicted dH %+.4e ± %.2e at step %d", r.delta_h, r.se, step_number)
        return metrics


class _ProbeCallback(TrainerCallback):
    def __init__(self, trainer: ProbedGRPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step % self.trainer.probe_every == 0:
            metrics = self.trainer.run_probe()
            if metrics is not None and not all(math.isfinite(v) for v in metrics.values()):
                log.warning("funcprobe: non-finite metrics %s", metrics)
        return control


def window_metrics(steps: list[dict[str, float]], failed: int) -> dict[str, float]:
    """The probe's keys for one logging window of probed steps (each ``{"delta_h", "se",
    ["delta_h_same_batch"], ["lr"]}`` in nats per the weighting's unit) and ``failed`` probes:

    * ``funcprobe/delta_h``: the mean predicted δH per probed step of the window, the unit of
      TRL's window-averaged ``entropy``; ``funcprobe/se``: the SE of that mean,
      sqrt(Σ SE_k²)/n (steps' errors independent); ``funcprobe/ci95_low``/``_high``: ± 1.96 SE;
    * ``funcprobe/delta_h_same_batch``, ``funcprobe/lr``: means, where every step has them;
    * ``funcprobe/probed_steps`` and ``funcprobe/failed``: counts.
    """
    n = len(steps)
    out = {"funcprobe/probed_steps": float(n), "funcprobe/failed": float(failed)}
    if not n:
        return out
    mean = sum(k["delta_h"] for k in steps) / n
    se = math.sqrt(sum(k["se"] ** 2 for k in steps)) / n
    out.update({"funcprobe/delta_h": mean, "funcprobe/se": se, "funcprobe/ci95_low": mean - Z_95 * se,
                "funcprobe/ci95_high": mean + Z_95 * se})
    for key in ("delta_h_same_batch", "lr"):
        if all(key in k for k in steps):
            out[f"funcprobe/{key}"] = sum(k[key] for k in steps) / n
    return out


def trainer_gradient(registry) -> dict[str, torch.Tensor]:
    """``{name: −p.grad}``: the ascent gradient the optimizer is about to use (read-only).

    Raises ``ValueError`` naming probed parameters that have no ``.grad``.
    """
    live = registry.live_parameters()
    missing = [n for n, p in live.items() if p.grad is None]
    if missing:
        raise ValueError(f"model: {len(missing)} probed parameter(s) have no .grad at this step: {missing[:8]}")
    return {n: -p.grad.detach() for n, p in live.items()}


def trainer_settings(trainer: GRPOTrainer, base: ProbeSettings, *, recompute: bool = True) -> ProbeSettings:
    """The probe's settings for ``trainer``: ``loss_type``, ``max_grad_norm`` (``recompute``
    only: the trainer's ``.grad`` is already clipped) and the entropy weighting from its
    ``GRPOConfig``, on top of ``base``.

    Raises ``SettingsError`` naming each ``GRPOConfig`` setting whose loss term or step
    structure the probe does not model (see the module docstring).
    """
    args = trainer.args
    loss_type = getattr(trainer, "loss_type", args.loss_type)
    checks = [
        (loss_type not in LOSS_TYPES, f"loss_type={loss_type!r} (modelled: {LOSS_TYPES})"),
        (float(getattr(trainer, "beta", args.beta)) != 0.0, "beta != 0 (the KL term to the reference model)"),
        (bool(getattr(trainer, "_entropy_bonus_enabled", False)), "entropy_coef / adaptive entropy control"),
        (float(getattr(args, "top_entropy_quantile", 1.0)) < 1.0, "top_entropy_quantile < 1 (entropy-masked tokens)"),
        (int(getattr(args, "num_iterations", 1)) > 1, "num_iterations > 1 (ratios != 1 after the first step)"),
        (args.steps_per_generation != args.gradient_accumulation_steps,
         "steps_per_generation != gradient_accumulation_steps (one optimizer step sees part of the batch)"),
        (bool(getattr(args, "mask_truncated_completions", False)), "mask_truncated_completions=True"),
        (bool(getattr(trainer, "use_vllm", False)) and bool(getattr(args, "vllm_importance_sampling_correction",
                                                                    False)), "vLLM importance-sampling correction"),
        (getattr(args, "off_policy_mask_threshold", None) is not None, "off_policy_mask_threshold"),
        (loss_type == "bnpo" and args.gradient_accumulation_steps > 1,
         "loss_type='bnpo' with gradient accumulation (TRL normalises each shuffled micro-batch)"),
    ]
    refused = [what for bad, what in checks if bad] if recompute else []
    if refused:
        raise SettingsError(
            "GRPOConfig: funcprobe does not model " + "; ".join(refused)
            + ". Its prediction would be of another step, so the probe refuses instead of guessing"
        )
    changes: dict[str, Any] = {"loss_type": loss_type if loss_type in LOSS_TYPES else None,
                               "weighting": "dr_grpo" if loss_type == "dr_grpo" else "per_token_avg"}
    if base.step == "optimizer_step" and recompute:
        max_norm = args.max_grad_norm
        changes["max_grad_norm"] = float(max_norm) if max_norm is not None and max_norm > 0 else None
    return replace(base, **changes)
