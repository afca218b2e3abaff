"""Matrix products of one forward-mode step against the method's minimum (issue 15, part 1).

    python benchmarks/op_counts.py        # writes benchmarks/results/op-counts.md

One chunk (1 prompt x G = 4, prompt <= 64, response <= 192 tokens) of the ``small``
preset (Qwen2 config, hidden 512, 4 layers, LoRA r = 8 on q/k/v/o, float32). torch.profiler
counts the matrix-product operators (``aten::mm``, ``bmm``, ``addmm``, ``baddbmm``) of a
no-grad forward of S and of ``torch.func.jvp`` of the probe's LX, with PyTorch's generic
forward-AD formulas and with funcprobe's rules (``funcprobe.forward.rules``), and their
CPU time. The profiler counts an operator again at each functorch layer it passes, so the
products are also counted where the kernels run (a ``TorchDispatchMode`` below the
transforms: "products run").

The minimum for forward mode, per decoder layer: the frozen base projections q/k/v/o and
the MLP's gate/up/down need one extra product each (ẋ·W); each LoRA product x·A (and h·B),
whose weight carries a tangent, needs two (ẋ·A + x·Ȧ); each attention product (Q·Kᵀ, P·V)
needs two (Q̇·Kᵀ + Q·K̇ᵀ, Ṗ·V + P·V̇). The first layer's q/k/v read the embeddings, which
carry no tangent: their base products and their LoRA x·A need no ẋ term (one product less
each). The LM head needs one extra per chunk of tokens.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from presets import PRESETS, build_model, make_rollouts, random_direction  # noqa: E402

from funcprobe import ParamRegistry  # noqa: E402
from funcprobe.forward.rules import jvp_rules  # noqa: E402
from funcprobe.core.objectives import entropy_objective  # noqa: E402
from funcprobe.edge.session import probe_session  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


class KernelCounter(TorchDispatchMode):
    """Counts the matrix-product kernels that run (below torch.func's layers)."""

    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if f"aten::{func.__name__.split('.')[0]}" in PRODUCTS:
            self.products += 1
        return func(*args, **(kwargs or {}))


def counted(fn) -> tuple[Counter, float, int, int]:
    """(calls per product operator, their self CPU seconds, all operator calls, products
    run) of one ``fn()``."""
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls, seconds, total = Counter(), 0.0, 0
    for e in prof.key_averages():
        total += e.count
        if e.key in PRODUCTS:
            calls[e.key] += e.count
            seconds += e.self_cpu_time_total / 1e6
    with KernelCounter() as kernels:
        fn()
    return calls, seconds, total, kernels.products


def frozen_product_ratios(repeats: int = 15) -> dict[str, float]:
    """Time of ``x @ W`` (4096×1024 @ 1024×1024, float32) with a tangent on x only, in units
    of one plain product: two plain products, ``torch.func.jvp`` generic, with the rules."""
    gen = torch.Generator().manual_seed(0)
    x, w, dx = (torch.randn(*shape, generator=gen) for shape in ((4096, 1024), (1024, 1024), (4096, 1024)))

    def jvp_rules_call():
        with jvp_rules():
            return torch.func.jvp(lambda a: a @ w, (x,), (dx,))

    calls = {"one product": lambda: x @ w, "two plain products": lambda: (x @ w, dx @ w),
             "torch.func.jvp, generic": lambda: torch.func.jvp(lambda a: a @ w, (x,), (dx,)),
             "torch.func.jvp, rules": jvp_rules_call}
    medians = {}
    for name, call in calls.items():
        call()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        medians[name] = statistics.median(times)
    return {name: m / medians["one product"] for name, m in medians.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    p = PRESETS["small"].with_(prompts=1)
    model = build_model(p)
    E = make_rollouts(p)
    reg = ParamRegistry.from_model(model)
    mu = random_direction(reg.trainable)
    f = entropy_objective("dr_grpo").on_logprobs(reg.logprob_fn())
    with probe_session(reg):
        with torch.no_grad():
            fwd = counted(lambda: f(reg.trainable, E))
        generic = counted(lambda: torch.func.jvp(lambda t: f(t, E), (reg.trainable,), (mu,)))

        def with_rules():
            with jvp_rules():
                return torch.func.jvp(lambda t: f(t, E), (reg.trainable,), (mu,))

        rules = counted(with_rules)
    layers, lora = p.layers, len(p.lora_targets)
    first = len({"q_proj", "k_proj", "v_proj"} & set(p.lora_targets))  # layer 0's inputs have no tangent
    head = sum(fwd[0].values()) - layers * (4 + 2 * lora + 2 + 3)  # the LM head's products (token chunks)
    minimum = {"forward": layers * (4 + 2 * lora + 2 + 3) + head,
               "jvp": layers * (2 * 4 + 3 * 2 * lora + 3 * 2 + 2 * 3) + 2 * head - 2 * first}
    rows = [("no-grad forward", *fwd, minimum["forward"]),
            ("torch.func.jvp, generic formulas (before)", *generic, minimum["jvp"]),
            ("torch.func.jvp, funcprobe.forward.rules (after)", *rules, minimum["jvp"])]
    command = "python benchmarks/op_counts.py " + " ".join(sys.argv[1:])
    lines = ["# Matrix products of one jvp step: measured against the method's minimum", "",
             f"`{command}` ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}); "
             f"`small` preset, 1 prompt x G = {p.group_size}, {layers} layers, LoRA on {lora} projections, float32; "
             "one profiled call after a warm-up.", "",
             "| pass | mm | bmm | addmm | baddbmm | products (profiler) | products run | minimum | "
             "products CPU time | all operator calls |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c, sec, total, run, low in rows:
        n = sum(c.values())
        lines.append(f"| {name} | {c['aten::mm']} | {c['aten::bmm']} | {c['aten::addmm']} | {c['aten::baddbmm']} | "
                     f"{n} | {run} | {low} | {sec:.3f} s | {total} |")
    lines += ["", f"Minimum per layer: forward {4 + 2 * lora + 2 + 3} (q/k/v/o, {2 * lora} LoRA, 2 attention, 3 MLP); "
              f"jvp {2 * 4 + 3 * 2 * lora + 3 * 2 + 2 * 3} (x2 frozen, x3 LoRA, x3 attention, x2 MLP), "
              f"{2 * first} fewer in the first layer (q/k/v read the tangent-free embeddings); LM head "
              f"{head} product(s) in the forward (token chunks), x2 in the jvp.",
              "",
              "With the rules, per layer and block of query rows the attention runs Q̇·Kᵀ + Q·K̇ᵀ as one "
              "product of concatenations, the softmax tangent's row sums as a batched dot (a `bmm` that is "
              "not a product of the minimum) and Q·Kᵀ once more (P is recomputed in the tangent pass instead "
              "of kept, for memory): 7 `bmm` per layer where the minimum counts 2 + 4. The linear layers and "
              "the LM head run exactly their minimum."]
    ratios = frozen_product_ratios()
    lines += ["", "One frozen product, `x @ W` (4096×1024 @ 1024×1024, float32) with a tangent on x only, "
              "median of 15 after a warm-up, in units of one plain product:", "",
              "| call | × one product |", "|---|---:|"]
    lines += [f"| {name} | {r:.2f} |" for name, r in ratios.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "op-counts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
