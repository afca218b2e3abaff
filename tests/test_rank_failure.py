"""A failure of the probe on one rank after its collectives have started (issue 28).

Rank 1's probe fails in the middle (a forward that runs out of memory, an error after the
last collective, a failure inside the TRL callback); every rank must reach the same decision
before the trainer's next collective: skip the probe (training goes on with identical
parameters on every rank) or stop with a message naming the rank and the cause; no hang.
2 gloo processes on CPU; a hang fails by name (``spawn_ranks``' HANG guard).
"""

import contextlib
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")

import funcprobe.api  # noqa: E402
import funcprobe.passes  # noqa: E402
from funcprobe import EntropyProbe, ProbeRankError, ProbeSettings  # noqa: E402
from funcprobe.core.logprobs import sequence_logprobs  # noqa: E402
from funcprobe.core.objectives import policy_gradient_surrogate  # noqa: E402
from test_distributed import SHARDS, TIMEOUT, _setup, _shard, spawn_ranks  # noqa: E402

#: an agreed failure is decided at the next agreement point, in well under a second of waiting;
#: a failure that fell back on gloo's collective timeout would take TIMEOUT (180 s) or more
AGREED_WITHIN = TIMEOUT / 3
OOM = "CUDA out of memory (injected into rank 1's forward)"
LATE = "NaN found after the last collective (injected into rank 1)"
MID = "injected into rank 1 between two of the probe's collectives"
BEFORE = "injected into rank 1's trainer_gradient"


@contextlib.contextmanager
def _fail_on_rank1(rank, owner, name, message, after=0):
    """On rank 1 only, ``owner.name`` raises ``RuntimeError(message)`` from its ``after + 1``-th
    call on; rank 0 runs it unchanged."""
    original, own = getattr(owner, name), name in vars(owner)
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError(message)
        return original(*args, **kwargs)

    if rank == 1:
        setattr(owner, name, failing)
    try:
        yield calls
    finally:
        if rank == 1:
            setattr(owner, name, original) if own else delattr(owner, name)


def _outcome(fn):
    """What ``fn()`` did on this rank: its value or its error, and how long it took."""
    t0 = time.perf_counter()
    try:
        out = {"value": fn()}
    except Exception as err:  # noqa: BLE001 - reported to the parent, which asserts on it
        cause = err.__cause__
        out = {"error": type(err).__name__, "message": str(err), "agreed": getattr(err, "agreed", None),
               "ranks": getattr(err, "ranks", None), "cause": f"{type(cause).__name__}: {cause}" if cause else None,
               "trace": traceback.format_exc()}
    out["seconds"] = time.perf_counter() - t0
    return out


def _trl_batch(batch):
    """A ``RolloutBatch`` in TRL's generation-batch layout (``generation_batch_to_rollouts``' input)."""
    B, G, _ = batch.input_ids.shape
    rs = batch.response_start
    flat = lambda t: t.reshape(B * G, -1)  # noqa: E731
    return {"prompt_ids": flat(batch.input_ids[..., :rs]), "prompt_mask": flat(batch.attention_mask[..., :rs]),
            "completion_ids": flat(batch.input_ids[..., rs:]), "completion_mask": flat(batch.attention_mask[..., rs:]),
            "advantages": batch.advantages.reshape(-1)}


def _trainer(model, optimizer, batch, probe_raise):
    """A ``ProbedGRPOTrainer`` holding only what ``run_probe`` (its ``on_pre_optimizer_step``
    callback) reads: the model, the optimizer (its ``.grad`` is the step's) and the batch."""
    from funcprobe.integrations.trl import ProbedGRPOTrainer

    trainer = ProbedGRPOTrainer.__new__(ProbedGRPOTrainer)
    trainer.__dict__.update(
        model=model, optimizer=optimizer, _funcprobe_batch=_trl_batch(batch), state=SimpleNamespace(global_step=0),
        num_generations=batch.group_size, args=SimpleNamespace(max_completion_length=float(batch.max_len.max())),
        probe_settings=ProbeSettings(step="optimizer_step", progress=False, loss_type="dr_grpo", weighting="dr_grpo"),
        probe_gradient="trainer", probe_raise=probe_raise, funcprobe_step=None, funcprobe_history=[],
        _funcprobe_window=[], _funcprobe_failed=0)
    return trainer


