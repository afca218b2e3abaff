"""Data-parallel probing: 2 and 3 gloo processes on CPU give the single-process answer."""

import os
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from funcprobe import RolloutBatch, conditional_variance, update_direction
from funcprobe.edge.sharding import refuse_unsupported_sharding
from helpers import gpt2, random_rollouts, rel_err

# seconds a collective waits for its peers (gloo's process-group timeout): generous, so that a
# correct run on a loaded machine never reaches it; a dead peer closes its sockets and fails
# the others at once. HANG is only there to turn a real hang into a named failure.
TIMEOUT = 180
HANG = 3 * TIMEOUT
# the dead-peer case tests the timeout itself: its surviving rank waits this long for the dead one
DEAD_PEER_TIMEOUT = 20

SHARDS = {  # prompt ranges of E (7 prompts) and U (5 prompts) per rank
    2: ([(0, 5), (5, 7)], [(0, 1), (1, 5)]),
    3: ([(0, 4), (4, 7), (7, 7)], [(0, 3), (3, 5), (5, 5)]),  # rank 2 holds nothing
}


def _setup():
    model = gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, random_rollouts(B=7, G=3, seed=31), random_rollouts(B=5, G=3, seed=32)


def _shard(batch, lo, hi):
    return batch.select(lo, hi) if hi > lo else RolloutBatch.empty(batch.group_size, max_len=batch.max_len)


def _worker(rank, world, port, case, outdir):
    torch.set_num_threads(1)  # the ranks share the cores: no intra-op oversubscription
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=DEAD_PEER_TIMEOUT if case == "dead_peer" else TIMEOUT))
        model, opt, E, U = _setup()
        e_range, u_range = SHARDS[world][0][rank], SHARDS[world][1][rank]
        E_local, U_local = _shard(E, *e_range), _shard(U, *u_range)
        probed = torch.nn.parallel.DistributedDataParallel(model) if case == "ddp" else model
        if case == "dead_peer" and rank == 1:
            os._exit(3)  # dies before the first collective
        params = "trainable"
        if case == "mismatch" and rank == 1:
            params = [n for n, p in model.named_parameters() if p.requires_grad][:2]
        if case == "bad_input" and rank == 1:  # one rank's U has no advantages
            U_local = RolloutBatch(U_local.input_ids, U_local.attention_mask, U_local.response_start, None,
                                   U_local.max_len)
        if case == "bad_input":
            from funcprobe import EntropyProbe

            EntropyProbe(probed, opt).predict(E_local, U_local)
        if case == "influence":
            from funcprobe import EntropyProbe

            inf = EntropyProbe(probed, opt, max_grad_norm=1e-3).influence(
                E_local, U_local, groups={"pos": U_local.advantages > 0})
            result = {"inf": inf.to_dict(), "per_token": inf.per_token, "group": inf.groups["pos"].to_dict()}
            return
        mu = update_direction(probed, U_local, optimizer=opt, step="adam_step", params=params)
        res = conditional_variance(probed, E_local, mu, lr=0.1, gather_s=True)
        local = conditional_variance(probed, E_local, mu, lr=0.1)
        result = {"mu": mu, "res": res.to_dict(), "local_s": local.s, "grads_none": all(
            p.grad is None for p in model.parameters())}
    except Exception as err:  # reported to the parent, which asserts on it
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    finally:
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
        # exit without tearing the process group down: destroy_process_group after DDP with gloo was seen
        # to hang (futex) in a rank whose result was already written; the work is done and saved
        os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world, tmp_path, target, *args):
    """Run ``target(rank, world, port, *args, outdir)`` in ``world`` spawned processes and load
    each rank's ``rank{r}.pt`` (None where a rank wrote nothing); a hang fails by name."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=HANG)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, (f"hang: rank(s) {alive} of {world} ({target.__name__} {args}) still running {HANG} s after "
                       f"the start, past gloo's {TIMEOUT} s collective timeout; results written by: "
                       f"{sorted(f.name for f in tmp_path.glob('rank*.pt'))}")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) if (tmp_path / f"rank{r}.pt").exists()
            else None for r in range(world)]


def _run(world, case, tmp_path):
    return spawn_ranks(world, tmp_path, _worker, case)


@pytest.fixture(scope="module")
def single_process():
    model, opt, E, U = _setup()
    mu = update_direction(model, U, optimizer=opt, step="adam_step")
    return mu, conditional_variance(model, E, mu, lr=0.1)


@pytest.mark.parametrize("world, case", [(2, "plain"), pytest.param(3, "plain", marks=pytest.mark.slow), (2, "ddp")])
def test_sharded_equals_single_process(world, case, tmp_path, single_process):
    mu_ref, ref = single_process
    results = _run(world, case, tmp_path)
    # float64, the same sums reduced across ranks: seen <= 7.4e-16, bound 1e-10 (> 1e5x); a
    # missing or doubled shard is O(1/world) off
    for rank, out in enumerate(results):
        assert "error" not in out, out.get("trace")
        for k in mu_ref:
            assert rel_err(out["mu"][k], mu_ref[k]) < 1e-10, (rank, k)
        r = out["res"]
        for key in ("sum_s", "sum_s2", "mean_s", "delta_h", "var", "se"):
            assert rel_err(r[key], getattr(ref, key)) < 1e-10, (rank, key)
        assert r["num_prompts"] == 7
        assert rel_err(torch.tensor(r["s"], dtype=torch.float64), ref.s) < 1e-10  # gathered, rank order
        lo, hi = SHARDS[world][0][rank]
        assert out["local_s"].shape == (hi - lo,)
        if hi > lo:
            assert rel_err(out["local_s"], ref.s[lo:hi]) < 1e-10
        assert out["grads_none"]


@pytest.mark.slow  # 3 ranks; the default run checks the split on 2 FSDP2 ranks (tests/test_fsdp.py)
def test_sharded_influence_equals_single_process(tmp_path):
    """3 ranks (one holding no prompts), clipping active: totals, SEs, group and every local
    update sample's share equal the single-process split."""
    from funcprobe import EntropyProbe

    model, opt, E, U = _setup()
    ref = EntropyProbe(model, opt, max_grad_norm=1e-3).influence(E, U, groups={"pos": U.advantages > 0})
    assert ref.clip < 1
    # float64, as above (1e-10); slow, not run for this audit: the 2-rank FSDP2 split in
    # tests/test_fsdp.py saw <= 1.1e-15
    for rank, out in enumerate(_run(3, "influence", tmp_path)):
        assert "error" not in out, out.get("trace")
        got = out["inf"]
        for key in ("delta_h", "se", "delta_h_baseline", "se_baseline", "delta_h_update", "se_update", "clip"):
            assert rel_err(got[key], getattr(ref, key)) < 1e-10, (rank, key)
        assert got["num_update_prompts"] == 5 and got["num_eval_prompts"] == 7
        lo, hi = SHARDS[3][1][rank]
        assert out["per_token"].shape[0] == hi - lo
        if hi > lo:
            assert rel_err(out["per_token"], ref.per_token[lo:hi]) < 1e-10
        assert rel_err(out["group"]["delta_h"], ref.groups["pos"].delta_h) < 1e-10
        assert rel_err(out["group"]["se"], ref.groups["pos"].se) < 1e-10


