"""Benchmark: funcprobe's s[n] against the seeds' autograd.grad paths, side by side.

    python benchmarks/bench_conditional_variance.py --preset small

Methods (one run each on the same model, batch and μY):
  funcprobe_jvp      funcprobe.probe_scalars(mode="jvp"), forward mode (the s of conditional_variance);
                     kernels="off", the default: SDPA calls take the closed-form rule
  funcprobe_vjp      funcprobe.probe_scalars(mode="vjp"), α-trick via torch.func.vjp
  seeds_alpha        seed 001's autograd.grad α-trick (benchmarks/seed_methods.py)
  seeds_s_boundary   seed 000's VJP at the S boundary (grad_outputs = dL/dS)
  per_prompt_loop    one backward per prompt: the naive reference
  funcprobe_jvp_triton  funcprobe_jvp with kernels="triton": the Triton flash kernels for the
                     SDPA calls they cover on CUDA (on CPU the same code as funcprobe_jvp;
                     needs Triton)
  nograd_forward     unit: S once under no_grad (SDPA's MATH backend, as the probe's own passes)
  nograd_forward_flash  S once under no_grad, SDPA choosing among its fused backends
                     (flash where it applies; with a padding mask, as here, CUDA's SDPA
                     takes memory-efficient or cuDNN): what a trainer's forward costs;
                     ratios to it get their own columns
  nograd_forward_eager  S once under no_grad with eager attention ([T × T] scores)
  forward_backward   unit: one forward + backward of Σ LX

Wall time: one warm-up, then the median of --repeats runs. Peak memory: on CPU each
method runs in its own subprocess and reports its peak RSS growth over the loaded
model and batch (VmHWM after resetting it through /proc/self/clear_refs); on CUDA
torch.cuda.max_memory_allocated after a reset, over what was allocated before.
Agreement: max |s − s_ref| / max |s_ref| against per_prompt_loop.

Writes benchmarks/results/<device>-<preset>.json and .md, and PNG plots of the time
and memory ratios (to nograd_forward) against prompts per group and sequence length.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from presets import PRESETS, Preset, build_model, make_rollouts, random_direction  # noqa: E402
import seed_methods  # noqa: E402

from funcprobe import ParamRegistry, SettingsError, probe_scalars  # noqa: E402

METHODS = ["nograd_forward", "nograd_forward_flash", "nograd_forward_eager", "forward_backward", "funcprobe_jvp",
           "funcprobe_jvp_triton", "funcprobe_vjp", "seeds_alpha", "seeds_s_boundary", "per_prompt_loop"]
SWEEP_METHODS = ["nograd_forward", "forward_backward", "funcprobe_jvp", "funcprobe_vjp", "seeds_alpha"]
REFERENCE = "per_prompt_loop"
UNIT = "nograd_forward"
FLASH = "nograd_forward_flash"
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------ one measurement
def _funcprobe(mode, kernels="off"):
    def run(model, names, batch, mu, weighting, group_size):
        return probe_scalars(model, batch, mu, weighting=weighting, chunk_size=group_size, mode=mode, kernels=kernels)

    return run


RUNNERS = {
    "funcprobe_jvp": _funcprobe("jvp"),
    "funcprobe_jvp_triton": _funcprobe("jvp", kernels="triton"),
    "nograd_forward_flash": seed_methods.nograd_forward,
    "nograd_forward_eager": seed_methods.nograd_forward,
    "funcprobe_vjp": _funcprobe("vjp"),
    "seeds_alpha": seed_methods.seeds_alpha,
    "seeds_s_boundary": seed_methods.seeds_s_boundary,
    "per_prompt_loop": seed_methods.per_prompt_loop,
    "nograd_forward": seed_methods.nograd_forward,
    "forward_backward": seed_methods.forward_backward,
}


def _rss_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


class MemoryMeter:
    """Peak memory growth of a block: CUDA allocator stats, or the process's peak RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            st = _rss_status()
            self.base = min(st["VmRSS"], st["VmHWM"])

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return max(_rss_status()["VmHWM"] - self.base, 0)  # RSS counters are synced lazily (±pages)


