"""verl's ``TrainingWorker`` (in-process, no Ray) with the probe enabled by
``HFModelConfig.external_lib`` alone: the probed engine is built and ``actor/funcprobe/*`` comes
back in the metrics; with 2 gloo ranks holding split prompt groups, every rank's δH is the
single-process one. Each rank is a fresh process (``run_worker.py``), so nothing of funcprobe is
imported before verl imports the plug-in."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl.workers.engine", reason="verl is not installed (the verl tests run in .ci/run-verl's environment)")

from verl_cpu import save_tiny_qwen2  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "run_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model_dir: str, out_dir: Path, world: int, fp64: bool = False) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, str(SCRIPT), model_dir, str(out_dir / f"rank{rank}.json")]
        args += ["fp64"] if fp64 else []
        procs.append(subprocess.Popen(args,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(str(tmp_path_factory.mktemp("qwen2")))


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    return _run(model_dir, tmp_path_factory.mktemp("one"), 1)[0]


def test_external_lib_alone_enables_the_probe_and_verl_returns_its_metrics(single):
    assert not single["imported_before"]  # only verl's external_lib imported funcprobe.integrations.verl
    assert single["engine"] == "ProbedFSDPEngineWithLMHead"
    m = single["metrics"]  # the worker's metrics, which verl's trainer logs as actor/funcprobe/*
    assert m["funcprobe/probed_steps"] == 1.0 and m["funcprobe/failed"] == 0.0
    assert m["funcprobe/delta_h"] == pytest.approx(single["rank_metrics"]["delta_h"], rel=1e-12, abs=0)
    assert m["funcprobe/ci95_low"] < m["funcprobe/delta_h"] < m["funcprobe/ci95_high"]


@pytest.mark.slow
def test_two_ranks_with_split_prompt_groups_give_the_single_process_prediction(model_dir, tmp_path):
    # float64 throughout (model, FSDP2 compute and reduction): in float32 the ranks' other summation
    # order alone moved δH by 3.0e-6 relative (with Adam's eps raised to 1e-4; 1.7e-4 at eps 1e-8,
    # where g/(|g| + eps) turns entries at the gradient's rounding into whole steps), which is about
    # float32 arithmetic, not the regrouping by uid that this test is for
    one = _run(model_dir, tmp_path / "one", 1, fp64=True)[0]
    ranks = _run(model_dir, tmp_path / "two", 2, fp64=True)
    assert one["param_dtypes"] == ranks[0]["param_dtypes"] == ["torch.float64"]
    assert ranks[0]["rank_metrics"] == ranks[1]["rank_metrics"]  # identical on both ranks
    for key in ("delta_h", "se", "delta_h_same_batch"):
        # seen: 0 (delta_h), 0 (se), 4.7e-16 (same batch); the bound, 1e-6, is 1e9 x that
        assert ranks[0]["rank_metrics"][key] == pytest.approx(one["rank_metrics"][key], rel=1e-6, abs=0), (key, ranks, one)
