"""Precision policy on a real pretrained model: SmolLM2-135M-Instruct (+ LoRA) in bf16 vs float32.

    python benchmarks/precision.py            # writes benchmarks/results/precision-smollm2.{md,json}

One set of rollouts (8 arithmetic prompts through the chat template × G = 4 responses
sampled at temperature 1 from the float32 model, ≤ 48 new tokens; advantages: TRL's
group normalisation of seeded random rewards, since the precision question does not
depend on the reward) is probed, each configuration in its own process (peak RSS from
``VmHWM``), on the same LoRA weights:

* ``float32``: the float32 model (the reference);
* ``bf16-auto``: the model cast to bf16, ``precision="auto"`` (float32 compute, layer by layer);
* ``bf16-weights-float32``: the bf16-rounded weights cast back to float32 (what the same
  weights give in float32);
* ``bf16-model``: the model cast to bf16, ``precision="model"`` (bf16 compute: before the
  policy); s only (bf16 matmuls are slow on this CPU), μY column empty.

Each computes μY (``step="sgd"``, J with ``dr_grpo``) and every s[n] by ``jvp`` along the
float32 model's μY; δH = lr · mean s with lr = 1e-4. Memory: peak RSS growth of the
probe's phases over the loaded model (``VmHWM`` reset after loading), per process.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("float32", "bf16-auto", "bf16-weights-float32", "bf16-model")
LR = 1e-4


def build(config: str):
    from peft import LoraConfig, get_peft_model

    from funcprobe.io.pretrained import load_gguf, smollm2_gguf

    model, tok = load_gguf(smollm2_gguf())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False, lora_dropout=0.0)
        model = get_peft_model(model, lora)
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if config != "float32":
        model = model.to(torch.bfloat16)
    if config == "bf16-weights-float32":
        model = model.to(torch.float32)
    for n, p in model.named_parameters():  # the LoRA weights: identical (float32) in every configuration
        if n in adapter:
            p.data = adapter[n].clone()
    return model, tok


def make_rollouts(out: Path, prompts: int, group: int, max_new: int) -> None:
    from funcprobe import RolloutBatch
    from funcprobe.core.advantages import group_advantages

    model, tok = build("float32")
    gen = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(prompts):
        a, b = (int(x) for x in torch.randint(2, 50, (2,), generator=gen))
        texts.append(tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}? Answer with a number."}],
                                             tokenize=False, add_generation_prompt=True))
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    responses = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, max_new_tokens=max_new, num_return_sequences=group,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            group_resp = []
            for row in y[:, len(ids):].tolist():
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id) + 1]
                group_resp.append(row)
            responses.append(group_resp)
    rewards = torch.rand(prompts, group, generator=gen, dtype=torch.float64)
    batch = RolloutBatch.from_lists(prompt_ids, responses, pad_token_id=0, advantages=group_advantages(rewards),
                                    max_len=float(max_new))
    torch.save({"batch": batch}, out)


def run_one(config: str, rollouts: Path, mu_path: Path | None) -> dict:
    from funcprobe import conditional_variance, update_direction

    batch = torch.load(rollouts, weights_only=False)["batch"]
    model, _ = build(config)
    precision = {"bf16-model": "model"}.get(config, "auto")
    base = _rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: peaks below are the probe's
    t = time.perf_counter()
    mu = None if config == "bf16-model" else update_direction(model, batch, step="sgd", chunk_size=2,
                                                                 precision=precision)
    t_mu = time.perf_counter() - t
    ref_mu = torch.load(mu_path) if mu_path is not None and mu_path.exists() else mu
    t = time.perf_counter()
    pred = conditional_variance(model, batch, ref_mu, lr=LR, chunk_size=4, precision=precision)
    t_s = time.perf_counter() - t
    return {"config": config, "mu": None if mu is None else {k: v.float() for k, v in mu.items()}, "s": pred.s,
            "delta_h": pred.delta_h, "se": pred.se, "seconds_mu": t_mu, "seconds_s": t_s,
            "model_rss_mib": base, "probe_peak_mib": _rss_mib("VmHWM:") - base}


def _rss_mib(key: str = "VmRSS:") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/funcprobe-precision"), help="scratch folder")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rollouts, mu_path = args.work / "rollouts.pt", args.work / "mu_float32.pt"
    if args.one:
        res = run_one(args.one, rollouts, None if args.one == "float32" else mu_path)
        if args.one == "float32":
            torch.save(res["mu"], mu_path)
        torch.save(res, args.work / f"{args.one}.pt")
        return
    make_rollouts(rollouts, args.prompts, args.group_size, args.max_new_tokens)
    results = {}
    for config in CONFIGS:  # the report is rewritten after each configuration
        subprocess.run([sys.executable, __file__, "--one", config, "--work", str(args.work)], check=True)
        results[config] = torch.load(args.work / f"{config}.pt", weights_only=False)
        report(results, args)


def report(results: dict, args) -> None:
    ref = results["float32"]
    rows = []
    ref_norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in ref["mu"].values()))
    for config, r in results.items():
        mu_cos = float("nan") if r["mu"] is None else _cosine(r["mu"], ref["mu"])
        mu_norm = float("nan") if r["mu"] is None else math.sqrt(
            sum(float(v.double().pow(2).sum()) for v in r["mu"].values()))
        per_prompt = ((r["s"] - ref["s"]).abs() / ref["s"].abs()).median()
        rows.append({"config": config, "delta_h": r["delta_h"], "se": r["se"],
                     "delta_h_rel_diff": abs(r["delta_h"] / ref["delta_h"] - 1),
                     "s_median_rel_diff": float(per_prompt), "s_max_rel_diff": float(
                         ((r["s"] - ref["s"]).abs() / ref["s"].abs()).max()),
                     "mu_norm_rel_diff": abs(mu_norm / ref_norm - 1), "mu_cosine": mu_cos,
                     "seconds_mu": r["seconds_mu"], "seconds_s": r["seconds_s"], "model_rss_mib": r["model_rss_mib"],
                     "probe_peak_mib": r["probe_peak_mib"]})
    B, G = int(ref["s"].numel()), args.group_size
    md = [
        "# Precision policy on SmolLM2-135M-Instruct + LoRA (bf16 vs float32)",
        "",
        f"Command: `python benchmarks/precision.py --prompts {args.prompts} --group-size {G} --max-new-tokens "
        f"{args.max_new_tokens}` (torch {torch.__version__}, CPU, {torch.get_num_threads()} threads).",
        "",
        f"{B} arithmetic prompts (chat template) × G = {G} sampled responses, LoRA r=8 on q/k/v/o (same float32 LoRA "
        "weights in every row), μY = ∇J (`sgd`, dr_grpo); s along the float32 model's μY; δH = 1e-4 · mean s. "
        "Each row in its own process; memory: RSS of the loaded model, and the probe's peak RSS growth over it.",
        "",
        "| configuration | δH | SE | δH vs float32 | s: median / max rel. diff | ‖μY‖ rel. diff | cos(μY) | μY time | s time | model RSS | probe peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        md.append(f"| {r['config']} | {r['delta_h']:+.4e} | {r['se']:.2e} | {100 * r['delta_h_rel_diff']:.3f}% | "
                  f"{100 * r['s_median_rel_diff']:.3f}% / {100 * r['s_max_rel_diff']:.2f}% | "
                  f"{100 * r['mu_norm_rel_diff']:.3f}% | {r['mu_cosine']:.6f} | {r['seconds_mu']:.1f} s | "
                  f"{r['seconds_s']:.1f} s | {r['model_rss_mib']:.0f} MiB | {r['probe_peak_mib']:.0f} MiB |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision-smollm2.md").write_text("\n".join(md) + "\n")
    (args.out / "precision-smollm2.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(md))


def _cosine(a: dict, b: dict) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float(v.double().pow(2).sum()) for v in a.values()))
    nb = math.sqrt(sum(float(v.double().pow(2).sum()) for v in b.values()))
    return dot / (na * nb)


if __name__ == "__main__":
    main()
