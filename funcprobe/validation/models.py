"""Policies built from configs (random init, nothing downloaded) for the demo and studies."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..edge.rng import seeded

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class PolicySpec:
    """The shape of a config-built Qwen2 causal LM with a LoRA adapter.

    ``init_lora_weights=True`` is PEFT's standard init (B = 0: the adapter starts as a
    no-op); ``False`` makes both factors random, so every LoRA tensor matters at once.
    """

    vocab_size: int
    hidden: int
    layers: int
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None
    lora_rank: int = 8
    lora_targets: Sequence[str] = QKVO
    init_lora_weights: bool = True
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True


def qwen2_lora_policy(
    spec: PolicySpec,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> nn.Module:
    """A Qwen2-architecture causal LM of shape ``spec`` wrapped in a PEFT LoRA adapter ("default").

    ``seed``: initialise with the CPU generator and, on CUDA, ``device``'s generator seeded
    with it, both restored afterwards (``funcprobe.edge.rng.seeded``); None draws from the
    global RNG. Raises ValueError naming ``device`` for a seeded build off cpu/cuda.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate or 2 * spec.hidden,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    lora = LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, lora_dropout=0.0,
                      target_modules=list(spec.lora_targets), init_lora_weights=spec.init_lora_weights)
    with seeded(seed, device) if seed is not None else contextlib.nullcontext():
        with torch.device(device):
            base = Qwen2ForCausalLM(config)
        base.generation_config.eos_token_id = spec.eos_token_id
        base.generation_config.bos_token_id = None
        model = get_peft_model(base, lora)
    return model.to(device=device, dtype=dtype)
