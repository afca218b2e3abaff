"""The predicted effects of a step against their realized changes on the real model: a resumable study.

    nohup nice -n 10 python benchmarks/effects_study.py --reps 100 &          # starts (or --resume continues)
    python benchmarks/effects_study.py --summary                              # rewrites the .md and .png only

SmolLM2-135M-Instruct (float32) with a LoRA adapter (r = 8, q/k/v/o) and AdamW (lr ``--lr``,
weight decay 0.01), after ``--warmup`` real Dr. GRPO steps on the demo's arithmetic task
with a fixed seed, so that the adapter and Adam's state are not at their initial values
(as ``benchmarks/validation_smollm2.py``). From that one fixed state, each repetition
draws fresh rollouts (B prompts × G responses at temperature 1, Lmax tokens) for the update
batch U, the evaluation batch E and a held-out batch H, and:

* Δθ: U's Dr. GRPO gradient mapped by ``step_from_gradient(step="optimizer_step")``: the
  step ``AdamW.step()`` would take at lr (never taken: the state stays fixed);
* predicted: ``EntropyProbe(model, optimizer, effects=True).predict(E, U, gradient=...,
  rewards=R_E)``: every effect of ``funcprobe.core.effects.EFFECTS`` with its SE over E;
* realized, for each scale c of ``--scales`` (the step at lr c·lr: AdamW's step is linear
  in lr given the gradient and Adam's state, so it is c·Δθ): the change of each quantity on
  H between θ and θ + c·Δθ (``funcprobe.validation.effects_change``: importance sampling
  for length, reward and the token entropies, per-position full-vocabulary KLs for the
  KL), with its SE over H; the prediction at c is c·value (c² for the KL, second order);
* once (the first repetition): the prediction at lr·2 made directly (the optimizer's lr
  doubled) against 2× / 4× the prediction at lr (``scaling_check`` line).

Each repetition appends one JSON line per scale to ``effects-smollm2.jsonl`` (after a header
line that fixes the settings and a fingerprint of the fixed state); ``--resume`` rebuilds
the state, checks the fingerprint and continues after the last complete repetition. The
summary (``--summary``, and after every ``--summary-every`` repetitions) rewrites
``effects-smollm2.md`` and ``.png`` from the whole file: per quantity and scale the coverage
of the 95% interval of z = (predicted − realized)/sqrt(SE_pred² + SE_real²), the mean and sd
of z, realized/predicted with a bootstrap CI over repetitions, the scale up to which first
order holds within 10%, and the KL's log-log slope in η.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "effects-smollm2"
#: settings that must agree between a run and the file it resumes
FIXED = ("prompts", "group_size", "max_new_tokens", "lr", "warmup", "scales", "seed")
Z95 = 1.959964


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=100, help="total repetitions wanted in the file (default 100)")
    ap.add_argument("--prompts", type=int, default=8, help="B of each of U, E, H (default 8)")
    ap.add_argument("--group-size", type=int, default=4, help="G (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="Lmax (default 24)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW's lr, the base of the scales (default 1e-3)")
    ap.add_argument("--warmup", type=int, default=2, help="real GRPO steps before the fixed state (default 2)")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0],
                    help="c: the step is taken at lr c·lr (default 0.25 0.5 1 2 4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine more threads wait on each other)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the warm-up and of every repetition (default 0)")
    ap.add_argument("--resume", action="store_true", help="continue the existing jsonl file")
    ap.add_argument("--summary", action="store_true", help="only rewrite the .md and .png from the jsonl file")
    ap.add_argument("--summary-every", type=int, default=5, help="rewrite the summary every N repetitions (default 5)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the results (default benchmarks/results)")
    args = ap.parse_args(argv)
    for name in ("reps", "prompts", "group_size", "max_new_tokens", "summary_every", "threads"):
        if getattr(args, name) < (2 if name in ("prompts", "group_size") else 1):
            ap.error(f"--{name.replace('_', '-')}: expected an int >= {2 if name in ('prompts', 'group_size') else 1}, "
                     f"got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error(f"--lr: expected a finite number > 0, got {args.lr}")
    if args.warmup < 0:
        ap.error(f"--warmup: expected an int >= 0, got {args.warmup}")
    if any(not (c > 0 and math.isfinite(c)) for c in args.scales) or len(set(args.scales)) != len(args.scales):
        ap.error(f"--scales: expected distinct finite numbers > 0, got {args.scales}")
    if 1.0 not in args.scales:
        ap.error(f"--scales: must contain 1 (the optimizer's own step), got {args.scales}")
    args.scales = sorted(args.scales)
    return args


def jsonl_path(out: Path) -> Path:
    return out / f"{STEM}.jsonl"


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of ``path``; a truncated last line (an interrupted write) is dropped."""
    rows = []
    text = path.read_text()
    lines = text.splitlines()
    for k, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                print(f"dropping a truncated last line of {path}", file=sys.stderr)
                path.write_text("".join(x + "\n" for x in lines[:-1]))
            else:
                raise SystemExit(f"error: {path}: line {k + 1} is not JSON; fix or remove the file")
    return rows


