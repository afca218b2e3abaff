"""Smoke test of the benchmark harness: tiny preset, one repeat, every method, finite numbers."""

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    import bench_conditional_variance

    yield bench_conditional_variance
    sys.path.remove(str(BENCH))


def test_tiny_preset_all_methods(bench, tmp_path):
    rc = bench.main(["--preset", "tiny", "--repeats", "1", "--inline", "--out", str(tmp_path),
                     "--sweep-groups", "1,2", "--sweep-lengths", "16,32", "--length-sweep-prompts", "2",
                     "--sweep-methods", "nograd_forward,funcprobe_jvp,seeds_alpha"])
    assert rc == 0
    report = json.loads((tmp_path / "cpu-tiny.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert set(rows) == set(bench.METHODS)
    for name, r in rows.items():
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0, name
        assert math.isfinite(r["time_ratio"]) and r["peak_bytes"] >= 0, name
    for name in ("funcprobe_jvp", "funcprobe_vjp", "seeds_alpha", "seeds_s_boundary"):
        # Qwen2 float32 internals, float64 elsewhere: seen 3.3e-7 (~3 float32 ulps), bound 30x
        assert rows[name]["max_rel_diff"] < 1e-5, name
    assert len(report["group_sweep"]) == 6 and len(report["length_sweep"]) == 6
    assert set(report["largest_group_in_budget"]) == {"nograd_forward", "funcprobe_jvp", "seeds_alpha"}
    assert "| funcprobe_jvp |" in (tmp_path / "cpu-tiny.md").read_text()
    for png in ("cpu-tiny-groups.png", "cpu-tiny-seqlen.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_flash_jvp_benchmark_harness(bench, tmp_path):
    """benchmarks/flash_jvp.py (on CPU the kernels in Triton's interpreter): every row timed,
    the kernels' value and tangent against the closed-form rule's to bf16 rounding."""
    pytest.importorskip("triton", reason="Triton is not installed: the flash kernels cannot run")
    import flash_jvp

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert flash_jvp.main(["--device", device, "--lengths", "40", "--repeats", "1", "--heads", "2", "--kv-heads", "1",
                           "--head-dim", "16", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*-flash-jvp.json")
    rows = json.loads(report.read_text())["rows"]
    assert [r["method"] for r in rows] == ["sdpa_flash_forward", "sdpa_math_forward", "kernel_forward",
                                           "kernel_forward_jvp", "rule_forward_jvp", "generic_forward_jvp"]
    assert all(r["median_s"] > 0 for r in rows)
    agree = rows[3]["vs_rule"]
    # bf16 outputs both sides (eps 2^-8 = 3.9e-3 of the max): seen 2e-6 on CPU (the interpreter
    # multiplies in float32), up to 1.0e-2 on an H200 (benchmarks/results/cuda-nvidia-h200-flash-jvp.json,
    # T = 8192); bound 5e-2, ~13 bf16 ulps (was 1e-2, which the H200 run exceeded); a wrong tangent
    # term is O(1) off
    assert agree["value"] < 5e-2 and agree["tangent"] < 5e-2
    assert "| 40 | kernel_forward_jvp |" in report.with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def control_study():
    sys.path.insert(0, str(BENCH))
    try:
        import control_study
    finally:
        sys.path.remove(str(BENCH))
    return control_study


def test_control_study_summary_scores_each_run_against_its_target(control_study, tmp_path):
    """The comparison's summary from a hand-made results file: H0 = 1, 2 steps; the target-free
    ``none`` run is scored against both targets (hold: H* = 1; anneal: H*(1) = 0.75,
    H*(2) = 0.5), ``probe_lr`` against its own (float64 sums of a few terms: 1e-9)."""
    out = tmp_path / "control-study.jsonl"
    settings = {"steps": 2, "prompts": 2, "group_size": 2, "max_len": 4, "lr": 1e-3, "held_out": 2, "seed": 0}
    rows = [{"kind": "initial", "H0": 1.0, "H0_se": 0.01, "reward0": 0.0, "trl_entropy0": 2.0, "settings": settings}]
    for arm, target, hs in (("none", None, (0.9, 0.8)), ("probe_lr", "hold", (1.0, 1.1))):
        rows += [{"arm": arm, "target": target, "step": t, "seconds": 2.0, "H": h, "H_se": 0.01, "reward": 0.5,
                  "reward_se": 0.1, **({"knob": 0.5} if arm == "probe_lr" else {})} for t, h in zip((1, 2), hs)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert control_study.main(["--summary", "--out", str(out), "--arms", "none,probe_lr", "--targets", "hold"]) == 0
    table = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
             for line in (tmp_path / "control-study.md").read_text().splitlines() if line.startswith("| ")}
    assert abs(float(table[("none", "hold (target-free run)")][3]) - 0.15) < 1e-9
    assert abs(float(table[("none", "anneal (target-free run)")][3]) - 0.225) < 1e-9
    assert abs(float(table[("probe_lr", "hold")][3]) - 0.05) < 1e-9
    assert table[("probe_lr", "hold")][7] == "0.5 to 0.5"
    assert (tmp_path / "control-study.png").stat().st_size > 1000
    # --anchor train: the controllers' H0 from the training prompts is named; the score is unchanged
    with out.open("a") as fh:
        fh.write(json.dumps({"kind": "anchor", "H0_train": 1.25, "H0_train_se": 0.02, "problems": 4}) + "\n")
    assert control_study.main(["--summary", "--out", str(out), "--arms", "none,probe_lr", "--targets", "hold"]) == 0
    text = (tmp_path / "control-study.md").read_text()
    assert "aim from H0 of the run's 4 training prompts, 1.2500 ± 0.0200" in text
    assert "| probe_lr | hold | 2 | 0.0500 |" in text
    # the verdict against the best reactive arm: pi_beta on hold, deviations 0.2 and 0.4 against
    # probe_lr's 0 and 0.1: ratio 0.1/0.6; two steps make one block, so every resample is the run
    with out.open("a") as fh:
        for t, h in ((1, 1.2), (2, 0.6)):
            fh.write(json.dumps({"arm": "pi_beta", "target": "hold", "step": t, "seconds": 2.0, "H": h, "H_se": 0.01,
                                 "reward": 0.5, "reward_se": 0.1, "knob": 0.1, "pi_antiwindup": True}) + "\n")
    assert control_study.main(["--summary", "--out", str(out), "--arms", "none,pi_beta,probe_lr",
                               "--targets", "hold"]) == 0
    text = (tmp_path / "control-study.md").read_text()
    assert "| hold | probe_lr | pi_beta | 0.17x | 0.17–0.17x | 0.500 vs 0.500 ± 0.100 | met |" in text
    # a PI run with other gains carries them in its name; the better of the two is the one compared
    args = argparse.Namespace(kp=0.1, ki=0.02)
    assert control_study.run_label("pi_beta", args) == "pi_beta@kp0.1,ki0.02"
    assert control_study.run_label("probe_beta", args) == "probe_beta"
    with out.open("a") as fh:
        for t, h in ((1, 1.1), (2, 0.9)):
            fh.write(json.dumps({"arm": "pi_beta@kp0.1,ki0.02", "target": "hold", "step": t, "seconds": 2.0, "H": h,
                                 "H_se": 0.01, "reward": 0.5, "reward_se": 0.1, "knob": 0.1,
                                 "pi_antiwindup": True}) + "\n")
    assert control_study.main(["--summary", "--out", str(out), "--arms", "none,pi_beta,probe_lr",
                               "--targets", "hold"]) == 0
    text = (tmp_path / "control-study.md").read_text()
    assert "| pi_beta@kp0.1,ki0.02 | hold | 2 | 0.1000 |" in text and "| pi_beta | hold | 2 | 0.3000 |" in text
    assert "| hold | probe_lr | pi_beta@kp0.1,ki0.02 | 0.50x |" in text
    lo, hi = control_study.block_bootstrap_ratio([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0] * 6)
    assert 1.0 <= lo < 1.75 < hi <= 2.5  # the ratio 21/12 = 1.75 inside, within the extreme block means


def test_control_study_pi_antiwindup_leaves_the_bound_when_the_error_turns(control_study):
    """The reactive PI baseline (Kp 0.5, Ki 0.1, β in [0, 1]): six errors of −0.5 hold β at 0;
    with clamping anti-windup the first error of +0.2 gives β = 0.5·0.2 + 0.1·0.2 = 0.12 (the
    integral frozen at 0 while saturated), without it the wound-up integral (−3.0 + 0.2) keeps
    β at 0 until it has unwound; inside the bounds both are the plain PI (float64 sums: 1e-12)."""
    betas = {}
    for aw in (True, False):
        args, state = argparse.Namespace(kp=0.5, ki=0.1, pi_antiwindup=aw), {"integral": 0.0}
        betas[aw] = [control_study.pi_update(state, e, args, 0.0, 1.0) for e in [-0.5] * 6 + [0.2]]
    assert betas[True][:6] == betas[False][:6] == [0.0] * 6
    assert abs(betas[True][6] - 0.12) < 1e-12 and betas[False][6] == 0.0
    for aw in (True, False):  # unsaturated: Kp·e + Ki·Σe exactly
        args, state = argparse.Namespace(kp=0.5, ki=0.1, pi_antiwindup=aw), {"integral": 0.0}
        got = [control_study.pi_update(state, e, args, -1.0, 1.0) for e in (0.3, -0.1, 0.2)]
        assert max(abs(g - w) for g, w in zip(got, (0.18, -0.03, 0.14))) < 1e-12
