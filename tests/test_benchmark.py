"""The benchmark runs in --tiny mode on the CPU so it never rots (no timing is asserted here)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, subprocess_env


@pytest.mark.parametrize("model", ["sdxl"])  # sd15 runs through gpu_benchmarks.sh below
def test_benchmark_tiny_runs_both_loops(model, tmp_path, capsys):
    """The benchmark's main() in this process (its in-process loops are what it times; fresh processes are
    gpu_benchmarks.sh's, tested below)."""
    import benchmark_training

    out = tmp_path / "results.json"
    argv = ["--tiny", "--model", model, "--steps", "2", "--warmup", "1", "--workdir", str(tmp_path / "work")]
    benchmark_training.main([*argv, "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["model"] == model and results["tiny"] is True and results["device"] == "cpu"
    for loop in ("reference", "project"):
        assert results[loop]["ms_per_step"] > 0
    assert results["speedup"] == pytest.approx(results["reference"]["ms_per_step"] / results["project"]["ms_per_step"])
    assert "speed-up a/b" in capsys.readouterr().out


@pytest.mark.subprocess
def test_gpu_script_runs_its_stages_and_writes_the_table(tmp_path):
    """benchmarks/gpu_benchmarks.sh, the one command a GPU session runs, here on the tiny SD with 2 end-to-end
    steps."""
    out = tmp_path / "out"
    env = subprocess_env(
        PYTHON=sys.executable,
        DTI_BENCH_ARGS=f"--tiny --steps 2 --warmup 1 --e2e_steps 2 --workdir {tmp_path / 'work'}",
        DTI_BENCH_RESULTS=str(tmp_path / "kept"),
    )
    proc = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu_benchmarks.sh"), str(out), "sd15"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sd15 = json.loads((out / "sd15.json").read_text())
    assert sd15["e2e_steps"] == 2 and sd15["e2e_project_s"] > 0 and sd15["e2e_reference_s"] > 0
    # the start-up phases of the in-process run and of the fresh process, which alone counts its imports (from the
    # process's start, read from the OS)
    assert {"checks", "models", "latents", "total"} == set(sd15["project"]["startup"])
    assert {"imports", "checks", "models", "latents", "total"} == set(sd15["e2e_startup"])
    assert sum(v for k, v in sd15["e2e_startup"].items() if k != "total") == pytest.approx(
        sd15["e2e_startup"]["total"], abs=0.3
    )
    assert sd15["reference"]["ms_per_step"] > 0 and sd15["project"]["ms_per_step"] > 0
    assert json.loads((tmp_path / "kept" / "sd15.json").read_text()) == sd15  # kept for a later call's table
    table = (out / "table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| cpu |")]
    assert (
        len(rows) == 1
        and "| sd15 32px batch 4 no (default) |" in rows[0]
        and f"2: {sd15['e2e_reference_s']:.1f} / {sd15['e2e_project_s']:.1f}" in rows[0]
    )
    # the end-to-end reference built nothing
    assert sorted(os.listdir(tmp_path / "work")) == ["images-32", "pipeline-sd15-tiny"]
    # no GPU memory to compare on the CPU: no target line, and no "nan GiB"
    assert "peak memory" not in proc.stdout and "nan" not in proc.stdout and "peak: GPU only" in proc.stdout
    assert "stage sd15: " in proc.stdout
    assert re.search(
        r"^(PASS|FAIL) sd15 32px batch 4 no: end to end \d+\.\d\dx the reference's wall time", proc.stdout, re.M
    )


def _result(model, compile, ref_ms, ours_ms, ref_gib=6.0, ours_gib=3.0, first=5.0, e2e=None, eager=None, startup=None):
    r = {
        "device": "NVIDIA H200",
        "date": "2026-11-26",
        "model": model,
        "resolution": 512,
        "batch": 4,
        "mixed_precision": "bf16",
        "compile": compile,
        "reference": {"ms_per_step": ref_ms, "peak_gib": ref_gib},
        "project": {"ms_per_step": ours_ms, "peak_gib": ours_gib, "first_step_s": first},
        "speedup": ref_ms / ours_ms,
    }
    if eager:  # (ms/step, peak GiB, degrees from the default's vectors)
        r.update(
            project_eager={"ms_per_step": eager[0], "peak_gib": eager[1], "first_step_s": 0.4},
            speedup_eager=ref_ms / eager[0],
            graphs_vs_eager_deg=eager[2],
        )
    if e2e:
        r.update(
            e2e_steps=400, e2e_project_s=e2e[1], e2e_startup={"imports": 3.0, "models": 2.0, "total": startup or 6.0}
        )
        if e2e[0]:
            r["e2e_reference_s"] = e2e[0]
    return r


def test_table_checks_each_target_and_says_when_compile_pays():
    from benchmark_training import format_table

    results = [
        _result(
            "sd15",
            compile=False,
            ref_ms=270.0,
            ours_ms=40.0,
            first=9.0,
            e2e=(130.0, 28.0),
            eager=(100.0, 5.2, 0.02),
            startup=7.5,
        ),  # 6.75x, e2e 0.22
        _result(
            "sd15", compile=True, ref_ms=270.0, ours_ms=34.0, first=110.0, e2e=(None, 40.0)
        ),  # compile costs 101 s more, saves 6 ms/step
        _result(
            "sdxl",
            compile=False,
            ref_ms=340.0,
            ours_ms=120.0,
            ref_gib=14.4,
            ours_gib=9.2,
            e2e=(150.0, 65.0),
            eager=(240.0, 13.0, 3.0),
        ),  # 2.83x; memory 0.63
    ]
    table, checks = format_table(results)
    assert table.count("| NVIDIA H200 | 2026-11-26 |") == 5
    assert (
        "| sd15 512px batch 4 bf16 (default) | 270.0 | 40.0 | 6.75x | 6.00 / 3.00 | 9.0 | 7.5 "
        "| 400: 130.0 / 28.0 (0.22) |" in table
    )
    assert "| sd15 512px batch 4 bf16 --cuda_graphs off | 270.0 | 100.0 | 2.70x | 6.00 / 5.20 | 0.4 | - | - |" in table
    assert "400: 130.0 / 40.0 (0.31)" in table  # the compiled run's end to end against the default run's reference
    lines = checks.splitlines()
    assert "PASS sd15 512px batch 4 bf16 (default): 6.75x (target >= 6.0x)" in lines
    assert (
        "PASS sd15 512px batch 4 bf16 (default): peak memory 3.00 GiB, 0.50x the reference's 6.00 GiB (target <= 0.6)"
        in lines
    )
    assert "PASS sd15 512px batch 4 bf16: end to end 0.22x the reference's wall time (target <= 0.3)" in lines
    assert "PASS sd15 512px batch 4 bf16: 400 steps in 28.0 s wall (stretch < 30 s)" in lines
    assert (
        "PASS sd15 512px batch 4 bf16: CUDA graphs and eager learn vectors 0.0200 degrees apart (same seed; limit 0.5)"
        in lines
    )
    assert "PASS sd15 512px batch 4 bf16 --compile: 7.94x (target >= 6.0x)" in lines
    assert "FAIL sdxl 512px batch 4 bf16 (default): 2.83x (target >= 3.0x)" in lines
    assert (
        "FAIL sdxl 512px batch 4 bf16 (default): peak memory 9.20 GiB, 0.64x the reference's 14.40 GiB (target <= 0.6)"
        in lines
    )
    assert (
        "FAIL sdxl 512px batch 4 bf16: CUDA graphs and eager learn vectors 3.0000 degrees apart (same seed; limit 0.5)"
        in lines
    )
    assert "PASS sdxl 512px batch 4 bf16: end to end 0.43x the reference's wall time (target <= 0.4)" not in lines
    assert "FAIL sdxl 512px batch 4 bf16: end to end 0.43x the reference's wall time (target <= 0.4)" in lines
    assert not [
        line for line in lines if "--cuda_graphs off:" in line and "target" in line
    ]  # the eager row is a comparison, not a target
    # compile: 101 s more for 6 ms/step pays after 101 / 0.006 = 16833 steps; the warm second run spends
    # (40 - 13.6) - (28 - 16) = 14.4 s more than the default on start-up: pays after 2400 steps
    pays = [line for line in lines if line.startswith("--compile on sd15")]
    assert pays == [
        "--compile on sd15: compiling costs 101 s more than the default's first step (cold caches) and saves "
        "6.0 ms/step: it pays after 16833 steps; a second run (warm caches) spends 14 s more on start-up than the "
        "default and pays after 2400 steps"
    ]


def test_reference_loop_runs_epoch_after_epoch(tmp_path, monkeypatch):
    """The reference keeps going past the end of its DataLoader, as the script's loop does (end-to-end runs are
    long)."""
    import argparse

    import benchmark_training

    monkeypatch.setattr(benchmark_training, "REFERENCE_REPEATS", 1)  # 5 images, batch 4: 2 batches per epoch
    folder = benchmark_training.build_pipeline("sd15", True, str(tmp_path / "pipeline"))
    images = benchmark_training.make_images(str(tmp_path / "images"), 32)
    args = argparse.Namespace(model="sd15", mixed_precision="no", resolution=32, batch=4)
    result = benchmark_training.reference_run(args, folder, images, steps=5, warmup=1)
    assert result["steps_run"] == 6 and result["ms_per_step"] > 0


def test_two_project_runs_in_one_process_learn_the_same_vectors(tmp_path):
    """How the benchmark times --cuda_graphs beside eager: a second main() in the same process starts afresh
    (accelerate's state reset) and, with the same seed, learns exactly what the first learned."""
    import argparse

    import benchmark_training

    folder = benchmark_training.build_pipeline("sd15", True, str(tmp_path / "pipeline"))
    images = benchmark_training.make_images(str(tmp_path / "images"), 32)
    args = argparse.Namespace(model="sd15", mixed_precision="no", resolution=32, batch=4, compile=False)
    first = benchmark_training.project_run(args, folder, images, 2, 1)
    second = benchmark_training.project_run(
        args, folder, images, 2, 1, "--log_steps", "7"
    )  # a flag that changes no math
    assert first["vectors"].shape == (1, 32)
    torch.testing.assert_close(second["vectors"], first["vectors"], rtol=0, atol=0)


@pytest.mark.parametrize("model", ["sana", "wan"])
def test_family_benchmark_runs_the_authors_step_and_the_script_in_one_process(model, tmp_path, capsys, request):
    """--model sana / wan --tiny on the CPU, in this process: the reproduction of the authors' step (the VAE and the
    full-length text encoding every micro-batch) and the script's own main(), both 2 x 2 images a step."""
    import benchmark_training

    # the session's tiny pipeline where the benchmark looks for the one it would build (it reuses a built one)
    os.symlink(request.getfixturevalue(f"tiny_{model}"), tmp_path / f"pipeline-{model}-tiny")
    out = tmp_path / "results.json"
    argv = [
        "--tiny",
        "--model",
        model,
        "--steps",
        "2",
        "--warmup",
        "1",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    ]
    results = benchmark_training.main(argv)
    assert json.loads(out.read_text())["model"] == model
    assert (results["resolution"], results["batch"], results["reference"]["steps_run"]) == (32, 2, 3)
    for loop in ("reference", "project"):
        assert results[loop]["ms_per_step"] > 0
    assert results["speedup"] == pytest.approx(results["reference"]["ms_per_step"] / results["project"]["ms_per_step"])
    assert "reference (the authors' step):" in capsys.readouterr().out


@pytest.mark.subprocess
def test_gpu_checks_run_in_tiny_mode_and_pass(tmp_path):
    """benchmarks/gpu_checks.sh, what a GPU session runs before a release, here on tiny pipelines on the CPU: every
    check but the capture (SD bf16 with validation, checkpoint and a resume; SDXL fp16 validation; bf16 on the GPU)."""
    env = subprocess_env(PYTHON=sys.executable, DTI_BENCH_WORKDIR=str(tmp_path / "work"))
    proc = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu_checks.sh"), str(tmp_path / "out"), "--tiny"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "all checks passed" in lines and not [line for line in lines if line.startswith("FAIL")]
    passed = [line for line in lines if line.startswith("PASS")]
    results = json.loads((tmp_path / "out" / "checks.json").read_text())
    assert results["failures"] == 0 and len(results["checks"]) == len(passed)
    (resume,) = [c for c in results["checks"] if c["name"] == "sd15 bf16 resume"]
    # half precision on a CPU: not bitwise reproducible across processes on every CPU, so a bound of a tenth of a
    # step's turn (0.04 rad); a resume that lost state ends a whole step (2.3 degrees) or more away.
    assert (
        resume["ok"] and resume["limit"] == pytest.approx(0.2292, abs=1e-4) and 0 <= resume["value"] <= resume["limit"]
    )
    validated = [line[5:].split(":")[0] for line in passed if "validation images, none black or flat" in line]
    assert validated == ["sd15 bf16", "sd15 bf16, first half", "sd15 bf16, resumed", "sdxl fp16"]
    assert not [line for line in passed if "captured" in line]  # no CUDA here: the capture checks are GPU-only
    assert (tmp_path / "out" / "checks.txt").read_text().splitlines() == lines