def measure(spec: dict) -> dict:
    """Run one method on one configuration; returns times, peak memory and s."""
    preset = PRESETS[spec["preset"]].with_(**spec["overrides"])
    device = spec["device"]
    model = build_model(preset, device=device)
    batch = make_rollouts(preset, device=device)
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg.trainable)
    names = reg.names
    run = RUNNERS[spec["method"]]
    args = (model, names, batch, mu, spec["weighting"], spec["group_size"])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if spec["method"] == "nograd_forward_eager":
        model.get_base_model().set_attn_implementation("eager")
    backends = [SDPBackend.MATH] if spec["method"] != FLASH else \
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    meter = MemoryMeter(device)
    result: dict = {"method": spec["method"], "group_size": spec["group_size"],
                    "seq_len": preset.prompt_len + preset.response_len, "prompts": preset.prompts}
    try:
        with sdpa_kernel(backends, set_priority=True):
            meter.start()
            s = run(*args)
            result["peak_bytes"] = meter.peak()
            times = []
            for _ in range(spec["repeats"]):
                _sync(device)
                t = time.perf_counter()
                run(*args)
                _sync(device)
                times.append(time.perf_counter() - t)
    except torch.cuda.OutOfMemoryError as err:  # pragma: no cover - GPU only
        result["error"] = f"out of memory: {str(err).splitlines()[0]}"
        return result
    except SettingsError as err:  # funcprobe_jvp_triton without Triton
        result["error"] = str(err)
        return result
    result["times"] = times
    result["median_s"] = statistics.median(times)
    result["s"] = None if s is None else [float(x) for x in s.double().cpu()]
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_isolated(spec: dict, isolate: bool) -> dict:
    if not isolate:
        return measure(spec)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        preset = PRESETS[spec["preset"]].with_(**spec["overrides"])
        why = "killed (SIGKILL: out of memory)" if proc.returncode == -9 else f"exit code {proc.returncode}"
        errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-1:]
        return {"method": spec["method"], "group_size": spec["group_size"], "prompts": preset.prompts,
                "seq_len": preset.prompt_len + preset.response_len, "error": "; ".join([why, *errors])}
    return json.loads(lines[-1])


# ------------------------------------------------------------------ a table of methods
def run_methods(base: dict, methods: list[str], isolate: bool, log) -> list[dict]:
    rows = []
    for m in methods:  # each row logged as it comes: a run cut short still leaves them
        rows.append(measure_isolated({**base, "method": m}, isolate))
        r = rows[-1]
        log(f"  measured {m}: " + (f"{r['median_s']:.3f} s, {r['peak_bytes'] / 2**20:.1f} MiB" if "median_s" in r
                                   else r.get("error", "failed")))
    unit = next((r for r in rows if r["method"] == UNIT and "median_s" in r), None)
    flash = next((r for r in rows if r["method"] == FLASH and "median_s" in r), None)
    ref = next((r for r in rows if r["method"] == REFERENCE and r.get("s")), None)
    for r in rows:
        if "median_s" not in r:
            log(f"  {r['method']:<24} {r.get('error', 'failed')}")
            continue
        if unit:
            r["time_ratio"] = r["median_s"] / unit["median_s"]
            r["memory_ratio"] = r["peak_bytes"] / max(unit["peak_bytes"], 1)
        if flash:
            r["flash_time_ratio"] = r["median_s"] / flash["median_s"]
            r["flash_memory_ratio"] = r["peak_bytes"] / max(flash["peak_bytes"], 1)
        if ref and r.get("s"):
            diff = max(abs(a - b) for a, b in zip(r["s"], ref["s"]))
            r["max_rel_diff"] = diff / max(abs(b) for b in ref["s"])
        log(f"  {r['method']:<24} {r['median_s']:9.3f} s  x{r.get('time_ratio', float('nan')):6.2f}   "
            f"{r['peak_bytes'] / 2**20:9.1f} MiB  x{r.get('memory_ratio', float('nan')):6.2f}   "
            f"rel diff {r.get('max_rel_diff', float('nan')):.1e}")
    return rows


