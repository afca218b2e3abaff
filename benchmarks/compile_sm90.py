"""Cross-compile the Triton attention kernels for an H100/H200 (sm_90) without a GPU.

    python benchmarks/compile_sm90.py            # every variant; writes benchmarks/results/compile-sm90.md
    python benchmarks/compile_sm90.py --quick    # three variants (the test suite runs this)

Triton compiles to PTX and runs its bundled ``ptxas`` on this machine, so what the
interpreter cannot show — that the kernels compile, and fit sm_90's 227 KiB of shared
memory per block at the block sizes ``funcprobe.forward.triton._blocks`` picks —
is checked here: per dtype (bf16, fp16, fp32, fp64), head dimension (64, 128, 256),
kernel (forward, jvp with q̇, k̇, v̇) and mask (causal; bool; float), with the launch's
own specialisations (unit innermost strides, 16-byte aligned pointers). Nothing runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter (read at Triton's import)

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
MASKS = {0: "causal", 1: "bool mask", 2: "float mask"}


def compile_one(name: str, dt: str, head_dim: int, mask_kind: int):
    """The compiled kernel's metadata (``shared`` bytes, ...) for one variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from funcprobe.forward import triton as ta

    fn = ta._kernel(name)  # a JITFunction: TRITON_INTERPRET is unset above
    acc = "fp64" if dt == "fp64" else "fp32"
    pointers = {"Q": dt, "K": dt, "V": dt, "O": acc, "LSE": acc, "DQ": dt, "DK": dt, "DV_": dt, "DO": acc,
                "M": {0: dt, 1: "u8", 2: dt}[mask_kind]}
    block_m, fwd_n, jvp_n, stages = ta._blocks(head_dim, DTYPES[dt])
    constants = dict(BLOCK_M=block_m, BLOCK_N=fwd_n if name == "forward" else jvp_n, BLOCK_D=ta._pow2(head_dim),
                     BLOCK_DV=ta._pow2(head_dim), CAUSAL=mask_kind == 0, IS_CAUSAL=mask_kind == 0,
                     MASK_KIND=mask_kind, LOW=dt in ("bf16", "fp16"), WIDE=dt == "fp64")
    if name == "jvp":
        constants.update(HAS_DQ=True, HAS_DK=True, HAS_DV=True)
    for unit in ("sqd", "skd", "svd", "sod", "_sl1", "dqd", "dkd", "dvd", "rod") + (("smn",) if mask_kind else ()):
        if unit in fn.arg_names:
            constants[unit] = 1  # innermost strides of 1 are specialised so at launch
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp64" if arg == "scale" else "i32"
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=4, num_stages=stages))
    return kernel.metadata, (block_m, fwd_n if name == "forward" else jvp_n, stages)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bf16 jvp at 128, fp32 forward at 64, fp64 jvp at 128")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile_sm90: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    if args.quick:
        variants = [("jvp", "bf16", 128, 1), ("forward", "fp32", 64, 0), ("jvp", "fp64", 128, 2)]
    else:
        variants = [(n, dt, d, m) for dt in DTYPES for d in (64, 128, 256) for n in ("forward", "jvp") for m in MASKS]
    rows, bad = [], 0
    for name, dt, head_dim, mask_kind in variants:
        t0 = time.perf_counter()
        try:
            meta, blocks = compile_one(name, dt, head_dim, mask_kind)
            fits = meta.shared <= SHARED_LIMIT
            line = (f"| {name} | {dt} | {head_dim} | {MASKS[mask_kind]} | {blocks[0]} × {blocks[1]}, {blocks[2]} | "
                    f"{meta.shared} | {'yes' if fits else 'NO'} |")
        except Exception as err:  # a compile error is the finding
            fits, line = False, f"| {name} | {dt} | {head_dim} | {MASKS[mask_kind]} | | failed: {err!r:.200} | NO |"
        bad += not fits
        rows.append(line)
        print(line, f"{time.perf_counter() - t0:.1f} s", flush=True)
    import triton

    md = ["# The Triton attention kernels compiled for sm_90 (no GPU)", "",
          "`python benchmarks/compile_sm90.py" + (" --quick" if args.quick else "") + "`", "",
          f"Triton {triton.__version__}, target cuda sm_90 (warp 32), 4 warps; shared memory per block "
          f"against sm_90's {SHARED_LIMIT} bytes. Compiled only: nothing ran on a GPU.", "",
          "| kernel | dtype | head dim | mask | blocks (rows × keys, stages) | shared memory (bytes) | fits |",
          "| --- | --- | ---: | --- | --- | ---: | --- |", *rows]
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile-sm90.md").write_text("\n".join(md) + "\n")
    print(f"{len(rows) - bad} of {len(rows)} variants compile and fit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
