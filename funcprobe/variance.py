"""Per-prompt probe scalars s[n] = ⟨∇θ LX[n], μY⟩ and their conditional variance Var_E.

``mode="jvp"``: one ``torch.func.jvp`` of θ ↦ LX[group] along μY per group of prompts:
every s[n] of the group at the cost of about one primal + one tangent forward.

``mode="vjp"``: the seeds' α-trick (seed 001 ``compute_conditional_variance_over_E_alpha``)
as reverse-over-reverse with ``torch.func.vjp``: h(α) = ⟨∇θ Σ_n α_n LX[n], μY⟩,
s = ∂h/∂α at α = 1. Same numbers, more memory.

Statistics (SPEC "Estimates"): s̄ = mean s (``bars_dot``), δH = η·s̄,
Var_E = η²·sample_var(s)/B from Σs, Σs², B in float64, SE_E = sqrt(Var_E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from .distributed import all_gather_varlen, all_reduce_float64, handshake, resolve_group
from .guards import as_normal_batch, as_normal_tensor, probe_session
from .logprobs import sequence_logprobs
from .progress import log, progress_bar
from .pytree import ParamTree, check_like, tree_map, tree_sq_norm, tree_vdot
from .registry import ParamRegistry, ParamSelection
from .rollouts import RolloutBatch, check_batch_size, check_rollouts
from .surrogates import WEIGHTINGS, check_weighting, entropy_surrogate

MODES = ("jvp", "vjp")

#: two-sided 97.5% quantile of N(0, 1)
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class ConditionalVariance:
    """The probe's estimate of the next step's entropy change and its E-conditional error.

    Attributes:
        s: ``[B]`` float64, s[n] = ⟨∇θ LX[n], μY⟩ (nats per unit learning rate).
        sum_s, sum_s2: Σ s and Σ s² (float64), the all-reducible sufficient statistics.
        num_prompts: B.
        lr: η, the learning rate of the step.
        bars_dot: s̄ = Σs / B = ⟨μX, μY⟩.
        delta_h: predicted entropy change η·s̄ (nats).
        var_e: Var_E = η² · sample_var(s) / B (nats²).
        se_e: SE_E = sqrt(Var_E) (nats).
        mode, weighting: how s was computed.
    """

    s: Tensor = field(repr=False)
    sum_s: float
    sum_s2: float
    num_prompts: int
    lr: float
    bars_dot: float
    delta_h: float
    var_e: float
    se_e: float
    mode: str
    weighting: str

    @classmethod
    def from_sums(
        cls, s: Tensor, sum_s: float, sum_s2: float, num_prompts: int, *, lr: float, mode: str, weighting: str
    ) -> "ConditionalVariance":
        """Assemble the statistics from Σs, Σs², B (seed 001 §D). Raises ``ValueError`` if B < 2."""
        B = int(num_prompts)
        if B < 2:
            raise ValueError(f"E: the conditional variance needs at least 2 prompts, got {B}")
        mean = sum_s / B
        sample_var = max((sum_s2 - B * mean * mean) / (B - 1), 0.0)
        var_e = lr * lr * sample_var / B
        return cls(
            s=s,
            sum_s=float(sum_s),
            sum_s2=float(sum_s2),
            num_prompts=B,
            lr=float(lr),
            bars_dot=mean,
            delta_h=lr * mean,
            var_e=var_e,
            se_e=math.sqrt(var_e),
            mode=mode,
            weighting=weighting,
        )

    @property
    def ci95(self) -> tuple[float, float]:
        """Normal 95% interval δH ± 1.96·SE_E (nats)."""
        return (self.delta_h - Z_95 * self.se_e, self.delta_h + Z_95 * self.se_e)

    def to_dict(self) -> dict:
        """JSON-ready dict of every field, ``s`` as a list of floats, plus ``ci95``."""
        return {
            "s": [float(x) for x in self.s.tolist()],
            "sum_s": self.sum_s,
            "sum_s2": self.sum_s2,
            "num_prompts": self.num_prompts,
            "lr": self.lr,
            "bars_dot": self.bars_dot,
            "delta_h": self.delta_h,
            "var_e": self.var_e,
            "se_e": self.se_e,
            "ci95": list(self.ci95),
            "mode": self.mode,
            "weighting": self.weighting,
        }


def as_registry(model: nn.Module | ParamRegistry, params: ParamSelection, adapter: str | None) -> ParamRegistry:
    """``model`` itself if it is a ``ParamRegistry``, else ``ParamRegistry.from_model``."""
    if isinstance(model, ParamRegistry):
        return model
    return ParamRegistry.from_model(model, params=params, adapter=adapter)


def _scalars(
    registry: ParamRegistry,
    E: RolloutBatch,
    tangent: Mapping[str, Tensor],
    *,
    weighting: str,
    batch_size: int,
    mode: str,
    surrogate: Callable[[Tensor, RolloutBatch, str], Tensor] = entropy_surrogate,
    progress: bool | None = None,
) -> Tensor:
    """s ``[B]`` (float64) for every prompt of E, in groups of ``batch_size`` prompts.

    ``tangent`` must already have the registry's names, shapes, dtypes and devices.
    Must run inside ``probe_session``.
    """
    theta = registry.trainable

    def lx(group: RolloutBatch):
        def fn(t: ParamTree) -> Tensor:
            return surrogate(sequence_logprobs(registry.module, registry.merged(t), group), group, weighting)

        return fn

    out = []
    starts = range(0, E.num_prompts, batch_size)
    for start in progress_bar(starts, total=len(starts), desc=f"funcprobe s[n] ({mode})", enabled=progress):
        group = E.select(start, min(start + batch_size, E.num_prompts))
        log.debug("probe group: prompts %d..%d, T = %d, mode %s", start, start + group.num_prompts, group.seq_len, mode)
        if mode == "jvp":
            _, s = jvp(lx(group), (theta,), (dict(tangent),))
        else:
            s = _alpha_trick(lx(group), theta, tangent, group.num_prompts)
        out.append(s.detach().to(torch.float64))
    if not out:  # an empty data-parallel shard
        return torch.zeros(0, dtype=torch.float64, device=registry.device)
    return torch.cat(out)


def _alpha_trick(lx, theta: ParamTree, tangent: Mapping[str, Tensor], k: int) -> Tensor:
    """s = ∂/∂α ⟨∇θ Σ_n α_n LX[n](θ), μY⟩ at α = 1, by ``vjp`` over ``vjp``."""

    def h(alpha: Tensor) -> Tensor:
        _, pull = vjp(lambda t: (alpha * lx(t)).sum(), theta)
        (g,) = pull(torch.ones((), dtype=alpha.dtype, device=alpha.device))
        return tree_vdot(g, tangent)

    dtype = torch.promote_types(next(iter(theta.values())).dtype, torch.float32)
    alpha = torch.ones(k, dtype=dtype, device=next(iter(theta.values())).device)
    value, pull_h = vjp(h, alpha)
    (s,) = pull_h(torch.ones((), dtype=value.dtype, device=value.device))
    return s


def _validated_local_scalars(
    model: nn.Module | ParamRegistry,
    E: RolloutBatch,
    muY: Mapping[str, Tensor],
    *,
    weighting: str,
    batch_size: int,
    mode: str,
    params: ParamSelection,
    adapter: str | None,
    keep_dropout: bool,
    surrogate: Callable[[Tensor, RolloutBatch, str], Tensor],
    group: object | None = None,
    lr: float = 1.0,
    progress: bool | None = None,
) -> Tensor:
    check_weighting(weighting)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    check_batch_size(batch_size)
    check_rollouts(E, "E")
    registry = as_registry(model, params, adapter)
    check_like(registry.trainable, muY, "muY")
    if group is not None:
        handshake(group, registry.names, registry.numel(),
                  [lr, WEIGHTINGS.index(weighting), MODES.index(mode)])
    if tree_sq_norm(muY) == 0.0:  # μY is the same on every rank (update_direction all-reduces it)
        raise ValueError("muY: the update direction is zero everywhere; there is no step to probe")
    tangent = tree_map(
        lambda m, p: as_normal_tensor(m).to(device=p.device, dtype=p.dtype), dict(muY), registry.trainable
    )
    E = as_normal_batch(E, registry.device)
    with probe_session(registry, keep_dropout=keep_dropout):
        return _scalars(registry, E, tangent, weighting=weighting, batch_size=batch_size, mode=mode,
                        surrogate=surrogate, progress=progress)


def probe_scalars(
    model: nn.Module | ParamRegistry,
    E: RolloutBatch,
    muY: Mapping[str, Tensor],
    *,
    weighting: str = "dr_grpo",
    batch_size: int = 8,
    mode: str = "jvp",
    params: ParamSelection = "trainable",
    adapter: str | None = None,
    keep_dropout: bool = False,
    surrogate: Callable[[Tensor, RolloutBatch, str], Tensor] = entropy_surrogate,
    progress: bool | None = None,
) -> Tensor:
    """Every per-prompt s[n] = ⟨∇θ LX[n], μY⟩ of E, ``[B]`` float64 (nats per unit lr).

    The arguments, checks and errors are those of ``conditional_variance`` (which calls
    this), without ``lr`` and with any B ≥ 1, in this process only (no collectives).
    ``surrogate(S, batch, weighting) -> [B]`` replaces LX (validation studies use it to
    show that a biased baseline is detected).
    """
    s = _validated_local_scalars(
        model, E, muY, weighting=weighting, batch_size=batch_size, mode=mode, params=params, adapter=adapter,
        keep_dropout=keep_dropout, surrogate=surrogate, progress=progress,
    )
    _check_s(s, _counts(s))
    return s


def conditional_variance(
    model: nn.Module | ParamRegistry,
    E: RolloutBatch,
    muY: Mapping[str, Tensor],
    *,
    lr: float,
    weighting: str = "dr_grpo",
    batch_size: int = 8,
    mode: str = "jvp",
    params: ParamSelection = "trainable",
    adapter: str | None = None,
    keep_dropout: bool = False,
    process_group: object | None = None,
    gather_s: bool = False,
    progress: bool | None = None,
) -> ConditionalVariance:
    """Every s[n] over the evaluation batch E along μY, and Var_E / SE_E of the prediction.

    Args:
        model: an ``nn.Module`` (HF / PEFT, possibly DDP-wrapped) or a ``ParamRegistry``.
        E: evaluation rollouts, B ≥ 2 prompts × G ≥ 2 responses (across all ranks when
            distributed; a rank's shard may be empty, ``RolloutBatch.empty``).
        muY: name→tensor update direction per unit learning rate (``update_direction``),
            with exactly the registry's names and shapes; cast to each parameter's
            dtype and device.
        lr: η > 0, the learning rate of the step.
        weighting: ``"dr_grpo"`` (S / Lmax, needs ``E.max_len``) or ``"per_token_avg"``.
        batch_size: prompts per group (one JVP or one α-trick per group). Results do not
            depend on it.
        mode: ``"jvp"`` (forward mode) or ``"vjp"`` (α-trick, reverse over reverse).
        params, adapter: registry selection (ignored when ``model`` is a registry).
        keep_dropout: keep the caller's train/eval modes during the forwards.
        process_group: reduce Σs, Σs², B over this ``torch.distributed`` group; default:
            the world group when ``torch.distributed`` is initialised with > 1 rank.
        gather_s: distributed only: return every rank's s (rank order) instead of the
            local ones.
        progress: a tqdm bar over the groups: ``None`` (default) only when stderr is a
            terminal, ``True``/``False`` to force it on/off.

    Returns:
        ``ConditionalVariance`` (s, Σs, Σs², B, bars_dot, delta_h, var_e, se_e, ci95);
        the statistics are global, ``s`` is this rank's unless ``gather_s``.

    Raises:
        KeyError: μY names missing from or unknown to the registry (listed).
        ValueError: bad ``lr``/``weighting``/``mode``/``batch_size``, μY shapes or
            non-finite values (listed), μY identically zero, B < 2 (over all ranks).
        TypeError: E is not a ``RolloutBatch``.
        NotImplementedError: an FSDP-sharded model.
        RuntimeError: non-finite s (prompts listed), every s exactly 0 (the direction
            does not reach the forward: adapter disabled?), or ranks that disagree on the
            registry or settings; raised on every rank together.
    """
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    group = resolve_group(process_group)
    if group is None and isinstance(E, RolloutBatch) and E.num_prompts < 2:
        raise ValueError(f"E: the conditional variance needs at least 2 prompts, got {E.num_prompts}")
    s = _validated_local_scalars(
        model, E, muY, weighting=weighting, batch_size=batch_size, mode=mode, params=params, adapter=adapter,
        keep_dropout=keep_dropout, surrogate=entropy_surrogate, group=group, lr=float(lr), progress=progress,
    )
    local = [float(s.sum()), float((s * s).sum()), *_counts(s)]
    totals = all_reduce_float64(local, group) if group is not None else local
    _check_s(s, totals[2:])
    if group is not None and gather_s:
        s = all_gather_varlen(s, group)
    return ConditionalVariance.from_sums(
        s, totals[0], totals[1], int(totals[2]), lr=float(lr), mode=mode, weighting=weighting
    )


def _counts(s: Tensor) -> list[float]:
    """(B, #non-finite, #non-zero) of the local s, the inputs of ``_check_s``."""
    return [float(s.numel()), float((~torch.isfinite(s)).sum()), float((s != 0).sum())]


def _check_s(s: Tensor, counts: Sequence[float]) -> None:
    """Raise for non-finite or all-zero s, from (B, #non-finite, #non-zero) over all ranks."""
    total, non_finite, non_zero = counts
    if non_finite > 0:
        local = (~torch.isfinite(s)).nonzero().flatten().tolist()
        raise RuntimeError(
            f"probe: s is NaN or inf for {int(non_finite)} prompt(s) (here: {local[:16]}): the model produced "
            "non-finite log-probs on real response tokens (check the inputs and the model's dtype)"
        )
    if total > 0 and non_zero == 0:
        raise RuntimeError(
            "probe: every s[n] is exactly 0: the direction does not reach the forward "
            "(are the probed parameters used, is the adapter enabled?)"
        )
