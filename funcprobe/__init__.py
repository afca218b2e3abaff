"""funcprobe: predict the entropy change of the next RL optimizer step, exactly, via torch.func.

Quantities and failure modes are defined in SPEC.md; the public API:

* ``ParamRegistry``: name→tensor pytrees of a model's parameters (extracted once);
* ``RolloutBatch``: B prompts × G responses;
* ``sequence_logprobs``: the pure S(θ);
* ``entropy_surrogate`` (LX) and ``policy_gradient_surrogate`` (J);
* ``update_direction``: μY for ``sgd`` / ``adam`` / ``adam_step``;
* ``conditional_variance(model, E, muY, lr=...)``: s[n], δH, Var_E, SE_E;
* ``EntropyProbe``: both in one call.
"""

from .directions import DIRECTIONS, AdamState, adam_preconditioner, adam_step, precondition, read_adam_state
from .logprobs import sequence_logprobs
from .probe import EntropyPrediction, EntropyProbe, update_direction
from .registry import ParamRegistry, unwrap_model
from .rollouts import RolloutBatch
from .surrogates import WEIGHTINGS, entropy_surrogate, policy_gradient_surrogate, weighted_logprobs
from .variance import MODES, ConditionalVariance, conditional_variance, probe_scalars

__version__ = "0.1.0"

__all__ = [
    "AdamState",
    "ConditionalVariance",
    "DIRECTIONS",
    "EntropyPrediction",
    "EntropyProbe",
    "MODES",
    "ParamRegistry",
    "RolloutBatch",
    "WEIGHTINGS",
    "adam_preconditioner",
    "adam_step",
    "conditional_variance",
    "entropy_surrogate",
    "policy_gradient_surrogate",
    "precondition",
    "probe_scalars",
    "read_adam_state",
    "sequence_logprobs",
    "unwrap_model",
    "update_direction",
    "weighted_logprobs",
]
