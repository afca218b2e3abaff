"""The parameter registry: one name→tensor pytree per model, extracted once.

Failure 1 of the older design (docs/failure-modes.md, parameter identity mismatch) came from asking autograd for gradients
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
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .sharding import Replica, Sharding, refuse_unsupported_sharding, sharding_of
from ..core.rollouts import RolloutBatch
from ..errors import UnsupportedModelError
from ..settings import ParamSelection, ProbeSettings, check_params

#: substrings that mark PEFT LoRA-family adapter weights in parameter names
LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the canonical module that runs the forward.

    Strips ``DistributedDataParallel`` / ``DataParallel`` (``.module``), ``torch.compile``
    (``._orig_mod``) and DeepSpeed engines, in any nesting, with accelerate's
    ``extract_model_from_parallel`` (mixed-precision forward wrappers are kept: the
    model is not changed). A ``peft.PeftModel`` is itself canonical (docs/seeds/002: the
    adapter lives there).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        UnsupportedModelError: an FSDP1 or DeepSpeed ZeRO-3 model
            (``funcprobe.edge.sharding.refuse_unsupported_sharding``; FSDP2 is supported).
    """
    from accelerate.utils import extract_model_from_parallel

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    refuse_unsupported_sharding(model)
    for _ in range(16):
        inner = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
        if inner is model:
            return model
        model = inner
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
            detached views of the live parameters (shared storage, no copies); on FSDP2,
            full tensors gathered from the shards at extraction.
        frozen: ``{name: tensor}`` of every other parameter, also detached (empty on
            FSDP2: the base stays sharded and FSDP gathers it in each forward).
        sharding: how the parameters are read, installed and iterated
            (``funcprobe.edge.sharding``: ``Replica`` or ``FSDP2``).

    Names are those of ``module.named_parameters()`` (tied weights appear once; the tie
    is restored by ``functional_call(..., tie_weights=True)``).
    """

    module: nn.Module
    adapter: str | None
    trainable: dict[str, Tensor]
    frozen: dict[str, Tensor]
    sharding: Sharding = Replica()

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
            UnsupportedModelError (a ``NotImplementedError``): an FSDP1 or DeepSpeed ZeRO-3 model.
        """
        module = unwrap_model(model)
        with adapter_activated(module, adapter):
            named = dict(module.named_parameters())
            names = _select(module, named, params, adapter)
            _refuse_dora(module, named)
        sharding = sharding_of(module)
        trainable, frozen = sharding.parameters(module, names)
        return cls(module=module, adapter=adapter, trainable=trainable, frozen=frozen, sharding=sharding)

    @classmethod
    def from_settings(cls, model: "nn.Module | ParamRegistry", settings: ProbeSettings) -> "ParamRegistry":
        """``model`` itself if it is already a registry, else ``from_model`` with the
        selection of ``settings`` (``params``, ``adapter``)."""
        if isinstance(model, ParamRegistry):
            return model
        return cls.from_model(model, params=settings.params, adapter=settings.adapter)

    def check_batch(self, batch: RolloutBatch, argname: str) -> None:
        """Refuse, before any forward, a batch this model cannot read: real token ids outside
        the vocabulary (padding ids are never looked up), or sequences longer than a
        learned absolute position table (GPT-2's ``wpe``). Raises ``ValueError`` naming
        ``argname``, the prompt and the limit."""
        ids = batch.input_ids
        if ids.numel() == 0:
            return
        real = batch.attention_mask.bool()
        vocab = self.vocab_size
        if vocab is not None:
            real_ids = torch.where(real, ids, 0)  # padding ids are never looked up
            top = int(real_ids.max())
            if top >= vocab:
                n = int((real_ids >= vocab).flatten(1).any(-1).nonzero()[0])
                raise ValueError(f"{argname}: token id {top} (prompt {n}) is outside the model's vocabulary of "
                                 f"{vocab} ids (wrong tokenizer?)")
        positions = _position_table(self.module)
        if positions is not None:
            longest = int(real.sum(-1).max())
            if longest > positions:
                raise ValueError(f"{argname}: a sequence has {longest} tokens, more than the model's {positions} "
                                 "learned positions")

    def non_finite(self, limit: int = 8) -> list[str]:
        """The module's parameters and buffers that hold NaN or inf, probed and frozen alike
        (on FSDP2 this rank's shards), up to ``limit``, in module order, each marked
        ``(probed)``, ``(frozen)`` or ``(buffer)``.

        For the error of a non-finite result, so it names the weights that caused it. Reads
        every tensor once (SmolLM2-135M: a fraction of a second on a CPU core)."""
        found: list[str] = []
        tensors = [(n, t, "probed" if n in self.trainable else "frozen") for n, t in self.module.named_parameters()]
        tensors += [(n, t, "buffer") for n, t in self.module.named_buffers()]
        for name, t, kind in tensors:
            local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard: no collective
            if (not (local.is_floating_point() or local.is_complex()) or local.numel() == 0
                    or local.device.type == "meta"):
                continue
            if not bool(torch.isfinite(local.detach()).all()):
                found.append(f"{name} ({kind})")
                if len(found) >= limit:
                    break
        return found

    def __repr__(self) -> str:
        return (
            f"ParamRegistry(module={type(self.module).__name__}, adapter={self.adapter!r}, "
            f"trainable={len(self.trainable)} tensors / {self.numel()} scalars, frozen={len(self.frozen)} tensors)"
        )

    def params(self, theta: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(frozen, theta)``: what ``functional_call`` takes, θ replaced by ``theta``."""
        return (self.frozen, theta)

    def logprob_fn(self) -> Callable[[dict[str, Tensor], RolloutBatch], Tensor]:
        """The pure S(θ, batch) ``[B, G]`` of this model (``sequence_logprobs`` closed over
        the canonical module and the frozen parameters): what the edge hands the core.
        On FSDP2, θ is put in place by hooks around the model's own forward instead
        (``funcprobe.edge.sharding``)."""
        return self.sharding.logprob_fn(self.module, self.frozen, per_token=False)

    def token_logprob_fn(self) -> Callable[[dict[str, Tensor], RolloutBatch], Tensor]:
        """The pure per-token log-probs (θ, batch) ↦ ``[B, G, T]`` of this model, in the
        batch's columns, 0 off response tokens (``response_token_values``)."""
        return self.sharding.logprob_fn(self.module, self.frozen, per_token=True)

    def live_parameters(self) -> dict[str, nn.Parameter]:
        """The module's live ``nn.Parameter`` objects for the trainable names.

        Used only at the edge, to read optimizer state (``torch.optim`` keys its state by
        parameter object); the probe itself never differentiates these.
        """
        named = dict(self.module.named_parameters())
        return {n: named[n] for n in self.trainable}

    @property
    def vocab_size(self) -> int | None:
        """V, the rows of the model's input embedding table (None if it has none)."""
        return _vocab_size(self.module)

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
    """The probed names: the format of ``params`` is checked by ``funcprobe.settings.check_params``;
    here, what needs the model (names it lacks: ``KeyError``; an empty selection: ``ValueError``)."""
    params = check_params(params)
    if isinstance(params, str):
        if params == "trainable":
            names = [n for n, p in named.items() if p.requires_grad]
            what = "no parameter has requires_grad=True"
        else:  # "lora"
            wanted = [adapter] if adapter is not None else active_adapters(module)
            names = [
                n
                for n in named
                if any(f".{m}." in n for m in LORA_MARKERS) and any(f".{a}." in n or n.endswith(f".{a}") for a in wanted)
            ]
            what = f"no LoRA weights found for adapter(s) {wanted} (is this a peft LoRA model?)"
        if not names:
            raise ValueError(f"params={params!r}: {what}")
        return names
    unknown = [n for n in params if n not in named]
    if unknown:
        raise KeyError(f"params: {len(unknown)} name(s) are not parameters of the model: {unknown[:8]}")
    return list(params)


def _vocab_size(module: nn.Module) -> int | None:
    """Rows of the input embedding table (the ids the model can look up), if it has one."""
    get = getattr(module, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.ndim == 2 else None


def _position_table(module: nn.Module) -> int | None:
    """Size of a learned absolute position embedding (GPT-2 ``wpe``, OPT ``embed_positions``), if any."""
    for name, m in module.named_modules():
        if name.rsplit(".", 1)[-1] in ("wpe", "embed_positions", "position_embeddings") and isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return None


def _refuse_dora(module: nn.Module, named: dict) -> None:
    """DoRA (PEFT ``use_dora=True``) detaches the weight norm in its forward, so the model's
    forward is not differentiated exactly: s came out 5-10% off a float64 finite difference."""
    if any(".lora_magnitude_vector." in n for n in named):
        raise UnsupportedModelError(
            "model: a DoRA adapter (use_dora=True): PEFT detaches the weight norm in DoRA's forward, so the "
            "derivative the probe would take is not the model's (measured 5-10% off a finite difference); "
            "probe a plain LoRA adapter"
        )
