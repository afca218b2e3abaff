"""The Triton flash-attention kernels with a tangent (funcprobe.forward.triton).

Without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
float64 throughout: value and tangent against SDPA's MATH backend under torch.func.jvp and
against the blockwise PyTorch attention (funcprobe.forward.attention), < 1e-10 relative, for
every subset of q, k, v carrying a tangent (seen <= 2.1e-15: > 1e4x); masks as transformers builds them (causal plus
padding, with rows that see no key), float masks, GQA, non-square and odd head sizes. Then
the probe's s with SDPA routed to the kernels (``kernels="triton"``) against the generic
path (< 1e-10; seen 1.4e-16), and the default (``kernels="off"``) never reaching them.
With CUDA the same tests run the compiled kernels.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from funcprobe.forward import triton as ta
from funcprobe.forward.attention import AttentionCall, AttentionOptions, blockwise_causal_attention
from helpers import qwen2, random_direction, random_rollouts, rel_err

pytestmark = pytest.mark.skipif(not ta.available(), reason="Triton is not installed (pip install triton): the "
                                "kernels of funcprobe.forward.triton cannot run")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = torch.float64
BLOCKS = (16, 16)  # several query and key blocks at these sizes


def _randn(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def _call(q, k, v, mask=None, is_causal=False, scale=None):
    """The kernels' ``AttentionCall`` (they always take GQA: H a multiple of H_kv)."""
    return AttentionCall(q, k, v, mask, AttentionOptions(is_causal, scale, gqa=True))


def _math(q, k, v, tangents, **kw):
    with sdpa_kernel([SDPBackend.MATH]):
        return jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kw), (q, k, v), tangents)


def _padding_mask(B, L, pad):
    """transformers' causal-plus-padding bool mask [B, 1, L, L]: sequence b's first pad[b]
    keys hidden (left padding), so its first pad[b] query rows see no key at all."""
    mask = torch.ones(L, L, dtype=torch.bool).tril().repeat(B, 1, 1, 1)
    for b, n in enumerate(pad):
        mask[b, ..., :n] = False
    return mask.to(DEVICE)


CASES = {
    "causal-gqa": dict(shape=(2, 4, 2, 37, 37, 24, 24), kw=dict(is_causal=True, enable_gqa=True)),
    "padding-mask": dict(shape=(2, 2, 2, 33, 33, 16, 16), kw=dict(attn_mask=_padding_mask(2, 33, [0, 5]))),
    "bool-mask-dense": dict(shape=(1, 2, 2, 21, 21, 16, 16), kw=dict()),
    "float-mask-scale": dict(shape=(1, 2, 1, 19, 19, 32, 32), kw=dict(scale=0.3, enable_gqa=True)),
    "cross-uneven": dict(shape=(1, 2, 2, 20, 45, 12, 8), kw=dict()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_equal_the_math_backend_in_value_and_tangent(case):
    B, H, Hkv, L, S, Dqk, Dv = CASES[case]["shape"]
    kw = dict(CASES[case]["kw"])
    if case == "bool-mask-dense":  # keys above the diagonal too: no blocks skipped
        kw["attn_mask"] = (torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(8)) > 0.4).to(DEVICE)
        kw["attn_mask"][..., 3, :] = False  # a row that sees no key
    if case == "float-mask-scale":
        kw["attn_mask"] = _randn(B, 1, L, S, seed=9)
        kw["attn_mask"][..., 2, :] = float("-inf")  # a row that sees no key
    q, k, v = _randn(B, H, L, Dqk), _randn(B, Hkv, S, Dqk, seed=1), _randn(B, Hkv, S, Dv, seed=2)
    tangents = (_randn(B, H, L, Dqk, seed=3), _randn(B, Hkv, S, Dqk, seed=4), _randn(B, Hkv, S, Dv, seed=5))
    mask, causal, scale = kw.get("attn_mask"), kw.get("is_causal", False), kw.get("scale")
    call = _call(q, k, v, mask, causal, scale)
    out, lse = ta.attention_forward(call, blocks=BLOCKS)
    assert out.dtype == lse.dtype == D and lse.shape == (B, H, L)
    assert ta.keeps_lower_triangle(mask) == (case == "padding-mask")  # the only case whose key blocks are skipped
    for which in [c for n in (1, 2, 3) for c in itertools.combinations(range(3), n)]:
        given = [t if i in which else None for i, t in enumerate(tangents)]
        ref, ref_tangent = _math(q, k, v, tuple(t if t is not None else torch.zeros_like(p)
                                                for t, p in zip(given, (q, k, v))), **kw)
        tangent = ta.attention_jvp(call, out, lse, tuple(given), blocks=BLOCKS)
        assert rel_err(out, ref) < 1e-10 and rel_err(tangent, ref_tangent) < 1e-10, which
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask > float("-inf")
        hidden = ~(keep.expand(B, H, L, S).any(-1))
        assert hidden.any() and (out[hidden] == 0).all() and (lse[hidden] == float("-inf")).all()
    assert ta.attention_jvp(call, out, lse, (None, None, None)) is None


def test_kernels_equal_the_blockwise_pytorch_attention():
    """The part-2 blockwise attention (online softmax in PyTorch, tangent by torch.func.jvp):
    causal, GQA, float64, < 1e-10."""
    B, H, Hkv, T, Dh = 2, 4, 2, 29, 8
    q, k, v = _randn(B, H, T, Dh), _randn(B, Hkv, T, Dh, seed=1), _randn(B, Hkv, T, Dh, seed=2)
    dq, dk, dv = _randn(B, H, T, Dh, seed=3), _randn(B, Hkv, T, Dh, seed=4), _randn(B, Hkv, T, Dh, seed=5)
    ref, ref_tangent = jvp(lambda a, b, c: blockwise_causal_attention(a, b, c, scaling=0.4, block=8),
                           (q, k, v), (dq, dk, dv))
    call = _call(q, k, v, None, True, 0.4)
    out, lse = ta.attention_forward(call, blocks=BLOCKS)
    tangent = ta.attention_jvp(call, out, lse, (dq, dk, dv), blocks=BLOCKS)
    assert rel_err(out.transpose(1, 2), ref) < 1e-10 and rel_err(tangent.transpose(1, 2), ref_tangent) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3),
                                        (torch.bfloat16, 1e-5 if ta.interpreted() else 2e-2)])
