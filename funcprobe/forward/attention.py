"""Causal attention over key blocks (online softmax) in plain PyTorch: forward-mode AD
carries the tangent through it block by block, so no [T × T] score matrix, primal or
tangent, is ever held for all heads at once (issue: forward mode at its limit, part 2).

For queries i and keys j ≤ i, with running max m (held without a tangent: the result does
not depend on it), running sum l and accumulator a over key blocks b:

    s = scaling · q kᵀ (keys of b, queries at or after the block's start),
    m' = max(m, max_j s),  l' = l·e^{m−m'} + Σ_j e^{s−m'},  a' = a·e^{m−m'} + e^{s−m'} v,
    out = a / l

— exactly softmax(s)·v (Milakov & Gimelshein 2018; Dao et al., FlashAttention, 2022).
Causal only: the probe left-aligns every sequence (``funcprobe.core.logprobs``), so padding
trails and no real token ever attends to it; padded rows compute values nobody reads.
Grouped-query attention: query head h reads key/value head h // (H / H_kv).
"""

from __future__ import annotations

import torch
from torch import Tensor


def blockwise_causal_attention(query: Tensor, key: Tensor, value: Tensor, *, scaling: float,
                               block: int = 512) -> Tensor:
    """``[B, T, H, D]`` causal softmax attention, key blocks of ``block`` tokens.

    Args:
        query: ``[B, H, T, D]``; key, value: ``[B, H_kv, T, D]`` with H a multiple of H_kv.
        scaling: the factor on q·k (1/sqrt(D) in most models).
        block: keys per block (memory ∝ B·H·T·block per block, primal and tangent).

    Raises ``ValueError`` for mismatched shapes or ``block`` < 1.
    """
    B, H, T, D = query.shape
    Hkv = key.shape[1]
    if key.shape != (B, Hkv, T, D) or value.shape[:3] != (B, Hkv, T) or H % Hkv != 0:
        raise ValueError(f"attention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} are not [B, H, T, D], [B, H_kv, T, D] with H a multiple of H_kv")
    if block < 1:
        raise ValueError(f"block: expected an integer >= 1, got {block}")
    g = H // Hkv
    q = query.reshape(B, Hkv, g, T, D)
    Dv = value.shape[-1]
    wide = torch.promote_types(q.dtype, torch.float64)  # running sums in float64: long rows lose no digits
    acc = q.new_zeros((B, Hkv, g, T, Dv), dtype=wide)
    total = q.new_zeros((B, Hkv, g, T, 1), dtype=wide)
    run_max = q.new_full((B, Hkv, g, T, 1), float("-inf"))
    rows = torch.arange(T, device=q.device)
    for start in range(0, T, block):
        stop = min(start + block, T)
        kb = key[:, :, None, start:stop]  # [B, Hkv, 1, b, D]
        vb = value[:, :, None, start:stop]
        qs = q[..., start:, :]  # queries before the block see none of its keys
        s = torch.matmul(qs, kb.transpose(-1, -2)) * scaling  # [B, Hkv, g, T - start, b]
        future = rows[start:stop].unsqueeze(0) > rows[start:].unsqueeze(1)  # key after query
        s = s.masked_fill(future, float("-inf"))
        m_old = run_max[..., start:, :]
        m_new = torch.maximum(m_old, s.amax(-1, keepdim=True)).detach()
        p = torch.exp(s - m_new)
        corr = torch.exp(m_old - m_new)
        corr = corr.to(wide)
        acc = torch.cat([acc[..., :start, :], acc[..., start:, :] * corr + torch.matmul(p, vb).to(wide)], -2)
        total = torch.cat([total[..., :start, :], total[..., start:, :] * corr + p.sum(-1, keepdim=True, dtype=wide)],
                          -2)
        run_max = torch.cat([run_max[..., :start, :], m_new], -2)
    out = (acc / total).to(q.dtype)  # every query sees key 0: total > 0
    return out.reshape(B, H, T, Dv).transpose(1, 2)
