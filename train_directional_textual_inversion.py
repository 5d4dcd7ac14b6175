#!/usr/bin/env python
"""Directional Textual Inversion for Stable Diffusion 1.x/2.x: a drop-in for diffusers' textual_inversion.py.

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
import random
from concurrent.futures import ThreadPoolExecutor

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from PIL import ImageOps

from dti_utils import (
    DTIError,
    DTITrainer,
    LearnedVectors,
    TrainingData,
    add_placeholder_tokens,
    add_training_args,
    check_args,
    diffusion_loss,
    image_to_tensor,
    load_training_images,
    logger,
    push_output_to_hub,
    resolve_token_scale,
    resolve_tokens,
    run_main,
    square_view,
    vocabulary_norm_stats,
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

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if args.seed is None:  # one random seed for all processes, stored in checkpoints for exact resume
        args.seed = broadcast_object_list([random.randrange(2**31)])[0]
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- 1. Load models --
    from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    model = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(**model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(**model, subfolder="text_encoder", variant=args.variant)
    vae = AutoencoderKL.from_pretrained(**model, subfolder="vae", variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(**model, subfolder="unet", variant=args.variant)
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # The text encoder stays float32: the learned rows pass through it and their gradient must not be rounded.
    text_encoder.to(accelerator.device)
    vae.to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
        text_encoder.gradient_checkpointing_enable()
        text_encoder.train()

    # -- 2. Add the placeholder tokens; only their vectors are trainable --
    vocab_weight = text_encoder.get_input_embeddings().weight
    original_vocab_size = vocab_weight.shape[0]
    norm = resolve_token_scale(args.token_scale, vocabulary_norm_stats(vocab_weight)) if args.optimizer == "rsgd" else None
    token_ids = add_placeholder_tokens(tokenizer, text_encoder, tokens)
    concept = LearnedVectors(text_encoder, tokens, token_ids, init_ids, original_vocab_size, mode="dti" if args.optimizer == "rsgd" else "ti", norm=norm)

    # -- 3. Data: every view encoded once, prompts tokenized once --
    def views(image):
        square = square_view(image, args.resolution, args.center_crop)
        return [image_to_tensor(square)] + ([image_to_tensor(ImageOps.mirror(square))] if args.flip_p > 0 else [])

    with ThreadPoolExecutor(max(args.dataloader_num_workers, 1)) as pool:
        image_views = list(pool.map(views, images))
    placeholder_string = " ".join(tokens)
    data = TrainingData.build(image_views, vae, [tokenizer], placeholder_string, args.learnable_property, args.repeats, args.flip_p, args.seed, accelerator.device)

    # -- 4. Train --
    def compute_loss(batch, generator):
        encoder_hidden_states = text_encoder(batch["input_ids"][0])[0]
        return diffusion_loss(unet, noise_scheduler, batch, encoder_hidden_states, generator, vae.config.scaling_factor, weight_dtype)

    def make_pipeline():
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    if accelerator.is_main_process:
        accelerator.init_trackers("directional_textual_inversion", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    trainer = DTITrainer(accelerator, args, [concept], [tokenizer], data, compute_loss, make_pipeline, weight_dtype)
    trainer.fit()
    trainer.finish()

    # -- 5. Save and push --
    if accelerator.is_main_process:
        if args.save_as_full_pipeline:
            concept.remove_hook()  # fold the vectors into the embedding rows
            pipeline = StableDiffusionPipeline.from_pretrained(**model, text_encoder=text_encoder, vae=vae, unet=unet, tokenizer=tokenizer)
            pipeline.save_pretrained(args.output_dir, safe_serialization=not args.no_safe_serialization)
        if args.push_to_hub:
            push_output_to_hub(args, [concept], trainer.validation_images)
        logger.info(f"Done: {os.path.join(args.output_dir, 'learned_embeds.safetensors')} ({len(tokens)} vector(s), norm {concept.vectors().norm(dim=-1).mean().item():.6f})")
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main, parse_args())
