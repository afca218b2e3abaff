"""funcprobe: predict the entropy change of the next RL optimizer step, exactly, via torch.func.

Quantities are defined in ``docs/definitions.md``; the failure modes of the older
design, and how each is ruled out, in ``docs/failure-modes.md``. The public API:

* ``ProbeSettings``: every option, checked once;
* ``RolloutBatch``: B prompts × G responses;
* ``update_direction(model, U, optimizer=...)``: μY for ``step`` ``sgd`` /
  ``frozen_adam`` / ``adam_step``;
* ``conditional_variance(model, E, muY, lr=...)``: s[n], δH, SE, 95% interval;
* ``EntropyProbe``: both in one call, following the live model and optimizer;
* ``entropy_influence(model, E, U, optimizer=...)`` / ``EntropyProbe.influence``: δH
  split exactly over U's prompts, responses and tokens, with SEs (``funcprobe.influence``);
* ``choose_knob(model, E, U, EntropyControl(EntropyTarget(...), knob=...))`` / ``EntropyProbe.choose``: the
  entropy-bonus coefficient or step-size scale of the next step that meets an entropy
  target or a KL budget (``funcprobe.control``, docs/control.md);
* the pure core: ``sequence_logprobs`` (S), ``entropy_surrogate`` (LX),
  ``policy_gradient_surrogate`` (J), the transforms (``funcprobe.core``);
* the step maps as optax-style ``StepMap`` values: ``sgd``, ``frozen_adam``,
  ``adam_next_step``, ``clip_by_global_norm``, ``scale_by_lr``, ``chain``,
  ``optimizer_step_map`` (``funcprobe.core.steps``).

Layout (imports point one way, lowest first; ``tests/test_architecture.py`` checks it):
``funcprobe.forward`` (forward-mode operators: the rules mode, LM head, attention, Triton
kernels), ``funcprobe.core`` (pure maths), ``funcprobe.edge`` (side effects; sharding as a
strategy), ``funcprobe.io`` (files), ``funcprobe.run`` (the run value: registry, settings,
communicator, compute dtype, θ; chunk plan, session, the two core calls),
``funcprobe.passes`` (policy gradient, step, s, δH ± SE, leave-one-out),
``funcprobe.influence`` (the split), ``funcprobe.control`` (choosing a knob), ``funcprobe.api`` (entry points),
``funcprobe.validation`` (demo studies), ``funcprobe.integrations`` (TRL),
``funcprobe.apps`` (demo, command line, plots).
"""

from __future__ import annotations

from . import errors
from .api import (
    EntropyProbe,
    choose_knob,
    conditional_variance,
    entropy_influence,
    probe_scalars,
    step_from_gradient,
    update_direction,
)
from .core.control import ControlDecision, EntropyControl, EntropyEstimate, EntropySchedule, EntropyTarget
from .core.influence import EntropyInfluence, GroupInfluence
from .core.logprobs import sequence_logprobs
from .core.objectives import (
    Objective,
    entropy_objective,
    entropy_surrogate,
    policy_gradient_objective,
    policy_gradient_surrogate,
    weighted_logprobs,
)
from .core.rollouts import RolloutBatch
from .core.statistics import EntropyPrediction
from .core.steps import (
    AdamHyper,
    AdamState,
    ClipByGlobalNorm,
    StepMap,
    adam_next_step,
    adam_preconditioner,
    chain,
    clip_by_global_norm,
    frozen_adam,
    optimizer_step_map,
    scale_by_lr,
    sgd,
)
from .core.transforms import directional_derivatives, summed_gradient
from .edge.optim import read_adam_state

from .edge.registry import ParamRegistry, unwrap_model
from .influence import InfluenceRequest
from .errors import (
    NoSignalError,
    NonFiniteError,
    ProbeRankError,
    RankMismatchError,
    SettingsError,
    StaleProbeError,
    UnreachableDirectionError,
    UnsupportedModelError,
)
from .settings import MODES, STEPS, WEIGHTINGS, ProbeSettings

__version__ = "0.3.0"

__all__ = [
    "AdamHyper",
    "AdamState",
    "ClipByGlobalNorm",
    "ControlDecision",
    "EntropyControl",
    "EntropyEstimate",
    "EntropyInfluence",
    "EntropyPrediction",
    "EntropyProbe",
    "EntropySchedule",
    "EntropyTarget",
    "GroupInfluence",
    "InfluenceRequest",
    "MODES",
    "NoSignalError",
    "NonFiniteError",
    "Objective",
    "ParamRegistry",
    "ProbeRankError",
    "ProbeSettings",
    "RankMismatchError",
    "RolloutBatch",
    "STEPS",
    "SettingsError",
    "StaleProbeError",
    "StepMap",
    "UnreachableDirectionError",
    "UnsupportedModelError",
    "WEIGHTINGS",
    "adam_next_step",
    "adam_preconditioner",
    "chain",
    "choose_knob",
    "clip_by_global_norm",
    "conditional_variance",
    "directional_derivatives",
    "entropy_influence",
    "entropy_objective",
    "entropy_surrogate",
    "errors",
    "frozen_adam",
    "optimizer_step_map",
    "policy_gradient_objective",
    "policy_gradient_surrogate",
    "probe_scalars",
    "read_adam_state",
    "scale_by_lr",
    "sequence_logprobs",
    "sgd",
    "step_from_gradient",
    "summed_gradient",
    "unwrap_model",
    "update_direction",
    "weighted_logprobs",
]