def test_kernels_in_float32_fp16_and_bf16(dtype, tol):
    """Accumulation in float32; against the MATH backend on the same inputs in float64.
    fp16 runs the tensor-core path (products in fp16, P rounded to fp16 before P·v) in the
    interpreter too; bf16 only on CUDA (the interpreter's bf16 products are wrong, so there
    bf16 inputs are multiplied in float32: float32's tolerance).

    Seen (interpreter): float32 and bf16-as-float32 <= 2.7e-7 (1e-5: ~80 float32 ulps, 37x);
    fp16 3.3e-4 (5e-3: ~5 fp16 ulps of 9.8e-4, 15x); bf16 on CUDA: 2e-2 is ~5 bf16 ulps (3.9e-3)."""
    q, k, v, dq, dk, dv = (_randn(2, 2, 40, 16, seed=s, dtype=dtype) for s in range(6))
    call = _call(q, k, v, None, True)
    out, lse = ta.attention_forward(call, blocks=BLOCKS)
    tangent = ta.attention_jvp(call, out, lse, (dq, dk, dv), blocks=BLOCKS)
    assert out.dtype == tangent.dtype == torch.float32
    ref, ref_tangent = _math(*(t.double() for t in (q, k, v)), tuple(t.double() for t in (dq, dk, dv)),
                             is_causal=True)
    assert rel_err(out.double(), ref) < tol and rel_err(tangent.double(), ref_tangent) < tol


def test_kernels_name_what_they_do_not_cover():
    q = _randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="is_causal and mask"):
        ta.attention_forward(_call(q, q, q, torch.ones(8, 8, dtype=torch.bool, device=DEVICE), True))
    with pytest.raises(ValueError, match="H a multiple of H_kv"):
        ta.attention_forward(_call(q, _randn(1, 3, 8, 16), _randn(1, 3, 8, 16)))
    with pytest.raises(ValueError, match="block_n: expected a power of two >= 16, got 24"):
        ta.attention_forward(_call(q, q, q), blocks=(16, 24))
    with pytest.raises(ValueError, match="block_m: expected a power of two >= 16, got 0"):
        ta.attention_forward(_call(q, q, q), blocks=(0, 16))
    with pytest.raises(ValueError, match=r"mask broadcastable to \[B, H, L, S\]"):  # broadcasts with, not to
        ta.attention_forward(_call(q, q, q, torch.ones(3, 1, 8, 8, dtype=torch.bool, device=DEVICE)))
    out, lse = ta.attention_forward(_call(q, q, q), blocks=BLOCKS)
    with pytest.raises(ValueError, match=r"dk: expected the shape of its primal \(1, 2, 8, 16\)"):
        ta.attention_jvp(_call(q, q, q), out, lse, (None, _randn(1, 2, 7, 16), None))


def test_which_sdpa_calls_go_to_the_kernels(monkeypatch):
    """``applies``: CUDA tensors (CPU tensors only in Triton's interpreter) and ``_supported``:
    4-D, one dtype, heads dividing (equal without GQA), bool or same-dtype masks that
    broadcast *to* the scores."""
    q, kv = _randn(2, 4, 8, 16), _randn(2, 2, 8, 16)

    def call(q=q, k=kv, mask=None, gqa=True):
        return AttentionCall(q, k, k, mask, AttentionOptions(gqa=gqa))

    assert ta.applies(call()) and not ta.applies(call(gqa=False))  # CUDA, or CPU in the interpreter
    if not q.is_cuda:
        monkeypatch.setattr(ta, "interpreted", lambda: False)
        assert not ta.applies(call())  # CPU tensors without the interpreter: the compiled kernels cannot read them
        monkeypatch.undo()
    assert not ta._supported(call(q[0], kv[0]))  # 3-D
    assert not ta._supported(call(k=kv.float()))
    assert ta._supported(call(mask=torch.zeros(8, 8, dtype=D, device=DEVICE)))
    assert not ta._supported(call(mask=torch.zeros(8, 8, device=DEVICE)))  # float32 mask, float64 q
    assert not ta._supported(call(mask=torch.ones(3, 1, 8, 8, dtype=torch.bool, device=DEVICE)))
    assert not ta._supported(call(mask=torch.ones(1, 2, 1, 8, 8, dtype=torch.bool, device=DEVICE)))


