"""TRL integration: the probe inside a real ``trl.GRPOTrainer`` loop.

``ProbedGRPOTrainer`` is a drop-in ``GRPOTrainer`` that, every ``probe_every`` optimizer
steps, right before ``optimizer.step()`` (the ``on_pre_optimizer_step`` callback, after
gradient clipping), predicts the entropy change of that step from that step's own
generation batch (E = U = the completions just generated and scored, grouped G =
``num_generations`` per prompt), and logs into ``trainer.state.log_history`` (hence
TensorBoard / W&B) next to the ``entropy`` TRL itself logs:

* ``funcprobe/delta_h``: predicted δH of the step (nats / W, see docs/definitions.md#weighting);
* ``funcprobe/se`` and ``funcprobe/ci95_low`` / ``funcprobe/ci95_high``;
* ``funcprobe/mean_s`` and ``funcprobe/lr``.

A diagnostic must never stop the training it watches: a batch with no signal
(``NoSignalError``: all advantages 0) is skipped with a log line, and any other failure
of the probe is logged with its reason (``funcprobe/failed`` counts them) while
training goes on, unless ``probe_raise=True``.

Mapping of TRL's losses: ``loss_type="dr_grpo"`` → ``weighting="dr_grpo"`` with Lmax =
``max_completion_length``; every other loss type → ``per_token_avg`` (exact for
``grpo``; an approximation of the token-level normalisation of ``bnpo``/``dapo``). The
direction assumes the optimizer step on ``−∇ mean J``: TRL's gradient clipping and
multiple iterations per batch (``num_iterations > 1``) are not modelled. Using the same
batch for E and U adds an O(1/B) self-term to s̄ (each prompt's own contribution to μY).

Tested with trl 1.16 (``pyproject.toml`` pins ``trl>=1.16,<2``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from ..api import EntropyProbe
from ..core.rollouts import RolloutBatch
from ..edge.progress import log
from ..errors import NoSignalError
from ..settings import ProbeSettings


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


class ProbedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` that logs funcprobe's prediction of each (N-th) step.

    Args (besides ``GRPOTrainer``'s):
        probe_every: probe every N optimizer steps (1: every step).
        probe_settings: ``ProbeSettings`` of the probe (``step``, ``mode``,
            ``chunk_size``, ...); ``weighting`` is taken from the trainer's ``loss_type``.
        probe_raise: raise the probe's errors instead of logging them and training on.
        probe_direction, probe_batch_size, probe_mode: deprecated spellings of
            ``probe_settings`` fields.
    """

    def __init__(self, *args, probe_every: int = 1, probe_settings: ProbeSettings | None = None,
                 probe_raise: bool = False, **kwargs):
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every: expected an int >= 1, got {probe_every!r}")
        old = {k[len("probe_"):]: kwargs.pop(k) for k in ("probe_direction", "probe_batch_size", "probe_mode")
               if k in kwargs}
        self.probe_settings = ProbeSettings.resolve(probe_settings, {"progress": False, **old},
                                                    caller="ProbedGRPOTrainer")
        super().__init__(*args, **kwargs)
        self.probe_every = probe_every
        self.probe_raise = bool(probe_raise)
        self._funcprobe_batch: dict[str, Any] | None = None
        self.add_callback(_ProbeCallback(self))

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
        dr = self.loss_type == "dr_grpo"
        batch = generation_batch_to_rollouts(self._funcprobe_batch, self.num_generations,
                                             float(self.args.max_completion_length) if dr else None)
        if batch.num_prompts < 2:
            log.warning("funcprobe: skipped, the step's batch has %d prompt(s); the SE needs 2", batch.num_prompts)
            return None
        settings = replace(self.probe_settings, weighting="dr_grpo" if dr else "per_token_avg")
        try:
            r = EntropyProbe(self.model, self.optimizer, settings=settings).predict(batch, batch)
        except NoSignalError as err:  # a batch with no signal (all advantages 0): nothing to predict
            log.warning("funcprobe: skipped step %d: %s", self.state.global_step, err)
            return None
        except Exception as err:  # a diagnostic must not stop the training it watches
            if self.probe_raise:
                raise
            log.error("funcprobe: the probe failed at step %d (training goes on; probe_raise=True raises): "
                      "%s: %s", self.state.global_step, type(err).__name__, err)
            self._metrics["train"]["funcprobe/failed"].append(1.0)
            return None
        lo, hi = r.ci95
        metrics = {"funcprobe/delta_h": r.delta_h, "funcprobe/se": r.se, "funcprobe/ci95_low": lo,
                   "funcprobe/ci95_high": hi, "funcprobe/mean_s": r.mean_s, "funcprobe/lr": r.lr}
        for k, v in metrics.items():
            self._metrics["train"][k].append(v)
        log.info("funcprobe: predicted dH %+.4e ± %.2e at step %d", r.delta_h, r.se, self.state.global_step)
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
