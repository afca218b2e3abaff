"""Prompts per chunk from a memory budget: the default ``chunk_size``.

The probe's memory beyond the model is activations; on an ordinary model the logits are
never whole (``funcprobe.core.lm_head``: at most ``LOGITS_CHUNK_BYTES`` of them per head
chunk). Per token of a chunk, an estimate from the model's config (float32 bytes, ``D``
hidden size, ``I`` MLP width, ``h`` attention heads, ``T`` columns, ``n`` layers, ``V``
vocabulary):

* reverse mode (the update direction's gradient; ``mode="vjp"`` counts twice): every
  layer's saved activations, ``4 · n · (8·D + 5·I + h·T)`` bytes;
* forward mode (``mode="jvp"``): primal and tangent of a few layers at a time,
  ``4 · 4 · (8·D + 5·I + h·T)`` bytes;
* on an FSDP2 model every pass runs the model's own forward to whole logits of the response
  columns (``funcprobe.edge.fsdp``), so add ``4·V`` bytes times 3 (gradient: logits, their
  log-softmax and gradient), 6 (``vjp``) or 2 (forward mode: logits and tangents). Not
  calibrated: an upper-side estimate (it counts prompt columns too).

Calibrated on SmolLM2-135M (D 576, I 1536, 9 heads, 30 layers): the update direction over
8 sequences x 96 columns peaked at 1.12 GB, the estimate gives 1.21 GB
(benchmarks/results/memory.md). The chunk is the most prompts (each G sequences of T
columns) whose estimate fits ``memory_budget_gb``, at least 1. Models without these config
fields get 8 prompts per chunk.
"""

from __future__ import annotations

from ..core.rollouts import RolloutBatch
from ..settings import ProbeSettings
from .registry import ParamRegistry

#: prompts per chunk where the model's config does not give its shape
FALLBACK_CHUNK = 8
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def bytes_per_token(registry: ParamRegistry, columns: int, transform: str) -> float | None:
    """Estimated activation bytes per sequence token for ``transform`` in
    ``{"gradient", "jvp", "vjp"}``, or None when the config does not say the model's shape."""
    owner = registry.module.get_base_model() if hasattr(registry.module, "get_base_model") else registry.module
    config = getattr(owner, "config", None)
    shape = [getattr(config, f, None) for f in _FIELDS]
    if not all(isinstance(x, int) and x > 0 for x in shape):
        return None
    D, I, n, h = shape
    per_layer = 4.0 * (8 * D + 5 * I + h * columns)
    layers = {"gradient": n, "vjp": 2 * n, "jvp": 4}[transform]
    vocab = getattr(config, "vocab_size", None)
    logits = 0.0
    if isinstance(vocab, int) and vocab > 0 and registry.sharding.whole_logits:  # FSDP2 (module docstring)
        logits = 4.0 * vocab * {"gradient": 3, "vjp": 6, "jvp": 2}[transform]
    return per_layer * layers + logits


def chunk_size_for(settings: ProbeSettings, registry: ParamRegistry, batch: RolloutBatch, transform: str) -> int:
    """``settings.chunk_size`` if given, else the most prompts whose estimate fits the budget."""
    if settings.chunk_size is not None:
        return settings.chunk_size
    per_token = bytes_per_token(registry, batch.seq_len, transform)
    if per_token is None:
        return FALLBACK_CHUNK
    per_prompt = per_token * batch.group_size * batch.seq_len
    return max(1, int(settings.memory_budget_gb * 2**30 // per_prompt))
