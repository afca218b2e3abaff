"""Blockwise attention against the model's own attention in the probe's jvp, by sequence length.

    python benchmarks/attention.py        # writes benchmarks/results/attention.{md,json}

A random Qwen2 config (hidden 256, 2 layers, 8 query / 2 key-value heads, vocab 1000,
float32, LoRA r = 8 on q/k/v/o); one prompt of 32 tokens with G = 2 responses filling the
sequence to T tokens; ``probe_scalars(mode="jvp", chunk_size=1)`` along a random
direction with ``attention_block=None`` (the model's own attention: SDPA restricted to its
MATH backend by the probe, [T x T] scores for the primal and for the tangent) and ``attention_block=512``. Each measurement runs in its
own process; peak is the growth of peak RSS (``VmHWM``, reset after the model and batch
are built), time one call after a warm-up call; s of both runs is compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from precision import _rss_mib  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (1024, 2048, 4096, 8192)


def one(T: int, block: int | None) -> dict:
    from funcprobe import ParamRegistry, RolloutBatch, probe_scalars
    from funcprobe.validation.models import PolicySpec, qwen2_lora_policy

    model = qwen2_lora_policy(PolicySpec(vocab_size=1000, hidden=256, layers=2, heads=8, kv_heads=2,
                                         intermediate=512, lora_rank=8, init_lora_weights=False), seed=0)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 1000, (32,), generator=gen).tolist()
    responses = [torch.randint(3, 1000, (T - 32,), generator=gen).tolist() for _ in range(2)]
    E = RolloutBatch.from_lists([prompt, prompt], [responses, responses], pad_token_id=0, max_len=float(T))
    reg = ParamRegistry.from_model(model)
    mu = {n: torch.randn(t.shape, generator=gen) * 1e-2 for n, t in reg.trainable.items()}
    kw = dict(mode="jvp", chunk_size=1, attention_block=block)
    probe_scalars(model, E.select(0, 1), mu, **kw)  # warm-up
    base = _rss_mib()
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    s = probe_scalars(model, E.select(0, 1), mu, **kw)
    seconds = time.perf_counter() - t0
    return {"T": T, "block": block, "seconds": seconds, "peak_mib": _rss_mib("VmHWM:") - base, "s": s.tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        T, block = int(args.one[0]), None if args.one[1] == "none" else int(args.one[1])
        print(json.dumps(one(T, block)))
        return 0
    rows = []
    for T in args.lengths:
        pair = {}
        for block in (None, args.block):
            proc = subprocess.run([sys.executable, __file__, "--one", str(T), "none" if block is None else str(block)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                pair[block] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
            else:
                pair[block] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(T, block, {k: v for k, v in pair[block].items() if k != "s"}, flush=True)
        rows.append(pair)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/attention.py " + " ".join(sys.argv[1:])
    lines = ["# Blockwise attention vs the model's own attention (SDPA, MATH backend) in the probe's jvp", "",
             f"`{command}` ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}). "
             "Qwen2 config, hidden 256, 2 layers, 8/2 heads, float32, LoRA r=8 q/k/v/o; one prompt x G=2 "
             "sequences of T tokens; `probe_scalars(mode='jvp', chunk_size=1)`; peak = growth of peak RSS "
             "over the loaded model and batch, one process per cell.", "",
             f"| T | model's: time | model's: peak | blockwise ({args.block}): time | blockwise: peak | "
             "peak ratio | max rel. diff of s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for pair in rows:
        e, b = pair[None], pair[args.block]
        T = e.get("T", b.get("T"))
        if "error" in e or "error" in b:
            lines.append(f"| {T} | {e.get('error', '')} | | {b.get('error', '')} | | | |")
            continue
        se, sb = torch.tensor(e["s"], dtype=torch.float64), torch.tensor(b["s"], dtype=torch.float64)
        diff = float((se - sb).abs().max() / se.abs().max())
        lines.append(f"| {T} | {e['seconds']:.2f} s | {e['peak_mib']:.0f} MiB | {b['seconds']:.2f} s | "
                     f"{b['peak_mib']:.0f} MiB | {b['peak_mib'] / e['peak_mib']:.2f} | {diff:.1e} |")
    (args.out / "attention.md").write_text("\n".join(lines) + "\n")
    (args.out / "attention.json").write_text(json.dumps({"command": command, "rows": [
        {str(k): v for k, v in pair.items()} for pair in rows]}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
