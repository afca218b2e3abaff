"""The predicted effects as trainer metrics: the keys the TRL and verl integrations both log.

With the setting ``effects=True`` a probed step's ``EntropyPrediction.effects``
(``funcprobe.core.effects``, docs/derivations.md#predicted-effects) gives each trainer metric's
predicted change with its SE; the integrations log them as ``funcprobe/pred/<metric>`` and
``funcprobe/pred/<metric>_se`` (verl adds its ``actor/`` prefix).
"""

from __future__ import annotations

from ..core.effects import Effects

#: the predicted effects logged with ``effects=True`` (key → ``funcprobe.core.effects.EFFECTS`` name),
#: each beside the trainer metric it predicts the change of, in that metric's unit
PREDICTED_KEYS = {
    "pred/entropy": "entropy_token_mean",  # TRL's `entropy`, verl's `actor/entropy`: nats per completion token
    "pred/kl": "kl_per_token",  # KL(π_old ‖ π_new) of the step per completion token (second order)
    "pred/completion_length": "completion_length",  # TRL's `completions/mean_length`: tokens
    "pred/reward": "reward",  # TRL's `reward`, verl's `critic/score/mean` (with the rewards given)
}


def predicted_metrics(effects: Effects | None) -> dict[str, float]:
    """``{"pred/<metric>": value, "pred/<metric>_se": SE}`` for each of ``PREDICTED_KEYS`` that
    ``effects`` holds (``reward`` only when rewards were given); ``{}`` for None."""
    out: dict[str, float] = {}
    if effects is None:
        return out
    for key, name in PREDICTED_KEYS.items():
        if name in effects.effects:
            out[key], out[key + "_se"] = effects[name].value, effects[name].se
    return out
