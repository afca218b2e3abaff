"""Where the time of one funcprobe jvp goes on a GPU preset (a diagnostic, never CI).

    python benchmarks/gpu_diag.py --preset qwen2.5-0.5b --response-len 256 --profile

Builds the preset once, then times (each line printed as it is measured, with the
seconds since the start): a no-grad forward (SDPA MATH, the benchmark's unit), the
first funcprobe jvp and the second at each --precision (``kernels="off"``, the default: the
closed-form SDPA rule), and with --triton the jvp with ``kernels="triton"`` (first call:
Triton compiles; then a second); with --profile, the top operators of one more jvp (the
default kernels) by CUDA time and by CPU self time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from presets import PRESETS, build_model, make_rollouts, random_direction  # noqa: E402
import seed_methods  # noqa: E402

from funcprobe import ParamRegistry, probe_scalars  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def timed(name: str, fn):
    if CUDA:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    peak = ""
    if CUDA:
        torch.cuda.synchronize()
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        torch.cuda.reset_peak_memory_stats()
    log(f"{name}: {time.perf_counter() - t:.3f} s{peak}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--responses", type=int)
    ap.add_argument("--response-len", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--chunk-size", type=int, help="prompts per chunk (default: all)")
    ap.add_argument("--precision", default="auto",
                    help="comma-separated probe precisions to time (auto, float32, model)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--triton", action="store_true", help="also time the jvp with kernels='triton' (needs Triton)")
    args = ap.parse_args()
    over = {k: v for k, v in {"prompts": args.prompts, "group_size": args.responses,
                              "response_len": args.response_len,
                              "layers": args.layers}.items() if v is not None}
    p = PRESETS[args.preset].with_(**over)
    log(f"{p}")
    model = build_model(p, device=DEVICE)
    batch = make_rollouts(p, device=DEVICE)
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg.trainable)
    chunk = args.chunk_size or p.prompts
    log(f"built: {sum(v.numel() for v in reg.trainable.values())} trainable parameters, chunk {chunk}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    precisions = [x for x in args.precision.split(",") if x]

    def jvp(precision=precisions[0], kernels="off"):
        return probe_scalars(model, batch, mu, chunk_size=chunk, mode="jvp", precision=precision, kernels=kernels)

    with sdpa_kernel([SDPBackend.MATH]):
        timed("nograd_forward (MATH)", lambda: seed_methods.nograd_forward(model, reg.names, batch, mu, "dr_grpo", chunk))
        ref = None
        for precision in precisions:
            timed(f"jvp precision={precision}, first call", lambda: jvp(precision))
            s = timed(f"jvp precision={precision}, second call", lambda: jvp(precision))
            ref = s if ref is None else ref
            log(f"s = {[round(x, 4) for x in s.tolist()]}, max |s - s[{precisions[0]}]| / max |s[{precisions[0]}]| = "
                f"{float((s - ref).abs().max() / ref.abs().max()):.2e}")
        if args.triton:
            timed("jvp, kernels='triton', first call", lambda: jvp(kernels="triton"))
            s = timed("jvp, kernels='triton', second call", lambda: jvp(kernels="triton"))
            log(f"max |s - s[kernels off]| / max |s[kernels off]| = {float((s - ref).abs().max() / ref.abs().max()):.2e}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                jvp()
                if CUDA:
                    torch.cuda.synchronize()
            ka = prof.key_averages()
            print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
            print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