def complete_reps(rows: list[dict], scales: list[float]) -> set[int]:
    seen: dict[int, set[float]] = {}
    for r in rows:
        if r.get("kind") == "rep":
            seen.setdefault(r["rep"], set()).add(r["scale"])
    return {rep for rep, s in seen.items() if s >= set(scales)}


def main(argv=None) -> None:
    args = parse_args(argv)
    path = jsonl_path(args.out)
    if args.summary:
        if not path.exists():
            raise SystemExit(f"error: --summary: {path} does not exist; run the study first")
        write_summary(read_lines(path), args.out)
        return
    if path.exists() and not args.resume:
        raise SystemExit(f"error: {path} exists; pass --resume to continue it (or move it away to start afresh)")
    if args.resume and not path.exists():
        raise SystemExit(f"error: --resume: {path} does not exist; run without --resume to start")
    rows = read_lines(path) if args.resume else []
    header = rows[0] if rows else None
    if header is not None:
        if header.get("kind") != "header":
            raise SystemExit(f"error: {path}: the first line is not the study's header")
        differ = [k for k in FIXED if header["args"][k] != getattr(args, k)]
        if differ:
            raise SystemExit("error: --resume: settings differ from the file's: " + ", ".join(
                f"--{k.replace('_', '-')} {header['args'][k]} (file) vs {getattr(args, k)}" for k in differ))
    done = complete_reps(rows, args.scales)
    todo = [rep for rep in range(args.reps) if rep not in done]
    if not todo:
        print(f"{len(done)} repetitions done, {args.reps} wanted: nothing to do")
        write_summary(rows, args.out)
        return
    run(args, path, header, todo, any(r.get("kind") == "scaling_check" for r in rows))


