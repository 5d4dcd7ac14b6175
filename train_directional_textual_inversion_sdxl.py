#!/usr/bin/env python
r"""Directional Textual Inversion for SDXL, on both text encoders: a drop-in for diffusers' textual_inversion_sdxl.py.

    python train_directional_textual_inversion_sdxl.py \
      --train_data_dir ./cat_toy --placeholder_token "<cat-toy>" --initializer_token toy \
      --mixed_precision bf16 --output_dir cat-toy-dti-sdxl

Each encoder gets its own fixed norm m (its own vocabulary statistic) and its own prior direction (its own
initializer rows); only the directions are trained, in float32 whatever --mixed_precision says. Outputs:
learned_embeds.safetensors (text_encoder), learned_embeds_2.safetensors (text_encoder_2) and one
{"clip_l", "clip_g"} file for AUTOMATIC1111, ComfyUI and kohya.
"""

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import diffusers
import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import check_min_version
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import dti_cli as cli
import dti_data as data_lib
import dti_files as files
import dti_training as training
from dti_graphs import unet_for_training
from dti_hub import create_hub_repo
from dti_utils import DTIError, RiemannianSGD, add_directional_embedding, resolve_tokens
from dti_validation import Validation, plot_training_curves


check_min_version("0.42.0")
logger = get_logger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_training_args(parser, default_model=DEFAULT_MODEL, default_resolution=768, default_flip_p=0.0)
    args = cli.check_args(parser.parse_args(argv))
    if args.learning_rate is None:
        args.learning_rate = cli.DEFAULT_LEARNING_RATES[args.optimizer]
    return args


def encode_prompt(text_encoders, input_ids):
    """SDXL conditioning, as StableDiffusionXLPipeline.encode_prompt computes it: hidden_states[-2] of both encoders
    concatenated, and encoder 2's pooled projection. The pooled output is the encoder's own, so training sees exactly
    what inference sees after load_textual_inversion, including configs whose eos_token_id is 2 (they pool at
    argmax(input_ids), which is the added placeholder token)."""
    out_1 = text_encoders[0](input_ids[0], output_hidden_states=True)
    out_2 = text_encoders[1](input_ids[1], output_hidden_states=True)
    return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2.text_embeds


