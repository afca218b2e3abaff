"""The run value: what one probe call computes with, built once, and its two core calls.

Every pass of the probe (the policy gradient of U, the scalars s over E, the influence
split, and any pass added later) needs the same five things: the parameter registry, the
checked settings, the communicator of its process group, the compute dtype of the
precision policy and θ in that dtype. ``ProbeRun.of(registry, settings)`` builds them once
per call; the run then owns

* the chunk plan: the chunk size from the settings or the memory budget
  (``funcprobe.edge.memory``), cut by the model's sharding strategy
  (``funcprobe.edge.sharding``: own chunks, or equal counts on FSDP2) and wrapped in a
  progress bar;
* the session (``funcprobe.edge.session``): modes, adapter, attention, precision and, for
  forward-mode passes, the rules mode of ``funcprobe.forward.rules`` (Triton kernels per ``settings.kernels``);
* the two core calls (``funcprobe.core.transforms``): ``gradient`` (Σ_n ∇θ f[n] over this
  rank's prompts) and ``derivatives`` (d/dε f(θ + ε·tangent)[n] per prompt).

Entry points (``funcprobe.api``, ``funcprobe.influence``) are compositions of these.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor

from .forward.rules import jvp_rules
from .core.objectives import PromptFn
from .core.pytree import ParamTree, tree_map
from .core.rollouts import RolloutBatch
from .core.token_stats import TOKEN_STATS
from .core.transforms import Chunks, directional_derivatives, summed_gradient
from .edge.distributed import Communicator
from .edge.memory import chunk_size_for
from .edge.precision import compute_dtype, primal
from .edge.progress import chunk_progress
from .edge.registry import ParamRegistry
from .edge.session import as_normal_batch, as_normal_tensor, probe_session
from .edge.sharding import Sharding, no_progress
from .settings import ProbeSettings

@dataclass(frozen=True)
class ProbeRun:
    """One probe call's registry, settings, communicator, compute dtype and θ.

    Attributes:
        registry: the model's ``ParamRegistry`` (``funcprobe.edge.registry``).
        settings: the checked ``ProbeSettings``.
        comm: the ``Communicator`` of ``settings.process_group``.
        dtype: the compute dtype of the precision policy (None: the model's own).
        theta: the probed parameters in ``dtype``, name → tensor (the transforms' primal).
    """

    registry: ParamRegistry
    settings: ProbeSettings
    comm: Communicator
    dtype: torch.dtype | None
    theta: ParamTree

    @classmethod
    def of(cls, registry: ParamRegistry, settings: ProbeSettings) -> "ProbeRun":
        """The run of ``registry`` under ``settings`` (no forward; θ upcast once where the
        precision policy says so)."""
        dtype = compute_dtype(registry, settings.precision)
        return cls(registry=registry, settings=settings, comm=Communicator.for_group(settings.process_group),
                   dtype=dtype, theta=primal(registry, dtype))

    @property
    def sharding(self) -> Sharding:
        return self.registry.sharding

    def logprob_fn(self, *, per_token: bool = False):
        """S(θ, batch) ``[B, G]`` (or token log-probs ``[B, G, T]``) of the model
        (``ParamRegistry.logprob_fn`` / ``token_logprob_fn``)."""
        return self.registry.token_logprob_fn() if per_token else self.registry.logprob_fn()

    # ------------------------------------------------------------ inputs
    def batch(self, batch: RolloutBatch) -> RolloutBatch:
        """``batch`` on the model's device, inference tensors copied to normal ones."""
        return as_normal_batch(batch, next(iter(self.theta.values())).device)

    def tangent(self, tree: Mapping[str, Tensor]) -> ParamTree:
        """``tree`` cast to θ's devices and dtypes (names and shapes checked by the caller)."""
        return tree_map(lambda m, p: as_normal_tensor(m).to(device=p.device, dtype=p.dtype), dict(tree), self.theta)

    # ------------------------------------------------------------ plan and session
    def chunks(self, batch: RolloutBatch, transform: str, label: str | None = None) -> Chunks:
        """The ``(chunk, keep)`` pairs a pass of ``transform`` (``"gradient"``, ``"jvp"`` or
        ``"vjp"``: the memory estimate of ``funcprobe.edge.memory``) runs over this rank's
        ``batch``; ``label``: a progress bar over the chunks (``settings.progress``)."""
        size = chunk_size_for(self.settings, self.registry, batch, transform)
        wrap = chunk_progress(label, self.settings.progress) if label else no_progress
        return self.sharding.chunks(batch, size, self.comm, wrap)

    @contextlib.contextmanager
    def session(self, *, forward_mode: bool) -> Iterator[None]:
        """``probe_session`` with the settings' dropout, attention, precision and (forward-mode
        passes) MLP chunking and the rules mode (unless ``generic_jvp``; kernels per ``kernels``)."""
        settings = self.settings
        rules = jvp_rules(settings.kernels) if forward_mode and not settings.generic_jvp else contextlib.nullcontext()
        with probe_session(self.registry, keep_dropout=settings.keep_dropout, dtype=self.dtype,
                           attention_block=settings.attention_block,
                           mlp_chunk=settings.mlp_chunk if forward_mode else None), rules:
            yield

    # ------------------------------------------------------------ the two core calls
    def prompts(self, batch: RolloutBatch, label: str | None = None) -> Chunks:
        """This rank's prompts of ``batch`` one at a time, as ``(one-prompt batch, keep)`` pairs
        (equal counts on every rank where forwards are collective); ``label``: a progress
        bar over them (``settings.progress``)."""
        wrap = chunk_progress(label, self.settings.progress) if label else no_progress
        return self.sharding.chunks(self.batch(batch), 1, self.comm, wrap)

    def gradient(self, f: PromptFn, batch: RolloutBatch, label: str | None = None) -> ParamTree:
        """Σ_n ∇θ f(θ, batch)[n] over this rank's prompts of ``batch`` (float32 or wider; not
        all-reduced: ``comm.sum_tree`` does that)."""
        return self.gradient_over(f, self.chunks(self.batch(batch), "gradient", label))

    def gradient_over(self, f: PromptFn, chunks: Chunks) -> ParamTree:
        """``gradient`` over given ``(chunk, keep)`` pairs (``chunks``, ``prompts``)."""
        with self.session(forward_mode=False):
            return summed_gradient(f)(self.theta, chunks)

    def derivatives(self, f: PromptFn, tangent: Mapping[str, Tensor], batch: RolloutBatch,
                    label: str | None = None) -> Tensor:
        """``[B_local]`` float64 d/dε f(θ + ε·tangent)[n] over this rank's prompts, by
        ``settings.mode`` (``tangent`` cast by ``tangent()``)."""
        return self.derivatives_over(f, tangent, self.chunks(self.batch(batch), self.settings.mode, label))

    def derivatives_over(self, f: PromptFn, tangent: Mapping[str, Tensor], chunks: Chunks) -> Tensor:
        """``derivatives`` over given ``(chunk, keep)`` pairs (``chunks``, ``prompts``)."""
        mode = self.settings.mode
        self.sharding.check_mode(mode)
        tangent = self.tangent(tangent)
        with self.session(forward_mode=mode == "jvp"):
            return directional_derivatives(f, mode=mode)(self.theta, tangent, chunks)

    def token_derivatives(self, tangent: Mapping[str, Tensor], batch: RolloutBatch,
                          label: str | None = None) -> Tensor:
        """``[B, G, T]`` float64 d/dε log π(y_t) along ``tangent``: one JVP pass over ``batch``
        (forward mode whatever ``settings.mode``; zeros for an empty batch)."""
        batch = self.batch(batch)
        tangent, chunks = self.tangent(tangent), self.chunks(batch, "jvp", label)
        with self.session(forward_mode=True):
            out = directional_derivatives(self.logprob_fn(per_token=True), mode="jvp")(self.theta, tangent, chunks)
        if batch.num_prompts == 0:
            return torch.zeros(batch.input_ids.shape, dtype=torch.float64, device=batch.input_ids.device)
        return out

    def token_stats(self, tangent: Mapping[str, Tensor], batch: RolloutBatch, label: str | None = None) -> Tensor:
        """``[B, G, T, 5]`` float64 per-token statistics along ``tangent`` (``funcprobe.core.
        token_stats``: log-probs, entropies, their tangents, the tangent variances) over this
        rank's ``batch``: the effects pass, one forward-mode pass (whatever ``settings.mode``)."""
        batch = self.batch(batch)
        return self.token_stats_over(tangent, self.chunks(batch, "jvp", label), batch)

    def token_stats_over(self, tangent: Mapping[str, Tensor], chunks: Chunks, batch: RolloutBatch) -> Tensor:
        """``token_stats`` over given ``(chunk, keep)`` pairs of ``batch`` (its shape for no kept chunk);
        on FSDP2 through the model's whole forward (``funcprobe.edge.fsdp``), a collective."""
        tangent = self.tangent(tangent)
        stats_of = self.sharding.token_stats_fn(self.registry.module, self.registry.frozen)
        out = []
        with self.session(forward_mode=True):
            for chunk, keep in chunks:
                st = stats_of(self.theta, tangent, chunk)
                if keep:
                    out.append(st)
        if not out:
            return torch.zeros((*batch.input_ids.shape, len(TOKEN_STATS)), dtype=torch.float64,
                               device=batch.input_ids.device)
        return torch.cat(out)