def run(args, path: Path, header: dict | None, todo: list[int], checked: bool) -> None:
    from funcprobe import EntropyProbe, ParamRegistry, step_from_gradient
    from funcprobe.passes import prediction_with_effects
    from funcprobe.run import ProbeRun
    from funcprobe.apps.demo import DemoConfig, load_policy_and_task
    from funcprobe.core.logprobs import sequence_logprobs
    from funcprobe.core.objectives import policy_gradient_surrogate
    from funcprobe.edge.session import probe_session
    from funcprobe.settings import ProbeSettings
    from funcprobe.validation.effects_change import realized_effects, response_terms, token_comparisons

    t_load = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = DemoConfig(prompts=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                     lr=args.lr, seed=args.seed)
    torch.manual_seed(args.seed)
    model, sample, name = load_policy_and_task(cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=args.lr, weight_decay=0.01)
    B, Lmax = args.prompts, float(args.max_new_tokens)

    def gradient_of(U):
        model.train()
        opt.zero_grad(set_to_none=True)
        (-policy_gradient_surrogate(sequence_logprobs(model, trainable, U), U, "dr_grpo").mean()).backward()
        g = {n: -p.grad.detach().clone() for n, p in trainable.items()}
        opt.zero_grad(set_to_none=True)
        model.eval()
        return g

    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.warmup):  # real steps: a trained adapter and Adam state
        model.eval()
        U = sample(model, B, gen).batch
        model.train()
        (-policy_gradient_surrogate(sequence_logprobs(model, trainable, U), U, "dr_grpo").mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()

    def fingerprint() -> list[float]:
        params = sum(float(p.detach().double().abs().sum()) for p in trainable.values())
        state = sum(float(s["exp_avg_sq"].double().sum()) for s in opt.state.values())
        return [params, state]

    state = fingerprint()
    if header is None:
        header = {"kind": "header", "args": {k: getattr(args, k) for k in FIXED}, "model": name,
                  "torch": torch.__version__, "threads": args.threads, "state": state,
                  "command": "python benchmarks/effects_study.py " + " ".join(
                      f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in {k: getattr(args, k) for k in FIXED}.items())}
        append(path, [header])
    else:
        rel = max(abs(a - b) / abs(b) for a, b in zip(state, header["state"]))
        if rel > 1e-5:
            raise SystemExit(f"error: --resume: the rebuilt fixed state differs from the file's (fingerprint "
                             f"{state} vs {header['state']}, relative {rel:.1e}); the repetitions would not share one state")
    print(f"fixed state ready in {time.perf_counter() - t_load:.0f} s: {name}; {len(todo)} repetitions to do",
          flush=True)
    registry = ParamRegistry.from_model(model)
    theta0 = {n: t.detach() for n, t in registry.trainable.items()}
    probe = EntropyProbe(model, opt, effects=True, weighting="dr_grpo")
    # the probe's own pass, along the step Δθ already made (EntropyProbe.predict with gradient= maps the
    # same gradient to the same Δθ, plus one backward over U for its cosine check: compared at the first rep)
    effects_run = ProbeRun.of(registry, ProbeSettings.from_options({"effects": True, "weighting": "dr_grpo"},
                                                                   caller="effects_study"))

    def predicted_at(scale: float, effects) -> dict:
        return {n: {"value": e.value * scale ** e.order, "se": e.se * scale ** e.order}
                for n, e in effects.effects.items()}

    for count, rep in enumerate(todo, 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(1_000_003 * (args.seed + 1) + rep)
        torch.manual_seed(1000 * (args.seed + 1) + rep)
        model.eval()
        rollouts = sample(model, 3 * B, gen)
        U, E, H = (rollouts.batch.select(i * B, (i + 1) * B) for i in range(3))
        R_U, R_E, R_H = (rollouts.rewards[i * B:(i + 1) * B] for i in range(3))
        t_sample = time.perf_counter()
        g = gradient_of(U)
        delta = step_from_gradient(model, g, optimizer=opt, step="optimizer_step")
        pred = prediction_with_effects(effects_run, E, delta, 1.0, R_E)
        t_predict = time.perf_counter()
        lines = []
        if not checked:  # once: the public predict gives the same, and a direct prediction at 2·lr scales
            public = probe.predict(E, U, gradient=g, rewards=R_E)
            same = max(abs(public.effects[n].value - e.value) / max(abs(e.value), 1e-300)
                       for n, e in pred.effects.effects.items())
            for group in opt.param_groups:
                group["lr"] *= 2
            try:
                twice = probe.predict(E, U, gradient=g, rewards=R_E)
            finally:
                for group in opt.param_groups:
                    group["lr"] /= 2
            dev = {n: (twice.effects[n].value / (e.value * 2 ** e.order) - 1) if e.value != 0 else 0.0
                   for n, e in pred.effects.effects.items()}
            lines.append({"kind": "scaling_check", "rep": rep, "factor": 2.0, "relative_deviation": dev,
                          "max_relative_deviation": max(abs(v) for v in dev.values()),
                          "public_predict_relative_difference": same})
            checked = True
        with probe_session(registry):
            news = [registry.params({n: t + c * delta[n].to(t.dtype) for n, t in theta0.items()}) for c in args.scales]
            comparisons = token_comparisons(registry.module, registry.params(theta0), news, H)
            for c, comparison in zip(args.scales, comparisons):
                terms = response_terms(comparison, H, R_H).mean(1)
                real = realized_effects(terms, max_len=Lmax, has_rewards=True)
                p = predicted_at(c, pred.effects)
                p["kl_logratio"] = p["kl"]
                lines.append({"kind": "rep", "rep": rep, "scale": c, "lr": c * args.lr,
                              "predicted": p, "realized": {n: r.to_dict() for n, r in real.items()}})
        t_real = time.perf_counter()
        if fingerprint() != state:
            raise SystemExit("error: the fixed state changed during a repetition (a bug of this study)")
        lengths = H.response_lengths.double()
        info = {"reward_U": float(R_U.mean()), "reward_E": float(R_E.mean()), "reward_H": float(R_H.mean()),
                "entropy_token_mean_H": float(comparison[..., 2].sum() / lengths.sum()),
                "length_H": float(lengths.mean()), "delta_h": pred.delta_h, "se_delta_h": pred.se,
                "seconds": {"sample": t_sample - t0, "gradient and predict": t_predict - t_sample,
                            "realize": t_real - t_predict}}
        for line in lines:
            if line["kind"] == "rep":
                line.update(info)
        append(path, lines)
        one = next(x for x in lines if x.get("scale") == 1.0)
        print(f"rep {rep:3d} ({count}/{len(todo)}): " + ", ".join(
            f"{n} {one['predicted'][n]['value']:+.2e}/{one['realized'][n]['value']:+.2e}"
            for n in ("entropy_token_mean", "kl", "completion_length", "reward")) +
            f" (pred/real at c=1); {t_real - t0:.0f} s", flush=True)
        if count % args.summary_every == 0 or count == len(todo):
            write_summary(read_lines(path), args.out)


def append(path: Path, lines: list[dict]) -> None:
    """Append ``lines`` in one write (an interruption leaves at most one truncated line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
        f.flush()


# ------------------------------------------------------------------ summary

def _bootstrap_ratio(num, den, n_boot=2000, seed=0):
    """Bootstrap over repetitions of mean(num)/mean(den): (2.5%, 97.5%) percentiles."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    r = num[idx].mean(1) / den[idx].mean(1)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def verdict(lo: float, hi: float, tol: float = 0.1) -> str:
    if 1 - tol <= lo and hi <= 1 + tol:
        return "within 10%"
    if hi < 1 - tol or lo > 1 + tol:
        return "departs"
    return "unresolved"


def summarize(rows: list[dict]) -> dict:
    """Per quantity and scale: n, z statistics, means, ratio with bootstrap CI, linearity."""
    import numpy as np

    from funcprobe.core.effects import EFFECTS

    first: dict = {}
    for r in rows:  # a repetition written twice (two runs on one file) counts once
        if r.get("kind") == "rep":
            first.setdefault((r["rep"], r["scale"]), r)
    reps = list(first.values())
    scales = sorted({r["scale"] for r in reps})
    names = [n for n in (*EFFECTS, "kl_logratio") if reps and n in reps[0]["realized"]]
    by = {c: sorted((r for r in reps if r["scale"] == c), key=lambda r: r["rep"]) for c in scales}
    common = sorted(set.intersection(*({r["rep"] for r in by[c]} for c in scales))) if scales else []
    out = {"scales": scales, "names": names, "n": len(common), "q": {}}
    for name in names:
        order = 2 if name.startswith("kl") else 1
        q = {}
        for c in scales:
            rs = [r for r in by[c] if r["rep"] in set(common)]
            p = np.array([r["predicted"][name]["value"] for r in rs])
            sp = np.array([r["predicted"][name]["se"] for r in rs])
            y = np.array([r["realized"][name]["value"] for r in rs])
            sy = np.array([r["realized"][name]["se"] for r in rs])
            z = (p - y) / np.sqrt(sp ** 2 + sy ** 2)
            lo, hi = _bootstrap_ratio(y, p)
            q[c] = {"p": p, "y": y, "sp": sp, "sy": sy, "z": z, "coverage": float((np.abs(z) < Z95).mean()),
                    "z_mean": float(z.mean()), "z_sd": float(z.std(ddof=1)) if len(z) > 1 else float("nan"),
                    "ratio": float(y.mean() / p.mean()), "ratio_ci": (lo, hi), "verdict": verdict(lo, hi)}
        c0 = scales[0]
        for c in scales:  # realized(c)/c^order over realized(c0)/c0^order: paired, the same H
            num, den = q[c]["y"] / c ** order, q[c0]["y"] / c0 ** order
            q[c]["linearity"] = float(num.mean() / den.mean())
            q[c]["linearity_ci"] = _bootstrap_ratio(num, den, seed=1)
        holds = [c for c in scales if all(q[d]["verdict"] == "within 10%" for d in scales if d <= c)]
        q["holds_to"] = max(holds) if holds else None
        q["departs_from"] = min((c for c in scales if q[c]["verdict"] == "departs"), default=None)
        lin = [c for c in scales if all(verdict(*q[d]["linearity_ci"]) == "within 10%" for d in scales if d <= c)]
        q["linear_to"] = max(lin) if lin else None
        q["nonlinear_from"] = min((c for c in scales if verdict(*q[c]["linearity_ci"]) == "departs"), default=None)
        q["order"] = order
        out["q"][name] = q
    if "kl" in out["q"] and len(scales) >= 2:
        logc = np.log(np.array(scales))
        for key in ("y", "p"):
            means = np.array([out["q"]["kl"][c][key].mean() for c in scales])
            out[f"kl_slope_{key}"] = float(np.polyfit(logc, np.log(means), 1)[0]) if (means > 0).all() else float("nan")
        rng = np.random.default_rng(2)
        ys = np.stack([out["q"]["kl"][c]["y"] for c in scales], 1)  # [n, scales]
        slopes = []
        for _ in range(2000):
            m = ys[rng.integers(0, len(ys), len(ys))].mean(0)
            if (m > 0).all():
                slopes.append(np.polyfit(logc, np.log(m), 1)[0])
        out["kl_slope_ci"] = (float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5)))
        small = [c for c in scales if c <= 1.0]
        if len(small) >= 2:
            means = np.array([out["q"]["kl"][c]["y"].mean() for c in small])
            out["kl_slope_small"] = float(np.polyfit(np.log(small), np.log(means), 1)[0])
    return out


