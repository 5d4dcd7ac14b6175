#!/usr/bin/env python
r"""Directional Textual Inversion for Stable Diffusion 1.x/2.x: a drop-in for diffusers' textual_inversion.py.

    python train_directional_textual_inversion.py \
      --dataset_name diffusers/cat_toy_example --placeholder_token "<cat-toy>" --initializer_token toy \
      --output_dir cat-toy-dti --validation_prompt "a <cat-toy> in a Japanese modern city street"

The learned vectors keep a fixed in-distribution norm m (the vocabulary's mean norm by default) and only their
direction is trained, by Riemannian SGD with a von Mises-Fisher prior (arXiv 2512.13672). The output loads with
`pipe.load_textual_inversion(output_dir)`. `--optimizer adamw` runs classic textual inversion for comparison.

Images keep their aspect ratio (shorter side resized to the model's resolution, square crops along the longer side);
a NAME.txt beside NAME.jpg is that image's caption (see --caption_token).
"""

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import diffusers
import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import check_min_version
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

import dti_cli as cli
import dti_data as data_lib
import dti_training as training
from dti_graphs import unet_for_training
from dti_hub import create_hub_repo
from dti_utils import RiemannianSGD, add_directional_embedding, resolve_tokens
from dti_validation import Validation, plot_training_curves


check_min_version("0.42.0")
logger = get_logger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_training_args(parser, default_model=DEFAULT_MODEL, default_resolution=None, default_flip_p=0.5)
    parser.add_argument("--tokenizer_name", default=None, help="Tokenizer name or path, if not the model's own.")
    parser.add_argument(
        "--resize_mode",
        choices=["crop", "squash"],
        default="crop",
        help="crop (default, the reference recipe): shorter side to --resolution, square crops along the longer side "
        "(--crop_positions), aspect ratio kept. squash: diffusers' example, the whole image resized to a square "
        "(after a central square crop with --center_crop), which distorts a non-square subject.",
    )
    args = cli.check_args(parser.parse_args(argv))
    if args.learning_rate is None:
        args.learning_rate = cli.DEFAULT_LEARNING_RATES[args.optimizer]
    return args


