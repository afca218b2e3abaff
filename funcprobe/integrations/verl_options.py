"""The verl plug-in's options and what it reads from verl's actor configuration.

``VerlProbeOptions`` are the plug-in's options, set in the engine config
(``actor_rollout_ref.actor.fsdp_config.funcprobe``, a mapping; see
``funcprobe.integrations.verl``). ``loss_settings`` maps verl's ``loss_agg_mode`` to
funcprobe's loss type and entropy weighting, and ``recompute_refusals`` lists the actor settings
whose loss terms funcprobe's recomputed gradient does not model. No verl import here: the values
are read by attribute from verl's config objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import SettingsError
from ..settings import ProbeSettings

#: where the step's gradient comes from: the ``.grad`` verl's optimizer is about to use, or
#: funcprobe's own gradient of the modelled loss
GRADIENTS = ("trainer", "recompute")

#: the plug-in's own keys in the ``funcprobe`` mapping; every other key is a ``ProbeSettings`` field
OWN_KEYS = ("every", "first_minibatch_only", "gradient", "raise")

#: ``ProbeSettings`` fields the plug-in sets itself (from verl's configuration)
SET_BY_PLUGIN = ("weighting", "loss_type", "max_grad_norm", "process_group", "step", "gather_s")


@dataclass(frozen=True)
class VerlProbeOptions:
    """The plug-in's options.

    Attributes:
        every: probe every N-th optimizer step of the actor (1: every step), counted over the
            steps that ``first_minibatch_only`` leaves.
        first_minibatch_only: probe only the first mini-batch of each actor update (the step at
            ratio 1, before the update's own steps move the policy); default True.
        gradient: ``"trainer"`` (default: the clipped ``.grad`` verl's optimizer is about to use,
            so Δθ is the step taken) or ``"recompute"`` (funcprobe's gradient of the modelled
            loss at ratio 1, clipped by the optimizer config's ``clip_grad``).
        raise_: raise the probe's failures instead of logging them (key ``raise``).
        settings: the probe's ``ProbeSettings`` (``mode``, ``chunk_size``, ``effects``, ...);
            ``weighting``, ``loss_type``, ``max_grad_norm``, ``step`` and ``process_group`` are
            set by the plug-in from verl's configuration.
    """

    every: int = 1
    first_minibatch_only: bool = True
    gradient: str = "trainer"
    raise_: bool = False
    settings: ProbeSettings = field(default_factory=lambda: ProbeSettings(step="optimizer_step", progress=False))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "VerlProbeOptions":
        """The options of the engine config's ``funcprobe`` mapping (None or empty: defaults).

        Raises:
            SettingsError: naming the key: not a mapping, a bad ``every`` (int >= 1),
                ``first_minibatch_only`` / ``raise`` (bool), ``gradient`` (one of ``GRADIENTS``),
                ``gradient="recompute"`` with ``first_minibatch_only=False`` (later mini-batches
                are at ratio != 1), a key the plug-in sets itself, or a bad ``ProbeSettings``
                field (its own error); an unknown key (``TypeError`` from ``ProbeSettings``,
                re-raised as ``SettingsError``).
        """
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise SettingsError(f"funcprobe: expected a mapping of options, got {type(options).__name__}")
        options = dict(options)
        every = options.pop("every", 1)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise SettingsError(f"funcprobe.every: expected an int >= 1, got {every!r}")
        first = options.pop("first_minibatch_only", True)
        raise_ = options.pop("raise", False)
        for key, value in (("first_minibatch_only", first), ("raise", raise_)):
            if not isinstance(value, bool):
                raise SettingsError(f"funcprobe.{key}: expected true or false, got {value!r}")
        gradient = options.pop("gradient", "trainer")
        if gradient not in GRADIENTS:
            raise SettingsError(f"funcprobe.gradient: expected one of {GRADIENTS}, got {gradient!r}")
        if gradient == "recompute" and not first:
            raise SettingsError("funcprobe.gradient: 'recompute' models the loss at ratio 1, which holds on the first "
                                "mini-batch of an update only; keep first_minibatch_only=true (or gradient='trainer')")
        own = sorted(set(options) & set(SET_BY_PLUGIN))
        if own:
            raise SettingsError(f"funcprobe.{own[0]}: set by the plug-in from verl's configuration "
                                f"(loss_agg_mode, clip_grad, the data-parallel group); remove it")
        try:
            settings = ProbeSettings(**{"step": "optimizer_step", "progress": False, **options})
        except TypeError as err:
            known = [f.name for f in dataclasses.fields(ProbeSettings)]
            raise SettingsError(f"funcprobe: unknown option(s) {sorted(set(options) - set(known))} (the plug-in's own: "
                                f"{OWN_KEYS}; the probe's: the fields of funcprobe.ProbeSettings)") from err
        return cls(every=every, first_minibatch_only=first, gradient=gradient, raise_=raise_, settings=settings)


@dataclass(frozen=True)
class LossModel:
    """funcprobe's model of verl's policy loss: ``loss_type`` and ``weighting`` of
    ``ProbeSettings``, and Lmax (``max_len``, tokens) for the ``dr_grpo`` weighting
    (``lmax_is_response_width``: Lmax is the batch's padded response width R, verl's
    ``max_response_len``; ``recomputable``: funcprobe's recomputed gradient is verl's)."""

    loss_type: str
    weighting: str
    max_len: float | None
    unit: str
    lmax_is_response_width: bool = False
    recomputable: bool = True


def loss_settings(actor_config: Any) -> LossModel:
    """funcprobe's loss type and weighting for verl's ``loss_agg_mode`` (issue 27's table;
    each equality tested against verl's own gradient):

    ============================  =========================================================
    ``loss_agg_mode``             funcprobe
    ============================  =========================================================
    ``token-mean`` (default)      ``dapo``, weighting ``per_token_avg`` (nats per token)
    ``seq-mean-token-mean``       ``grpo``, weighting ``per_token_avg`` (nats per token)
    ``seq-mean-token-sum``        ``dr_grpo`` with Lmax = R, the padded response width
                                  (verl's gradient is R times it: fitted under
                                  ``gradient="trainer"``; refused under ``"recompute"``)
    ``seq-mean-token-sum-norm``   ``dr_grpo`` with Lmax = ``loss_scale_factor`` (nats per
                                  Lmax tokens); refused without ``loss_scale_factor``
    ============================  =========================================================

    Raises:
        SettingsError: naming ``loss_agg_mode``: ``seq-mean-token-sum-norm`` without
            ``loss_scale_factor`` (verl then divides each micro-batch by its own padded width,
            which no per-sequence objective reproduces) and every other mode (``token-sum``).
    """
    mode = getattr(actor_config, "loss_agg_mode", None)
    if mode == "token-mean":
        return LossModel("dapo", "per_token_avg", None, "nats per response token")
    if mode == "seq-mean-token-mean":
        return LossModel("grpo", "per_token_avg", None, "nats per response token")
    if mode == "seq-mean-token-sum":
        # the token sum per sequence is Dr. GRPO with Lmax = 1, which RolloutBatch refuses (Lmax >= every
        # response length): the weighting uses Lmax = R, and the gradient's scale is fitted (trainer's .grad)
        return LossModel("dr_grpo", "dr_grpo", None, "nats per R tokens (R: the padded response width)",
                         lmax_is_response_width=True, recomputable=False)
    if mode == "seq-mean-token-sum-norm":
        factor = getattr(actor_config, "loss_scale_factor", None)
        if factor is None:
            raise SettingsError(
                "loss_agg_mode: 'seq-mean-token-sum-norm' without actor.loss_scale_factor normalises each "
                "micro-batch by its own padded width, which no per-sequence objective reproduces; set "
                "actor_rollout_ref.actor.loss_scale_factor (Dr. GRPO's Lmax, e.g. the max response length)")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise SettingsError(f"loss_scale_factor: expected a positive number, got {factor!r}")
        return LossModel("dr_grpo", "dr_grpo", float(factor), "nats per loss_scale_factor tokens")
    raise SettingsError(f"loss_agg_mode: {mode!r} is not modelled by funcprobe (modelled: token-mean, "
                        "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm with loss_scale_factor)")


def recompute_refusals(actor_config: Any) -> list[str]:
    """The actor settings whose loss terms ``gradient="recompute"`` does not model (empty: none)."""
    policy_loss = getattr(actor_config, "policy_loss", None)
    loss_mode = getattr(policy_loss, "loss_mode", "vanilla") if policy_loss is not None else "vanilla"
    checks = [
        (bool(getattr(actor_config, "use_kl_loss", False)), "use_kl_loss=True (the KL loss to the reference model)"),
        (float(getattr(actor_config, "entropy_coeff", 0.0) or 0.0) != 0.0, "entropy_coeff != 0 (the entropy bonus)"),
        (loss_mode != "vanilla", f"policy_loss.loss_mode={loss_mode!r} (modelled: 'vanilla')"),
    ]
    return [what for bad, what in checks if bad]