def write_summary(rows: list[dict], out_dir: Path) -> None:
    from funcprobe.core.effects import EFFECTS

    header = next((r for r in rows if r.get("kind") == "header"), None)
    s = summarize(rows)
    if header is None or s["n"] == 0:
        print("no complete repetitions yet: no summary")
        return
    a = header["args"]
    check = next((r for r in rows if r.get("kind") == "scaling_check"), None)
    reps = [r for r in rows if r.get("kind") == "rep" and r["scale"] == 1.0]
    secs = [sum(r["seconds"].values()) for r in reps]
    units = {n: EFFECTS[n][0] if n in EFFECTS else "nats per response" for n in s["names"]}
    lines = [
        "# Predicted effects of a step against their realized changes: SmolLM2-135M-Instruct",
        "",
        f"Command: `nohup nice -n 10 {header['command']} --reps {max(100, s['n'])} &` (add `--resume` to continue "
        f"the jsonl after an interruption; `python benchmarks/effects_study.py --summary` rewrites this file and "
        f"the plot). CPU, {header['threads']} threads, float32, torch {header['torch']}; "
        f"{statistics_line(secs)} per repetition.",
        "",
        f"Model: {header['model']}; AdamW lr {a['lr']:g}, weight decay 0.01, after "
        f"{a['warmup']} Dr. GRPO steps (seed {a['seed']}): one fixed state. Each repetition: fresh U, E, H of "
        f"{a['prompts']} prompts × G = {a['group_size']} (Lmax {a['max_new_tokens']}); Δθ = the AdamW step of U's "
        "Dr. GRPO gradient (never taken); predicted from E (`EntropyProbe(effects=True).predict`, rewards of E "
        "given), realized on H between θ and θ + c·Δθ (`funcprobe.validation.effects_change`: importance sampling, "
        "unbiased; the KL from per-position full-vocabulary KLs; `kl_logratio` = the same KL as E_old[log π_old − "
        "log π_new]). The prediction at c is c·value (c²·value for the KLs).",
        "",
        f"**Repetitions: {s['n']}** (complete, every scale).",
        "",
    ]
    if check:
        lines += [f"Scaling check (repetition {check['rep']}): the prediction made directly at 2·lr equals 2× the "
                  f"first-order effects and 4× the KLs of the prediction at lr within a relative "
                  f"{check['max_relative_deviation']:.1e} (AdamW's step is linear in lr); the public "
                  f"`EntropyProbe.predict(E, U, gradient=g, rewards=R_E)` and the study's pass along the same Δθ "
                  f"(`funcprobe.passes.prediction_with_effects`, which skips predict's extra backward over U) "
                  f"agree within a relative {check.get('public_predict_relative_difference', float('nan')):.1e}.", ""]
    lines += [
        "## Calibration at the optimizer's own step (c = 1)",
        "",
        "z = (predicted − realized)/sqrt(SE_pred² + SE_real²); calibrated: coverage 95%, mean 0, sd 1.",
        "Coverage 95% CI half-width with n repetitions: ≈ 1.96·sqrt(0.05·0.95/n)"
        f" = {1.96 * math.sqrt(0.0475 / s['n']):.1%}.",
        "",
        "| quantity | unit | mean predicted | mean realized | coverage of 95% | mean z | sd z |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in s["names"]:
        q = s["q"][n][1.0]
        lines.append(f"| {n} | {units[n]} | {q['p'].mean():+.3e} | {q['y'].mean():+.3e} | {q['coverage']:.0%} | "
                     f"{q['z_mean']:+.2f} | {q['z_sd']:.2f} |")
    lines += ["", "## Coverage of the 95% interval at every scale", "",
              "| quantity | " + " | ".join(f"c={c:g}" for c in s["scales"]) + " |",
              "|---|" + "---|" * len(s["scales"])]
    for n in s["names"]:
        lines.append(f"| {n} | " + " | ".join(f"{s['q'][n][c]['coverage']:.0%} (z {s['q'][n][c]['z_mean']:+.2f}"
                                                f"±{s['q'][n][c]['z_sd']:.2f})" for c in s["scales"]) + " |")
    lines += [
        "", "## Realized / predicted against η = c·lr", "",
        "Ratio of the mean realized to the mean predicted change over the repetitions, with a 95% bootstrap CI over",
        "repetitions (the prediction's spread over repetitions is part of it). *within 10%*: the CI lies in",
        "[0.9, 1.1]; *departs*: the CI excludes it; *unresolved*: neither (more repetitions needed).",
        "*Linearity*: the paired ratio [realized(c)/c^k] / [realized(c₀)/c₀^k] (k = the order, c₀ the smallest",
        "scale; the same H at every c, so most of the sampling noise cancels): how far the realized change",
        "departs from its own order-k scaling between c₀ and c.",
        "",
        "| quantity | " + " | ".join(f"c={c:g} (η {c * a['lr']:.1e})" for c in s["scales"]) +
        " | first order within 10% up to c |",
        "|---|" + "---|" * (len(s["scales"]) + 1),
    ]
    for n in s["names"]:
        q = s["q"][n]
        cells = [f"{q[c]['ratio']:.2f} [{q[c]['ratio_ci'][0]:.2f}, {q[c]['ratio_ci'][1]:.2f}] {q[c]['verdict']}"
                 for c in s["scales"]]
        holds = f"{q['holds_to']:g}" if q["holds_to"] is not None else "none resolved"
        if q["departs_from"] is not None:
            holds += f"; departs from c = {q['departs_from']:g}"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {holds} |")
    lines += ["", "Linearity (paired, relative to the smallest scale):", "",
              "| quantity | " + " | ".join(f"c={c:g}" for c in s["scales"]) + " | own order within 10% (paired) up to c |",
              "|---|" + "---|" * (len(s["scales"]) + 1)]
    for n in s["names"]:
        q = s["q"][n]
        to = f"{q['linear_to']:g}" if q["linear_to"] is not None else "none resolved"
        if q["nonlinear_from"] is not None:
            to += f"; departs from c = {q['nonlinear_from']:g}"
        lines.append(f"| {n} | " + " | ".join(
            f"{q[c]['linearity']:.3f} [{q[c]['linearity_ci'][0]:.3f}, {q[c]['linearity_ci'][1]:.3f}]"
            for c in s["scales"]) + f" | {to} |")
    if "kl_slope_y" in s:
        lines += ["", "## The KL's quadratic scaling", "",
                  f"Log-log slope of the mean realized KL against η over c ∈ {s['scales']}: "
                  f"**{s['kl_slope_y']:.3f}** (95% bootstrap CI [{s['kl_slope_ci'][0]:.3f}, {s['kl_slope_ci'][1]:.3f}]); "
                  + (f"over c ≤ 1: {s['kl_slope_small']:.3f}; " if "kl_slope_small" in s else "")
                  + f"predicted: {s['kl_slope_p']:.3f} (η² by construction). Second order: 2."]
    lines += ["", f"Plot: `{STEM}.png` (realized against predicted per quantity at c = 1 with 95% error bars; "
              "realized/predicted against η; the KL against η, log-log).", ""]
    (out_dir / f"{STEM}.md").write_text("\n".join(lines))
    plot(s, out_dir / f"{STEM}.png", a["lr"])
    print(f"summary: {s['n']} repetitions -> {out_dir / (STEM + '.md')}", flush=True)


def statistics_line(secs: list[float]) -> str:
    if not secs:
        return "no timing"
    secs = sorted(secs)
    return f"median {secs[len(secs) // 2]:.0f} s"


def plot(s: dict, path: Path, lr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = s["names"]
    cols = 4
    rows = math.ceil((len(names) + 2) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows))
    axes = axes.ravel()
    for ax, n in zip(axes, names):
        q = s["q"][n][1.0]
        ax.errorbar(q["p"], q["y"], xerr=Z95 * q["sp"], yerr=Z95 * q["sy"], fmt="o", ms=3, alpha=0.5, lw=0.6)
        lim = [min(q["p"].min(), q["y"].min()), max(q["p"].max(), q["y"].max())]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_title(f"{n}\ncoverage {q['coverage']:.0%}, z {q['z_mean']:+.2f}±{q['z_sd']:.2f}", fontsize=9)
        ax.set_xlabel("predicted (c = 1)", fontsize=8)
        ax.set_ylabel("realized", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes[len(names)]
    eta = np.array(s["scales"]) * lr
    for k, n in enumerate(names):
        q = s["q"][n]
        r = np.array([q[c]["ratio"] for c in s["scales"]])
        lo = np.array([q[c]["ratio_ci"][0] for c in s["scales"]])
        hi = np.array([q[c]["ratio_ci"][1] for c in s["scales"]])
        x = eta * (1 + 0.03 * (k - len(names) / 2))
        ax.errorbar(x, r, yerr=[r - lo, hi - r], fmt="o-", ms=3, lw=0.8, label=n, capsize=2)
    ax.axhspan(0.9, 1.1, color="grey", alpha=0.2)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0, 2)
    ax.set_xlabel("η (AdamW lr)", fontsize=8)
    ax.set_ylabel("realized / predicted", fontsize=8)
    ax.set_title("realized/predicted vs η (95% bootstrap CI)", fontsize=9)
    ax.legend(fontsize=5)
    ax = axes[len(names) + 1]
    if "kl" in s["q"]:
        y = np.array([s["q"]["kl"][c]["y"].mean() for c in s["scales"]])
        p = np.array([s["q"]["kl"][c]["p"].mean() for c in s["scales"]])
        ax.loglog(eta, y, "o-", label=f"realized (slope {s.get('kl_slope_y', float('nan')):.2f})")
        ax.loglog(eta, p, "s--", label="predicted η²·E[½ΣV] (slope 2)")
        ax.set_xlabel("η (AdamW lr)", fontsize=8)
        ax.set_ylabel("KL(π_old‖π_new), nats per response", fontsize=8)
        ax.set_title("KL against η", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[len(names) + 2:]:
        ax.axis("off")
    fig.suptitle(f"funcprobe effects vs realized changes, SmolLM2-135M-Instruct, {s['n']} repetitions", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
