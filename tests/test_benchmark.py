"""The benchmark runs in --tiny mode on the CPU so it never rots (no timing is asserted here)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env


@pytest.mark.subprocess
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_benchmark_tiny_runs_both_loops(model, tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "benchmark_training.py"), "--tiny", "--model", model,
           "--steps", "2", "--warmup", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["model"] == model and results["tiny"] is True and results["device"] == "cpu"
    for loop in ("reference", "project"):
        assert results[loop]["ms_per_step"] > 0
    assert results["speedup"] == pytest.approx(results["reference"]["ms_per_step"] / results["project"]["ms_per_step"])
    assert "speed-up a/b" in proc.stdout