def test_the_lower_triangle_check_in_pieces(monkeypatch):
    """``keeps_lower_triangle`` over 3 sequences' masks at a time (one at the end alone),
    broadcast dimensions read once: one key after its query anywhere makes it False."""
    monkeypatch.setattr(ta, "MASK_CHECK_ELEMENTS", 3 * 64)
    mask = _padding_mask(7, 8, [0, 1, 2, 0, 3, 0, 1])
    assert ta.keeps_lower_triangle(mask) and ta.keeps_lower_triangle(mask.expand(7, 4, 8, 8))
    assert ta.keeps_lower_triangle(mask[0, 0]) and not ta.keeps_lower_triangle(None)
    assert not ta.keeps_lower_triangle(torch.zeros(8, 8, dtype=D, device=DEVICE))  # float masks: no skip
    mask[6, 0, 2, 5] = True
    assert not ta.keeps_lower_triangle(mask) and not ta.keeps_lower_triangle(mask.expand(7, 4, 8, 8))


def test_a_float_mask_with_a_tangent_takes_the_rule_s_tangent(monkeypatch):
    """The kernels treat the mask as constant; a float mask built from θ carries a tangent,
    which ``_FlashAttention`` hands to the closed-form rule: vs MATH's generic jvp < 1e-10."""
    from funcprobe.forward.rules import jvp_rules

    calls = []
    for name in ("attention_forward", "attention_jvp"):
        monkeypatch.setattr(ta, name, lambda *a, _f=getattr(ta, name), _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    q, k, v, bias = _randn(1, 2, 20, 16), _randn(1, 2, 20, 16, seed=1), _randn(1, 2, 20, 16, seed=2), _randn(20, 20)
    dq, dbias = _randn(1, 2, 20, 16, seed=3), _randn(20, 20, seed=4)

    def f(q, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias * 0.5)

    with sdpa_kernel([SDPBackend.MATH]):
        ref, ref_tangent = jvp(f, (q, bias), (dq, dbias))
        with jvp_rules(kernels="triton"):
            out, tangent = jvp(f, (q, bias), (dq, dbias))
            out_q, tangent_q = jvp(lambda q: f(q, bias), (q,), (dq,))  # mask without a tangent: the kernel
        ref_q = jvp(lambda q: f(q, bias), (q,), (dq,))[1]
    assert calls == ["attention_forward", "attention_forward", "attention_jvp"]  # the kernels ran, bar one jvp
    assert rel_err(out, ref) < 1e-10 and rel_err(tangent, ref_tangent) < 1e-10
    assert rel_err(tangent_q, ref_q) < 1e-10


def test_probe_with_sdpa_on_the_kernels_equals_the_generic_path(monkeypatch):
    """Qwen2 (GQA, SDPA, LoRA, float64): ``kernels="triton"`` sends every SDPA call to the
    kernels (CPU tensors run in the interpreter), s vs generic < 1e-10; the default
    (``kernels="off"``) sends none there, on CUDA too."""
    from funcprobe import probe_scalars
    from funcprobe.edge.registry import ParamRegistry

    calls, scans = [], []
    forward, scan = ta.attention_forward, ta.keeps_lower_triangle

    def counted(*args, **kwargs):
        calls.append(args[0].q.shape)
        return forward(*args, **kwargs)

    monkeypatch.setattr(ta, "attention_forward", counted)
    monkeypatch.setattr(ta, "keeps_lower_triangle", lambda mask: scans.append(mask.shape) or scan(mask))
    model = qwen2(attn="sdpa").to(DEVICE)
    E = random_rollouts(B=2, G=2, seed=3, resp_len=(1, 7), max_len=7.0).to(DEVICE)
    mu = random_direction(ParamRegistry.from_model(model))
    ref = probe_scalars(model, E, mu, chunk_size=2, generic_jvp=True)
    off = probe_scalars(model, E, mu, chunk_size=2)
    assert calls == [] and scans == [] and rel_err(off, ref) < 1e-10  # the default: the closed-form rule
    got = probe_scalars(model, E, mu, chunk_size=2, kernels="triton")
    assert len(calls) == 2 and rel_err(got, ref) < 1e-10  # 2 layers, one chunk
    assert len(scans) == 1  # the padded batch's one mask, read once for both layers


def test_kernels_compile_for_sm90_within_its_shared_memory(tmp_path):
    """What the interpreter cannot show: Triton compiles both kernels for an H100/H200
    (sm_90, with its bundled ptxas; no GPU needed) at ``_blocks``' sizes, within 227 KiB of
    shared memory (``benchmarks/compile_sm90.py --quick``: bf16 jvp, fp32 forward, fp64 jvp)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_sm90.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "3 of 3 variants compile and fit" in proc.stdout