def main(args, callback=None):
    """Train; returns a namespace with the step reached, the embedding, the optimizer, the data and the files.
    `callback(step, loss=..., finite=..., embeddings=..., optimizer=...)` runs after every optimizer step."""
    timer = training.StartupTimer()
    model = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "cache_dir": args.cache_dir,
    }
    cli.check_model(args.pretrained_model_name_or_path, "sd", args.revision, args.cache_dir)
    cli.check_variant(args.pretrained_model_name_or_path, args.variant, ("unet", "vae", "text_encoder"))
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
        tokenizer = cli.load_tokenizer(
            CLIPTokenizer,
            args.tokenizer_name or args.pretrained_model_name_or_path,
            flag="--tokenizer_name" if args.tokenizer_name else "--pretrained_model_name_or_path",
            subfolder=None if args.tokenizer_name else "tokenizer",
            revision=args.revision,
            cache_dir=args.cache_dir,
        )
        tokens, init_ids = resolve_tokens(
            tokenizer,
            args.placeholder_token,
            args.initializer_token,
            num_vectors=args.num_vectors,
            allow_multi_token=args.allow_multi_token_initializer,
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
        if args.resolution is None:  # the model's own, from its config files: 512 for SD 1.5, 768 for SD 2.x 768-v
            args.resolution = cli.model_resolution(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
            logger.info(f"--resolution {args.resolution} (the model's unet sample_size x VAE scale factor)")
        data_lib.warn_small_images(images, args.resolution)
        data_lib.check_prompts(
            [tokenizer],
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
                family="sd",
                tokens=tokens,
                init_ids=[init_ids],
                num_processes=accelerator.num_processes,
            )
        args.seed = cli.resolve_seed(args.seed)  # drawn and logged when not given
        if args.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        cli.init_trackers(
            accelerator,
            "directional_textual_inversion",
            config=vars(args),
            validation_prompt=args.validation_prompt,
            placeholder_token=args.placeholder_token,
        )
        hub_repo = None
        if args.push_to_hub and accelerator.is_main_process:  # made now: a bad token fails before training
            name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            hub_repo = create_hub_repo(name, token=args.hub_token, private=args.hub_private)
        timer.mark("checks")

        # -- 1. Load the models, each straight in the dtype it runs in: the text encoder float32 (the learned rows'
        #       gradient flows through it), the UNet and VAE in the mixed-precision dtype --
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        noise_scheduler = DDPMScheduler.from_pretrained(**model, subfolder="scheduler")
        text_encoder = CLIPTextModel.from_pretrained(
            **model, subfolder="text_encoder", variant=args.variant, dtype=torch.float32
        )
        vae_config = SimpleNamespace(**AutoencoderKL.load_config(**model, subfolder="vae"))
        vae_dtype = training.vae_dtype(vae_config, weight_dtype)
        vae = AutoencoderKL.from_pretrained(**model, subfolder="vae", variant=args.variant, dtype=vae_dtype)
        unet = UNet2DConditionModel.from_pretrained(
            **model, subfolder="unet", variant=args.variant, dtype=weight_dtype
        )
        training.freeze_models(
            unet,
            vae,
            [text_encoder],
            device=accelerator.device,
            xformers=args.enable_xformers_memory_efficient_attention,
            gradient_checkpointing=args.gradient_checkpointing,
        )

        # Validation renders with the models in memory (the placeholder's directional embedding included, once it is
        # installed). The pipeline class is read from diffusers' lazy module, not imported at the top: importing a
        # pipeline makes transformers announce, for image processors these scripts never use, that torchvision is
        # missing, and the session's filter (quiet_library_notices) is on now. With --evaluate_steps the scoring
        # models load now (their weights at the first score).
        def make_pipeline():
            return diffusers.StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
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

        # -- 2. Add the placeholder tokens and install their directional embedding in the text encoder: the tokens
        #       get m * v, only v trains --
        embedding = add_directional_embedding(
            tokenizer, text_encoder, tokens, init_ids, token_scale=args.token_scale, classic=args.optimizer == "adamw"
        )

        # -- 3. Data: every distinct view (each crop position of each image, and its mirror) VAE-encoded once; the
        #       prompts (templates and captions) tokenized once --
        res = args.resolution

        def resize(image):  # squash: diffusers' one square per image, so one crop position
            if args.resize_mode == "squash":
                return data_lib.square_view(image.image, res, args.center_crop)
            return data_lib.resized_shorter_side(image.image, res)

        with ThreadPoolExecutor(max(args.dataloader_num_workers, 1)) as pool:
            resized = list(pool.map(resize, images))
        _, view_index, means, stds = data_lib.cache_views(
            vae,
            resized,
            resolution=res,
            center_crop=args.center_crop,
            positions=args.crop_positions,
            flip=args.flip_p > 0,
            device=accelerator.device,
        )
        prompt_ids, caption_rows = data_lib.training_prompts(
            [tokenizer],
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
            caption_rows=caption_rows,
            caption_dropout=args.caption_dropout,
        )
        timer.mark("latents")

        # -- 4. The optimizer. DTI: Riemannian SGD on the direction, with the vMF prior toward the initializer.
        #       Classic TI (--optimizer adamw): AdamW on the free embedding, for comparison. --
        params = [embedding.param]
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
                checkpoint_path, checkpoint, [embedding], optimizer, scaler=accelerator.scaler
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
            [embedding],
            family="sd",
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
            init_ids=[init_ids],
            safe_serialization=not args.no_safe_serialization,
            checkpoints_total_limit=args.checkpoints_total_limit,
        )
        stop.save_on_abort = lambda: run_files.save(global_step)  # an error or a second Ctrl-C: keep what was learned

        # -- 6. The training loop --
        training.log_run_start(
            data,
            [embedding],
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
                encoder_hidden_states = text_encoder(batch["input_ids"][0])[0]  # the placeholder rows are m * v
                loss = data_lib.diffusion_loss(
                    train_unet,
                    noise_scheduler,
                    batch,
                    encoder_hidden_states,
                    generator=data_lib.step_generator(args.seed, micro_step, rank, accelerator.device),
                    vae_config=vae.config,
                    weight_dtype=weight_dtype,
                )
                loss = loss / accum
                accelerator.backward(loss)
                step_loss = step_loss + loss.detach()
            training.average_gradients(accelerator, params)
            finite = training.guard_nonfinite_step(optimizer, step_loss, params)  # skipped on the device: no sync
            optimizer.step()  # <- the embedding update: v turns along the sphere and stays unit (rsgd), or e moves
            lr_scheduler.step()  #    freely (adamw)
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            window.add(step_loss, finite)
            if callback is not None:
                callback(global_step, loss=step_loss, finite=finite, embeddings=[embedding], optimizer=optimizer)

            last = global_step == args.max_train_steps
            synced = window.due(last)
            if synced:  # one device->host read every --log_steps steps: progress bar, trackers, history
                window.report(
                    global_step,
                    accelerator,
                    [embedding],
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
                    validation.run(global_step, [embedding], [tokenizer])
            if stop.check(accelerator, synced):
                break
        progress.close()

        # -- 7. Final files, validation and push --
        accelerator.wait_for_everyone()
        result = SimpleNamespace(
            global_step=global_step,
            embeddings=[embedding],
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
                validation.run(global_step, [embedding], [tokenizer], final=True)
            if stop.requested:  # before or during the final validation
                run_files.stopped(global_step)
                result.exit_code = 128 + stop.signum
                return result
            if args.save_as_full_pipeline:
                text_encoder.set_input_embeddings(embedding.fold())
                pipeline = diffusers.StableDiffusionPipeline.from_pretrained(
                    **model, text_encoder=text_encoder, vae=vae, unet=unet, tokenizer=tokenizer
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
