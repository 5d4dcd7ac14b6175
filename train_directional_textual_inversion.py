#!/usr/bin/env python
r"""Directional Textual Inversion for Stable Diffusion 1.x/2.x: a drop-in for diffusers' textual_inversion.py.

    accelerate launch train_directional_textual_inversion.py \
      --train_data_dir ./cat_toy --placeholder_token "<cat-toy>" --initializer_token toy \
      --output_dir cat-toy-dti --validation_prompt "a <cat-toy> in a Japanese modern city street"

The learned vectors keep a fixed in-distribution norm m (the vocabulary's mean norm by default) and only their
direction is trained, by Riemannian SGD with a von Mises-Fisher prior (arXiv 2512.13672). The output loads with
`pipe.load_textual_inversion(output_dir)`. `--optimizer adamw` runs classic textual inversion for comparison.
"""

import argparse
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from dti_utils import (
    DTIError,
    DTITrainer,
    TrainingData,
    add_concept,
    add_training_args,
    build_views,
    check_args,
    compile_for_training,
    diffusion_loss,
    freeze_models,
    load_training_images,
    resolve_tokens,
    run_main,
    setup_accelerator,
    square_view,
)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, default_model=DEFAULT_MODEL, default_resolution=512, default_flip_p=0.5)
    parser.add_argument("--tokenizer_name", default=None, help="Tokenizer name or path, if not the model's own.")
    return check_args(parser.parse_args(argv))


def load_tokenizer(args):
    from transformers import CLIPTokenizer

    source = args.tokenizer_name or args.pretrained_model_name_or_path
    try:
        return CLIPTokenizer.from_pretrained(source, subfolder=None if args.tokenizer_name else "tokenizer", revision=args.revision, cache_dir=args.cache_dir)
    except OSError as e:
        raise DTIError(f"Could not load a tokenizer from {source!r} ({e}); check --pretrained_model_name_or_path (a diffusers folder or Hub id) or --tokenizer_name.")


def main(args):
    # -- Checks that need no model: tokens and images fail here, before gigabytes load. --
    tokenizer = load_tokenizer(args)
    tokens, init_ids = resolve_tokens(tokenizer, args.placeholder_token, args.initializer_token, args.num_vectors)
    images = load_training_images(args.train_data_dir, args.dataset_name, args.dataset_config_name, args.image_column, args.cache_dir)

    accelerator, weight_dtype = setup_accelerator(args, "directional_textual_inversion")

    # -- 1. Load models --
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    model = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(**model, subfolder="scheduler")
    # Loaded straight in the dtypes they train in (no float32 copy of the UNet on the way): text encoder float32.
    text_encoder = CLIPTextModel.from_pretrained(**model, subfolder="text_encoder", variant=args.variant, torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(**model, subfolder="vae", variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(**model, subfolder="unet", variant=args.variant, torch_dtype=weight_dtype)
    freeze_models(args, accelerator, weight_dtype, unet, vae, [text_encoder])
    train_unet = compile_for_training(args, unet)

    # -- 2. Add the placeholder tokens; only their vectors are trainable --
    concept = add_concept(args, tokenizer, text_encoder, tokens, init_ids)

    # -- 3. Data: every view encoded once, prompts tokenized once --
    with ThreadPoolExecutor(max(args.dataloader_num_workers, 1)) as pool:
        squares = list(pool.map(lambda image: square_view(image, args.resolution, args.center_crop), images))
    views, view_index, _ = build_views(squares, lambda image, crop: image, lambda image: [None], flip=args.flip_p > 0)
    data = TrainingData.build(views, view_index, vae, [tokenizer], " ".join(tokens), args.learnable_property, args.repeats, args.flip_p, args.seed, accelerator.device)

    # -- 4. Train --
    def compute_loss(batch, generator):
        encoder_hidden_states = text_encoder(batch["input_ids"][0])[0]
        return diffusion_loss(train_unet, noise_scheduler, batch, encoder_hidden_states, generator, vae.config.scaling_factor, weight_dtype)

    def make_pipeline():
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    trainer = DTITrainer(accelerator, args, [concept], [tokenizer], data, compute_loss, make_pipeline, weight_dtype)
    trainer.fit()
    trainer.finish()

    # -- 5. Save and push --
    def load_full_pipeline():
        return StableDiffusionPipeline.from_pretrained(**model, text_encoder=text_encoder, vae=vae, unet=unet, tokenizer=tokenizer)

    trainer.publish(load_full_pipeline)


if __name__ == "__main__":
    run_main(main, parse_args)
