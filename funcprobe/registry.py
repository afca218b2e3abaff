"""The parameter registry: one name→tensor pytree per model, extracted once.

SPEC failure 1 (parameter identity mismatch) came from asking autograd for gradients
of tensor objects that the forward did not use (DDP/FSDP/PEFT re-wrapping), and from
keying buffers by ``id(p)`` (seeds 003 and 000). Here the canonical module is found
once (``unwrap_model``), its parameters are extracted once into ``dict[str, Tensor]``
(detached views: no copy, no autograd link to the live ``nn.Parameter``), and every
probe forward is ``torch.func.functional_call(module, registry_params, ...)``. μX, μY
and optimizer state are keyed by the same names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor, nn

ParamSelection = Union[str, Sequence[str]]

#: substrings that mark PEFT LoRA-family adapter weights in parameter names
LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the canonical module that runs the forward.

    Strips ``DistributedDataParallel`` / ``DataParallel`` (``.module``), ``torch.compile``
    (``._orig_mod``) and DeepSpeed engines, in any nesting. A ``peft.PeftModel`` is itself
    canonical (seed 002: the adapter lives there). Raises ``TypeError`` for a non-module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ == "DeepSpeedEngine" and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
    raise TypeError("model: wrapper nesting deeper than 16 levels")


def is_peft_model(module: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (checked without importing peft eagerly)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, PeftModel)


def active_adapters(module: nn.Module) -> list[str]:
    """Names of the adapters active on a PEFT model (empty list for a plain module)."""
    if not is_peft_model(module):
        return []
    return list(module.active_adapters)


@contextlib.contextmanager
def adapter_activated(module: nn.Module, adapter: str | None) -> Iterator[None]:
    """Activate ``adapter`` on a PEFT model for the duration; restore everything after.

    PEFT's ``set_adapter`` also flips ``requires_grad`` on adapter weights, so the flags of
    every parameter are restored too, even on error. ``adapter=None`` keeps the active one.
    Raises ``ValueError`` for an unknown adapter name or a named adapter on a non-PEFT model.
    """
    if adapter is None:
        yield
        return
    if not is_peft_model(module):
        raise ValueError(f"adapter: {adapter!r} was named but the model is not a peft.PeftModel")
    if adapter not in module.peft_config:
        raise ValueError(f"adapter: {adapter!r} not found; the model has {sorted(module.peft_config)}")
    before = active_adapters(module)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        if before != [adapter]:
            module.set_adapter(adapter)
        yield
    finally:
        if active_adapters(module) != before:
            if len(before) == 1:
                module.set_adapter(before[0])
            else:  # several adapters were active together (LoRA allows it)
                module.base_model.set_adapter(before)
        for n, p in module.named_parameters():
            if p.requires_grad != flags[n]:
                p.requires_grad_(flags[n])


@dataclass(frozen=True)
class ParamRegistry:
    """Name→tensor pytrees of a model's parameters, split into the probed and the frozen.

    Attributes:
        module: the canonical module (``unwrap_model``); the template for
            ``torch.func.functional_call``.
        adapter: the PEFT adapter the probe activates for its forwards (``None``: the
            active one, or no PEFT).
        trainable: ``{name: tensor}`` of the parameters the probe differentiates (θ);
            detached views of the live parameters (shared storage, no copies).
        frozen: ``{name: tensor}`` of every other parameter, also detached.

    Names are those of ``module.named_parameters()`` (tied weights appear once; the tie
    is restored by ``functional_call(..., tie_weights=True)``).
    """

    module: nn.Module
    adapter: str | None
    trainable: dict[str, Tensor]
    frozen: dict[str, Tensor]

    @classmethod
    def from_model(
        cls, model: nn.Module, params: ParamSelection = "trainable", adapter: str | None = None
    ) -> "ParamRegistry":
        """Extract the registry of ``model``.

        Args:
            model: an ``nn.Module`` (HF ``PreTrainedModel``, ``peft.PeftModel``, or either
                inside DDP / DataParallel / ``torch.compile``).
            params: ``"trainable"`` (every ``requires_grad`` parameter, judged with the
                adapter activated), ``"lora"`` (LoRA adapter weights of ``adapter`` or of the
                active adapters) or an explicit sequence of parameter names.
            adapter: PEFT adapter to probe; default the active one.

        Raises:
            TypeError: ``model`` is not a module.
            ValueError: unknown selection, unknown adapter, or an empty selection.
            KeyError: explicit names that the model does not have (all listed).
            NotImplementedError: an FSDP-sharded model (``funcprobe.distributed.refuse_fsdp``).
        """
        from .distributed import refuse_fsdp

        module = unwrap_model(model)
        refuse_fsdp(module)
        with adapter_activated(module, adapter):
            named = dict(module.named_parameters())
            names = _select(module, named, params, adapter)
        trainable = {n: named[n].detach() for n in names}
        frozen = {n: p.detach() for n, p in named.items() if n not in trainable}
        return cls(module=module, adapter=adapter, trainable=trainable, frozen=frozen)

    def __repr__(self) -> str:
        return (
            f"ParamRegistry(module={type(self.module).__name__}, adapter={self.adapter!r}, "
            f"trainable={len(self.trainable)} tensors / {self.numel()} scalars, frozen={len(self.frozen)} tensors)"
        )

    def merged(self, trainable: dict[str, Tensor]) -> dict[str, Tensor]:
        """The full parameter dict for ``functional_call`` with θ replaced by ``trainable``."""
        return {**self.frozen, **trainable}

    def live_parameters(self) -> dict[str, nn.Parameter]:
        """The module's live ``nn.Parameter`` objects for the trainable names.

        Used only at the edge, to read optimizer state (``torch.optim`` keys its state by
        parameter object); the probe itself never differentiates these.
        """
        named = dict(self.module.named_parameters())
        return {n: named[n] for n in self.trainable}

    @property
    def device(self) -> torch.device:
        """Where the probed parameters live (inputs are moved there)."""
        return next(iter(self.trainable.values())).device

    @property
    def names(self) -> list[str]:
        return list(self.trainable)

    def numel(self) -> int:
        """Number of probed scalars (Σ over trainable tensors of ``numel``)."""
        return sum(t.numel() for t in self.trainable.values())


def _select(module: nn.Module, named: dict[str, nn.Parameter], params: ParamSelection, adapter: str | None) -> list[str]:
    if isinstance(params, str):
        if params == "trainable":
            names = [n for n, p in named.items() if p.requires_grad]
            what = "no parameter has requires_grad=True"
        elif params == "lora":
            wanted = [adapter] if adapter is not None else active_adapters(module)
            names = [
                n
                for n in named
                if any(f".{m}." in n for m in LORA_MARKERS) and any(f".{a}." in n or n.endswith(f".{a}") for a in wanted)
            ]
            what = f"no LoRA weights found for adapter(s) {wanted} (is this a peft LoRA model?)"
        else:
            raise ValueError(f"params: expected 'trainable', 'lora' or a list of parameter names, got {params!r}")
        if not names:
            raise ValueError(f"params={params!r}: {what}")
        return names
    names = list(params)
    if not names:
        raise ValueError("params: the explicit list of parameter names is empty")
    if not all(isinstance(n, str) for n in names):
        raise ValueError("params: an explicit selection must be a sequence of str parameter names")
    unknown = [n for n in names if n not in named]
    if unknown:
        raise KeyError(f"params: {len(unknown)} name(s) are not parameters of the model: {unknown[:8]}")
    if len(set(names)) != len(names):
        raise ValueError("params: the explicit list of parameter names has duplicates")
    return names