def main(args, callback=None):
    """Train; returns a namespace with the step reached, the embeddings, the optimizer, the data and the files.
    `callback(step, loss=..., finite=..., embeddings=..., optimizer=...)` runs after every optimizer step."""
    timer = training.StartupTimer()
    model = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "cache_dir": args.cache_dir,
    }
    cli.check_model(args.pretrained_model_name_or_path, "sdxl", args.revision, args.cache_dir)
    cli.check_variant(
        args.pretrained_model_name_or_path, args.variant, ("unet", "vae", "text_encoder", "text_encoder_2")
    )
    session = training.training_session(
        output_dir=args.output_dir,
        logging_dir=args.logging_dir,
        mixed_precision=args.mixed_precision,
        report_to=args.report_to,
    )
    with session as (accelerator, stop):
        # -- Checks that need no model: output folder, tokens, resume, images; they fail here, before gigabytes load --
        if accelerator.is_main_process:
            cli.prepare_output_dir(
                args.output_dir,
                resuming=args.resume_from_checkpoint is not None,
                overwrite=args.overwrite_output_dir,
            )
        tokenizers = [CLIPTokenizer.from_pretrained(**model, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
        resolved = [
            resolve_tokens(
                tok,
                args.placeholder_token,
                args.initializer_token,
                num_vectors=args.num_vectors,
                allow_multi_token=args.allow_multi_token_initializer,
            )
            for tok in tokenizers
        ]
        tokens = resolved[0][0]
        if len(resolved[1][1]) != len(tokens):
            raise DTIError(
                f"--initializer_token {args.initializer_token!r} gives {len(tokens)} and {len(resolved[1][1])} tokens "
                "in the two tokenizers; use a one-token initializer with --num_vectors."
            )
        if tokens[0] != args.placeholder_token:  # written as the tokenizer reads it (resolve_tokens warned)
            if args.validation_prompt:
                args.validation_prompt = args.validation_prompt.replace(args.placeholder_token, tokens[0])
            args.placeholder_token = tokens[0]
        images = data_lib.load_training_images(
            train_data_dir=args.train_data_dir,
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            image_column=args.image_column,
            cache_dir=args.cache_dir,
            caption_column=args.caption_column,
        )
        data_lib.warn_small_images(images, args.resolution)
        data_lib.check_prompts(
            tokenizers,
            images,
            tokens,
            learnable_property=args.learnable_property,
            caption_token=args.caption_token,
        )
        epoch = training.steps_per_epoch(
            num_images=len(images),
            repeats=args.repeats,
            batch_size=args.train_batch_size,
            num_processes=accelerator.num_processes,
            accumulation=args.gradient_accumulation_steps,
        )
        if args.max_train_steps is None:  # whole epochs with --num_train_epochs, else the recipe's 400 steps
            args.max_train_steps = args.num_train_epochs * epoch if args.num_train_epochs else 400
        if args.validation_epochs is not None:  # diffusers' deprecated flag, in steps
            args.validation_steps = args.validation_epochs * epoch
            logger.warning(f"--validation_epochs is deprecated; validating every {args.validation_steps} steps.")
        checkpoint_path, checkpoint = training.find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is not None:  # the checkpoint's seed continues its data order and noise
            args.seed = training.check_resume(
                checkpoint_path,
                checkpoint,
                flags=vars(args),
                family="sdxl",
                tokens=tokens,
                init_ids=[ids for _, ids in resolved],
                num_processes=accelerator.num_processes,
            )
        args.seed = cli.resolve_seed(args.seed)  # drawn and logged when not given
        if args.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        cli.init_trackers(
            accelerator,
            "directional_textual_inversion_sdxl",
            config=vars(args),
            validation_prompt=args.validation_prompt,
            placeholder_token=args.placeholder_token,
        )
        hub_repo = None
        if args.push_to_hub and accelerator.is_main_process:  # made now: a bad token fails before training
            name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            hub_repo = create_hub_repo(name, token=args.hub_token, private=args.hub_private)
        timer.mark("checks")

        # -- 1. Load the models, each straight in the dtype it runs in: the text encoders float32 (the learned rows'
        #       gradients flow through them), the UNet in the mixed-precision dtype, the VAE too unless it must be
        #       float32 --
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        noise_scheduler = DDPMScheduler.from_pretrained(**model, subfolder="scheduler")
        text_encoder = CLIPTextModel.from_pretrained(
            **model, subfolder="text_encoder", variant=args.variant, dtype=torch.float32
        )
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            **model, subfolder="text_encoder_2", variant=args.variant, dtype=torch.float32
        )
        text_encoders = [text_encoder, text_encoder_2]
        vae_config = SimpleNamespace(**AutoencoderKL.load_config(**model, subfolder="vae"))
        vae_dtype = training.vae_dtype(vae_config, weight_dtype)
        vae = AutoencoderKL.from_pretrained(**model, subfolder="vae", variant=args.variant, dtype=vae_dtype)
        unet = UNet2DConditionModel.from_pretrained(
            **model, subfolder="unet", variant=args.variant, dtype=weight_dtype
        )
        training.freeze_models(
            unet,
            vae,
            text_encoders,
            device=accelerator.device,
            xformers=args.enable_xformers_memory_efficient_attention,
            gradient_checkpointing=args.gradient_checkpointing,
        )

        # Validation renders with the models in memory (the placeholder's directional embeddings included, once they
        # are installed). The pipeline class is read from diffusers' lazy module, not imported at the top: importing a
        # pipeline makes transformers announce, for image processors these scripts never use, that torchvision is
        # missing, and the session's filter (quiet_library_notices) is on now. With --evaluate_steps the scoring
        # models load now (their weights at the first score).
        def make_pipeline():
            return diffusers.StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizers[0],
                tokenizer_2=tokenizers[1],
                unet=unet,
                scheduler=EulerDiscreteScheduler.from_config(noise_scheduler.config),
            )

        validation = Validation(
            make_pipeline,
            accelerator,
            prompt=args.validation_prompt,
            num_images=args.num_validation_images,
            num_inference_steps=args.num_validation_inference_steps,
            every=args.validation_steps,
            seed=args.seed,
            weight_dtype=weight_dtype,
            output_dir=args.output_dir,
            stop=stop,
            evaluate_steps=args.evaluate_steps,
            evaluation_models=args.evaluation_models,
            reference_images=[im.image for im in images],
            placeholder_token=args.placeholder_token,
            class_word=args.initializer_token,
            cache_dir=args.cache_dir,
        )
        timer.mark("models")

        # -- 2. Add the placeholder tokens to both encoders and install their directional embeddings, each with its
        #       own norm m and prior: the tokens get m * v, only v trains --
        embeddings = [
            add_directional_embedding(
                tok,
                encoder,
                tokens,
                init_ids,
                token_scale=args.token_scale,
                classic=args.optimizer == "adamw",
                name=name,
            )
            for tok, encoder, (_, init_ids), name in zip(tokenizers, text_encoders, resolved, files.ENCODERS)
        ]

        # -- 3. Data: every crop position of every image (and its mirror) VAE-encoded once, with its own SDXL time
        #       ids; the prompts (templates and captions) tokenized once --
        res = args.resolution
        with ThreadPoolExecutor(max(args.dataloader_num_workers, 1)) as pool:
            resized = list(pool.map(lambda image: data_lib.resized_shorter_side(image.image, res), images))
        keys, view_index, means, stds = data_lib.cache_views(
            vae,
            resized,
            resolution=res,
            center_crop=args.center_crop,
            positions=args.crop_positions,
            flip=args.flip_p > 0,
            device=accelerator.device,
        )
        # time ids = original size (h, w) + crop top-left + target size, per view; a mirrored view's crop starts from
        # the other side
        time_ids = [
            [images[i].image.height, images[i].image.width, top, resized[i].width - res - left if mirrored else left]
            + [res, res]
            for i, mirrored, (top, left) in keys
        ]
        time_ids = torch.tensor(time_ids, dtype=torch.float32, device=accelerator.device)
        prompt_ids, caption_rows = data_lib.training_prompts(
            tokenizers,
            images,
            tokens,
            learnable_property=args.learnable_property,
            device=accelerator.device,
            caption_token=args.caption_token,
        )
        data = data_lib.TrainingData(
            means,
            stds,
            view_index,
            prompt_ids,
            repeats=args.repeats,
            flip_p=args.flip_p,
            seed=args.seed,
            extra={"time_ids": time_ids},
            caption_rows=caption_rows,
            caption_dropout=args.caption_dropout,
        )
        timer.mark("latents")

        # -- 4. The optimizer. DTI: Riemannian SGD on both encoders' directions, each with the vMF prior toward its
        #       own initializer rows. Classic TI (--optimizer adamw): AdamW on the free embeddings. --
        params = [e.param for e in embeddings]
        lr = training.scaled_learning_rate(
            args.learning_rate,
            scale_lr=args.scale_lr,
            batch_size=args.train_batch_size,
            accumulation=args.gradient_accumulation_steps,
            num_processes=accelerator.num_processes,
        )
        if args.optimizer == "rsgd":
            optimizer = RiemannianSGD(params, lr=lr, kappa=args.kappa, beta=args.rsgd_beta)
        else:  # fused: skips a non-finite step on the device, like RiemannianSGD
            optimizer = torch.optim.AdamW(
                params,
                lr=lr,
                betas=(args.adam_beta1, args.adam_beta2),
                weight_decay=args.adam_weight_decay,
                eps=args.adam_epsilon,
                fused=True,
            )

        # -- 5. Resume: the directions and the optimizer's state; the flags of this run govern --
        global_step, history = 0, []
        if checkpoint is not None:
            global_step, history = training.restore_training_state(
                checkpoint_path, checkpoint, embeddings, optimizer, scaler=accelerator.scaler
            )
        # Not prepared by accelerate, so it steps once per optimizer step whatever the number of processes; a resumed
        # schedule starts at the checkpoint's step.
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=args.max_train_steps,
            num_cycles=args.lr_num_cycles,
            last_epoch=global_step - 1,
        )
        optimizer = accelerator.prepare(optimizer)  # fp16 loss scaling; the gradients are averaged by hand (a few KB)
        train_unet = unet_for_training(
            unet,
            cuda_graphs=args.cuda_graphs,
            compile=args.compile,
            gradient_checkpointing=args.gradient_checkpointing,
        )

        # The files the main process writes: embeddings (with how they were made), checkpoints, the upload.
        run_files = training.RunFiles(
            args.output_dir,
            embeddings,
            family="sdxl",
            token=args.placeholder_token,
            base_model=args.pretrained_model_name_or_path,
            initializer_token=args.initializer_token,
            token_scale=args.token_scale,
            kappa=args.kappa,
            seed=args.seed,
            optimizer=optimizer,
            scaler=accelerator.scaler,
            history=history,
            flags={**vars(args), "num_processes": accelerator.num_processes},
            resumed=checkpoint,
            init_ids=[ids for _, ids in resolved],
            safe_serialization=not args.no_safe_serialization,
            checkpoints_total_limit=args.checkpoints_total_limit,
        )
        stop.save_on_abort = lambda: run_files.save(global_step)  # an error or a second Ctrl-C: keep what was learned

        # -- 6. The training loop --
        training.log_run_start(
            data,
            embeddings,
            batch_size=args.train_batch_size,
            num_processes=accelerator.num_processes,
            accumulation=args.gradient_accumulation_steps,
            optimizer=args.optimizer,
            learning_rate=lr,
            steps=args.max_train_steps,
            seed=args.seed,
        )
        startup = timer.report()
        window = training.LossWindow(args.log_steps, accelerator.device)
        progress = tqdm(
            range(args.max_train_steps),
            initial=global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        accum, rank, world = args.gradient_accumulation_steps, accelerator.process_index, accelerator.num_processes
        while global_step < args.max_train_steps:
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accum):
                micro_step = global_step * accum + micro
                batch = data.batch(micro_step, args.train_batch_size, world, rank)
                hidden, pooled = encode_prompt(text_encoders, batch["input_ids"])  # the placeholder rows are m * v
                time_ids = batch["time_ids"].to(weight_dtype)
                loss = data_lib.diffusion_loss(
                    train_unet,
                    noise_scheduler,
                    batch,
                    hidden,
                    generator=data_lib.step_generator(args.seed, micro_step, rank, accelerator.device),
                    vae_config=vae.config,
                    weight_dtype=weight_dtype,
                    added_cond_kwargs={"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids},
                )
                loss = loss / accum
                accelerator.backward(loss)
                step_loss = step_loss + loss.detach()
            training.average_gradients(accelerator, params)
            finite = training.guard_nonfinite_step(optimizer, step_loss, params)  # skipped on the device: no sync
            optimizer.step()  # <- the embedding update: each v turns along its sphere and stays unit (rsgd), or e
            lr_scheduler.step()  #    moves freely (adamw)
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            window.add(step_loss, finite)
            if callback is not None:
                callback(global_step, loss=step_loss, finite=finite, embeddings=embeddings, optimizer=optimizer)

            last = global_step == args.max_train_steps
            synced = window.due(last)
            if synced:  # one device->host read every --log_steps steps: progress bar, trackers, history
                window.report(
                    global_step,
                    accelerator,
                    embeddings,
                    output_dir=args.output_dir,
                    lr=optimizer.param_groups[0]["lr"],
                    history=history,
                    progress=progress,
                )
            if accelerator.is_main_process:
                if global_step % args.save_steps == 0:
                    run_files.save(global_step, suffix=f"-steps-{global_step}")
                if global_step % args.checkpointing_steps == 0:
                    run_files.checkpoint(global_step)
                if validation.due(global_step, last):  # images, nearest tokens and, with --evaluate_steps, scores
                    validation.run(global_step, embeddings, tokenizers)
            if stop.check(accelerator, synced):
                break
        progress.close()

        # -- 7. Final files, validation and push --
        accelerator.wait_for_everyone()
        result = SimpleNamespace(
            global_step=global_step,
            embeddings=embeddings,
            optimizer=optimizer,
            data=data,
            history=history,
            files=[],
            startup=startup,
            weight_dtype=weight_dtype,
            unet=unet,
            exit_code=128 + stop.signum if stop.requested else 0,
        )
        if accelerator.is_main_process:
            stop.save_on_abort = None  # the final save rescues the embedding itself if it cannot be written
            result.files = run_files.save(global_step)
            if not stop.requested:
                plot_training_curves(history, f"{args.output_dir}/training_curves.png")
                validation.run(global_step, embeddings, tokenizers, final=True)
            if stop.requested:  # before or during the final validation
                run_files.stopped(global_step)
                result.exit_code = 128 + stop.signum
                return result
            if args.save_as_full_pipeline:
                for encoder, e in zip(text_encoders, embeddings):
                    encoder.set_input_embeddings(e.fold())
                pipeline = diffusers.StableDiffusionXLPipeline.from_pretrained(
                    **model,
                    text_encoder=text_encoder,
                    text_encoder_2=text_encoder_2,
                    vae=vae,
                    unet=unet,
                    tokenizer=tokenizers[0],
                    tokenizer_2=tokenizers[1],
                )
                pipeline.save_pretrained(args.output_dir, safe_serialization=not args.no_safe_serialization)
            if hub_repo:
                run_files.push(
                    hub_repo,
                    hub_token=args.hub_token,
                    push_checkpoints=args.push_checkpoints,
                    image_paths=validation.images,
                    steps=args.max_train_steps,
                    validation_prompt=args.validation_prompt,
                    details={
                        "images": len(images),
                        "steps": global_step,
                        "learning rate": f"{lr:g} (batch {args.train_batch_size} x {accum} x {world})",
                        "resolution": args.resolution,
                        "mixed precision": accelerator.mixed_precision,
                        "optimizer": args.optimizer,
                        "seed": args.seed,
                    },
                )
            run_files.done(result.files)
        return result


if __name__ == "__main__":
    raise SystemExit(cli.run_cli(main, parse_args))
