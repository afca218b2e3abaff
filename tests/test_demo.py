"""The demo (the README's main job) runs and reports finite numbers."""

import json
import math
import subprocess
import sys

from funcprobe.apps.demo import DemoConfig, format_report, run_demo


def test_demo_small_setting():
    cfg = DemoConfig(prompts=4, group_size=3, max_new_tokens=6, train_steps=2, hidden=32, layers=1)
    res = run_demo(cfg)
    r = res.prediction
    assert r.num_prompts == 4 and res.E.group_size == 3 and len(res.train_rewards) == 2
    assert all(math.isfinite(x) for x in (r.delta_h, r.se, *r.ci95, res.prediction.step_norm))
    assert r.se > 0
    report = format_report(res)
    assert "predicted dH" in report and "95% interval" in report and "nan" not in report.lower()


def test_demo_command_line(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "funcprobe", "demo", "--prompts", "3", "--group-size", "2", "--max-new-tokens", "4",
         "--train-steps", "1", "--hidden", "32", "--layers", "1", "--mode", "vjp", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "SE_E" in proc.stdout
    data = json.loads(out.read_text())
    assert data["mode"] == "vjp" and len(data["s"]) == 3 and math.isfinite(data["delta_h"])
