"""Rewards → advantages: the one place the demo, the command line (rollout files), the
validation task and the benchmarks turn ``[B, G]`` rewards into group advantages.

As TRL's ``GRPOTrainer`` does (``trl/trainer/grpo_trainer.py``,
``_generate_and_score_completions``): ``A = (r − mean_g r) / (std_g r + 1e-4)`` with the
unbiased standard deviation over the G responses of a prompt (``scale_rewards="group"``,
TRL's default), or ``A = r − mean_g r`` (``scale_rewards="none"``, Dr. GRPO). A prompt
whose G rewards are all equal gets all-zero advantages: it carries no signal in the update
batch U (``no_signal_prompts``). The TRL integration reads TRL's own advantages and does
not recompute them.
"""

from __future__ import annotations

from torch import Tensor

#: the values of ``scale_rewards`` (TRL's names)
SCALE_REWARDS = ("group", "none")


def group_advantages(rewards: Tensor, scale_rewards: str = "group") -> Tensor:
    """``[B, G]`` floating rewards → ``[B, G]`` advantages of the same dtype (see the
    module docstring).

    Raises:
        ValueError: ``scale_rewards`` not in ``SCALE_REWARDS``; ``rewards`` not a floating
            ``[B, G]`` tensor with G ≥ 2 (the standard deviation over a group of one is NaN).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {SCALE_REWARDS}, got {scale_rewards!r}")
    _check_rewards(rewards)
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale_rewards == "none":
        return centred
    return centred / (rewards.std(-1, keepdim=True) + 1e-4)


def no_signal_prompts(rewards: Tensor) -> list[int]:
    """Indices of the prompts whose G rewards (``[B, G]``) are all equal: zero advantages,
    no signal in U. Raises ``ValueError`` for rewards that are not a ``[B, G]`` tensor."""
    _check_rewards(rewards, floating=False)
    return [i for i in range(rewards.shape[0]) if bool((rewards[i] == rewards[i, 0]).all())]


def _check_rewards(rewards: object, floating: bool = True) -> None:
    if not isinstance(rewards, Tensor) or rewards.ndim != 2:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards: expected a [B, G] tensor, got {shape}")
    if floating and not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a floating dtype, got {rewards.dtype}")
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards: G = {rewards.shape[1]} responses per prompt; group advantages need G >= 2")
