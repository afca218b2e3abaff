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
* ``funcprobe/probed_steps`` and ``funcprobe/failed``: counts over the logging window;
* with ``probe_settings=ProbeSettings(effects=True, ...)``, the step's predicted effects
  (``funcprobe.core.effects``; leave-one-out like ``delta_h``), each beside the TRL metric
  whose change it predicts, in that metric's unit, with ``_se``: ``funcprobe/pred/entropy``
  (change of TRL's ``entropy``, nats per completion token), ``funcprobe/pred/kl`` (the step's
  KL(π_old ‖ π_new) per completion token, second order), ``funcprobe/pred/completion_length``
  (change of ``completions/mean_length``, tokens) and ``funcprobe/pred/reward`` (change of
  ``reward``, the weighted sum of the reward functions; absent at a step with an unscorable
  completion);
* with ``probe_realized=RealizedCompanion(prompts=B, dataset=held_out)`` (off by default),
  the realized companion (``funcprobe.integrations.realized``): for each probed step, before
  ``optimizer.step()``, G = ``num_generations`` responses to each of B prompts drawn at
  random from the dataset (held out: never trained on) are sampled from π_θ (temperature
  1, no truncation, eval mode: the policy whose entropy is predicted, whatever the trainer
  samples with; in a seeded block that leaves the global CPU/CUDA generators as they were,
  so training is bit-identical with it off) and scored; after the step they are rescored
  and ``funcprobe/realized_delta_h`` is the importance-sampling change of the weighted
  entropy on them (``is_change``: unbiased for every G), in the unit of
  ``funcprobe/delta_h``, with ``funcprobe/realized_se`` (SE over the B prompts),
  ``funcprobe/z`` (predicted − realized over sqrt(SE² + SE_realized²), of the window's
  mean difference), ``funcprobe/realized_steps`` and ``funcprobe/realized_failed``. Its
  cost per probed step: one generation of B·G responses, two no-grad forwards over them.
  Not supported (refused by name): vLLM, continuous batching, ``rollout_func``, tools or
  environments, vision-language processors, FSDP, DeepSpeed, devices other than cpu/cuda.
  Under DDP every rank samples and scores the same H (same seed) by itself.

