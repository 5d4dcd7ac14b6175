#!/usr/bin/env python
"""Step time and memory of DTI training against diffusers' textual-inversion recipe, on one GPU, offline.

Full-size SD1.5 or SDXL architectures are built from the configs below (SANA1.5 1.6B and Wan 2.1 1.3B from those in
benchmark_families.py) with random weights (step time does not depend on weight values), saved to a work folder,
and trained on generated images. In one process:

  (a) reference: what diffusers' textual_inversion.py does each step: a PIL dataset decoding, resizing and
      flipping images through a DataLoader and tokenizing there, VAE encode every step, the whole
      vocabulary matrix trainable with AdamW, frozen rows copied back, the loss read back every step (SANA and Wan:
      the authors' step, benchmark_families.family_reference_run: the VAE every step, the full 300/512-token
      text encoding);
  (b) this project: the training script's own main(), timed through its public callback (called after every
      optimizer step), so the timed code is the loop users run.

Then, optionally, both end to end as fresh processes for --e2e_steps steps, start-up included.

    python benchmarks/benchmark_training.py --model sd15 --eager_row --e2e_steps 400   # 512 px, batch 4, bf16
    python benchmarks/benchmark_training.py --model sdxl --eager_row --e2e_steps 400   # 1024 px, batch 1, bf16
    python benchmarks/benchmark_training.py --model sd15 --compile --e2e_steps 400 --no_e2e_reference
    python benchmarks/benchmark_training.py --model sana   # SANA1.5 1.6B, 1024 px, batch 2 x 2, bf16 (authors' recipe)
    python benchmarks/benchmark_training.py --model wan    # Wan 2.1 1.3B, 512 px one-frame videos, batch 2 x 2, bf16
    python benchmarks/benchmark_training.py --table OUT/*.json   # the README table and a check per target
    python benchmarks/benchmark_training.py --tiny            # CPU, tiny configs: keeps this file working in CI

benchmarks/gpu_benchmarks.sh runs the first three and the table in one command.
"""