def _backward(model, batch):
    """The trainer's backward on this rank's batch: DDP all-reduces the gradients."""
    S = sequence_logprobs(model, {}, batch, full_logits=True)
    (-policy_gradient_surrogate(S, batch, "dr_grpo").sum()).backward()


def _ddp_worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT))
        model, opt, E, U = _setup()
        model.eval()  # dropout off: the trainer's gradient is the one the probe models (leave-one-out)
        E_local, U_local = _shard(E, *SHARDS[world][0][rank]), _shard(U, *SHARDS[world][1][rank])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        mlp = model.base_model.model.transformer.h[1].mlp
        predict = lambda: EntropyProbe(ddp, opt).predict(E_local, U_local).delta_h  # noqa: E731
        # an out-of-memory in rank 1's second forward (the pass over E, after update_direction's collectives)
        with _fail_on_rank1(rank, mlp, "forward", OOM, after=1):
            result["forward"] = _outcome(predict)
        # a failure after the probe's last collective (the norm of the step in predict's result)
        with _fail_on_rank1(rank, funcprobe.api, "tree_sq_norm", LATE):
            result["late"] = _outcome(predict)
        # the TRL callback in the trainer's DDP path: the step's gradient, then the probe, which fails
        # on rank 1 after its handshake; every rank skips it and counts it, then the trainer goes on
        _backward(ddp, U_local)
        trainer = _trainer(ddp, opt, U_local, probe_raise=False)
        with _fail_on_rank1(rank, funcprobe.passes, "entropy_objective", MID):
            result["trl"] = _outcome(trainer.run_probe)
        result["trl"]["failed"] = trainer._funcprobe_failed
        opt.step()
        opt.zero_grad(set_to_none=True)
        _backward(ddp, U_local)  # the trainer's next collectives: DDP's gradient all-reduce
        # probe_raise=True, rank 1 failing before any collective of the probe: every rank raises
        import funcprobe.integrations.trl as trl_integration

        with _fail_on_rank1(rank, trl_integration, "trainer_gradient", BEFORE):
            result["trl_raise"] = _outcome(_trainer(ddp, opt, U_local, probe_raise=True).run_probe)
        opt.step()
        opt.zero_grad(set_to_none=True)
        result["after"] = _outcome(predict)  # the process group is still in step: the same answer everywhere
        result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    except Exception as err:  # reported to the parent, which asserts on it
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(), "partial": dict(result)}
    finally:
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
        os._exit(0)  # as in test_distributed: no process-group teardown after DDP with gloo


def _assert_agreed(outs, key, cause):
    """Every rank raised ``ProbeRankError(agreed=True)`` naming rank 1 and ``cause``, quickly."""
    for rank, out in enumerate(outs):
        got = out[key]
        assert got.get("error") == "ProbeRankError", (rank, key, got)
        assert got["agreed"] is True and got["ranks"] == (1,), (rank, key, got)
        assert "failed on rank(s) [1] of 2" in got["message"] and cause in got["message"], (rank, key, got["message"])
        assert got["seconds"] < AGREED_WITHIN, (rank, key, got["seconds"])
    assert cause in outs[1][key]["cause"], outs[1][key]  # the failing rank's own error is chained


def test_a_rank_failing_mid_probe_stops_every_rank_together_under_ddp(tmp_path):
    """DDP on 2 ranks: a forward that fails on rank 1, a failure after the last collective, the
    TRL callback (skipped and counted on every rank; with ``probe_raise`` raised on every rank):
    the ranks decide together, then train on in step with identical parameters."""
    outs = spawn_ranks(2, tmp_path, _ddp_worker)
    for rank, out in enumerate(outs):
        assert "error" not in out, out.get("trace")
    _assert_agreed(outs, "forward", OOM)
    _assert_agreed(outs, "late", LATE)
    _assert_agreed(outs, "trl_raise", BEFORE)
    for rank, out in enumerate(outs):
        trl = out["trl"]
        assert "error" not in trl and trl["value"] is None and trl["failed"] == 1, (rank, trl)
        assert trl["seconds"] < AGREED_WITHIN, (rank, trl["seconds"])
        assert "error" not in out["after"], (rank, out["after"].get("trace"))
    assert outs[0]["after"]["value"] == outs[1]["after"]["value"]
    for n, p in outs[0]["params"].items():
        assert torch.equal(p, outs[1]["params"][n]), n  # in step: bit-identical parameters


