"""The step-cost benchmark keeps working: its `--quick` mode (tiny model, slow-marked) runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_cost_quick_mode_writes_all_figures(tmp_path):
    out = tmp_path / "cost.json"
    # The baseline option is exercised with the current estimators themselves.
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "step_cost.py"),
        "--quick",
        "--reps",
        "1",
        "--baseline-estimators",
        str(ROOT / "hf_hiso" / "zo_estimators.py"),
        "--output-json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step / floor" in proc.stdout and "peak RSS increase" in proc.stdout
    result = json.loads(out.read_text())
    assert result["torch_threads"] >= 1
    p = result["num_directions"]
    assert result["cost"]["full"]["trainable"] > result["cost"]["lora"]["trainable"] > 0
    for setup in ("full", "lora"):
        cost = result["cost"][setup]
        assert cost["step_nocache"]["generations_per_direction"] == 3
        assert cost["step_cache"]["generations_per_direction"] == 1
        for key in ("step_nocache", "step_cache", "step_nocache_baseline", "step_cache_baseline"):
            assert cost[key]["over_floor"]["median"] > 0
        assert 0 < cost["step_nocache"]["generation_share"]["median"]
        memory = result["memory"][setup]
        hiso = {f"hiso_cache={cache}{suffix}" for cache in (False, True) for suffix in ("", " baseline")}
        assert set(memory["runs"]) == {"adamw"} | hiso
        for run in memory["runs"].values():
            assert run["trainable"] == cost["trainable"]
            assert run["peak_bytes"] >= run["rss_before_bytes"] > 0
        analytical = memory["analytical_bytes"]
        assert analytical["hiso_direction_cache"] == p * analytical["hiso_hessian"] == p * 4 * cost["trainable"]