import argparse
import gc
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmark_families import build_family_pipeline, family_reference_run  # beside this file: on sys.path


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "sd15": "train_directional_textual_inversion.py",
    "sdxl": "train_directional_textual_inversion_sdxl.py",
    "sana": "train_directional_textual_inversion_sana.py",
    "wan": "train_directional_textual_inversion_wan.py",
}
FAMILIES = ("sana", "wan")  # transformer models: benchmark_families.py
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 64,
}
SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def build_pipeline(model, tiny, folder):
    """Write a random-weight pipeline of the real architecture (or a tiny one) to `folder`."""
    import make_tiny_pipeline as tiny_tools

    if model in FAMILIES:
        return build_family_pipeline(model, tiny, folder)
    if tiny:
        (tiny_tools.make_tiny_sdxl if model == "sdxl" else tiny_tools.make_tiny_sd)(folder)
        return folder
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    ):  # random init on the GPU is seconds, not minutes
        if model == "sdxl":
            parts = {
                "unet": UNet2DConditionModel(**SDXL_UNET),
                "vae": AutoencoderKL(**VAE, scaling_factor=0.13025, force_upcast=True, sample_size=1024),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            }
        else:
            parts = {
                "unet": UNet2DConditionModel(**SD15_UNET),
                "vae": AutoencoderKL(**VAE, scaling_factor=0.18215, sample_size=512),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            }
    parts = {k: v.half() for k, v in parts.items()}  # halves the write; the scripts cast what they load
    scheduler_args = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
    }
    if model == "sdxl":
        tokenizers = {"tokenizer": tiny_tools.tiny_clip_tokenizer(), "tokenizer_2": tiny_tools.tiny_clip_tokenizer()}
        pipe = StableDiffusionXLPipeline(**parts, **tokenizers, scheduler=EulerDiscreteScheduler(**scheduler_args))
    else:
        pipe = StableDiffusionPipeline(
            **parts,
            tokenizer=tiny_tools.tiny_clip_tokenizer(),
            scheduler=DDPMScheduler(**scheduler_args, clip_sample=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder)
    return folder


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def gib_text(gib):
    return f"{gib:.2f}" if gib == gib else "n/a"  # nan on the CPU: no GPU memory to measure


def peak_text(gib):
    return f"peak {gib_text(gib)} GiB" if gib == gib else "peak: GPU only"


def reset_peak():
    # The previous loop's models sit in reference cycles (closures, trainer): collect them first, or they count here.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class StepTimer:
    """Per-step wall times from CUDA events (no host sync inside the timed loop), or perf_counter on CPU."""

    def __init__(self):
        self.marks = []

    def mark(self):
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def median_ms(self):
        cuda_sync()
        if torch.cuda.is_available():
            times = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        else:
            times = [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]
        return statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# (a) The reference: diffusers' textual_inversion(_sdxl).py step, reproduced
# ----------------------------------------------------------------------------------------------------


REFERENCE_REPEATS = 100  # diffusers' --repeats default


def reference_run(args, folder, images_dir, steps, warmup):
    if args.model in FAMILIES:
        timer = StepTimer()
        step = family_reference_run(
            args, folder, images_dir, steps, warmup, timer=timer, measure=lambda: (cuda_sync(), reset_peak())
        )
        return {"ms_per_step": timer.median_ms(), "peak_gib": peak_gib(), "steps_run": step}
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dti_data import OBJECT_TEMPLATES as imagenet_templates_small

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    sdxl = args.model == "sdxl"
    subs = [("tokenizer", "text_encoder")] + ([("tokenizer_2", "text_encoder_2")] if sdxl else [])
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=t) for t, _ in subs]
    encoders = [
        (CLIPTextModelWithProjection if e == "text_encoder_2" else CLIPTextModel).from_pretrained(
            folder, subfolder=e, dtype=torch.float32
        )
        for _, e in subs
    ]
    vae = (
        AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float32 if sdxl else dtype)
        .to(device)
        .requires_grad_(False)
    )
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype).to(device).requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    params, keep_rows = [], []
    for tokenizer, encoder in zip(tokenizers, encoders):
        tokenizer.add_tokens(["<ref>"])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[-1] = weight[tokenizer.encode("toy", add_special_tokens=False)[0]]
        encoder.requires_grad_(False).to(device)
        weight.requires_grad_(True)  # the whole vocabulary matrix trains, as in diffusers
        params.append(weight)
        keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
        keep[tokenizer.convert_tokens_to_ids("<ref>")] = False
        keep_rows.append((weight, weight.detach().clone(), keep))
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    res = args.resolution

    class PILDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.paths = sorted(os.path.join(images_dir, n) for n in os.listdir(images_dir))

        def __len__(self):
            return len(self.paths) * REFERENCE_REPEATS

        def __getitem__(self, i):
            image = Image.open(self.paths[i % len(self.paths)]).convert("RGB")
            original = (image.height, image.width)
            image = image.resize((res, res), resample=Image.Resampling.BICUBIC)
            if torch.rand(()) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            text = imagenet_templates_small[int(torch.randint(len(imagenet_templates_small), ()))].format("<ref>")
            ids = [
                tok(
                    text, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt"
                ).input_ids[0]
                for tok in tokenizers
            ]
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            return {
                "pixel_values": pixels,
                "input_ids": ids,
                "time_ids": torch.tensor([*original, 0, 0, res, res], dtype=torch.float32),
            }

    loader = torch.utils.data.DataLoader(PILDataset(), batch_size=args.batch, shuffle=True, num_workers=0)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch, as the script's loop does
    timer, reset_done = StepTimer(), False
    for step, batch in enumerate(batches):
        if step == warmup and not reset_done:
            cuda_sync()
            reset_peak()
            reset_done = True
        if step >= warmup:
            timer.mark()
        if step == warmup + steps:
            break
        latents = (
            vae.encode(batch["pixel_values"].to(device, dtype=vae.dtype)).latent_dist.sample()
            * vae.config.scaling_factor
        )
        latents = latents.to(dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(
            device.type, dtype=dtype, enabled=dtype != torch.float32
        ):  # accelerate autocasts the prepared encoder
            outs = [enc(ids.to(device), output_hidden_states=True) for enc, ids in zip(encoders, batch["input_ids"])]
        if sdxl:
            hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1).to(dtype)
            added = {"text_embeds": outs[1].text_embeds.to(dtype), "time_ids": batch["time_ids"].to(device, dtype)}
        else:
            hidden, added = outs[0][0].to(dtype), None
        pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for weight, original, keep in keep_rows:
                weight[keep] = original[keep]
        loss.item()  # diffusers logs the loss every step: a device->host sync
    return {"ms_per_step": timer.median_ms(), "peak_gib": peak_gib(), "steps_run": step}