def _fsdp_worker(rank, world, port, outdir):
    from test_fsdp import W_SHARDS, _batches, _model, _train_loss, _wrap

    from funcprobe.edge.fsdp import full_tensor

    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=TIMEOUT))
        E, U, W = _batches()
        U_local, W_local = _shard(U, *SHARDS[world][1][rank]), _shard(W, *W_SHARDS[world][rank])
        model = _wrap(_model(), "layers")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        _train_loss(model, W_local, 4, world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the TRL callback on FSDP2: rank 1 fails after the handshake of the s pass, before its forwards
        _train_loss(model, U_local, 5, world).backward()
        trainer = _trainer(model, opt, U_local, probe_raise=False)
        with _fail_on_rank1(rank, funcprobe.passes, "entropy_objective", MID):
            result["skip"] = _outcome(trainer.run_probe)
        result["skip"]["failed"] = trainer._funcprobe_failed
        opt.step()
        opt.zero_grad(set_to_none=True)
        _train_loss(model, W_local, 4, world).backward()  # the trainer's next step: FSDP's collectives
        opt.step()
        opt.zero_grad(set_to_none=True)
        result["params"] = {n: full_tensor(p).clone() for n, p in model.named_parameters()}
        # last (the process group is spent after it): a failure inside an FSDP2 forward cannot be agreed on
        _train_loss(model, U_local, 5, world).backward()
        mlp = model.base_model.model.transformer.h[1].mlp
        with _fail_on_rank1(rank, mlp, "forward", OOM):
            result["in_forward"] = _outcome(trainer.run_probe)
    except Exception as err:  # reported to the parent, which asserts on it
        result = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    finally:
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
        os._exit(0)  # rank 1 exits: rank 0's pending collective fails at once, as in a job whose rank stopped


def test_a_rank_failing_mid_probe_on_fsdp2_is_skipped_together_or_stops_every_rank(tmp_path):
    """FSDP2 on 2 ranks, the TRL callback's path: a failure between the probe's collectives is
    skipped by every rank and training goes on in step; a failure inside an FSDP2 forward (whose
    all-gathers the other rank waits in) cannot be agreed on: every rank raises
    ``ProbeRankError(agreed=False)`` naming the probe, even with ``probe_raise=False``."""
    outs = spawn_ranks(2, tmp_path, _fsdp_worker)
    for rank, out in enumerate(outs):
        assert "error" not in out, out.get("trace")
        skip = out["skip"]
        assert "error" not in skip and skip["value"] is None and skip["failed"] == 1, (rank, skip)
        assert skip["seconds"] < AGREED_WITHIN, (rank, skip["seconds"])
        stop = out["in_forward"]
        assert stop.get("error") == "ProbeRankError" and stop["agreed"] is False, (rank, stop)
        assert stop["message"].startswith("funcprobe: ") and "docs/sharding.md#rank-failures" in stop["message"], stop
    assert outs[1]["in_forward"]["ranks"] == (1,) and OOM in outs[1]["in_forward"]["message"], outs[1]["in_forward"]
    for n, p in outs[0]["params"].items():
        assert torch.equal(p, outs[1]["params"][n]), n


def test_probe_rank_error_keeps_its_ranks_causes_and_verdict_across_processes():
    """Errors travel between processes pickled (multiprocessing, torchelastic's error files)."""
    import pickle

    err = ProbeRankError("funcprobe: the probe failed on rank(s) [1] of 2", ranks=(1,),
                         causes={1: "RuntimeError: out of memory"}, agreed=False)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.ranks, back.causes, back.agreed) == (str(err), (1,), {1: "RuntimeError: out of memory"},
                                                                 False)
    assert isinstance(back, RuntimeError)
