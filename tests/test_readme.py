"""The README: its commands are the ones CI runs, its offline smoke run and its first command work as written, and its
code uses current diffusers arguments."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import run_inprocess


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(heading):
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_ci_runs_the_readme_install_lint_and_test_commands():
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"))]
    install, lint, test = readme_block("Run the tests")
    assert install in ci and lint in ci and test in ci
    assert ci.index(install) < ci.index(lint) < ci.index(test)
    assert "python3 -m venv .ci-venv" in ci
    assert "ruff" in install.split() and lint == "ruff check . && ruff format --check ."


def test_no_torchvision_anywhere():
    for folder, _, files in os.walk(ROOT):
        if any(part.startswith(".") for part in folder.split(os.sep)):
            continue
        for name in files:
            if name.endswith(".py"):
                source = open(os.path.join(folder, name)).read()
                assert not re.search(r"^\s*(import|from)\s+torchvision", source, re.M), name
    assert "torchvision" not in open(os.path.join(ROOT, "requirements.txt")).read().split("No torchvision")[0]


def test_readme_uses_dtype_not_the_deprecated_torch_dtype():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "torch_dtype" not in readme
    assert "dtype=torch.float16" in readme


def test_one_gpu_training_commands_run_with_python_so_an_error_is_one_line():
    """Before: the README's commands ran under `accelerate launch`, which follows the script's one `error:` line with
    its own CalledProcessError traceback and exit code 1. Now every training command in a code block runs with
    python (one line and exit 2 through that entry point: test_flags.py), but for the Multi-GPU section's, which
    says what accelerate adds and how --quiet leaves the line alone."""
    text = open(os.path.join(ROOT, "README.md")).read()
    launches = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = section.splitlines()[0]
        for block in re.findall(r"```(?:bash)?\n(.*?)```", section, re.S):
            for before, script in re.findall(r"(\S+) (train_directional_textual_inversion\w*\.py)", block):
                launches.append((heading, before, script))
    scripts = {script for _, _, script in launches}
    assert {f"train_directional_textual_inversion{s}.py" for s in ("", "_sdxl", "_sana", "_wan")} <= scripts
    for heading, before, script in launches:
        if heading == "Multi-GPU":
            assert before.isdigit(), script  # accelerate launch --num_processes N script
        else:
            assert before.endswith("python"), (heading, before, script)
    multi_gpu = text.split("## Multi-GPU", 1)[1].split("\n## ", 1)[0]
    assert "CalledProcessError" in multi_gpu and "accelerate launch --quiet" in multi_gpu


@pytest.mark.subprocess
def test_smoke_run_as_written(tmp_path):
    # what a user has after a clone: every top-level module (new ones included) and tools/
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))) + [os.path.join(ROOT, "tools")]:
        os.symlink(path, tmp_path / os.path.basename(path))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    for command in readme_block("Smoke run: offline, on a CPU, in under a minute"):
        result = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        if "make_tiny_pipeline" in command:  # before: about 50 FutureWarnings and notices
            assert result.stderr == "", result.stderr[-3000:]
    assert "generated smoke-output/toy.png" in result.stdout
    vectors = load_file(tmp_path / "smoke-output" / "learned_embeds.safetensors")["<toy>"]
    assert vectors.shape == (1, 32)
    assert (tmp_path / "smoke-output" / "toy.png").stat().st_size > 0
    assert len(list((tmp_path / "smoke-output" / "validation").glob("*.png"))) == 1


def test_main_command_trains_on_a_folder_laid_out_like_the_cat_toy_example(tiny_sd, tmp_path):
    """The README's first command names the public example dataset; run as written (but for the tiny model, the size
    and the step count) on a local folder with that dataset's layout, through the same `datasets` image-folder
    path."""
    install, launch = readme_block("Install and train")[0].split(" && ")
    assert install == "pip install -r requirements.txt"
    argv = shlex.split(launch)
    assert argv[:2] == ["python", "train_directional_textual_inversion.py"]
    at = argv.index("--dataset_name") + 1
    assert argv[at] == "diffusers/cat_toy_example"
    # the dataset repository: six JPEG photos at its top level, and a .gitattributes
    data = tmp_path / "cat_toy_example"
    data.mkdir()
    (data / ".gitattributes").write_text("*.jpeg filter=lfs diff=lfs merge=lfs -text\n")
    for i in range(6):
        Image.new("RGB", (48 + 8 * i, 40), (30 * i, 120, 200 - 20 * i)).save(data / f"{i + 1}.jpeg")
    argv[at] = str(data)
    out = tmp_path / "out"
    result = run_inprocess(
        argv[2:]
        + [
            "--pretrained_model_name_or_path",
            tiny_sd,
            "--resolution",
            "32",
            "--max_train_steps",
            "1",
            "--output_dir",
            out,
            "--cache_dir",
            tmp_path / "cache",
            "--report_to",
            "none",
            "--num_validation_images",
            "1",
            "--num_validation_inference_steps",
            "1",
            "--crop_positions",
            "2",
        ]
    )
    assert result.data.num_images == 6
    assert load_file(out / "learned_embeds.safetensors")["<cat-toy>"].shape == (1, 32)


def test_the_readme_quotes_the_benchmark_results_kept_in_the_repository():
    """Every results folder holds the raw JSON of its rows, and the README quotes its table as the JSON gives it."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    folders = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*")))
    assert folders
    for folder in folders:
        rows = [
            line for line in open(os.path.join(folder, "table.md")).read().splitlines() if line.startswith("| NVIDIA")
        ]
        assert rows and all(row in readme for row in rows)
        assert f"benchmarks/results/{os.path.basename(folder)}/" in readme
        for name in ("sd15.json", "sdxl.json"):
            result = json.load(open(os.path.join(folder, name)))
            ours = f"{result['project']['ms_per_step']:.1f} | {result['speedup']:.2f}x"
            assert any(ours in row for row in rows), (name, ours)