# ----------------------------------------------------------------------------------------------------
# (b) This project: the script's own main(), its steps timed from the callback it calls after each one
# ----------------------------------------------------------------------------------------------------


def script_argv(args, folder, images_dir, output_dir, steps, *extra):
    argv = [
        "--pretrained_model_name_or_path",
        folder,
        "--train_data_dir",
        images_dir,
        "--output_dir",
        output_dir,
        "--placeholder_token",
        "<dti>",
        "--initializer_token",
        "toy",
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.batch),
        "--max_train_steps",
        str(steps),
        "--report_to",
        "none",
        "--seed",
        "0",
        "--checkpointing_steps",
        "100000",
        "--save_steps",
        "100000",
        "--log_steps",
        "50",
        "--allow_tf32",  # as the reference runs (main() turns TF32 on for the whole process)
    ]
    if args.mixed_precision != "no":
        argv += ["--mixed_precision", args.mixed_precision]
    if args.compile:
        argv += ["--compile"]
    return argv + list(extra)


def project_run(args, folder, images_dir, steps, warmup, *extra):
    """main() of the training script for warmup + steps steps; the median step time of the last `steps`."""
    module = importlib.import_module(SCRIPTS[args.model].removesuffix(".py"))
    result, timer = {}, StepTimer()

    def callback(step, embeddings, **state):
        if step == 1:
            cuda_sync()
            result["first_step_end"] = time.perf_counter()
        if step == warmup:
            cuda_sync()
            reset_peak()
        if step >= warmup:
            timer.mark()
        if step == warmup + steps:
            result.update(ms_per_step=timer.median_ms(), peak_gib=peak_gib())
            result["vectors"] = torch.cat([e.vectors().detach().float().cpu() for e in embeddings], dim=-1)

    with tempfile.TemporaryDirectory() as out:
        run = module.main(
            module.parse_args(script_argv(args, folder, images_dir, out, warmup + steps, *extra)), callback
        )
    result["first_step_s"] = result.pop("first_step_end") - run.startup["at"]  # includes the capture or the compile
    # In process, "imports" (from the process's start) would count the reference loop too: left out.
    result["startup"] = {k: v for k, v in run.startup.items() if k not in ("at", "imports")}
    return result


