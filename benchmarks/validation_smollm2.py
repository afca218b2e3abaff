"""Calibration of the prediction on the real model: repeated experiments from one training state.

    python benchmarks/validation_smollm2.py     # writes benchmarks/results/validation-smollm2.{md,json}

SmolLM2-135M-Instruct (float32) with a LoRA adapter (r = 8, q/k/v/o) and AdamW (lr 1e-3,
weight decay 0.01), after ``--warmup`` real GRPO steps on the arithmetic task, so that the
adapter and Adam's state are not at their initial values. From that one state (the seeds'
method: repeated experiments from one checkpoint), each repetition draws fresh rollouts
(B prompts x G responses at temperature 1, Lmax tokens) for U, E and a held-out H, and:

* Δθ: the trainer's Dr. GRPO gradient over U mapped by ``step_from_gradient(step=
  "optimizer_step")``: the step ``AdamW.step()`` would take (not taken: the state is kept);
* predicted: ``conditional_variance(model, E, c·Δθ, lr=1)`` = c·δH ± c·SE_E;
* realized: the IS change on H of the weighted sequence entropy at θ + c·Δθ
  (``funcprobe.validation.entropy_change.is_change``: unbiased for every G; the self-normalised estimate is (G-1)/G too small), with its SE, for c in ``--scales``
  (a learning-rate sweep: c·lr), and z = (predicted − realized)/sqrt(SE_E² + SE_H²) at c = 1;
* for the first ``--bf16-reps`` repetitions: δH from the same model cast to bf16
  (``precision="auto"``) on the same E and Δθ.

The first-order prediction is exact in expectation as c → 0; the sweep shows up to which
c·lr the pooled realized/predicted ratio stays within 10% of 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.25, 1.0, 4.0, 16.0])
    ap.add_argument("--bf16-reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from funcprobe import ParamRegistry, conditional_variance, step_from_gradient
    from funcprobe.core.logprobs import logprobs_and_entropies, response_sums, sequence_logprobs
    from funcprobe.core.objectives import policy_gradient_surrogate
    from funcprobe.edge.session import probe_session
    from funcprobe.apps.demo import DemoConfig, load_policy_and_task
    from funcprobe.validation.entropy_change import is_change

    cfg = DemoConfig(prompts=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                     lr=args.lr)
    torch.manual_seed(0)
    model, sample, name = load_policy_and_task(cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    B, Lmax = args.prompts, float(args.max_new_tokens)

    def gradient_of(U):
        model.train()
        opt.zero_grad(set_to_none=True)
        (-policy_gradient_surrogate(sequence_logprobs(model, trainable, U), U, "dr_grpo").mean()).backward()
        g = {n: -p.grad.detach().clone() for n, p in trainable.items()}
        opt.zero_grad(set_to_none=True)
        model.eval()
        return g

    for _ in range(args.warmup):  # real steps: a trained adapter and Adam state
        U = sample(model, B, gen).batch
        model.train()
        (-policy_gradient_surrogate(sequence_logprobs(model, trainable, U), U, "dr_grpo").mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
    bf16 = copy.deepcopy(model).to(torch.bfloat16) if args.bf16_reps else None
    registry = ParamRegistry.from_model(model)

    @torch.no_grad()
    def held_out(H, theta):
        with probe_session(registry):
            both = response_sums(registry.module, registry.params(theta), H, logprobs_and_entropies)
        return both[..., 0].double(), both[..., 1].double()

    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for rep in range(args.reps):
        t0 = time.perf_counter()
        torch.manual_seed(1000 + rep)
        rollouts = sample(model, 3 * B, gen)
        U, E, H = (rollouts.batch.select(i * B, (i + 1) * B) for i in range(3))
        delta = step_from_gradient(model, gradient_of(U), optimizer=opt, step="optimizer_step")
        pred = conditional_variance(model, E, delta, lr=1.0)
        S0, _ = held_out(H, registry.trainable)
        row = {"rep": rep, "delta_h": pred.delta_h, "se": pred.se, "mean_reward_U": float(rollouts.rewards[:B].mean()),
               "scales": {}}
        for c in args.scales:
            theta = {n: t + c * delta[n].to(t.dtype) for n, t in registry.trainable.items()}
            S1, _ = held_out(H, theta)
            real = is_change(S0, S1, -S0 / Lmax, -S1 / Lmax)
            row["scales"][str(c)] = {"predicted": c * pred.delta_h, "se_predicted": c * pred.se,
                                     "realized": real.delta_h, "se_realized": real.se}
        r1 = row["scales"]["1.0"]
        row["z"] = (r1["predicted"] - r1["realized"]) / math.hypot(r1["se_predicted"], r1["se_realized"])
        if rep < args.bf16_reps:
            p16 = conditional_variance(bf16, E, delta, lr=1.0, precision="auto")
            row["delta_h_bf16"] = p16.delta_h
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"rep {rep:2d}: predicted {pred.delta_h:+.3e} ± {pred.se:.1e}, realized {r1['realized']:+.3e} ± "
              f"{r1['se_realized']:.1e}, z {row['z']:+.2f}, {row['seconds']:.0f} s", flush=True)
        (args.out / "validation-smollm2.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                                       "model": name, "rows": rows}, indent=2))
    write_table(args, name, rows)


def write_table(args, name: str, rows: list[dict]) -> None:
    z = torch.tensor([r["z"] for r in rows], dtype=torch.float64)
    lines = [
        "# Calibration on SmolLM2-135M-Instruct: repeated experiments from one training state",
        "",
        f"Command: `python benchmarks/validation_smollm2.py --reps {args.reps} --prompts {args.prompts} "
        f"--group-size {args.group_size} --max-new-tokens {args.max_new_tokens} --lr {args.lr} --warmup {args.warmup}`"
        f" (CPU, 2 cores, float32, torch {torch.__version__}).",
        f"Model: {name}; AdamW lr {args.lr}, weight decay 0.01, after {args.warmup} GRPO steps. "
        f"Each repetition: fresh U, E, H of {args.prompts} prompts x G = {args.group_size}; Δθ = the AdamW step of "
        "U's Dr. GRPO gradient (not taken). Units: nats per Lmax tokens.",
        "",
        f"## z = (predicted − realized) / sqrt(SE_E² + SE_H²) at the trainer's step, over {len(rows)} repetitions",
        "",
        f"mean {float(z.mean()):+.3f}, standard deviation {float(z.std()):.3f} (calibrated: 0 and 1), "
        f"|z| < 1.96 in {float((z.abs() < 1.959964).double().mean()):.0%} of repetitions (calibrated: 95%).",
        "",
        "## Learning-rate sweep: θ + c·Δθ (c·lr), pooled over the repetitions",
        "",
        "Ratio SE: the realized mean's SE over |mean predicted| (the prediction's own spread over the",
        "repetitions is part of the question, not noise). Within 10% needs |ratio − 1| ≤ 0.1; where the ratio's",
        "SE is larger than that, the 10% question is not resolved by this many repetitions.",
        "",
        "| c | c·lr | mean predicted | mean realized (SE) | realized / predicted (SE) | within 10%? | consistent with 1 (2 SE)? |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in rows[0]["scales"]:
        pred = torch.tensor([r["scales"][c]["predicted"] for r in rows], dtype=torch.float64)
        real = torch.tensor([r["scales"][c]["realized"] for r in rows], dtype=torch.float64)
        se_real = float(real.std()) / math.sqrt(len(real))
        ratio = float(real.mean() / pred.mean())
        ratio_se = se_real / abs(float(pred.mean()))
        within = "unresolved" if ratio_se > 0.1 else ("yes" if abs(ratio - 1) <= 0.1 else "no")
        lines.append(f"| {float(c):g} | {float(c) * args.lr:.2e} | {float(pred.mean()):+.3e} | {float(real.mean()):+.3e} "
                     f"({se_real:.1e}) | {ratio:.3f} ({ratio_se:.3f}) | {within} | "
                     f"{'yes' if abs(ratio - 1) <= 2 * ratio_se else 'no'} |")
    b = [r for r in rows if "delta_h_bf16" in r]
    if b:
        rel = [abs(r["delta_h_bf16"] - r["delta_h"]) / abs(r["delta_h"]) for r in b]
        lines += ["", "## bf16 against float32 (same E, same Δθ)", "",
                  "| rep | δH float32 | δH bf16 (precision auto) | relative difference |", "|---|---|---|---|"]
        lines += [f"| {r['rep']} | {r['delta_h']:+.4e} | {r['delta_h_bf16']:+.4e} | {x:.2%} |" for r, x in zip(b, rel)]
    lines += ["", "## Repetitions", "", "| rep | reward U | predicted | SE_E | realized | SE_H | z | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        r1 = r["scales"]["1.0"]
        lines.append(f"| {r['rep']} | {r['mean_reward_U']:.3f} | {r1['predicted']:+.3e} | {r1['se_predicted']:.1e} | "
                     f"{r1['realized']:+.3e} | {r1['se_realized']:.1e} | {r['z']:+.2f} | {r['seconds']:.0f} |")
    (args.out / "validation-smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
