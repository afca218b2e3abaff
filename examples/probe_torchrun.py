"""Data-parallel probe inside a torchrun job (CPU, gloo).

    torchrun --nproc_per_node 2 examples/probe_torchrun.py

Every rank builds the same Qwen2-config policy with a LoRA adapter (same seed), wraps it
in DistributedDataParallel, takes a few real DDP training steps (so the AdamW state is
identical on every rank), samples its own shard of E and U with ``generate``, and runs
``EntropyProbe``: μY and the statistics are all-reduced, so every rank prints the same
prediction, which is what one process holding all shards would compute.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from funcprobe import EntropyProbe, policy_gradient_surrogate, sequence_logprobs
from funcprobe.apps.demo import DemoConfig, build_policy, sample_prompts, sample_rollouts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts-per-rank", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny sizes (the test suite uses this)")
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    train_and_probe(args)
    # DDP holds the process group: free it while the interpreter is alive, so gloo's threads do not
    # outlive it ("terminate called without an active exception" at exit), then leave together
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train_and_probe(args: argparse.Namespace) -> None:
    """Train ``--train-steps`` DDP steps, then probe the next one and print it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # each rank its share of the cores
    cfg = DemoConfig(model="tiny", prompts=args.prompts_per_rank, group_size=4, max_new_tokens=8 if args.small else 24,
                     hidden=32 if args.small else 128, layers=1 if args.small else 4)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_policy(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank samples its own shard
    torch.manual_seed(1000 + rank)
    for _ in range(args.train_steps):
        batch = sample_rollouts(model, sample_prompts(cfg.prompts, cfg, gen), cfg)
        optimizer.zero_grad(set_to_none=True)
        S = sequence_logprobs(ddp, dict(ddp.named_parameters()), batch)  # DDP forward: gradients all-reduced
        (-policy_gradient_surrogate(S, batch, cfg.probe.weighting).mean()).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    E = sample_rollouts(model, sample_prompts(cfg.prompts, cfg, gen), cfg)
    U = sample_rollouts(model, sample_prompts(cfg.prompts, cfg, gen), cfg)
    pred = EntropyProbe(ddp, optimizer, step="adam_step").predict(E, U)
    r = pred
    lo, hi = r.ci95
    line = (f"rank {rank}/{world}: local E prompts {E.num_prompts}, global B = {r.num_prompts}, "
            f"predicted dH = {r.delta_h:+.6e} nats, SE_E = {r.se:.6e}, 95% [{lo:+.6e}, {hi:+.6e}]\n")
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())  # one write: the ranks' lines never interleave


if __name__ == "__main__":
    main()
