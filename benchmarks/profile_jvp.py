"""Where the time of funcprobe's jvp path goes, by model component.

    python benchmarks/profile_jvp.py --preset small

Forward hooks on the model's modules time each component exclusively (a child's time
is not counted again in its parent) while ``probe_scalars(mode="jvp")`` runs; the
primal and the tangent of a module are computed inside the same call, so each row is
"primal + tangent" of that component. The same is done for a no-grad forward for
comparison. Also prints torch.profiler's top operators by self time.

Writes benchmarks/results/<device>-<preset>-profile.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from presets import PRESETS, build_model, make_rollouts, random_direction  # noqa: E402

from funcprobe import ParamRegistry, probe_scalars, sequence_logprobs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def category(name: str) -> str | None:
    """The component a module belongs to, from its qualified name."""
    last = name.rsplit(".", 1)[-1]
    if ".lora_A." in name + "." or ".lora_B." in name + ".":
        return "LoRA A/B matmuls" if last not in ("lora_A", "lora_B") else None
    if last == "base_layer":
        return "q/k/v/o projections (base weights)"
    if last == "self_attn":
        return "attention core (rotary, scores, softmax, AV)"
    if last == "mlp":
        return "MLP (gate/up/down)"
    if last.endswith("norm"):
        return "RMSNorm"
    if last == "embed_tokens":
        return "embedding"
    if last == "lm_head":
        return "lm_head (response positions)"
    if name.endswith("base_model.model"):
        return "decoder glue (residuals, masks, rotary tables)"
    return None


class ComponentTimer:
    def __init__(self, model: torch.nn.Module):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.handles = []
        for name, module in model.named_modules():
            cat = category(name)
            if cat is not None:
                self.handles.append(module.register_forward_pre_hook(self._enter(cat)))
                self.handles.append(module.register_forward_hook(self._exit()))

    def _enter(self, cat):
        def hook(module, args):
            self.stack.append([cat, time.perf_counter(), 0.0])

        return hook

    def _exit(self):
        def hook(module, args, out):
            cat, start, children = self.stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[cat] += elapsed - children
            if self.stack:
                self.stack[-1][2] += elapsed

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def profile(fn, model) -> tuple[float, dict[str, float]]:
    fn()  # warm-up
    timer = ComponentTimer(model)
    t = time.perf_counter()
    fn()
    total = time.perf_counter() - t
    timer.remove()
    rows = dict(timer.totals)
    rows["outside the model (log-softmax, gather, surrogate, transform overhead)"] = total - sum(rows.values())
    return total, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    model = build_model(preset, device=args.device)
    E = make_rollouts(preset, device=args.device)
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg.trainable)

    def jvp_path():
        probe_scalars(reg, E, mu, chunk_size=preset.prompts, mode="jvp")

    def forward():
        with torch.no_grad():
            sequence_logprobs(reg.module, reg.params(reg.trainable), E)

    with sdpa_kernel([SDPBackend.MATH]):
        t_jvp, jvp_rows = profile(jvp_path, model)
        t_fwd, fwd_rows = profile(forward, model)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            jvp_path()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)

    lines = [f"# Profile of the jvp path · preset `{args.preset}` · {args.device}", "",
             f"`python benchmarks/profile_jvp.py --preset {args.preset}`", "",
             f"{preset.prompts} prompts x G={preset.group_size}, prompt <= {preset.prompt_len}, response <= "
             f"{preset.response_len}, {preset.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"one group. jvp total {t_jvp:.2f} s, no-grad forward total {t_fwd:.2f} s "
             f"(ratio {t_jvp / t_fwd:.2f}).", "",
             "| component | jvp (s) | share | no-grad forward (s) | jvp / forward |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for cat, t in sorted(jvp_rows.items(), key=lambda kv: -kv[1]):
        f = fwd_rows.get(cat, float("nan"))
        lines.append(f"| {cat} | {t:.3f} | {100 * t / t_jvp:.1f}% | {f:.3f} | {t / f if f > 0 else float('nan'):.2f} |")
    lines += ["", "torch.profiler, jvp path, top operators by self CPU time:", "", "```", ops, "```"]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if args.device == "cpu" else args.device.replace(":", "")
    (args.out / f"{dev}-{args.preset}-profile.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
