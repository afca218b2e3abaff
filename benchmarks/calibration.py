"""Calibration study: is SE_E a real standard error, and where does first order hold?

    python benchmarks/calibration.py

On a Qwen2-config transformer with a LoRA adapter and a tiny vocabulary (V = 8,
responses of L = 3 tokens, so every one of the 512 responses of a prompt can be
enumerated), after a few AdamW steps of a policy gradient (so the optimizer has real
state), for each step map (sgd, frozen_adam, adam_step) and weighting (dr_grpo,
per_token_avg):

1. μY from a fixed update batch U (the study is conditional on U);
2. the exact η·⟨∇H_w, μY⟩ over the prompt pool, by enumeration and one JVP;
3. R repetitions: fresh E (prompts i.i.d. from the pool, responses from ``generate``),
   the probe's η·s̄ ± 1.96·SE_E; coverage of the exact value, z-scores;
4. a learning-rate sweep: predicted η·⟨∇H_w, μY⟩ against the exact entropy change of
   the step actually taken, H_w(θ + ημY) − H_w(θ).

Writes benchmarks/results/calibration.{json,md} and PNGs (z-score histograms against
N(0,1), predicted vs exact per repetition, first order vs the real step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration_study import (  # noqa: E402
    CalibrationDesign,
    calibration_study,
    first_order_sweep,
    largest_first_order_lr,
    sample_fixed_length,
)
from funcprobe import RolloutBatch, policy_gradient_surrogate, sequence_logprobs, update_direction  # noqa: E402
from funcprobe.core.advantages import group_advantages  # noqa: E402
from funcprobe.validation.models import PolicySpec, qwen2_lora_policy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
V, L = 8, 3
LMAX = L + 1  # Dr. GRPO's fixed max completion length (responses here all have L tokens)
DIRECTION_LR = {"sgd": 0.1, "frozen_adam": 1e-3, "adam_step": 1e-3}


def reward(tokens: list[int]) -> float:
    """Fraction of tokens with id < 3: the policy is pushed onto 3 of the 8 tokens."""
    return sum(1.0 for t in tokens if t < 3) / len(tokens)


def with_advantages(batch: RolloutBatch) -> RolloutBatch:
    r = torch.tensor([[reward(batch.input_ids[n, g, batch.response_start:].tolist())
                       for g in range(batch.group_size)] for n in range(batch.num_prompts)], dtype=torch.float64)
    return RolloutBatch(batch.input_ids, batch.attention_mask, batch.response_start, group_advantages(r), float(LMAX))


def prompt_pool(k: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (k, 3), generator=gen).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repetitions", type=int, default=400)
    ap.add_argument("--prompts-per-batch", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--pool", type=int, default=8, help="prompts in the fixed prompt distribution")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--directions", default="sgd,frozen_adam,adam_step")
    ap.add_argument("--weightings", default="dr_grpo,per_token_avg")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    pool = prompt_pool(args.pool, args.seed)
    model = qwen2_lora_policy(PolicySpec(vocab_size=V, hidden=32, layers=2, lora_rank=4), dtype=torch.float64,
                              seed=args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    params = dict(model.named_parameters())
    for step in range(args.train_steps):  # real optimizer state for adam / adam_step
        batch = with_advantages(sample_fixed_length(model, pool * 4, group_size=4, response_len=L, seed=10_000 + step))
        optimizer.zero_grad(set_to_none=True)
        (-policy_gradient_surrogate(sequence_logprobs(model, params, batch), batch, "dr_grpo").mean()).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    U = with_advantages(sample_fixed_length(model, pool * 4, group_size=args.group_size, response_len=L, seed=777))

    rows, studies, sweeps = [], {}, {}
    lrs = [10.0**e for e in torch.arange(-5, 1.01, 0.5).tolist()]
    for direction in args.directions.split(","):
        for weighting in args.weightings.split(","):
            mu = update_direction(model, U, optimizer=optimizer, step=direction, weighting=weighting)
            lr = DIRECTION_LR[direction]
            t = time.perf_counter()
            design = CalibrationDesign(vocab_size=V, response_len=L, repetitions=args.repetitions,
                                       prompts_per_batch=args.prompts_per_batch, group_size=args.group_size,
                                       weighting=weighting, max_len=LMAX, seed=args.seed + 1)
            res = calibration_study(model, pool, mu, lr=lr, design=design)
            summary = {"direction": direction, "weighting": weighting, "lr": lr, **res.summary(),
                       "seconds": time.perf_counter() - t}
            sweep = first_order_sweep(model, pool, mu, [x * lr / DIRECTION_LR["sgd"] for x in lrs], design=design)
            summary["largest_lr_first_order_within_10pct"] = largest_first_order_lr(sweep, 0.1)
            rows.append(summary)
            studies[(direction, weighting)] = res
            sweeps[(direction, weighting)] = sweep
            print(f"{direction:>9} {weighting:>13}: coverage {summary['coverage_95']:.3f}  mean z {summary['mean_z']:+.3f}"
                  f"  std z {summary['std_z']:.3f}  bias {summary['bias_in_se_of_mean']:+.2f} SE  exact {res.exact:+.3e}"
                  f"  first order within 10% up to lr {summary['largest_lr_first_order_within_10pct']}")

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python benchmarks/calibration.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "setup": {"vocab": V, "response_len": L, "pool": pool, "prompts_per_batch": args.prompts_per_batch,
                        "group_size": args.group_size, "repetitions": args.repetitions, "torch": torch.__version__},
              "studies": rows,
              "first_order_sweeps": {f"{d}/{w}": s for (d, w), s in sweeps.items()}}
    (args.out / "calibration.json").write_text(json.dumps(report, indent=1))
    (args.out / "calibration.md").write_text(markdown(report, args))
    plots(studies, sweeps, args.out)
    print(f"wrote {args.out / 'calibration.md'}")
    return 0


def markdown(report: dict, args) -> str:
    rows = report["studies"]
    md = ["# Calibration of SE_E and the reach of first order", "", f"`{report['command'].strip()}`", "",
          f"Qwen2 config (vocab {V}, hidden 32, 2 layers) + LoRA r=4, float64, {args.train_steps} AdamW steps first; "
          f"E = {args.prompts_per_batch} prompts drawn i.i.d. from a pool of {args.pool} x G = {args.group_size} "
          f"responses of {L} tokens from `generate`; {args.repetitions} repetitions per row; exact values by "
          f"enumerating all {V ** L} responses per prompt. Dr. GRPO uses Lmax = {LMAX}; with fixed-length "
          "responses the two weightings differ by the constant Lmax / L, so their z-scores agree. The last column "
          "is the largest learning rate of a half-decade grid up to which the first-order prediction stays within "
          "10% of the exact change of the step actually taken (first-order.png).", "",
          "| direction | weighting | lr | exact η⟨∇H,μY⟩ | mean estimate | bias (SE of mean) | coverage 95% | mean z | std z | first order within 10% up to lr |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['direction']} | {r['weighting']} | {r['lr']:g} | {r['exact']:+.3e} | {r['mean_estimate']:+.3e} | "
           f"{r['bias_in_se_of_mean']:+.2f} | {r['coverage_95']:.3f} | {r['mean_z']:+.3f} | {r['std_z']:.3f} | "
           f"{r['largest_lr_first_order_within_10pct']:.3g} |" for r in rows]
    return "\n".join(md) + "\n"


def plots(studies, sweeps, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(studies)
    cols = len(keys)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.4), squeeze=False)
    grid = torch.linspace(-4, 4, 200)
    for j, key in enumerate(keys):
        res = studies[key]
        ax = axes[0][j]
        ax.hist(res.z.clamp(-5, 5).tolist(), bins=30, range=(-5, 5), density=True, alpha=0.6)
        ax.plot(grid, torch.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), "k-", lw=1, label="N(0,1)")
        ax.set_title(f"{key[0]} / {key[1]}\ncoverage {res.coverage:.3f}", fontsize=9)
        ax.set_xlabel("z = (pred − exact) / SE_E")
        ax = axes[1][j]
        ax.errorbar(range(len(res.predicted[:60])), res.predicted[:60].tolist(), yerr=(1.96 * res.se[:60]).tolist(),
                    fmt=".", ms=3, lw=0.6, alpha=0.7)
        ax.axhline(res.exact, color="r", lw=1, label="exact")
        ax.set_xlabel("repetition")
        ax.set_ylabel("predicted δH ± 1.96 SE")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "calibration-z.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, sweep in sweeps.items():
        lrs = [r["lr"] for r in sweep]
        line = ax[0].loglog(lrs, [abs(r["exact"]) for r in sweep], label=f"{key[0]}/{key[1]} exact")[0]
        ax[0].loglog(lrs, [abs(r["predicted"]) for r in sweep], "--", color=line.get_color())
        ax[1].loglog(lrs, [max(r["rel_error"], 1e-8) for r in sweep], color=line.get_color(), label=f"{key[0]}/{key[1]}")
    ax[0].set_xlabel("learning rate η")
    ax[0].set_ylabel("|δH| (solid: real step, dashed: first order)")
    ax[1].axhline(0.1, color="k", lw=0.8, ls=":")
    ax[1].set_xlabel("learning rate η")
    ax[1].set_ylabel("|first order − real| / |real|")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "first-order.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
