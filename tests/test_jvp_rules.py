"""funcprobe.forward.rules against PyTorch's generic forward-AD formulas (float64).

Each rule: the same primal (bit for bit, the same kernels) and the generic tangent to
1e-12 relative, for every subset of operands that carries a tangent. The probe's s and
token shares with the rules (the default) against ``generic_jvp=True``: < 1e-10 on GPT-2
(Conv1D's addmm, tied head) and Qwen2 (SDPA with GQA, SiLU MLP), with LoRA and with full
fine-tuning (a head weight with a tangent).

Tolerances (float64, eps = 2.2e-16): seen <= 6.5e-16 for the rules (1e-12: > 1e3x, a few eps
times the ops of one formula), <= 7.5e-16 for whole probes (1e-10: > 1e5x); a wrong tangent
term is O(1) relative off. bf16: see that test.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from funcprobe import entropy_influence, probe_scalars
from funcprobe.forward.head import linear_logprobs
from funcprobe.forward.rules import jvp_rules
from funcprobe.edge.registry import ParamRegistry
from helpers import gpt2, qwen2, random_direction, random_rollouts, rel_err

D = torch.float64


def _subsets(n):
    return [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]


def _check(fn, primals, rtol=1e-12):
    """fn(*primals) under the rules vs generic, for every subset of primals with a tangent."""
    gen = torch.Generator().manual_seed(7)
    tangents = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in primals]
    for which in _subsets(len(primals)):
        def f(*moving, which=which):
            args = list(primals)
            for i, t in zip(which, moving):
                args[i] = t
            return fn(*args)

        ins, tans = tuple(primals[i] for i in which), tuple(tangents[i] for i in which)
        ref_value, ref_tangent = jvp(f, ins, tans)
        with jvp_rules():
            value, tangent = jvp(f, ins, tans)
        assert torch.equal(value, ref_value), which
        assert rel_err(tangent, ref_tangent) < rtol, which


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_linear_addmm_matmul_and_silu_rules_match_the_generic_formulas():
    x, w, b = _randn(2, 5, 6), _randn(4, 6, seed=1), _randn(4, seed=2)
    _check(lambda x, w, b: F.linear(x, w, b), [x, w, b])
    _check(lambda x, w: F.linear(x, w), [x, w])
    c, a, m = _randn(4, seed=3), _randn(3, 6, seed=4), _randn(6, 4, seed=5)
    _check(lambda c, a, m: torch.addmm(c, a, m), [c, a, m])
    _check(lambda c, a, m: torch.addmm(c, a, m, beta=0.5, alpha=2.0), [c, a, m])
    q, k = _randn(2, 3, 5, 4, seed=6), _randn(2, 3, 4, 7, seed=7)
    _check(lambda q, k: torch.matmul(q, k), [q, k])
    _check(lambda q, k: q @ k, [q, k])
    _check(lambda x, m: torch.matmul(x, m), [_randn(2, 3, 6, seed=8), m])  # broadcasting [B, n, d] @ [d, k]
    _check(lambda x: F.silu(x), [_randn(3, 8, seed=9)])


@pytest.mark.parametrize("block_bytes", [None, 500])
@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(is_causal=True, enable_gqa=True),
                                    dict(mask="bool", enable_gqa=True), dict(mask="float", scale=0.3, enable_gqa=True)])
def test_attention_rule_matches_the_math_backend(kwargs, block_bytes, monkeypatch):
    """``block_bytes=500``: query rows in blocks of 2 (7 queries: 4 blocks), P recomputed per block in the jvp."""
    import funcprobe.forward.attention as rules

    if block_bytes is not None:
        monkeypatch.setattr(rules, "ATTENTION_BLOCK_BYTES", block_bytes)
        assert len(rules._row_blocks(torch.zeros(2, 4, 7, 5), torch.zeros(2, 4, 7, 5))) == 4
    kwargs = dict(kwargs)
    gqa = kwargs.get("enable_gqa", False)
    q, k, v = _randn(2, 4, 7, 5), _randn(2, 2 if gqa else 4, 7, 5, seed=1), _randn(2, 2 if gqa else 4, 7, 3, seed=2)
    mask = kwargs.pop("mask", None)
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.3
        kwargs["attn_mask"][..., 0] = True
    elif mask == "float":
        kwargs["attn_mask"] = _randn(2, 1, 7, 7, seed=4)
    with sdpa_kernel([SDPBackend.MATH]):
        _check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs), [q, k, v])


def test_attention_rule_carries_the_tangent_of_a_float_mask():
    """A float mask built from θ (a learned bias) carries a tangent: it adds to Ṡ, not dropped."""
    q, k, v = _randn(2, 4, 7, 5), _randn(2, 4, 7, 5, seed=1), _randn(2, 4, 7, 3, seed=2)
    mask = _randn(2, 1, 7, 7, seed=4)
    mask[..., 3, 5] = float("-inf")
    with sdpa_kernel([SDPBackend.MATH]):
        _check(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), [q, k, v, mask])


def test_attention_rule_computes_bf16_as_the_math_backend():
    """bf16 q/k/v: the MATH backend computes in float32 and rounds the output; so does the
    rule (value bit for bit); the tangent agrees with the generic one to bf16 rounding."""
    q, k, v = (_randn(2, 4, 7, 8, seed=s).to(torch.bfloat16) for s in (0, 1, 2))
    dq, dk, dv = (_randn(2, 4, 7, 8, seed=s).to(torch.bfloat16) for s in (3, 4, 5))

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with sdpa_kernel([SDPBackend.MATH]):
        ref, ref_tangent = jvp(f, (q, k, v), (dq, dk, dv))
        with jvp_rules():
            value, tangent = jvp(f, (q, k, v), (dq, dk, dv))
    assert value.dtype == tangent.dtype == torch.bfloat16 and torch.equal(value, ref)
    # seen 0 (bit-identical); 2e-2 is 5 bf16 ulps (eps 2^-8 = 3.9e-3) for reordered float32 sums
    # rounded to bf16; a missing tangent term is O(1) off
    assert rel_err(tangent.double(), ref_tangent.double()) < 2e-2


def test_head_logprob_rule_matches_the_generic_formulas():
    h, w, b = _randn(6, 5), _randn(11, 5, seed=1), _randn(11, seed=2)
    y = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(3))
    _check(lambda h, w, b: linear_logprobs(h, w, b, y), [h, w, b])
    plain = F.log_softmax(F.linear(h, w, b), -1).gather(-1, y[:, None]).squeeze(-1)
    assert rel_err(linear_logprobs(h, w, b, y), plain) < 1e-14  # float64: seen 1.8e-16 (1 ulp), bound ~50 ulps


def test_calls_the_rules_do_not_cover_run_as_the_plain_operator():
    x = _randn(3, 8)
    with jvp_rules():
        assert torch.equal(F.silu(x.clone(), inplace=True), F.silu(x))
        out = torch.empty(3, 3, dtype=D)
        torch.matmul(x, x.T, out=out)
        assert torch.equal(out, x @ x.T)
        with sdpa_kernel([SDPBackend.MATH]):
            torch.manual_seed(0)
            y = F.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None], dropout_p=0.5)
    with sdpa_kernel([SDPBackend.MATH]):
        torch.manual_seed(0)
        assert torch.equal(y, F.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None], dropout_p=0.5))


def test_reverse_mode_through_a_rule_raises_instead_of_a_wrong_gradient():
    w = _randn(4, 6).requires_grad_(True)
    with jvp_rules():
        y = F.linear(_randn(2, 6, seed=1), w).sum()
    with pytest.raises(Exception, match="backward"):
        y.backward()
    assert w.grad is None


@pytest.mark.parametrize("make, lora, attn", [(gpt2, True, "eager"), (gpt2, False, "sdpa"), (qwen2, True, "sdpa"),
                                              (qwen2, False, "eager")])
def test_probe_with_rules_equals_the_generic_path(make, lora, attn):
    """s (jvp) and the entropy influence's token shares: rules vs generic < 1e-10.
    ``lora=False``: full fine-tuning, so the (tied) head weight and the embeddings carry tangents."""
    model = make(lora=lora, attn=attn)
    E = random_rollouts(B=3, G=3, seed=3, resp_len=(1, 7), max_len=7.0)
    mu = random_direction(ParamRegistry.from_model(model))
    ref = probe_scalars(model, E, mu, chunk_size=2, generic_jvp=True)
    got = probe_scalars(model, E, mu, chunk_size=2)
    assert rel_err(got, ref) < 1e-10
    if lora:
        U = random_rollouts(B=2, G=3, seed=4, resp_len=(1, 7), max_len=7.0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        a = entropy_influence(model, E, U, optimizer=opt, step="optimizer_step", generic_jvp=True)
        b = entropy_influence(model, E, U, optimizer=opt, step="optimizer_step")
        assert rel_err(b.per_token, a.per_token) < 1e-10 and abs(b.delta_h - a.delta_h) < 1e-10 * abs(a.delta_h)


@pytest.mark.parametrize("make", [gpt2, qwen2])
def test_mlps_in_token_chunks_give_the_same_s_and_leave_no_trace(make):
    """``mlp_chunk`` (funcprobe.edge.token_chunks): 3 tokens per MLP call vs all at once,
    float64 < 1e-12; the MLPs' class forward is back afterwards; train-mode MLPs are not chunked."""
    from funcprobe.edge.token_chunks import chunked_mlps

    model = make()
    E = random_rollouts(B=3, G=3, seed=3, resp_len=(1, 7), max_len=7.0)
    mu = random_direction(ParamRegistry.from_model(model))
    ref = probe_scalars(model, E, mu, chunk_size=3, mlp_chunk=None)
    got = probe_scalars(model, E, mu, chunk_size=3, mlp_chunk=3)
    assert rel_err(got, ref) < 1e-12  # float64 reordering only: seen 3.9e-16, bound > 1e3x
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    assert mlps and all("forward" not in m.__dict__ for m in mlps)
    model.eval()
    with chunked_mlps(model, 3) as n:
        assert n == len(mlps) and all("forward" in m.__dict__ for m in mlps)
    model.train()
    with chunked_mlps(model, 3) as n:
        assert n == 0
    assert all("forward" not in m.__dict__ for m in mlps)
