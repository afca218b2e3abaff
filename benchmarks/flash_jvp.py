"""Attention with a tangent on a GPU: the Triton flash kernels against SDPA's flash forward.

    python benchmarks/flash_jvp.py          # on CUDA; writes benchmarks/results/<device>-flash-jvp.{md,json}

Qwen2.5-0.5B's attention shapes (14 query / 2 key-value heads, head dim 64; ``--heads``,
``--kv-heads``, ``--head-dim``), bf16, causal, one sequence per length (``--lengths``),
tangents on q, k and v (full fine-tuning's worst case). Rows, each timed as the median of
``--repeats`` after a warm-up, with the peak of ``torch.cuda.max_memory_allocated`` above
the inputs:

  sdpa_flash_forward   ``F.scaled_dot_product_attention`` with the flash backend: the unit
  sdpa_math_forward    the same with the MATH backend ([T × T] scores)
  kernel_forward       ``funcprobe.forward.triton.attention_forward``
  kernel_forward_jvp   ``torch.func.jvp`` of SDPA under ``jvp_rules(kernels="triton")``: the kernels' forward + jvp
  rule_forward_jvp     the same under ``jvp_rules()`` (kernels off, the default): the closed-form rule (query
                       blocks, MATH semantics)
  generic_forward_jvp  ``torch.func.jvp`` of SDPA under MATH without the rules (PyTorch's formulas)

Agreement: the kernels' value and tangent against the closed-form rule's (max relative
difference, bf16). On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set here): a smoke run of the harness, times meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

RESULTS = Path(__file__).resolve().parent / "results"


def _inputs(T, args, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(h):
        return torch.randn(1, h, T, args.head_dim, generator=gen).to(device=device, dtype=dtype)

    primals = (randn(args.heads), randn(args.kv_heads), randn(args.kv_heads))
    tangents = tuple(randn(t.shape[1]) for t in primals)
    return primals, tangents


def _rows(args):
    from funcprobe.forward import triton
    from funcprobe.forward.attention import AttentionCall, AttentionOptions
    from funcprobe.forward.rules import jvp_rules

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def forward(backend):
        def run(p, t):
            with sdpa_kernel([backend]):
                return sdpa(*p), None
        return run

    def kernel_forward(p, t):
        call = AttentionCall(p[0], p[1], p[2], None, AttentionOptions(is_causal=True, gqa=True))
        return triton.attention_forward(call)[0], None

    def jvp(kernels: str | None):
        """SDPA's jvp under ``jvp_rules(kernels)``; None: without the rules (CPU tensors reach
        the kernels in Triton's interpreter, set in ``main`` for smoke runs)."""
        def run(p, t):
            with sdpa_kernel([SDPBackend.MATH]), (jvp_rules(kernels) if kernels else contextlib.nullcontext()):
                return torch.func.jvp(sdpa, p, t)
        return run

    return {"sdpa_flash_forward": forward(SDPBackend.FLASH_ATTENTION), "sdpa_math_forward": forward(SDPBackend.MATH),
            "kernel_forward": kernel_forward, "kernel_forward_jvp": jvp("triton"),
            "rule_forward_jvp": jvp("off"), "generic_forward_jvp": jvp(None)}


def measure(name, run, primals, tangents, repeats, device):
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        run(primals, tangents)  # warm-up (compiles the kernels)
        sync()
        base = 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = run(primals, tangents)
            sync()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        return {"method": name, "error": str(err).splitlines()[0][:200]}, None
    return {"method": name, "median_s": statistics.median(times), "peak_bytes": peak}, out


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.device == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton reads it when imported (next line)
    from funcprobe.forward import triton

    if not triton.available():
        print("flash_jvp: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    if args.heads % args.kv_heads:
        print(f"--heads: expected a multiple of --kv-heads ({args.kv_heads}), got {args.heads}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    device = args.device
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu (interpreter)"
    rows = []
    for T in args.lengths:
        primals, tangents = _inputs(T, args, device, dtype)
        results = {}
        for method, run in _rows(args).items():
            row, out = measure(method, run, primals, tangents, args.repeats, device)
            row["T"] = T
            results[method] = out
            rows.append(row)
        unit = next((r for r in rows if r["T"] == T and r["method"] == "sdpa_flash_forward" and "median_s" in r), None)
        kernel, rule = results.get("kernel_forward_jvp"), results.get("rule_forward_jvp")
        for r in rows:
            if r["T"] == T and unit and "median_s" in r:
                r["time_ratio"] = r["median_s"] / unit["median_s"]
                r["memory_ratio"] = r["peak_bytes"] / max(unit["peak_bytes"], 1)
        if kernel is not None and rule is not None:
            agree = {"value": _rel(kernel[0], rule[0]), "tangent": _rel(kernel[1], rule[1])}
            next(r for r in rows if r["T"] == T and r["method"] == "kernel_forward_jvp")["vs_rule"] = agree
        for r in (r for r in rows if r["T"] == T):
            print(f"T={T:>6} {r['method']:<22} " + (r.get("error") or
                  f"{r['median_s'] * 1e3:9.2f} ms x{r.get('time_ratio', float('nan')):6.2f}  "
                  f"{r['peak_bytes'] / 2**20:9.1f} MiB x{r.get('memory_ratio', float('nan')):6.2f}"
                  + (f"  vs rule: value {r['vs_rule']['value']:.1e}, tangent {r['vs_rule']['tangent']:.1e}"
                     if "vs_rule" in r else "")), flush=True)
    report = {"command": "python benchmarks/flash_jvp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": name, "torch": torch.__version__, "dtype": args.dtype, "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "repeats": args.repeats, "rows": rows}
    stem = "cuda-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") \
        if device.startswith("cuda") else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}-flash-jvp.json").write_text(json.dumps(report, indent=1))
    md = [f"# Attention with a tangent: {name}", "", f"`{report['command']}`", "",
          f"torch {torch.__version__}, {args.dtype}, causal, 1 sequence, {args.heads} query / {args.kv_heads} "
          f"key-value heads, head dim {args.head_dim}, tangents on q, k, v; median of {args.repeats} after a "
          "warm-up; peak = torch.cuda.max_memory_allocated above the inputs.", "",
          "| T | method | time (ms) | × flash forward | peak (MiB) | × flash forward | kernels vs rule (value, tangent) |",
          "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "median_s" not in r:
            md.append(f"| {r['T']} | {r['method']} | {r['error']} | | | | |")
            continue
        agree = f"{r['vs_rule']['value']:.1e}, {r['vs_rule']['tangent']:.1e}" if "vs_rule" in r else ""
        md.append(f"| {r['T']} | {r['method']} | {r['median_s'] * 1e3:.2f} | {r.get('time_ratio', float('nan')):.2f} | "
                  f"{r['peak_bytes'] / 2**20:.1f} | {r.get('memory_ratio', float('nan')):.2f} | {agree} |")
    (args.out / f"{stem}-flash-jvp.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / stem}-flash-jvp.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