def end_to_end(args, folder, images_dir, steps, reference):
    """(wall seconds of a fresh process training `steps` steps, start-up included; the project's start-up phases)."""
    with tempfile.TemporaryDirectory() as out:
        if reference:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--reference_only",
                "--model",
                args.model,
                "--resolution",
                str(args.resolution),
                "--batch",
                str(args.batch),
                "--mixed_precision",
                args.mixed_precision,
                "--steps",
                str(steps),
                "--warmup",
                "0",
                "--workdir",
                args.workdir,
            ]
            cmd += ["--tiny"] if args.tiny else []
        else:
            cmd = [
                sys.executable,
                os.path.join(ROOT, SCRIPTS[args.model]),
                *script_argv(args, folder, images_dir, out, steps),
            ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
    startup = re.search(r"Start-up: (.*); ([0-9.]+) s to the first step", proc.stderr)
    phases = {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", startup.group(1))} if startup else {}
    if startup:
        phases["total"] = float(startup.group(2))
    return wall, phases


def make_images(folder, resolution, count=5):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(
        count
    ):  # photo-sized JPEGs, as users have: decoding and resizing them is part of the reference's step
        size = (max(resolution, 1024) + 64 * i, max(resolution, 768))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(folder, f"img{i}.jpg"), quality=90
        )
    return folder


TARGETS = {  # steady-state speed-up over the reference with the default configuration (issues 11, 19, 20)
    ("sd15", False): 6.0,
    ("sd15", True): 6.0,
    ("sdxl", False): 3.0,
    ("sana", False): 1.5,
    ("wan", False): 2.0,
}
E2E_TARGETS = {"sd15": 0.3, "sdxl": 0.4}  # 400 steps end to end, start-up included, against the reference's wall time
E2E_STRETCH_S = {"sd15": 30.0}  # 400 SD1.5 steps in under 30 s of wall time (on an H100)
MEMORY_TARGETS = {"sd15": 0.6, "sdxl": 0.6, "sana": 1.0}  # peak memory against the reference's
GRAPHS_AGREEMENT_DEG = 0.5  # eager and CUDA graphs, same seed and steps: floating-point noise only


def format_table(results):
    """The README's Performance table (Markdown) and a line per target, from the --json files of one GPU."""
    rows = [
        "| GPU | date | setting | reference ms/step | DTI ms/step | speed-up | peak GiB ref / DTI | first step s | "
        "start-up s | end to end, steps: ref / DTI s (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    default = {r["model"]: r for r in results if not r["compile"]}
    for r in results:
        ref = r["reference"]
        setting = f"{r['model']} {r['resolution']}px batch {r['batch']} {r['mixed_precision']}"
        setting += " --compile" if r["compile"] else ""
        e2e = "-"
        if r.get("e2e_project_s"):
            ref_s = r.get("e2e_reference_s") or default.get(r["model"], {}).get("e2e_reference_s")
            ratio = r["e2e_project_s"] / ref_s if ref_s else float("nan")
            given = (
                "*"
                if (r if r.get("e2e_reference_s") else default.get(r["model"], {})).get("e2e_reference_given")
                else ""
            )
            e2e = (
                f"{r['e2e_steps']}: {ref_s:.1f}{given} / {r['e2e_project_s']:.1f} ({ratio:.2f})"
                if ref_s
                else f"{r['e2e_steps']}: - / {r['e2e_project_s']:.1f}"
            )
            if ref_s and not r["compile"] and r["model"] in E2E_TARGETS:
                target = E2E_TARGETS[r["model"]]
                checks.append(
                    f"{'PASS' if ratio <= target else 'FAIL'} {setting}: end to end {ratio:.2f}x the reference's wall "
                    f"time (target <= {target})"
                )
            if not r["compile"] and r["model"] in E2E_STRETCH_S and r["e2e_steps"] == 400:
                limit = E2E_STRETCH_S[r["model"]]
                checks.append(
                    f"{'PASS' if r['e2e_project_s'] < limit else 'FAIL'} {setting}: 400 steps in "
                    f"{r['e2e_project_s']:.1f} s wall (stretch < {limit:.0f} s)"
                )
        target = TARGETS.get((r["model"], r["compile"]))
        startup = r.get("e2e_startup", {}).get("total")
        # One row per timed variant, each against the same process's reference: the default first, then eager.
        # (name, timings, speed-up, start-up cell, end-to-end cell, degrees from the other variant's vectors or None,
        # checked)
        variants = [
            (
                setting + (" (default)" if not r["compile"] else ""),
                r["project"],
                r["speedup"],
                f"{startup:.1f}" if startup else "-",
                e2e,
                None,
                True,
            )
        ]
        if r.get("project_eager"):
            variants.append(
                (
                    f"{setting} --cuda_graphs off",
                    r["project_eager"],
                    r["speedup_eager"],
                    "-",
                    "-",
                    r["graphs_vs_eager_deg"],
                    False,
                )
            )
        for name, ours, speedup, startup_cell, e2e_cell, apart, checked in variants:
            rows.append(
                f"| {r['device']} | {r['date']} | {name} | {ref['ms_per_step']:.1f} | {ours['ms_per_step']:.1f} | "
                f"{speedup:.2f}x | {gib_text(ref['peak_gib'])} / {gib_text(ours['peak_gib'])} | "
                f"{ours['first_step_s']:.1f} | "
                f"{startup_cell} | {e2e_cell} |"
            )
            if apart is not None:
                checks.append(
                    f"{'PASS' if apart < GRAPHS_AGREEMENT_DEG else 'FAIL'} {setting}: CUDA graphs and eager learn "
                    f"vectors {apart:.4f} degrees apart (same seed; limit {GRAPHS_AGREEMENT_DEG})"
                )
            if not checked:
                continue
            if target:
                checks.append(
                    f"{'PASS' if speedup >= target else 'FAIL'} {name}: {speedup:.2f}x (target >= {target}x)"
                )
            memory_target = MEMORY_TARGETS.get(r["model"])
            if ref["peak_gib"] == ref["peak_gib"] and memory_target:  # nan on the CPU: no GPU memory to compare
                ratio = ours["peak_gib"] / ref["peak_gib"]
                checks.append(
                    f"{'PASS' if ratio <= memory_target else 'FAIL'} {name}: peak memory {ours['peak_gib']:.2f} GiB, "
                    f"{ratio:.2f}x the reference's {ref['peak_gib']:.2f} GiB (target <= {memory_target})"
                )
    for r in results:
        base = default.get(r["model"])
        if not r["compile"] or base is None:
            continue
        saved_ms = base["project"]["ms_per_step"] - r["project"]["ms_per_step"]
        cold = r["project"]["first_step_s"] - base["project"]["first_step_s"]
        line = (
            f"--compile on {r['model']}: compiling costs {cold:.0f} s more than the default's first step (cold "
            f"caches) and saves {saved_ms:.1f} ms/step"
        )
        if saved_ms > 0:
            line += f": it pays after {cold / saved_ms * 1000:.0f} steps"
            if r.get("e2e_project_s") and base.get("e2e_project_s"):  # a second run: persistent caches warm
                steps = r["e2e_steps"]
                warm = (r["e2e_project_s"] - steps * r["project"]["ms_per_step"] / 1000) - (
                    base["e2e_project_s"] - steps * base["project"]["ms_per_step"] / 1000
                )
                pays = max(warm, 0) / saved_ms * 1000
                line += (
                    f"; a second run (warm caches) spends {warm:.0f} s more on start-up than the default and pays "
                    f"after {pays:.0f} steps"
                )
        checks.append(line)
    if any(r.get("e2e_reference_given") for r in results):
        rows.append(
            "\n\\* the reference's end-to-end time was measured earlier on the same GPU kind with the same reference "
            "code (--e2e_reference_s)."
        )
    return "\n".join(rows), "\n".join(checks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SCRIPTS), default="sd15")
    parser.add_argument(
        "--tiny", action="store_true", help="Tiny configs on the CPU (a smoke test of this file, not a measurement)."
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Default 512 (sd15, wan), 1024 (sdxl, sana), 32 (tiny)."
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="Default 4 (sd15), 1 (sdxl), 2 (sana, wan: x 2 accumulation)."
    )
    parser.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="Default bf16 on a GPU, no on the CPU."
    )
    parser.add_argument("--steps", type=int, default=30, help="Timed steps after warm-up.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="Time the project's step with --compile.")
    parser.add_argument(
        "--eager_row",
        action="store_true",
        help="Also time the project with --cuda_graphs off (a second row) and compare its vectors with the default's.",
    )
    parser.add_argument(
        "--e2e_steps", type=int, default=0, help="Also time both end to end for this many steps (0: skip)."
    )
    parser.add_argument(
        "--workdir", default=None, help="Where the random pipeline and images are written (reused if present)."
    )
    parser.add_argument("--json", default=None, help="Write the results to this file.")
    parser.add_argument(
        "--no_e2e_reference",
        action="store_true",
        help="End to end: time the project only (the reference's time is taken from the default run's JSON in "
        "--table).",
    )
    parser.add_argument(
        "--e2e_reference_s",
        type=float,
        default=None,
        help="End to end: the reference's wall time measured earlier on the same GPU kind, used instead of timing it "
        "(marked * in the table).",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="Print the README table and the target checks from these --json files, and exit.",
    )
    parser.add_argument("--reference_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        results = []
        for path in args.table:
            with open(path) as f:
                results.append(json.load(f))
        table, checks = format_table(results)
        print(table + "\n\n" + checks)
        return results
    gpu = torch.cuda.is_available()
    args.resolution = args.resolution or (32 if args.tiny else 1024 if args.model in ("sdxl", "sana") else 512)
    args.batch = args.batch or {"sdxl": 1, "sana": 2, "wan": 2}.get(args.model, 4)
    args.mixed_precision = args.mixed_precision or ("bf16" if gpu else "no")
    args.workdir = args.workdir or os.path.join(tempfile.gettempdir(), "dti-bench")
    folder = os.path.join(
        args.workdir, f"pipeline-{args.model}{'-tiny' if args.tiny else ''}"
    )  # one work folder can serve every stage
    images_dir = os.path.join(args.workdir, f"images-{args.resolution}")
    if args.compile and not args.reference_only:
        # A fresh compile cache: the in-process run compiles cold, the end-to-end run after it (a child process,
        # same cache) is the second run on this machine that users get.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(
            prefix="compile-cache-", dir=os.makedirs(args.workdir, exist_ok=True) or args.workdir
        )
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        start = time.perf_counter()
        build_pipeline(args.model, args.tiny, folder)
        print(
            f"built a random {args.model}{' tiny' if args.tiny else ''} pipeline in "
            f"{time.perf_counter() - start:.1f}s",
            file=sys.stderr,
        )
    make_images(images_dir, args.resolution)
    if args.reference_only:
        reference_run(args, folder, images_dir, args.steps, args.warmup)
        return 0

    import accelerate
    import diffusers
    import transformers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    versions.update(transformers=transformers.__version__, accelerate=accelerate.__version__)
    print(" ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    results = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        **versions,
        "model": args.model,
        "tiny": args.tiny,
        "resolution": args.resolution,
        "batch": args.batch,
        "mixed_precision": args.mixed_precision,
        "compile": args.compile,
        "date": time.strftime("%Y-%m-%d"),
    }
    results["reference"] = reference_run(args, folder, images_dir, args.steps, args.warmup)
    reset_peak()  # frees the reference's models before the project loads its own
    results["project"] = project_run(args, folder, images_dir, args.steps, args.warmup)
    results["speedup"] = results["reference"]["ms_per_step"] / results["project"]["ms_per_step"]
    if args.eager_row and not gpu:
        print("--eager_row: not timed, there is no CUDA GPU (the default is eager there)", file=sys.stderr)
    elif args.eager_row:
        reset_peak()
        results["project_eager"] = project_run(
            args, folder, images_dir, args.steps, args.warmup, "--cuda_graphs", "off"
        )
        results["speedup_eager"] = results["reference"]["ms_per_step"] / results["project_eager"]["ms_per_step"]
        # Same seed, data and steps: the learned directions must agree up to floating-point noise.
        cosine = F.cosine_similarity(results["project"]["vectors"], results["project_eager"]["vectors"], dim=-1).clamp(
            -1, 1
        )
        results["graphs_vs_eager_deg"] = float(torch.rad2deg(torch.arccos(cosine)).max())
    for key in ("project", "project_eager"):
        results.get(key, {}).pop("vectors", None)
    if args.e2e_steps:  # with --compile the in-process run above filled the persistent caches: this is a second run
        results["e2e_steps"] = args.e2e_steps
        results["e2e_project_s"], results["e2e_startup"] = end_to_end(
            args, folder, images_dir, args.e2e_steps, reference=False
        )
        if args.e2e_reference_s:
            results.update(e2e_reference_s=args.e2e_reference_s, e2e_reference_given=True)
        elif not args.no_e2e_reference:
            results["e2e_reference_s"] = end_to_end(args, folder, images_dir, args.e2e_steps, reference=True)[0]
        if results.get("e2e_reference_s"):
            results["e2e_ratio"] = results["e2e_project_s"] / results["e2e_reference_s"]
    ref, ours = results["reference"], results["project"]
    print(
        f"{results['device']} | {args.model} {args.resolution}px batch {args.batch} "
        f"{args.mixed_precision}{' --compile' if args.compile else ''}"
    )
    label = "reference (the authors' step):" if args.model in FAMILIES else "reference (diffusers recipe): "
    print(f"  {label} {ref['ms_per_step']:8.1f} ms/step  {peak_text(ref['peak_gib'])}")
    print(
        f"  this project:                 {ours['ms_per_step']:8.1f} ms/step  {peak_text(ours['peak_gib'])}  (first "
        f"step {ours['first_step_s']:.1f}s)"
    )
    print(f"  speed-up a/b: {results['speedup']:.2f}x")
    print(f"  start-up (in process): {', '.join(f'{k} {v:.1f} s' for k, v in ours['startup'].items())}")
    if "project_eager" in results:
        eager = results["project_eager"]
        print(
            f"  --cuda_graphs off:            {eager['ms_per_step']:8.1f} ms/step  {peak_text(eager['peak_gib'])}  "
            f"(first step {eager['first_step_s']:.1f}s)  speed-up {results['speedup_eager']:.2f}x"
        )
        print(
            f"  CUDA graphs vs eager: learned vectors {results['graphs_vs_eager_deg']:.4f} degrees apart after "
            f"{args.warmup + args.steps} steps"
        )
    if args.e2e_steps:
        print(
            f"  end to end, {args.e2e_steps} steps: project {results['e2e_project_s']:.1f}s (start-up "
            f"{results['e2e_startup']})"
            + (
                f", reference {results['e2e_reference_s']:.1f}s, ratio {results['e2e_ratio']:.2f}"
                if "e2e_ratio" in results
                else ""
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