def markdown_table(rows: list[dict]) -> str:
    flash = any("flash_time_ratio" in r for r in rows)
    extra = " × flash forward (time) | × flash forward (memory) |" if flash else ""
    out = ["| method | time (s) | × no-grad forward | peak memory (MiB) | × no-grad forward |" + extra
           + " max rel. diff of s vs per-prompt loop |", "| --- |" + " ---: |" * (7 if flash else 5)]
    for r in rows:
        if "median_s" not in r:
            out.append(f"| {r['method']} | {r.get('error', 'failed')} |" + " |" * (6 if flash else 4))
            continue
        rel = r.get("max_rel_diff")
        ratios = (f" {r.get('flash_time_ratio', float('nan')):.2f} | {r.get('flash_memory_ratio', float('nan')):.2f} |"
                  if flash else "")
        out.append(f"| {r['method']} | {r['median_s']:.3f} | {r.get('time_ratio', float('nan')):.2f} | "
                   f"{r['peak_bytes'] / 2**20:.1f} | {r.get('memory_ratio', float('nan')):.2f} |{ratios} "
                   f"{'—' if rel is None else f'{rel:.1e}'} |")
    return "\n".join(out)


def largest_fitting(sweep: list[dict], budget_bytes: float) -> dict[str, int | None]:
    best: dict[str, int | None] = {}
    for r in sweep:
        fits = "peak_bytes" in r and r["peak_bytes"] <= budget_bytes
        best.setdefault(r["method"], None)
        if fits and (best[r["method"]] is None or r["group_size"] > best[r["method"]]):
            best[r["method"]] = r["group_size"]
    return best


