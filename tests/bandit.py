"""The softmax bandit: a policy whose first-order entropy change has a closed form.

``SoftmaxBandit`` is a policy whose logits z are free parameters (one response token, no
context). For a logit step Δz the first-order entropy change is
``−Cov_{a∼π}(log π(a), Δz(a))`` (Cui et al. 2025, "The Entropy Mechanism of
Reinforcement Learning for Reasoning Language Models", first-order entropy dynamics of a
softmax policy); the vanilla policy-gradient step is ``Δz = π ⊙ (A − E_π[A])``. Test
code (``test_validation.py``, ``test_influence.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from funcprobe import RolloutBatch


class SoftmaxBandit(nn.Module):
    """π(a) = softmax(z)[a] over K actions; follows the HF causal-LM calling convention.

    The logits do not depend on the input: ``forward`` returns z broadcast to
    ``[N, T, K]``. A rollout is a one-token "prompt" followed by one action token.
    """

    def __init__(self, logits: Tensor):
        super().__init__()
        self.z = nn.Parameter(logits.detach().clone())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        N, T = input_ids.shape
        return self.z.expand(N, T, self.z.shape[-1])


def covariance_entropy_derivative(z: Tensor, dz: Tensor) -> Tensor:
    """``−Cov_{a∼π}(log π(a), Δz(a))``: d/dε H(softmax(z + ε Δz)) at ε = 0 (nats)."""
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return -((p * logp * dz).sum() - (p * logp).sum() * (p * dz).sum())


def policy_gradient_logit_step(z: Tensor, advantages: Tensor) -> Tensor:
    """``∇z E_{a∼π}[A(a)] = π ⊙ (A − E_π[A])`` for per-action advantages ``[K]``."""
    p = torch.softmax(z, -1)
    return p * (advantages - (p * advantages).sum())


def bandit_rollouts(actions: Tensor, advantages: Tensor | None = None) -> RolloutBatch:
    """``[B, G]`` sampled actions as a ``RolloutBatch`` (prompt: token 0; response: the action)."""
    B, G = actions.shape
    ids = torch.stack([torch.zeros_like(actions), actions], -1)
    return RolloutBatch(ids, torch.ones_like(ids), 1, advantages, 1.0)
