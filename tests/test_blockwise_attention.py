"""Blockwise causal attention (online softmax, tangent carried block by block) against the
plain softmax formula and against the model's own attention, in every transform."""

import pytest
import torch

from funcprobe import SettingsError, probe_scalars, update_direction
from funcprobe.forward.attention import blockwise_causal_attention
from funcprobe.forward.attention_impl import BLOCKWISE
from helpers import gpt2, qwen2, random_direction, random_rollouts, rel_err
from funcprobe.edge.registry import ParamRegistry


def _reference(q, k, v, scaling):
    """softmax(q kᵀ·scaling + causal mask) v with repeated key/value heads: [B, T, H, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_blockwise_attention_is_softmax_attention_in_value_and_tangent(block):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 11, 5
    q, k, v, dq, dk, dv = (torch.randn(B, h, T, D, generator=gen, dtype=torch.float64)
                           for h in (H, Hkv, Hkv, H, Hkv, Hkv))
    out, tangent = torch.func.jvp(lambda a, b, c: blockwise_causal_attention(a, b, c, scaling=0.4, block=block),
                                  (q, k, v), (dq, dk, dv))
    ref, ref_tangent = torch.func.jvp(lambda a, b, c: _reference(a, b, c, 0.4), (q, k, v), (dq, dk, dv))
    assert rel_err(out, ref) < 1e-13 and rel_err(tangent, ref_tangent) < 1e-12  # float64: seen <= 5.3e-16
    with pytest.raises(ValueError, match="block: expected an integer >= 1"):
        blockwise_causal_attention(q, k, v, scaling=0.4, block=0)


@pytest.mark.parametrize("make, attn", [(gpt2, "eager"), (qwen2, "sdpa")])
def test_probe_with_blockwise_attention_equals_the_models_attention(make, attn):
    """Float64 < 1e-10. Qwen2 on SDPA (MATH backend, float64 throughout): its eager
    attention takes the softmax in float32 (transformers), which bounds the agreement by
    float32 rounding instead (3.3e-6 relative with transformers 5.24)."""
    tol = 1e-10  # float64: seen 7.9e-16
    model = make(attn=attn)
    E = random_rollouts(B=4, G=3, seed=3, resp_len=(1, 9), max_len=9.0)
    U = random_rollouts(B=3, G=3, seed=4, resp_len=(1, 9), max_len=9.0)
    mu = random_direction(ParamRegistry.from_model(model))
    for mode in ("jvp", "vjp"):
        ref = probe_scalars(model, E, mu, mode=mode, chunk_size=2)
        got = probe_scalars(model, E, mu, mode=mode, chunk_size=2, attention_block=3)
        assert rel_err(got, ref) < tol, mode
    g_ref = update_direction(model, U, step="sgd")
    g = update_direction(model, U, step="sgd", attention_block=2)
    assert all(rel_err(g[n], g_ref[n]) < tol for n in g)
    # nothing left behind: the model's implementation and transformers' registries are as before
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert model.config._attn_implementation == attn
    assert BLOCKWISE not in AttentionInterface._global_mapping and BLOCKWISE not in AttentionMaskInterface._global_mapping


def test_attention_block_is_checked():
    with pytest.raises(SettingsError, match="attention_block"):
        probe_scalars(gpt2(), random_rollouts(), {}, attention_block=0)