TRL averages its own metrics over a logging window (``logging_steps``); the probe's keys are
computed per window instead (``window_metrics``): δH is the mean per probed step, its SE
the SE of that mean, the counts are counts. Every probed step's own values are in
``trainer.funcprobe_history`` (with TRL's step number; with ``probe_realized``, also its
``realized_delta_h``, ``realized_se`` and ``z``).

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
from ..core.control import EntropyControl
from . import control as entropy_control_step
from .gradients import trainer_gradient
from .predicted import PREDICTED_KEYS, predicted_metrics
from .realized import RealizedCompanion, held_out_logprobs, realized_change, sample_held_out, sampling_config


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
        probe_realized: ``RealizedCompanion(prompts=B, dataset=held_out)``: B held-out prompts
            on which each probed step's realized change is measured
            (``funcprobe/realized_delta_h``; see the module docstring); None: off.
        entropy_control: an ``EntropyControl`` (target, knob ``"lr_scale"`` or ``"beta"``):
            before every optimizer step, the knob is chosen on the step's own batch and
            applied to that step (``funcprobe.integrations.control``; docs/control.md#in-trl);
            None (default): training is exactly TRL's.

    Raises:
        ValueError: a bad ``probe_every``; ``SettingsError`` (a ``ValueError``): a
            ``probe_realized`` that is not a ``RealizedCompanion``, a bad
            ``probe_gradient`` or ``probe_settings`` (not a ``ProbeSettings``), a trainer
            setting ``probe_realized`` does not support (``realized_refusals``), an
            ``entropy_control`` that is not an ``EntropyControl`` or a trainer it does not
            model (``control_refusals``, and ``trainer_settings``'s refusals of a recomputed
            loss), and the errors of ``trainer_settings``.
    """

    def __init__(self, *args, probe_every: int = 1, probe_settings: ProbeSettings | None = None,
                 probe_raise: bool = False, probe_gradient: str = "trainer",
                 probe_realized: RealizedCompanion | None = None, entropy_control: EntropyControl | None = None,
                 **kwargs):
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every: expected an int >= 1, got {probe_every!r}")
        if probe_realized is not None and not isinstance(probe_realized, RealizedCompanion):
            raise SettingsError("probe_realized: expected RealizedCompanion(prompts=B, dataset=held_out) or None, got "
                                f"{type(probe_realized).__name__}")
        if probe_gradient not in PROBE_GRADIENTS:
            raise SettingsError(f"probe_gradient: expected one of {PROBE_GRADIENTS}, got {probe_gradient!r}")
        if probe_settings is not None and not isinstance(probe_settings, ProbeSettings):
            raise SettingsError(f"probe_settings: expected a ProbeSettings, got {type(probe_settings).__name__}")
        if entropy_control is not None and not isinstance(entropy_control, EntropyControl):
            raise SettingsError(f"entropy_control: expected an EntropyControl (funcprobe.EntropyControl), got "
                                f"{type(entropy_control).__name__}")
        base = probe_settings if probe_settings is not None else ProbeSettings(step="optimizer_step")
        base = replace(base, progress=False)
        super().__init__(*args, **kwargs)
        self.entropy_control = entropy_control
        self._funcprobe_control: tuple | None = None  # (step number, lrs to restore, metrics) of this step
        self._funcprobe_control_failed = 0
        self._funcprobe_estimate: tuple | None = None  # (step number, EntropyEstimate after it) of the last decision
        if entropy_control is not None:
            refused = entropy_control_step.control_refusals(
                world_size=self.accelerator.num_processes, probe_gradient=probe_gradient, step=base.step)
            if refused:
                raise SettingsError(f"entropy_control: not supported with {'; '.join(refused)}")
            try:
                self.control_settings = trainer_settings(self, base, recompute=True)  # clipping: max_grad_norm
            except SettingsError as err:
                raise SettingsError(f"entropy_control: {err}") from None
        if probe_realized is not None:
            refused = realized_refusals(self)
            if refused:
                raise SettingsError(f"probe_realized: not supported with {'; '.join(refused)} (the held-out "
                                    "rollouts are sampled with model.generate on each process's own full model)")
        self.probe_gradient = probe_gradient
        self.probe_settings = trainer_settings(self, base, recompute=probe_gradient == "recompute")
        self.probe_every = probe_every
        self.probe_raise = bool(probe_raise)
        self.funcprobe_step: dict[str, torch.Tensor] | None = None
        self.funcprobe_history: list[dict[str, float]] = []  # every probed step's metrics, with "step"
        self._funcprobe_batch: dict[str, Any] | None = None
        self._funcprobe_window: list[dict[str, float]] = []
        self._funcprobe_rewards: torch.Tensor | None = None  # [B, G] of this process's batch (effects)
        self._funcprobe_failed = 0
        self.probe_realized = probe_realized
        # the held-out prompts and sampling seeds: a generator of their own, never the global one
        self._funcprobe_realized_rng = torch.Generator().manual_seed(int(self.args.seed))
        self._funcprobe_pending: tuple | None = None  # (metrics, history entry, H, S0) between the two callbacks
        self._funcprobe_realized_failed = 0
        self.add_callback(_ProbeCallback(self))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's ``log`` with the probe's statistics of the logging window added
        (``window_metrics``: never averaged by TRL, so the SE is the SE of the window's mean)."""
        if self.model.training and (self._funcprobe_window or self._funcprobe_failed
                                    or self._funcprobe_realized_failed or self._funcprobe_control_failed):
            logs.update(window_metrics(self._funcprobe_window, self._funcprobe_failed,
                                       realized_failed=self._funcprobe_realized_failed
                                       if self.probe_realized is not None else None))
            if self.entropy_control is not None:
                logs.update(entropy_control_step.control_window(self._funcprobe_window,
                                                                self._funcprobe_control_failed))
            self._funcprobe_window, self._funcprobe_failed, self._funcprobe_realized_failed = [], 0, 0
            self._funcprobe_control_failed = 0
        super().log(logs, start_time)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training and self.probe_settings.effects:  # this process's rows of the weighted reward
            n, rank = len(prompts), self.accelerator.process_index
            local = rewards_per_func[rank * n:(rank + 1) * n]
            rewards = (local * self.reward_weights.to(local.device).unsqueeze(0)).nansum(dim=1)
            unscorable = torch.isnan(local).all(dim=1)
            self._funcprobe_rewards = None if bool(unscorable.any()) else (
                rewards.detach().double().reshape(-1, self.num_generations))
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._funcprobe_batch = {k: out[k].detach() for k in
                                     ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
        return out

    def _clip_grad_norm(self, model):
        """Transformers' clipping, with the entropy control's knob applied first (on the raw
        gradient: the trainer then clips the gradient the controller chose)."""
        if self.entropy_control is not None and self.model.training:
            self.control_step()
        return super()._clip_grad_norm(model)

    def control_step(self) -> dict[str, float] | None:
        """Choose the knob of the step about to be taken and apply it (once per step: from
        ``_clip_grad_norm`` or, without clipping, the pre-optimizer-step callback); returns
        the step's metrics, or None where it was not controlled (no batch, no signal, a
        failure: logged, ``funcprobe/control/failed`` counts it; the step is then TRL's)."""
        step_number = self.state.global_step + 1
        if self._funcprobe_control is not None and self._funcprobe_control[0] == step_number:
            return self._funcprobe_control[2]
        self._funcprobe_control = (step_number, None, None)
        if self._funcprobe_batch is None:
            return None
        batch = generation_batch_to_rollouts(self._funcprobe_batch, self.num_generations,
                                             float(self.args.max_completion_length))
        try:
            probe = EntropyProbe(self.model, self.optimizer, **self.control_settings.options())
            carried = self._funcprobe_estimate
            prior = carried[1] if carried is not None and carried[0] == self.state.global_step else None
            self._funcprobe_estimate = None  # an undecided step moves the entropy unpredicted
            decision = entropy_control_step.decide(probe, batch, trainer_gradient(probe.registry),
                                                   self.entropy_control, self.state.global_step, prior)
        except NoSignalError as err:
            log.warning("funcprobe: step %d not controlled: %s", step_number, err)
            return None
        except Exception as err:  # the step goes on as TRL's own
            if self.probe_raise:
                raise
            log.error("funcprobe: entropy control failed at step %d (the step is taken uncontrolled; "
                      "probe_raise=True raises): %s: %s", step_number, type(err).__name__, err)
            self._funcprobe_control_failed += 1
            return None
        self._funcprobe_estimate = (step_number, decision.estimate_after())
        saved = entropy_control_step.apply(decision, self.optimizer, probe.registry)
        metrics = entropy_control_step.decision_metrics(decision)
        self.funcprobe_step = decision.step
        self._funcprobe_control = (step_number, saved, metrics)
        log.info("funcprobe: %s = %.4g, predicted dH %+.4e ± %.2e at step %d (uncontrolled %+.4e)",
                 decision.knob, decision.value, decision.delta_h, decision.se, step_number, decision.uncontrolled)
        return metrics

    def after_step(self) -> None:
        """After ``optimizer.step()``: the learning rates the control scaled are put back."""
        if self._funcprobe_control is not None:
            entropy_control_step.restore(self.optimizer, self._funcprobe_control[1])
            self._funcprobe_control = (self._funcprobe_control[0], None, self._funcprobe_control[2])

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
                rewards = self._funcprobe_rewards if self.probe_settings.effects else None
                r = probe.predict(batch, batch, gradient=gradient,  # E = U: leave-one-out (no self-influence)
                                  rewards=rewards)
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
        metrics.update(predicted_metrics(r.effects))
        self.record(metrics, step_number)
        log.info("funcprobe: predicted dH %+.4e ± %.2e at step %d", r.delta_h, r.se, step_number)
        return metrics

    def record(self, metrics: dict[str, float], step_number: int) -> None:
        """Keep a probed step's metrics for its logging window and in ``funcprobe_history``."""
        self._funcprobe_window.append(metrics)
        self.funcprobe_history.append({"step": float(step_number), **metrics})

    def realize_before(self, metrics: dict[str, float]) -> None:
        """Before the step: sample the held-out rollouts H of this probed step (``metrics``:
        its prediction, as ``run_probe`` returned it) from π_θ and score them (S0)."""
        self._funcprobe_pending = None
        entry = self.funcprobe_history[-1]
        try:
            data, B = self.probe_realized.dataset, self.probe_realized.prompts
            rows = torch.randperm(len(data), generator=self._funcprobe_realized_rng)[:B].tolist()
            seed = int(torch.randint(2**62, (1,), generator=self._funcprobe_realized_rng))
            prompt_ids, images, _ = self._tokenize_prompts([data[i]["prompt"] for i in rows])
            if images is not None:
                raise ValueError("probe_realized.dataset: prompts with images are not supported")
            config = sampling_config(group_size=self.num_generations,
                                     max_new_tokens=int(self.args.max_completion_length),
                                     eos_token_ids=self.eos_token_ids, pad_token_id=self._tokenizer.pad_token_id)
            H = sample_held_out(self.accelerator.unwrap_model(self.model), prompt_ids, config, seed=seed,
                                max_len=float(self.args.max_completion_length))
            S0 = held_out_logprobs(self.model, H, self.probe_settings)
        except Exception as err:  # a diagnostic must not stop the training it watches
            self._realized_failed(int(entry["step"]), err)
            return
        self._funcprobe_pending = (metrics, entry, H, S0)

    def realize_after(self) -> dict[str, float] | None:
        """After the step: rescore H under θ' (S1) and add the realized change of the step
        (``realized_delta_h``, ``realized_se`` and ``z``) to its metrics; returns those."""
        if self._funcprobe_pending is None:
            return None
        metrics, entry, H, S0 = self._funcprobe_pending
        self._funcprobe_pending = None
        try:
            S1 = held_out_logprobs(self.model, H, self.probe_settings)
            r = realized_change(S0, S1, H, self.probe_settings.weighting)
        except Exception as err:  # a diagnostic must not stop the training it watches
            self._realized_failed(int(entry["step"]), err)
            return None
        values = {"realized_delta_h": r.delta_h, "realized_se": r.se}
        denom = math.sqrt(metrics["se"] ** 2 + r.se ** 2)
        if denom > 0:
            values["z"] = (metrics["delta_h"] - r.delta_h) / denom
        metrics.update(values)
        entry.update(values)
        log.info("funcprobe: realized dH %+.4e ± %.2e at step %d", r.delta_h, r.se, int(entry["step"]))
        return values

    def _realized_failed(self, step_number: int, err: Exception) -> None:
        if self.probe_raise:
            raise err
        log.error("funcprobe: the realized change failed at step %d (training goes on; probe_raise=True raises): "
                  "%s: %s", step_number, type(err).__name__, err)
        self._funcprobe_realized_failed += 1


class _ProbeCallback(TrainerCallback):
    def __init__(self, trainer: ProbedGRPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        controlled = None
        if self.trainer.entropy_control is not None:  # without clipping, the knob is applied here
            controlled = self.trainer.control_step()
        metrics = None
        if controlled is not None:  # the decision's prediction is the step's prediction
            metrics = dict(controlled)
            self.trainer.record(metrics, state.global_step + 1)
        elif state.global_step % self.trainer.probe_every == 0:
            metrics = self.trainer.run_probe()
            if metrics is not None and not all(math.isfinite(v) for v in metrics.values()):
                log.warning("funcprobe: non-finite metrics %s", metrics)
        if metrics is not None and self.trainer.probe_realized is not None:
            self.trainer.realize_before(metrics)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.after_step()
        values = self.trainer.realize_after()
        if values is not None and not all(math.isfinite(v) for v in values.values()):
            log.warning("funcprobe: non-finite realized values %s", values)
        return control


def window_metrics(steps: list[dict[str, float]], failed: int, *,
                   realized_failed: int | None = None) -> dict[str, float]:
    """The probe's keys for one logging window of probed steps (each ``{"delta_h", "se",
    ["delta_h_same_batch"], ["lr"], ["realized_delta_h", "realized_se"]}`` in nats per the
    weighting's unit) and ``failed`` probes:

    * ``funcprobe/delta_h``: the mean predicted δH per probed step of the window, the unit of
      TRL's window-averaged ``entropy``; ``funcprobe/se``: the SE of that mean,
      sqrt(Σ SE_k²)/n (steps' errors independent); ``funcprobe/ci95_low``/``_high``: ± 1.96 SE;
    * ``funcprobe/delta_h_same_batch``, ``funcprobe/lr``: means, where every step has them;
    * ``funcprobe/probed_steps`` and ``funcprobe/failed``: counts.

    With ``realized_failed`` (a count: the realized companion is on), also
    ``funcprobe/realized_steps`` and ``funcprobe/realized_failed`` (counts) and, over the m
    steps that have a realized change, ``funcprobe/realized_delta_h`` (its mean) and
    ``funcprobe/realized_se`` (sqrt(Σ SE_k²)/m) and ``funcprobe/z``: Σ_k (δH_k − realized_k)
    / sqrt(Σ_k (SE_k² + SE_realized,k²)), the z of the window's mean difference.
    """
    n = len(steps)
    out = {"funcprobe/probed_steps": float(n), "funcprobe/failed": float(failed)}
    if realized_failed is not None:
        out.update(_realized_window(steps, realized_failed))
    if not n:
        return out
    mean = sum(k["delta_h"] for k in steps) / n
    se = math.sqrt(sum(k["se"] ** 2 for k in steps)) / n
    out.update({"funcprobe/delta_h": mean, "funcprobe/se": se, "funcprobe/ci95_low": mean - Z_95 * se,
                "funcprobe/ci95_high": mean + Z_95 * se})
    for key in ("delta_h_same_batch", "lr"):
        if all(key in k for k in steps):
            out[f"funcprobe/{key}"] = sum(k[key] for k in steps) / n
    for key in PREDICTED_KEYS:
        if all(key in k for k in steps):
            out[f"funcprobe/{key}"] = sum(k[key] for k in steps) / n
            out[f"funcprobe/{key}_se"] = math.sqrt(sum(k[key + "_se"] ** 2 for k in steps)) / n
    return out


def _realized_window(steps: list[dict[str, float]], failed: int) -> dict[str, float]:
    real = [k for k in steps if "realized_delta_h" in k]
    m = len(real)
    out = {"funcprobe/realized_steps": float(m), "funcprobe/realized_failed": float(failed)}
    if not m:
        return out
    out["funcprobe/realized_delta_h"] = sum(k["realized_delta_h"] for k in real) / m
    out["funcprobe/realized_se"] = math.sqrt(sum(k["realized_se"] ** 2 for k in real)) / m
    var = sum(k["se"] ** 2 + k["realized_se"] ** 2 for k in real)
    if var > 0:
        out["funcprobe/z"] = sum(k["delta_h"] - k["realized_delta_h"] for k in real) / math.sqrt(var)
    return out


def realized_refusals(trainer: GRPOTrainer) -> list[str]:
    """The trainer settings under which ``probe_realized`` cannot sample its held-out
    rollouts as documented (empty: none)."""
    args = trainer.args
    device = trainer.accelerator.device
    checks = [
        (bool(getattr(trainer, "use_vllm", False)), "use_vllm=True"),
        (bool(getattr(trainer, "use_transformers_continuous_batching", False)),
         "transformers continuous batching"),
        (getattr(trainer, "rollout_func", None) is not None, "a rollout_func"),
        (bool(getattr(trainer, "tools", None)) or getattr(trainer, "environment_factories", None) is not None,
         "tools or environments"),
        (bool(getattr(trainer, "_is_vlm", False)), "a vision-language processor"),
        (bool(getattr(trainer, "is_fsdp_enabled", False)), "FSDP"),
        (bool(getattr(trainer, "is_deepspeed_enabled", False)), "DeepSpeed"),
        (device.type not in ("cpu", "cuda"), f"device {device} (cpu or cuda: their generators are restored)"),
        (args.max_completion_length is None, "max_completion_length=None"),
    ]
    return [what for bad, what in checks if bad]


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
