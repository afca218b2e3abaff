"""The probe on an FSDP2-sharded policy inside a torchrun job (CPU, gloo).

    torchrun --nproc_per_node 2 examples/probe_fsdp2_torchrun.py

Every rank builds the same Qwen2-config policy with a LoRA adapter (same seed) and shards
it as verl's FSDP2 actor does: ``fully_shard`` on each decoder layer, then on the root.
(The root unit is the causal LM inside the PEFT wrapper, whose forward PEFT's ``generate``
calls.) It takes a few real training steps through the sharded model, samples its own shard of E
and U with ``generate(synced_gpus=True)`` (every forward of a sharded model is a
collective), and runs ``EntropyProbe`` on the sharded model itself: no unsharded replica;
the LoRA tensors are gathered in full, the base stays sharded and is gathered layer by
layer by FSDP. Every rank prints the same prediction, the answer one process holding the
unsharded model and all shards of E and U would compute (tests/test_fsdp.py).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from funcprobe import EntropyProbe, policy_gradient_surrogate, sequence_logprobs
from funcprobe.apps.demo import DemoConfig, build_policy, sample_prompts, sample_rollouts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts-per-rank", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny sizes (the test suite uses this)")
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    train_and_probe(args)
    # the sharded model and its optimizer hold the process group (FSDP2's device mesh): free them while
    # the interpreter is alive, so gloo's threads do not outlive it ("terminate called without an active
    # exception" at exit: seen in 5 of 34 runs before, 0 of 30 after), then leave together
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train_and_probe(args: argparse.Namespace) -> None:
    """Train ``--train-steps`` steps of the sharded policy, then probe the next one and print it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # each rank its share of the cores
    cfg = DemoConfig(model="tiny", prompts=args.prompts_per_rank, group_size=4, max_new_tokens=8 if args.small else 24,
                     hidden=32 if args.small else 128, layers=2 if args.small else 4)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_policy(cfg)
    causal_lm = model.base_model.model  # PEFT's generate calls this module's forward: it is the root unit
    for layer in causal_lm.model.layers:  # verl's layout: each decoder layer, then the root
        fully_shard(layer)
    fully_shard(causal_lm)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank samples its own shard
    torch.manual_seed(1000 + rank)
    for _ in range(args.train_steps):
        batch = sample_rollouts(model, sample_prompts(cfg.prompts, cfg, gen), cfg, synced_gpus=True)
        optimizer.zero_grad(set_to_none=True)
        S = sequence_logprobs(model, {}, batch, full_logits=True)  # the model's own (sharded) forward
        (-policy_gradient_surrogate(S, batch, cfg.probe.weighting).mean()).backward()  # FSDP reduces the grads
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    E = sample_rollouts(model, sample_prompts(cfg.prompts, cfg, gen), cfg, synced_gpus=True)
    U = sample_rollouts(model, sample_prompts(cfg.prompts, cfg, gen), cfg, synced_gpus=True)
    r = EntropyProbe(model, optimizer).predict(E, U)  # the Δθ AdamW takes next, on the sharded model
    lo, hi = r.ci95
    line = (f"rank {rank}/{world} (FSDP2): local E prompts {E.num_prompts}, global B = {r.num_prompts}, "
            f"predicted dH = {r.delta_h:+.6e} nats, SE_E = {r.se:.6e}, 95% [{lo:+.6e}, {hi:+.6e}]\n")
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())  # one write: the ranks' lines never interleave


if __name__ == "__main__":
    main()
