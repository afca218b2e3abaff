"""Policies built from configs (random init, nothing downloaded) for the demo and studies."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def qwen2_lora_policy(
    *,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    lora_rank: int = 8,
    lora_targets: Sequence[str] = QKVO,
    init_lora_weights: bool = True,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tie_word_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> nn.Module:
    """A Qwen2-architecture causal LM wrapped in a PEFT LoRA adapter ("default").

    ``init_lora_weights=True`` is PEFT's standard init (B = 0: the adapter starts as a
    no-op); ``False`` makes both factors random, so every LoRA tensor matters at once.
    ``seed``: initialise under a forked RNG seeded with it (the caller's global RNG is
    left as it was); None draws from the global RNG.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(lora_targets),
                      init_lora_weights=init_lora_weights)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            base = Qwen2ForCausalLM(config)
        base.generation_config.eos_token_id = eos_token_id
        base.generation_config.bos_token_id = None
        model = get_peft_model(base, lora)
    return model.to(device=device, dtype=dtype)
