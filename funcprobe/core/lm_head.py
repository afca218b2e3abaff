"""The LM head applied in token chunks: S without ``[N, T, V]`` logits.

At real vocabularies (49,152 for SmolLM2, 151,936 for Qwen2.5) the logits and their
tangent dominate a probe's memory: 32 sequences x 92 columns x 49,152 float32 logits are
579 MB, and a JVP holds the primal, the tangent and the log-softmax intermediates of all
of them at once. ``HeadSplit`` cuts a Hugging Face causal LM into its body (embeddings,
decoder layers, final norm: ``model.base_model``) and its head (``get_output_embeddings()``),
runs the body once, keeps only the hidden states of response tokens, and applies the head
and the log-softmax ``token_chunk`` tokens at a time. Under ``torch.func.jvp`` each chunk's
logits and tangents are freed before the next (forward mode needs no recomputation);
under ``grad``/``vjp`` only response tokens' logits are saved, never those of prompt or
padding columns.

A split is used only where it reproduces the model's own logits: models whose config sets
``final_logit_softcapping`` (Gemma 2) or ``logit_scale`` (Cohere) are not split, and every
other split is checked once per module against the model's own forward on a 4-token input
(same RNG, so dropout masks agree); a model that fails the check is run unsplit (full
logits), which is exact but heavier.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

#: float32 bytes of logits per token chunk; with a JVP about four such tensors live at once
LOGITS_CHUNK_BYTES = 64 * 2**20
#: config attributes of heads that do more than a linear map (not split)
_NONLINEAR_HEAD_CONFIG = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class HeadSplit:
    """Where a causal LM's body ends and its LM head begins.

    Attributes:
        body: the module that maps ``input_ids`` ``[N, T]`` to hidden states ``[N, T, D]``
            (``.last_hidden_state`` or the first output).
        body_prefix: its qualified name inside the probed module (``""`` for the root).
        head: the module that maps hidden states ``[M, D]`` to logits ``[M, V]``.
        head_params: the head's local parameter/buffer name → the name of the same tensor
            in the probed module's ``named_parameters()``/``named_buffers()`` (tied weights
            resolve to the embedding's name).
        vocab_size: V, the head's output width.
    """

    body: nn.Module
    body_prefix: str
    head: nn.Module
    head_params: Mapping[str, str]
    vocab_size: int

    def hidden(self, params: Mapping[str, Tensor], kwargs: dict) -> Tensor:
        """The body's last hidden states ``[N, T, D]`` under ``params`` (full names)."""
        p = len(self.body_prefix) + 1 if self.body_prefix else 0
        local = {k[p:]: v for k, v in params.items() if not self.body_prefix or k.startswith(self.body_prefix + ".")}
        out = functional_call(self.body, local, (), kwargs, tie_weights=True, strict=False)
        h = getattr(out, "last_hidden_state", None)
        if h is None:
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h

    def logits_fn(self, params: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
        """``h [M, D] ↦ logits [M, V]`` under ``params`` (full names; absent ones: the module's own)."""
        local = {k: params[full] for k, full in self.head_params.items() if full in params}

        def logits(h: Tensor) -> Tensor:
            return functional_call(self.head, local, (h,), tie_weights=False, strict=False)

        return logits

    def linear_weights(self, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None] | None:
        """``(W [V, D], b [V] or None)`` of a head that is a plain ``nn.Linear`` with no hooks,
        under ``params`` (full names; absent ones: the module's own); None for any other head
        (a LoRA-wrapped or hooked head runs through ``logits_fn``)."""
        head = self.head
        if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
            return None
        local = {k: params[full] for k, full in self.head_params.items() if full in params}
        return local.get("weight", head.weight), local.get("bias", head.bias)


def token_chunk_size(vocab_size: int, budget_bytes: int = LOGITS_CHUNK_BYTES) -> int:
    """Tokens per head chunk so that one chunk's float32 logits take at most ``budget_bytes``."""
    return max(1, budget_bytes // (4 * vocab_size))


def chunked_token_values(values: Callable[[Tensor, Tensor], Tensor], h: Tensor, targets: Tensor,
                         token_chunk: int) -> Tensor:
    """``values(h_m, target_m)`` for ``h [M, D]``, ``targets [M]`` → ``[M]`` (float32 or wider),
    ``token_chunk`` rows at a time.

    ``values`` applies the head and a token function (a log-prob or an entropy of the
    ``[m, V]`` logits) to one chunk: ``head_values`` or ``funcprobe.forward.head.linear_logprobs``.
    """
    out = []
    for a in range(0, h.shape[0], token_chunk):
        out.append(values(h[a : a + token_chunk], targets[a : a + token_chunk]))
    if not out:
        return h.new_zeros(0, dtype=torch.promote_types(h.dtype, torch.float32))
    return torch.cat(out)


def head_values(logits: Callable[[Tensor], Tensor],
                token_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``(h [m, D], targets [m]) ↦ token_fn(logits(h) in float32 or wider, targets)``."""

    def values(h: Tensor, targets: Tensor) -> Tensor:
        z = logits(h)
        return token_fn(z.to(torch.promote_types(z.dtype, torch.float32)), targets)

    return values


_SPLITS: "weakref.WeakKeyDictionary[nn.Module, HeadSplit | None]" = weakref.WeakKeyDictionary()


def head_split(module: nn.Module, owner: nn.Module,
               extra_kwargs: Mapping[str, object] | None = None) -> HeadSplit | None:
    """The verified ``HeadSplit`` of ``module`` (whose causal LM is ``owner``), or None.

    ``extra_kwargs``: what S's forwards pass besides ids, mask and positions (e.g.
    ``use_cache=False``); the check calls the module and the body with them too.

    Found once per module and cached (weakly). None where ``owner`` has no separate base
    model and output embeddings, where its config names a non-linear head, or where the
    split does not reproduce the model's own logits.
    """
    if module in _SPLITS:
        return _SPLITS[module]
    split = _find_split(module, owner)
    if split is not None and not _reproduces_logits(module, split, dict(extra_kwargs or {})):
        split = None
    _SPLITS[module] = split
    return split


def _find_split(module: nn.Module, owner: nn.Module) -> HeadSplit | None:
    config = getattr(owner, "config", None)
    if config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _NONLINEAR_HEAD_CONFIG):
        return None
    get_head = getattr(owner, "get_output_embeddings", None)
    body = getattr(owner, "base_model", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is owner:
        return None
    names = {id(m): n for n, m in module.named_modules(remove_duplicate=False)}
    if id(body) not in names or id(head) not in names:
        return None
    canonical: dict[int, str] = {}
    for n, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        canonical.setdefault(id(t), n)
    head_params = {n: canonical[id(t)] for n, t in
                   list(head.named_parameters(remove_duplicate=False)) + list(head.named_buffers(remove_duplicate=False))}
    vocab = getattr(head, "out_features", None) or getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return None
    return HeadSplit(body, names[id(body)], head, head_params, vocab)


def _reproduces_logits(module: nn.Module, split: HeadSplit, extra_kwargs: dict) -> bool:
    """The split's logits equal the module's own on a 4-token input (to a few ulps)."""
    ref = next(iter(module.parameters()), None)
    if ref is None or ref.device.type == "meta":
        return False
    ids = (torch.arange(4, device=ref.device) % split.vocab_size).unsqueeze(0)
    mask = torch.ones_like(ids)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(4, device=ref.device).unsqueeze(0),
              **extra_kwargs}
    # every CUDA device the module's parameters are on (a model split over GPUs draws on each)
    devices = sorted({p.device.index for p in module.parameters() if p.is_cuda})
    try:
        with torch.no_grad():
            # both passes start from the same generator state (forked, so restored after
            # each): equal random streams for a module that draws any, without seeding
            with torch.random.fork_rng(devices=devices, device_type="cuda"):
                out = module(**kwargs)
                full = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
            with torch.random.fork_rng(devices=devices, device_type="cuda"):
                own = {}
                h = split.hidden(own, kwargs)
                mine = split.logits_fn(own)(h.reshape(-1, h.shape[-1])).reshape(full.shape)
    except Exception:  # noqa: BLE001 - a model the split cannot drive is run unsplit
        return False
    if not isinstance(full, Tensor) or mine.shape != full.shape:
        return False
    scale = float(full.abs().max()) + 1.0
    tol = 16 * torch.finfo(full.dtype).eps * scale if full.dtype.is_floating_point else 0.0
    return float((mine.float() - full.float()).abs().max()) <= tol
