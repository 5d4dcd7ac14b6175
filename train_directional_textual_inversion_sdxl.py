#!/usr/bin/env python
r"""Directional Textual Inversion for SDXL, on both text encoders: a drop-in for diffusers' textual_inversion_sdxl.py.

    accelerate launch train_directional_textual_inversion_sdxl.py \
      --train_data_dir ./cat_toy --placeholder_token "<cat-toy>" --initializer_token toy \
      --mixed_precision bf16 --output_dir cat-toy-dti-sdxl

Each encoder gets its own fixed norm m (its own vocabulary statistic) and its own prior direction (its own
initializer rows); only the directions are trained, in float32 whatever --mixed_precision says. Outputs:
learned_embeds.safetensors (text_encoder), learned_embeds_2.safetensors (text_encoder_2) and one
{"clip_l", "clip_g"} file for AUTOMATIC1111, ComfyUI and kohya.
"""

import argparse
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

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
    embedding_slug,
    freeze_models,
    load_training_images,
    resolve_tokens,
    run_main,
    setup_accelerator,
)

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser, default_model=DEFAULT_MODEL, default_resolution=768, default_flip_p=0.0)
    parser.add_argument("--crop_positions", type=int, default=8,
                        help="Random crop: the crop is drawn from this many evenly spaced positions along the long side, "
                             "each encoded by the VAE once (ignored with --center_crop).")
    args = check_args(parser.parse_args(argv))
    if args.crop_positions < 1:
        raise DTIError(f"--crop_positions must be at least 1, not {args.crop_positions}.")
    return args


def load_tokenizers(args):
    from transformers import CLIPTokenizer

    try:
        return [CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder=sub, revision=args.revision, cache_dir=args.cache_dir)
                for sub in ("tokenizer", "tokenizer_2")]
    except OSError as e:
        raise DTIError(f"Could not load the two tokenizers of {args.pretrained_model_name_or_path!r} ({e}); pass an SDXL diffusers folder or Hub id.")


def resized_shorter_side(image, resolution):
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    return image.resize(size, resample=Image.Resampling.BICUBIC)


def crop_positions(image, resolution, center_crop, positions):
    """(top, left) crop corners: the centre, or `positions` evenly spaced along the long side."""
    free_y, free_x = image.height - resolution, image.width - resolution
    if center_crop or (free_x == 0 and free_y == 0):
        return [(free_y // 2, free_x // 2)]
    fractions = [i / max(positions - 1, 1) for i in range(positions)] if positions > 1 else [0.5]
    return [(round(free_y * f), round(free_x * f)) for f in fractions]


def encode_prompt(text_encoders, input_ids):
    """SDXL conditioning, as StableDiffusionXLPipeline.encode_prompt computes it: hidden_states[-2] of both
    encoders concatenated, and encoder 2's pooled projection. The pooled output is the encoder's own, so
    training sees exactly what inference sees after load_textual_inversion, including configs whose
    eos_token_id is 2 (they pool at argmax(input_ids), which is the added placeholder token)."""
    out_1 = text_encoders[0](input_ids[0], output_hidden_states=True)
    out_2 = text_encoders[1](input_ids[1], output_hidden_states=True)
    hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return hidden, out_2.text_embeds


def main(args):
    # -- Checks that need no model: tokens and images fail here, before gigabytes load. --
    tokenizers = load_tokenizers(args)
    resolved = [resolve_tokens(tok, args.placeholder_token, args.initializer_token, args.num_vectors) for tok in tokenizers]
    tokens = resolved[0][0]
    if len(resolved[1][1]) != len(tokens):
        raise DTIError(f"--initializer_token {args.initializer_token!r} gives {len(tokens)} and {len(resolved[1][1])} tokens in the two tokenizers; use a one-token initializer with --num_vectors.")
    images = load_training_images(args.train_data_dir, args.dataset_name, args.dataset_config_name, args.image_column, args.cache_dir)

    accelerator, weight_dtype = setup_accelerator(args, "directional_textual_inversion_sdxl")

    # -- 1. Load models --
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(**model, subfolder="scheduler")
    # Loaded straight in the dtypes they train in (no float32 copy of the UNet on the way): text encoders float32.
    text_encoders = [
        CLIPTextModel.from_pretrained(**model, subfolder="text_encoder", variant=args.variant, torch_dtype=torch.float32),
        CLIPTextModelWithProjection.from_pretrained(**model, subfolder="text_encoder_2", variant=args.variant, torch_dtype=torch.float32),
    ]
    vae = AutoencoderKL.from_pretrained(**model, subfolder="vae", variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(**model, subfolder="unet", variant=args.variant, torch_dtype=weight_dtype)
    freeze_models(args, accelerator, weight_dtype, unet, vae, text_encoders)
    train_unet = compile_for_training(args, unet)

    # -- 2. Add the placeholder tokens to both encoders; each has its own norm and prior --
    concepts = [
        add_concept(args, tokenizers[0], text_encoders[0], tokens, resolved[0][1], "text_encoder", "learned_embeds"),
        add_concept(args, tokenizers[1], text_encoders[1], tokens, resolved[1][1], "text_encoder_2", "learned_embeds_2"),
    ]

    # -- 3. Data: every crop position of every image encoded once, with its own SDXL time ids --
    with ThreadPoolExecutor(max(args.dataloader_num_workers, 1)) as pool:
        resized = list(pool.map(lambda image: resized_shorter_side(image, args.resolution), images))
    res = args.resolution

    def crop(image, corner):
        top, left = corner
        return image.crop((left, top, left + res, top + res))

    views, view_index, keys = build_views(resized, crop, lambda image: crop_positions(image, res, args.center_crop, args.crop_positions), flip=args.flip_p > 0)
    # time ids = original size (h, w) + crop top-left + target size, per view: a short last batch needs no padding
    time_ids = torch.tensor([[images[i].height, images[i].width, top, left, res, res] for i, _, (top, left) in keys], dtype=torch.float32)
    data = TrainingData.build(views, view_index, vae, tokenizers, " ".join(tokens), args.learnable_property, args.repeats, args.flip_p, args.seed,
                              accelerator.device, extra={"time_ids": time_ids})

    # -- 4. Train --
    def compute_loss(batch, generator):
        hidden, pooled = encode_prompt(text_encoders, batch["input_ids"])
        added_cond_kwargs = {"text_embeds": pooled.to(weight_dtype), "time_ids": batch["time_ids"].to(weight_dtype)}
        return diffusion_loss(train_unet, noise_scheduler, batch, hidden, generator, vae.config.scaling_factor, weight_dtype,
                              shift_factor=getattr(vae.config, "shift_factor", None), added_cond_kwargs=added_cond_kwargs)

    def make_pipeline():
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
            unet=unet, scheduler=EulerDiscreteScheduler.from_config(noise_scheduler.config),
        )

    trainer = DTITrainer(accelerator, args, concepts, tokenizers, data, compute_loss, make_pipeline, weight_dtype,
                         combined_file=(embedding_slug(args.placeholder_token), ["clip_l", "clip_g"]))
    trainer.fit()
    trainer.finish()

    # -- 5. Save and push --
    def load_full_pipeline():
        return StableDiffusionXLPipeline.from_pretrained(**model, vae=vae, unet=unet, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1])

    trainer.publish(load_full_pipeline, sdxl=True)


if __name__ == "__main__":
    run_main(main, parse_args)
