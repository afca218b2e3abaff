"""Entropy influence: the predicted δH split exactly over the update batch's prompts,
responses and tokens (docs/derivations.md#entropy-influence).

δH = η⟨μX, Δ(g)⟩ with μX = mean_{n∈E} ∇LX[n] and Δ the step map applied to the mean
policy gradient g = mean_{i∈U} ∇J_i. Every step map here is global-norm clipping by a
scalar c followed by a coordinate-wise map A (Adam, AdamW, SGD, the learning rates),
so with q_k = (A_k(c·g_k) − A_k(0)) / (c·g_k), the secant of coordinate k's map (its
derivative where g_k = 0),

    Δ(g) = Δ(0) + diag(q)·c·g = Δ(0) + Σ_{i∈U} diag(q)·c·∇J_i / |U|     (exact)

and δH = δH_baseline + Σ_i δH_i with δH_baseline = η⟨μX, Δ(0)⟩ and
δH_i = η·c/|U|·⟨diag(q)·μX, ∇J_i⟩ = d/dε J_i(θ + ε·η·c/|U|·diag(q)·μX): one JVP over U.
J is linear in the token log-probs, J_i = Σ_{g,t} a[i,g]·log π(y_{i,g,t}), so the same JVP
of the token log-probs gives each token's share a[i,g]·d/dε log π(y_{i,g,t}).

Pure: tensors in, tensors out; the entry point is ``funcprobe.influence``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor
from torch.func import jvp

from .objectives import Objective
from .pytree import ParamTree, tree_vdot
from .rollouts import RolloutBatch
from .statistics import Z_95
from .steps import StepMap


@dataclass(frozen=True)
class StepSplit:
    """A step Δ(g) = baseline + secant ⊙ (clip · g), exactly (float64 trees).

    Attributes:
        baseline: Δ(0), the step of a zero gradient (Adam's momentum and weight decay).
        clip: c, the global-norm clipping factor of g (1.0 without clipping).
        secant: q, coordinate k's (A_k(c·g_k) − A_k(0)) / (c·g_k), or A_k'(0) where g_k = 0.
    """

    baseline: ParamTree
    clip: float
    secant: ParamTree


def split_step(step: StepMap, gradient: Mapping[str, Tensor]) -> StepSplit:
    """The exact split of ``step(gradient)`` into its zero-gradient part and a diagonal
    map of the (clipped) gradient, in float64.

    ``step`` is clipping (``step.clip``, or none) followed by the coordinate-wise map
    ``step.update``: c is the clipping factor of ``gradient``, and the secant q comes from
    ``step.secant`` where the map has one, else from the difference.

    Raises ``ValueError`` naming the parameters where the secant is not finite.
    """
    c = 1.0 if step.clip is None else float(step.clip.coefficient(gradient))
    g = {n: t.detach().to(torch.float64) * c for n, t in gradient.items()}
    if step.secant is not None:
        pairs = {n: step.secant(n, t) for n, t in g.items()}
        at_zero, secant = {n: a for n, (a, _) in pairs.items()}, {n: q for n, (_, q) in pairs.items()}
    else:
        at_zero, secant = _difference_secant(step, g)
    secant = {n: q.to(torch.float64) for n, q in secant.items()}
    bad = sorted(n for n, q in secant.items() if not bool(torch.isfinite(q).all()))
    if bad:
        raise ValueError(f"step: the step map has no finite secant at {bad[:8]}")
    return StepSplit({n: t.to(torch.float64) for n, t in at_zero.items()}, c, secant)


def _difference_secant(step: StepMap, g: ParamTree) -> tuple[ParamTree, ParamTree]:
    """(A(0), (A(g) − A(0)) / g) by difference, A'(0) by one JVP where g = 0, for the
    coordinate-wise part A of a map without ``secant`` (loses digits where A(0) ≫ A(g) − A(0))."""
    at_zero = step.coordinatewise({n: torch.zeros_like(t) for n, t in g.items()})
    at_g = step.coordinatewise(g)
    nonzero = {n: t != 0 for n, t in g.items()}
    derivative: dict[str, Tensor] = {}
    if any(not bool(m.all()) for m in nonzero.values()):  # coordinate-wise: one JVP gives every A_k'(g_k)
        _, derivative = jvp(step.coordinatewise, (g,), ({n: torch.ones_like(t) for n, t in g.items()},))
    secant = {}
    for n, t in g.items():
        safe = torch.where(nonzero[n], t, torch.ones_like(t))
        q = (at_g[n].to(torch.float64) - at_zero[n].to(torch.float64)) / safe
        secant[n] = torch.where(nonzero[n], q, derivative[n].to(torch.float64)) if n in derivative else q
    return at_zero, secant


def response_coefficients(objective: Objective, batch: RolloutBatch, dtype: torch.dtype) -> Tensor:
    """``[B, G]`` a[n, g] = ∂J[n]/∂S[n, g] of a policy-gradient objective linear in S
    (A·w/G for the weightings and TRL's token-sum losses): J[n] = Σ_g a[n,g]·S[n,g]."""
    B, G = batch.num_prompts, batch.group_size
    with torch.enable_grad():
        S = torch.zeros(B, G, dtype=dtype, device=batch.input_ids.device, requires_grad=True)
        (a,) = torch.autograd.grad(objective(S, batch).sum(), S, allow_unused=False)
    return a.detach()


def scaled_direction(split: StepSplit, vector: Mapping[str, Tensor], scale: float) -> ParamTree:
    """``scale · q ⊙ vector`` (float64): the tangent whose JVP of J_i gives δH_i
    (``vector`` = μX, ``scale`` = η·c/|U|), or whose JVP of LX[n] gives a row of s[n, i]
    (``vector`` = ∇J_i)."""
    return {n: scale * q * vector[n].detach().to(torch.float64) for n, q in split.secant.items()}


@dataclass(frozen=True)
class GroupInfluence:
    """The predicted entropy change carried by a named group of update tokens.

    Attributes:
        delta_h: Σ of the group's token shares (nats).
        se: its E-conditional SE (nats): the spread over E of s_S[n] = η·c/|U|·⟨q ⊙
            ∇LX[n], ∇J_S⟩, one JVP pass over E.
        s: ``[B_E]`` float64 s_S[n] (their mean is ``delta_h``).
        num_tokens: tokens in the group.
    """

    delta_h: float
    se: float
    s: Tensor = field(repr=False)
    num_tokens: int

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.delta_h - Z_95 * self.se, self.delta_h + Z_95 * self.se)

    def to_dict(self) -> dict:
        return {"delta_h": self.delta_h, "se": self.se, "ci95": list(self.ci95), "num_tokens": self.num_tokens}


@dataclass(frozen=True)
class EntropyInfluence:
    """δH = ``delta_h_baseline`` + Σ_i ``per_prompt[i]``, split over U exactly.

    Attributes:
        delta_h: the predicted entropy change η⟨μX, Δ⟩ (nats; ``EntropyProbe.predict``'s
            ``delta_h`` up to rounding).
        se: its E-conditional SE (nats).
        delta_h_baseline, se_baseline: the part that no update sample drives, η⟨μX, Δ(0)⟩
            (Adam's momentum and weight decay; 0 for SGD), and its SE.
        delta_h_update, se_update: Σ_i δH_i and its SE (nats).
        per_prompt: ``[B_U]`` δH_i of each update prompt (nats).
        per_response: ``[B_U, G]`` each response's share (sums to ``per_prompt``).
        per_token: ``[B_U, G, T]`` each response token's share, in the columns of U's
            ``input_ids`` (0 at prompt and padding columns; sums to ``per_response``).
        groups: name → ``GroupInfluence`` for the groups the caller named.
        matrix: optional ``[B_E, B_U]`` s[n, i] = η·c/|U|·⟨q ⊙ ∇LX[n], ∇J_i⟩ (nats): its
            column means are ``per_prompt``.
        per_prompt_se, per_response_se, per_token_se: ``[B_U]``, ``[B_U, G]``,
            ``[B_U, G, T]`` E-conditional SE of each prompt's, response's and token's share
            (nats; 0 at prompt and padding columns): sd_n/sqrt(B_E) of its per-prompt
            contributions over E, from the ``matrix`` passes; None without the matrix.
            Each share is a mean over E, so its SE is defined, but the default passes
            only form the mean μX, not the B_E per-prompt ∇LX[n] that the per-prompt
            contributions need (one JVP pass over U per E prompt: what ``matrix`` costs).
        clip: c, the clipping factor of the gradient (1.0 without clipping).
        step, lr: the step map and η (1.0 for ``optimizer_step``).
        num_eval_prompts, num_update_prompts: B_E and |U| (over all ranks).
    """

    delta_h: float
    se: float
    delta_h_baseline: float
    se_baseline: float
    delta_h_update: float
    se_update: float
    per_prompt: Tensor = field(repr=False)
    per_response: Tensor = field(repr=False)
    per_token: Tensor = field(repr=False)
    clip: float
    step: str
    lr: float
    num_eval_prompts: int
    num_update_prompts: int
    groups: dict[str, GroupInfluence] = field(default_factory=dict)
    matrix: Tensor | None = field(default=None, repr=False)
    per_prompt_se: Tensor | None = field(default=None, repr=False)
    per_response_se: Tensor | None = field(default=None, repr=False)
    per_token_se: Tensor | None = field(default=None, repr=False)

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.delta_h - Z_95 * self.se, self.delta_h + Z_95 * self.se)

    def top_tokens(self, k: int = 10, *, by: str = "abs") -> list[tuple[int, int, int, float]]:
        """The k tokens with the largest share: ``(prompt, response, column, δH share)``.

        ``by``: ``"abs"`` (largest |share|), ``"negative"`` (most entropy-decreasing) or
        ``"positive"``. Raises ``ValueError`` for another ``by`` or k < 1.
        """
        return _top_entries(self.per_token, k, by)

    def top_responses(self, k: int = 10, *, by: str = "abs") -> list[tuple[int, int, float]]:
        """The k responses with the largest share: ``(prompt, response, δH share)``; ``by``
        and errors as ``top_tokens``."""
        return _top_entries(self.per_response, k, by)

    def to_dict(self) -> dict:
        """JSON-ready dict: the totals, ``per_prompt``, ``per_response``, ``groups``, and
        with the matrix ``per_prompt_se`` and ``per_response_se`` (``per_token`` and
        ``per_token_se`` are left out: ``top_tokens`` or the tensors themselves)."""
        out = {
            "delta_h": self.delta_h, "se": self.se, "ci95": list(self.ci95),
            "delta_h_baseline": self.delta_h_baseline, "se_baseline": self.se_baseline,
            "delta_h_update": self.delta_h_update, "se_update": self.se_update,
            "clip": self.clip, "step": self.step, "lr": self.lr,
            "num_eval_prompts": self.num_eval_prompts, "num_update_prompts": self.num_update_prompts,
            "per_prompt": self.per_prompt.tolist(), "per_response": self.per_response.tolist(),
            "groups": {name: g.to_dict() for name, g in self.groups.items()},
        }
        for name in ("per_prompt_se", "per_response_se"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.tolist()
        return out


class ShareSpread:
    """The E-conditional SE of shares that are means over E of per-prompt contributions
    x_n (any shape), added one E prompt at a time without holding all B_E of them.

    Sums of d_n = x_n − ``centre`` and d_n² with ``centre`` close to the mean (the share
    from μX): Σ_n (x_n − x̄)² = Σ d_n² − (Σ d_n)²/B exactly, without the cancellation of
    raw sums of squares. ``se()`` is sd_n(x_n)/sqrt(B) elementwise, float64.
    """

    def __init__(self, centre: Tensor) -> None:
        self.centre = centre.to(torch.float64)
        self.total = torch.zeros_like(self.centre)
        self.total_sq = torch.zeros_like(self.centre)
        self.count = 0

    def add(self, x: Tensor) -> None:
        """One E prompt's contributions, the shape of ``centre``."""
        d = x.to(torch.float64) - self.centre
        self.total += d
        self.total_sq += d * d
        self.count += 1

    def se(self) -> Tensor:
        """sd_n(x_n)/sqrt(B) (B ≥ 2, else ``ValueError``)."""
        B = self.count
        if B < 2:
            raise ValueError(f"ShareSpread: the SE needs at least 2 prompts, got {B}")
        squares = self.total_sq - self.total * self.total / B
        # ≥ 0 exactly; rounding can leave -ulp where every x_n is equal (the SE is then 0)
        return (squares.clamp_min(0.0) / (B - 1) / B).sqrt()


def _top_entries(values: Tensor, k: int, by: str) -> list[tuple]:
    """``(*index, value)`` of the k entries of ``values`` with the largest ``by`` key."""
    keys = {"abs": values.abs(), "negative": -values, "positive": values}
    if by not in keys:
        raise ValueError(f"by: expected 'abs', 'negative' or 'positive', got {by!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    top = torch.topk(keys[by].flatten(), min(k, values.numel())).indices
    coords = torch.stack(torch.unravel_index(top, values.shape), -1).tolist()
    return [(*c, float(values[tuple(c)])) for c in coords]


def vdot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """⟨a, b⟩ over every tensor of two trees, in float64."""
    return float(tree_vdot({n: t.to(torch.float64) for n, t in a.items()},
                           {n: b[n].to(torch.float64) for n in a}))
