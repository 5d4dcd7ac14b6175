#!/usr/bin/env python
"""Real-path checks before a release: the training scripts as users run them (fresh processes), with assertions.

  SD1.5  fp16 (GradScaler on a GPU; bf16 in --tiny), CUDA graphs (the default), validation at the half and at the
         end, a checkpoint at the half; the same run stopped at the half and resumed must end where the uninterrupted
         run ends.
  SDXL   bf16, CUDA graphs, validation; and an fp16 validation (the VAE kept float32): images finite, not black.
  Every run: exit 0, no traceback, the saved vectors at each encoder's vocabulary mean norm m; on CUDA the UNet
  captured once, with no AccumulateGrad stream warning and no eager fallback.

    bash benchmarks/gpu_checks.sh OUT               # full-size random SD1.5 and SDXL, on a GPU (about 3 minutes)
    python benchmarks/gpu_checks.py --tiny --out OUT  # tiny pipelines on the CPU (CI): everything but the capture

Prints one PASS/FAIL line per check and writes OUT/checks.json (each check's value and limit); the exit code is the
number of failures.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tools")]

from benchmark_training import build_pipeline, make_images  # noqa: E402


SCRIPTS = {"sd15": "train_directional_textual_inversion.py", "sdxl": "train_directional_textual_inversion_sdxl.py"}
CAPTURED = "Captured the UNet's training forward and backward as CUDA graphs"
STEP_RAD = 0.04  # the default effective learning rate: each step turns the vectors by 0.04 rad


def resume_limit_degrees(precision):
    """How far a resumed run may end from the uninterrupted one. float32: exact up to float rounding. fp16/bf16: a
    tenth of one step's turn. Half-precision CPU kernels are not bitwise reproducible from one process to the next on
    every CPU (0.028 degrees after 4 tiny steps on one AMD EPYC, 0.0000 on another and on an H100), while a resume that
    lost state (the optimizer's, the schedule's, the data position) ends a whole step or more away."""
    return 1e-4 if precision == "no" else 0.1 * float(np.degrees(STEP_RAD))


class Checks:
    """Prints one PASS/FAIL line per check and keeps every check, with its measured value and limit where it has
    them, for checks.json: whoever reads the results compares numbers, never printed text."""

    def __init__(self):
        self.failures, self.results = 0, []

    def __call__(self, ok, text, name=None, value=None, limit=None):
        print(f"{'PASS' if ok else 'FAIL'} {text}", flush=True)
        self.failures += not ok
        self.results.append({"name": name or text, "ok": bool(ok), "value": value, "limit": limit, "text": text})
        return ok


def vocabulary_mean_norm(pipeline, encoder):
    """The mean L2 norm of the encoder's non-zero vocabulary rows, read from its weight file (not through
    dti_utils)."""
    weights = {}
    for path in glob.glob(os.path.join(pipeline, encoder, "*.safetensors")):
        weights.update(load_file(path))
    (key,) = [k for k in weights if k.endswith("token_embedding.weight")]
    norms = weights[key].double().norm(dim=-1)
    return float(norms[norms > 0].mean())


def train(model, pipeline, images, out, *flags):
    argv = [
        sys.executable,
        os.path.join(ROOT, SCRIPTS[model]),
        "--pretrained_model_name_or_path",
        pipeline,
        "--train_data_dir",
        images,
        "--output_dir",
        out,
        "--placeholder_token",
        "<dti>",
        "--initializer_token",
        "toy",
        "--seed",
        "0",
        "--report_to",
        "none",
        "--num_validation_images",
        "2",
        "--save_steps",
        "100000",
        *map(str, flags),
    ]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    return proc, time.perf_counter() - start


def check_run(checks, name, proc, seconds, model, pipeline, out, cuda, validations):
    if not checks(
        proc.returncode == 0 and "Traceback" not in proc.stderr,
        f"{name}: exit 0 without a traceback ({seconds:.0f} s)",
    ):
        print(proc.stderr[-4000:])
        return None
    if cuda:
        checks(
            proc.stderr.count(CAPTURED) == 1 and "training eagerly" not in proc.stderr,
            f"{name}: the UNet was captured once as CUDA graphs",
        )
        checks("AccumulateGrad" not in proc.stderr, f"{name}: no AccumulateGrad stream warning")
    vectors = []
    for stem, encoder in (("learned_embeds", "text_encoder"), ("learned_embeds_2", "text_encoder_2"))[
        : 2 if model == "sdxl" else 1
    ]:
        v = load_file(os.path.join(out, f"{stem}.safetensors"))["<dti>"]
        m = vocabulary_mean_norm(pipeline, encoder)
        checks(
            bool(torch.isfinite(v).all())
            and torch.allclose(v.double().norm(dim=-1), torch.tensor(m, dtype=torch.float64), rtol=1e-5),
            f"{name}: {encoder} vectors at the vocabulary mean norm {m:.4f}",
        )
        vectors.append(v)
    pictures = sorted(glob.glob(os.path.join(out, "validation", "*.png")))
    stats = [(float(np.asarray(Image.open(p)).std()), int(np.asarray(Image.open(p)).max())) for p in pictures]
    checks(
        len(pictures) == 2 * validations and all(std > 1.0 and top > 0 for std, top in stats),
        f"{name}: {len(pictures)} validation images, none black or flat (std "
        f"{min((s for s, _ in stats), default=0):.1f} and up)",
    )
    return vectors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for the runs' outputs.")
    parser.add_argument(
        "--workdir",
        default=None,
        help="Where the random pipelines and images are written (shared with the benchmark).",
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny pipelines on the CPU: every check but the capture.")
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    workdir = args.workdir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "dti-bench")
    checks = Checks()
    for model in args.models:
        pipeline = os.path.join(workdir, f"pipeline-{model}{'-tiny' if args.tiny else ''}")
        if not os.path.exists(os.path.join(pipeline, "model_index.json")):
            build_pipeline(model, args.tiny, pipeline)
        resolution = 32 if args.tiny else 512 if model == "sd15" else 768
        images = make_images(os.path.join(workdir, f"images-{resolution}"), resolution)
        size = ["--resolution", resolution, "--num_validation_inference_steps", 2 if args.tiny else 10]
        if model == "sd15":
            steps = 4 if args.tiny else 20
            # fp16 exercises the GradScaler on a GPU; on a CPU accelerate uses none and fp16 kernels are emulated
            # (about 20x slower than bf16 here), so the tiny CPU run checks the same path in bf16.
            sd = "bf16" if args.tiny else "fp16"
            common = [
                *size,
                "--mixed_precision",
                sd,
                "--train_batch_size",
                4,
                "--validation_prompt",
                "a photo of <dti>",
                "--validation_steps",
                steps // 2,
                "--checkpointing_steps",
                steps // 2,
            ]
            full, half = os.path.join(args.out, "sd15-full"), os.path.join(args.out, "sd15-resumed")
            proc, seconds = train(model, pipeline, images, full, *common, "--max_train_steps", steps)
            uninterrupted = check_run(checks, f"sd15 {sd}", proc, seconds, model, pipeline, full, cuda, validations=2)
            proc, seconds = train(model, pipeline, images, half, *common, "--max_train_steps", steps // 2)
            check_run(checks, f"sd15 {sd}, first half", proc, seconds, model, pipeline, half, cuda, validations=1)
            proc, seconds = train(
                model,
                pipeline,
                images,
                half,
                *common,
                "--max_train_steps",
                steps,
                "--resume_from_checkpoint",
                "latest",
            )
            resumed = check_run(
                checks, f"sd15 {sd}, resumed", proc, seconds, model, pipeline, half, cuda, validations=2
            )
            if uninterrupted and resumed:
                degrees = float(
                    torch.rad2deg(
                        torch.arccos(torch.nn.functional.cosine_similarity(uninterrupted[0], resumed[0]).clamp(-1, 1))
                    ).max()
                )
                limit = resume_limit_degrees(sd)
                checks(
                    degrees <= limit,
                    f"sd15 {sd}: the resumed run ends {degrees:.4f} degrees from the uninterrupted one (limit "
                    f"{limit:.3f})",
                    name=f"sd15 {sd} resume",
                    value=degrees,
                    limit=limit,
                )
        else:
            steps = 2 if args.tiny else 10
            # bf16 is the recipe; fp16 keeps the VAE float32 (force_upcast). On the CPU (--tiny) the SD runs above
            # already check bf16, so only the fp16 validation runs here.
            for precision in ("fp16",) if args.tiny else ("bf16", "fp16"):
                out = os.path.join(args.out, f"sdxl-{precision}")
                proc, seconds = train(
                    model,
                    pipeline,
                    images,
                    out,
                    *size,
                    "--mixed_precision",
                    precision,
                    "--train_batch_size",
                    1,
                    "--max_train_steps",
                    steps,
                    "--validation_prompt",
                    "a photo of <dti>",
                    "--validation_steps",
                    100000,
                )
                check_run(checks, f"sdxl {precision}", proc, seconds, model, pipeline, out, cuda, validations=1)
    print(f"{checks.failures} check(s) failed" if checks.failures else "all checks passed")
    with open(os.path.join(args.out, "checks.json"), "w") as f:
        json.dump(
            {"tiny": args.tiny, "cuda": cuda, "failures": checks.failures, "checks": checks.results}, f, indent=2
        )
    return checks.failures


if __name__ == "__main__":
    sys.exit(main())