def plot(sweep: list[dict], key: str, xlabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in sweep):
        pts = sorted((r[key], r) for r in sweep if r["method"] == method and "time_ratio" in r)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        axes[0].plot(xs, [r["time_ratio"] for _, r in pts], marker="o", label=method)
        axes[1].plot(xs, [r["memory_ratio"] for _, r in pts], marker="o", label=method)
    for ax, ylabel in zip(axes, ["wall time / no-grad forward", "peak memory / no-grad forward"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, *, plots: bool = True) -> Path:
    """Write <device>-<preset>.json, .md and the sweep PNGs; returns the path stem."""
    dev, name, p = report["device"], report["preset"]["name"], report["preset"]
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{dev}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = [f"# {dev} · preset `{name}`", "", f"`{report['command'].strip()}`", "",
          f"torch {report['torch']}, {report['threads']} threads; {p['prompts']} prompts x G={p['group_size']}, "
          f"prompt <= {p['prompt_len']}, response <= {p['response_len']} tokens, {p['dtype']}, group size "
          f"{report['group_size']}, median of {report['repeats']} after a warm-up.", "",
          markdown_table(report["methods"])]
    for title, sweep, key in (("Prompts per group", report["group_sweep"], "group_size"),
                              ("Sequence length", report["length_sweep"], "seq_len")):
        if sweep:
            md += ["", f"## {title}", "", "| method | " + key + " | time (s) | × fwd | peak (MiB) | × fwd |",
                   "| --- | ---: | ---: | ---: | ---: | ---: |"]
            md += [f"| {r['method']} | {r[key]} | {r['median_s']:.3f} | {r.get('time_ratio', float('nan')):.2f} | "
                   f"{r['peak_bytes'] / 2**20:.1f} | {r.get('memory_ratio', float('nan')):.2f} |"
                   if "median_s" in r else f"| {r['method']} | {r.get(key, '?')} | {r.get('error', 'failed')} | | | |"
                   for r in sweep]
    if report["largest_group_in_budget"]:
        md += ["", f"Largest group within {report['memory_budget_gb']:g} GiB: "
               + ", ".join(f"{m} {k}" for m, k in report["largest_group_in_budget"].items())]
    for model_name, mrows in report["model_sweep"].items():
        md += ["", f"## Model `{model_name}`", "", markdown_table(mrows)]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    if plots:
        if report["group_sweep"]:
            plot(report["group_sweep"], "group_size", "prompts per group", f"{dev} {name}: scaling with group size",
                 Path(f"{stem}-groups.png"))
        if report["length_sweep"]:
            plot(report["length_sweep"], "seq_len", "sequence length T",
                 f"{dev} {name}: scaling with sequence length (2 prompts)", Path(f"{stem}-seqlen.png"))
    return stem


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return "cpu"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float64", "float32", "bfloat16", "float16"], help="override the preset's")
    ap.add_argument("--prompts", type=int, help="B, prompts in E")
    ap.add_argument("--group-size", type=int, help="prompts per group (default: all B in one group)")
    ap.add_argument("--responses", type=int, help="G, responses per prompt")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--response-len", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--lora-rank", type=int)
    ap.add_argument("--weighting", choices=["dr_grpo", "per_token_avg"], default="dr_grpo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--sweep-groups", default="", help="prompts per group to sweep, e.g. 1,2,4,8,16,32,64")
    ap.add_argument("--sweep-lengths", default="", help="sequence lengths T to sweep, e.g. 128,256,512,1024,2048")
    ap.add_argument("--sweep-models", default="", help="presets to compare at their own sizes, e.g. tiny,small")
    ap.add_argument("--sweep-methods", default=",".join(SWEEP_METHODS))
    ap.add_argument("--sweep-repeats", type=int, help="repeats in the sweeps (default: --repeats)")
    ap.add_argument("--length-sweep-prompts", type=int, help="prompts (one group) in the length sweep (default: B)")
    ap.add_argument("--memory-budget-gb", type=float, default=8.0, help="for the largest group that fits")
    ap.add_argument("--inline", action="store_true", help="measure in this process (memory numbers then overlap)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--from-json", type=Path, metavar="FILE", help="re-render the .md and plots of a results JSON")
    args = ap.parse_args(argv)

    if args.from_json:
        write_report(json.loads(args.from_json.read_text()), args.out, plots=not args.no_plots)
        return 0

    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    overrides = {"dtype": args.dtype, "prompts": args.prompts, "group_size": args.responses,
                 "prompt_len": args.prompt_len, "response_len": args.response_len, "hidden": args.hidden,
                 "layers": args.layers, "vocab": args.vocab, "lora_rank": args.lora_rank}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    preset: Preset = PRESETS[args.preset].with_(**overrides)
    group = args.group_size or preset.prompts
    isolate = not args.inline
    base = {"preset": args.preset, "overrides": overrides, "device": args.device, "weighting": args.weighting,
            "repeats": args.repeats, "group_size": group}
    log = functools.partial(print, flush=True)
    log(f"preset {preset.name}: {preset}")
    log(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, group size {group}")
    methods = [m for m in args.methods.split(",") if m]
    rows = run_methods(base, methods, isolate, log)

    sweep_methods = [m for m in args.sweep_methods.split(",") if m]
    budget = args.memory_budget_gb * 2**30
    sweep_base = {**base, "repeats": args.sweep_repeats or args.repeats}
    group_sweep: list[dict] = []
    for k in _ints(args.sweep_groups):
        log(f"group sweep: {k} prompts per group")
        spec = {**sweep_base, "overrides": {**overrides, "prompts": k}, "group_size": k}
        res = run_methods(spec, sweep_methods, isolate, log)
        group_sweep += res
        over = {r["method"] for r in res if r.get("peak_bytes", 0) > budget or "error" in r}
        sweep_methods = [m for m in sweep_methods if m not in over or m == UNIT]
    length_sweep: list[dict] = []
    for T in _ints(args.sweep_lengths):
        log(f"length sweep: T = {T}")
        k = args.length_sweep_prompts or preset.prompts
        spec = {**sweep_base, "overrides": {**overrides, "prompts": k, "prompt_len": T // 4, "response_len": T - T // 4},
                "group_size": k}
        length_sweep += run_methods(spec, [m for m in args.sweep_methods.split(",") if m], isolate, log)
    model_sweep: dict[str, list[dict]] = {}
    for name in [m for m in args.sweep_models.split(",") if m]:
        log(f"model sweep: {name}")
        spec = {**sweep_base, "preset": name, "overrides": {k: v for k, v in overrides.items() if k == "dtype"},
                "group_size": PRESETS[name].prompts}
        model_sweep[name] = run_methods(spec, [m for m in args.sweep_methods.split(",") if m], isolate, log)

    dev = device_name(args.device)
    report = {
        "command": "python benchmarks/bench_conditional_variance.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": dev, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "preset": preset.__dict__, "group_size": group, "weighting": args.weighting, "repeats": args.repeats,
        "methods": rows, "group_sweep": group_sweep, "length_sweep": length_sweep, "model_sweep": model_sweep,
        "memory_budget_gb": args.memory_budget_gb,
        "largest_group_in_budget": largest_fitting(group_sweep, budget) if group_sweep else {},
    }
    stem = write_report(report, args.out, plots=not args.no_plots)
    log(f"wrote {stem}.json, {stem}.md")
    failed = [r["method"] for r in rows if "median_s" not in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