def test_a_rank_with_bad_input_stops_every_rank_with_a_message(tmp_path):
    """Rank 1 refuses its U (no advantages) before any collective; rank 0 is told at once
    instead of waiting in an all-reduce until the process group's timeout."""
    results = _run(2, "bad_input", tmp_path)
    assert "U: the batch has no advantages" in results[1]["error"], results[1]
    assert "RankMismatchError" in results[0]["error"] and "1 other rank(s) refused" in results[0]["error"], results[0]
    assert "rank 1: ValueError: U: the batch has no advantages" in results[0]["error"], results[0]  # who and why


def test_ranks_probing_different_registries_fail_together(tmp_path):
    results = _run(2, "mismatch", tmp_path)
    for out in results:
        assert "RankMismatchError" in out["error"] and "ranks disagree on" in out["error"], out


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    results = _run(2, "dead_peer", tmp_path)
    assert results[1] is None  # it died without a word
    assert "ProbeRankError: funcprobe: a collective failed on rank 0 of 2 during the probe" in results[0]["error"], \
        results[0]


def test_fsdp1_is_refused_with_the_reason_and_fsdp2_is_probed(tmp_path):
    """A real FSDP1 model (1-rank gloo group) is refused by type, saying why and what to use;
    a ``fully_shard`` (FSDP2) model on the same group is probed like the unsharded one."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from funcprobe import UnsupportedModelError
    from helpers import qwen2

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        E = random_rollouts()
        fsdp1 = FullyShardedDataParallel(qwen2(dtype=torch.float32), use_orig_params=True, device_id=torch.device("cpu"))
        with pytest.raises(UnsupportedModelError, match="FSDP1 .*FlatParameter.* Use FSDP2"):
            refuse_unsupported_sharding(fsdp1)
        with pytest.raises(NotImplementedError, match="FSDP1"):
            conditional_variance(fsdp1, E, {}, lr=1.0)
        ref_model = qwen2()
        mu = update_direction(ref_model, random_rollouts(seed=5), step="sgd")
        ref = conditional_variance(ref_model, E, mu, lr=1.0)
        model = qwen2()
        fully_shard(model)
        got = conditional_variance(model, E, mu, lr=1.0)
        assert rel_err(got.s, ref.s) < 1e-10  # float64: seen 2.0e-16
    finally:
        dist.destroy_process_group()
    refuse_unsupported_sharding(gpt2())  # an ordinary model passes


def test_process_group_without_init_is_an_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        conditional_variance(gpt2(), random_rollouts(), {}, lr=1.0, process_group=object())


def test_torchrun_example_gives_every_rank_the_same_answer():
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(root / "examples" / "probe_torchrun.py"), "--small", "--prompts-per-rank", "3", "--train-steps", "1"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"rank (\d)/2: .*global B = 6, (predicted dH = \S+ nats, SE_E = \S+)", proc.stdout)
    assert sorted(r for r, _ in lines) == ["0", "1"] and lines[0][1] == lines[1][1], proc.stdout
