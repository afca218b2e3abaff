"""Tiny models, rollouts and an independent per-prompt autograd reference for the tests.

The reference never touches funcprobe's S: it runs a plain ``model(...)`` forward of each
(prompt + response) sequence alone, without padding, and differentiates with
``torch.autograd.grad`` on the live parameters.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from funcprobe import RolloutBatch

VOCAB = 40


def gpt2(dtype=torch.float64, seed=0, lora=True, attn="eager", vocab=VOCAB):
    """GPT-2 config (absolute positions, tied lm_head), 2 layers, with a LoRA adapter."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, attn_implementation=attn,
        bos_token_id=1, eos_token_id=2,
    )
    model = GPT2LMHeadModel(cfg).to(dtype)
    if not lora:
        return model
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False,
                      fan_in_fan_out=True, lora_dropout=0.0)
    return get_peft_model(model, lcfg).to(dtype)


def qwen2(dtype=torch.float64, seed=0, lora=True, attn="eager", vocab=VOCAB):
    """Qwen2 config (rotary, RMSNorm), 2 layers, GQA, with a LoRA adapter on q/k/v/o."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation=attn, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).to(dtype)
    if not lora:
        return model
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, lora_dropout=0.0)
    return get_peft_model(model, lcfg).to(dtype)


def random_rollouts(B=4, G=3, seed=1, prompt_len=(2, 6), resp_len=(1, 5), max_len=6.0, advantages=True):
    """Left-padded prompts and right-padded responses of unequal lengths."""
    gen = torch.Generator().manual_seed(seed)

    def rand_len(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    prompts = [torch.randint(1, VOCAB, (rand_len(*prompt_len),), generator=gen).tolist() for _ in range(B)]
    responses = [
        [torch.randint(1, VOCAB, (rand_len(*resp_len),), generator=gen).tolist() for _ in range(G)] for _ in range(B)
    ]
    adv = torch.randn(B, G, generator=gen, dtype=torch.float64) if advantages else None
    return RolloutBatch.from_lists(prompts, responses, pad_token_id=0, advantages=adv, max_len=max_len)


def live_params(model, names):
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def reference_S(model, batch):
    """[B, G] S from one unpadded ``model(input_ids)`` forward per sequence (autograd graph kept)."""
    B, G, T = batch.input_ids.shape
    rs = batch.response_start
    rows = []
    for n in range(B):
        row = []
        for g in range(G):
            m = batch.attention_mask[n, g].bool()
            seq = batch.input_ids[n, g][m]
            n_prompt = int(m[:rs].sum())
            logits = model(input_ids=seq[None]).logits[0]
            logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
            targets = seq[n_prompt:]
            row.append(logp[n_prompt - 1 : -1].gather(-1, targets[:, None]).sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _weighted(S, batch, weighting):
    if weighting == "dr_grpo":
        return S / torch.as_tensor(batch.max_len, dtype=S.dtype).reshape(-1, 1)
    return S / batch.response_lengths.to(S.dtype)


def reference_LX(S, batch, weighting):
    G = S.shape[1]
    Sw = _weighted(S, batch, weighting)
    base = torch.stack([(Sw.sum(1) - Sw[:, g]) / (G - 1) for g in range(G)], 1)
    coeff = (Sw - base).detach()
    return -(coeff * S).sum(1) / G


def reference_s(model, batch, mu, weighting="dr_grpo"):
    """Per-prompt loop: s[n] = ⟨∇ LX[n], μY⟩ with one ``torch.autograd.grad`` per prompt."""
    names = list(mu)
    params = live_params(model, names)
    model.eval()
    out = []
    for n in range(batch.num_prompts):
        sub = batch.select(n, n + 1)
        lx = reference_LX(reference_S(model, sub), sub, weighting)[0]
        grads = torch.autograd.grad(lx, params)
        out.append(sum((g.double() * mu[k].double()).sum() for g, k in zip(grads, names)))
    return torch.stack(out).detach()


def reference_policy_gradient(model, batch, names, weighting="dr_grpo"):
    """∇ mean_n J[n] by autograd on the live parameters (per prompt, summed)."""
    params = live_params(model, names)
    model.eval()
    total = [torch.zeros_like(p) for p in params]
    for n in range(batch.num_prompts):
        sub = batch.select(n, n + 1)
        S = reference_S(model, sub)
        J = (sub.advantages.to(S.dtype) * _weighted(S, sub, weighting)).mean(1)[0]
        for acc, g in zip(total, torch.autograd.grad(J, params)):
            acc += g
    return {k: t / batch.num_prompts for k, t in zip(names, total)}


def random_direction(registry, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(device=v.device, dtype=v.dtype)
        for k, v in registry.trainable.items()
    }


def rel_err(a, b):
    # float64 from the start: torch.as_tensor(python_float) is float32, which would round both sides alike
    a, b = (torch.as_tensor(x).double() if torch.is_tensor(x) else torch.as_tensor(x, dtype=torch.float64) for x in (a, b))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
