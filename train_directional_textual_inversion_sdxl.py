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

import time

STARTED = time.perf_counter()  # the start-up report counts the imports too

import argparse  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.utils import check_min_version  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import dti_cli as cli  # noqa: E402
import dti_utils as dti  # noqa: E402
from dti_utils import DTIError, RiemannianSGD  # noqa: E402

check_min_version("0.42.0")
logger = get_logger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_training_args(parser, default_model=DEFAULT_MODEL, default_resolution=768, default_flip_p=0.0)
    return cli.check_args(parser.parse_args(argv))


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
    timer = dti.StartupTimer(STARTED)
    model = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir)
    cli.check_model(args.pretrained_model_name_or_path, "sdxl", args.revision, args.cache_dir)
    with dti.training_session(args, "directional_textual_inversion_sdxl") as (accelerator, stop):
        # -- Checks that need no model: output folder, tokens, resume, images; they fail here, before gigabytes load --
        if accelerator.is_main_process:
            cli.prepare_output_dir(args.output_dir, resuming=args.resume_from_checkpoint is not None)
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = [CLIPTokenizer.from_pretrained(**model, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
        resolved = [dti.resolve_tokens(tok, args.placeholder_token, args.initializer_token, args.num_vectors, args.allow_multi_token_initializer)
                    for tok in tokenizers]
        tokens = resolved[0][0]
        if len(resolved[1][1]) != len(tokens):
            raise DTIError(f"--initializer_token {args.initializer_token!r} gives {len(tokens)} and {len(resolved[1][1])} tokens in the two "
                           f"tokenizers; use a one-token initializer with --num_vectors.")
        images = cli.load_training_images(args.train_data_dir, args.dataset_name, args.dataset_config_name, args.image_column, args.cache_dir, args.caption_column)
        cli.warn_small_images(images, args.resolution)
        dti.resolve_max_train_steps(args, len(images), accelerator.num_processes)
        checkpoint_path, checkpoint = dti.find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is not None:
            dti.check_resume(checkpoint_path, checkpoint, args, tokens, accelerator.num_processes)
        hub_repo = cli.start_run(accelerator, args, "directional_textual_inversion_sdxl")
        timer.mark("checks")

        # -- 1. Load the models, each straight in the dtype it runs in: the text encoders float32 (the learned rows'
        #       gradients flow through them), the UNet in the mixed-precision dtype, the VAE too unless it must be float32 --
        from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        noise_scheduler = DDPMScheduler.from_pretrained(**model, subfolder="scheduler")
        vae_dtype = dti.vae_dtype(SimpleNamespace(**AutoencoderKL.load_config(**model, subfolder="vae")), weight_dtype)
        text_encoder = CLIPTextModel.from_pretrained(**model, subfolder="text_encoder", variant=args.variant, dtype=torch.float32)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(**model, subfolder="text_encoder_2", variant=args.variant, dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(**model, subfolder="vae", variant=args.variant, dtype=vae_dtype)
        unet = UNet2DConditionModel.from_pretrained(**model, subfolder="unet", variant=args.variant, dtype=weight_dtype)
        text_encoders = [text_encoder, text_encoder_2]
        dti.freeze_models(args, accelerator, weight_dtype, unet, vae, text_encoders)
        evaluate = None
        if args.evaluate_steps and accelerator.is_main_process:  # the scoring encoders load only when asked for
            from evaluate_dti import TrainingEvaluator

            evaluate = TrainingEvaluator(args, images, accelerator.device)
        timer.mark("models")

        # -- 2. Add the placeholder tokens to both encoders, each with its own norm m and prior: e = m * v, only v trains --
        embeddings = [dti.add_directional_embedding(tok, enc, tokens, init_ids, args.token_scale, classic=args.optimizer == "adamw", name=name)
                      for tok, enc, (_, init_ids), name in zip(tokenizers, text_encoders, resolved, dti.ENCODERS)]

        # -- 3. Data: every crop position of every image (and its mirror) VAE-encoded once, with its own SDXL time ids --
        res = args.resolution
        with ThreadPoolExecutor(max(args.dataloader_num_workers, 1)) as pool:
            resized = list(pool.map(lambda im: dti.resized_shorter_side(im.image, res), images))
        keys, view_index = dti.build_views(resized, lambda image: dti.crop_positions(image, res, args.center_crop, args.crop_positions), flip=args.flip_p > 0)
        means, stds = dti.encode_views(vae, keys, lambda i, corner: resized[i].crop((corner[1], corner[0], corner[1] + res, corner[0] + res)), accelerator.device)
        # time ids = original size (h, w) + crop top-left + target size, per view; a mirrored view's crop starts from the other side
        time_ids = torch.tensor([[images[i].image.height, images[i].image.width, top, resized[i].width - res - left if mirrored else left, res, res]
                                 for i, mirrored, (top, left) in keys], dtype=torch.float32, device=accelerator.device)
        prompt_ids, caption_rows = dti.training_prompts(tokenizers, images, tokens, args.learnable_property, accelerator.device, args.caption_token)
        data = dti.TrainingData(means, stds, view_index, prompt_ids, args.repeats, args.flip_p, args.seed, extra={"time_ids": time_ids},
                                caption_rows=caption_rows, caption_dropout=args.caption_dropout)
        timer.mark("latents")

        # -- 4. The optimizer and schedule. DTI: Riemannian SGD on both encoders' directions, each with the vMF prior
        #       toward its own initializer rows. Classic TI (--optimizer adamw): AdamW on the free embeddings. --
        params = [e.param for e in embeddings]
        lr = dti.scaled_learning_rate(args, accelerator.num_processes)
        if args.optimizer == "rsgd":
            optimizer = RiemannianSGD(params, lr=lr, kappa=args.kappa, beta=args.rsgd_beta)
        else:  # fused: skips a non-finite step on the device, like RiemannianSGD
            optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                          eps=args.adam_epsilon, fused=True)
        # Not prepared by accelerate, so it steps once per optimizer step whatever the number of processes.
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                     num_training_steps=args.max_train_steps, num_cycles=args.lr_num_cycles)
        optimizer = accelerator.prepare(optimizer)  # fp16 loss scaling; the gradients are averaged by hand (a few KB)
        train_unet = dti.unet_for_training(args, unet)

        # -- 5. Resume: the directions, the optimizer's state and the schedule's position; the flags of this run govern --
        global_step, history = 0, []
        if checkpoint is not None:
            global_step, history = dti.restore_training_state(checkpoint_path, checkpoint, embeddings, optimizer, lr_scheduler, accelerator)

        def make_pipeline():  # validation renders with the models in memory
            return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
                                             unet=unet, scheduler=EulerDiscreteScheduler.from_config(noise_scheduler.config))

        def save(step, suffix=""):
            return dti.save_training_embeddings(args.output_dir, args, embeddings, step, suffix)

        def save_checkpoint(step):
            state = dti.training_state(step, args, embeddings, optimizer, accelerator, history)
            logger.info(f"Saved {dti.save_checkpoint(args.output_dir, step, state, args.checkpoints_total_limit)}")

        stop.save_on_abort = lambda: save(global_step)  # an error or a second Ctrl-C: keep what was learned so far

        # -- 6. The training loop --
        logger.info("***** Running training *****")
        logger.info(f"  Images = {len(images)} x {args.repeats} repeats ({len(keys)} cached views), batch {args.train_batch_size} per device "
                    f"x {accelerator.num_processes} processes x {args.gradient_accumulation_steps} accumulation")
        logger.info(f"  Optimizer = {args.optimizer}, effective learning rate = {lr:g}, steps = {args.max_train_steps}, seed = {args.seed}")
        for e in embeddings:
            logger.info(f"  {e.name}: tokens {e.tokens}, norm {'free (classic TI)' if e.norm is None else f'{e.norm:.6f}'}")
        startup = timer.report()
        window = dti.LossWindow(args.log_steps, accelerator.device)
        progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
        accum, rank, world = args.gradient_accumulation_steps, accelerator.process_index, accelerator.num_processes
        validation_images = []
        while global_step < args.max_train_steps:
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(accum):
                micro_step = global_step * accum + micro
                batch = data.batch(micro_step, args.train_batch_size, world, rank)
                hidden, pooled = encode_prompt(text_encoders, batch["input_ids"])  # the hooks splice in each encoder's m * v
                added_cond_kwargs = {"text_embeds": pooled.to(weight_dtype), "time_ids": batch["time_ids"].to(weight_dtype)}
                loss = dti.diffusion_loss(train_unet, noise_scheduler, batch, hidden, dti.step_generator(args.seed, micro_step, rank, accelerator.device),
                                          vae.config, weight_dtype, added_cond_kwargs=added_cond_kwargs) / accum
                accelerator.backward(loss)
                step_loss = step_loss + loss.detach()
            dti.average_gradients(accelerator, params)
            finite = dti.guard_nonfinite_step(optimizer, step_loss, params)  # skipped on the device if not finite: no sync
            optimizer.step()  # <- the embedding update: each v turns along its sphere and stays unit (rsgd), or e moves freely (adamw)
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            window.add(step_loss, finite)
            if callback is not None:
                callback(global_step, loss=step_loss, finite=finite, embeddings=embeddings, optimizer=optimizer)

            last = global_step == args.max_train_steps
            synced = window.due(last)
            if synced:  # one device->host read every --log_steps steps
                logs = window.read(global_step, accelerator, embeddings, args.output_dir)
                logs["lr"] = optimizer.param_groups[0]["lr"]
                history.append((global_step, logs["loss"], logs["norm"], logs["angle_deg"], logs["norm_2"], logs["angle_deg_2"]))
                progress.set_postfix(loss=f"{logs['loss']:.4f}", norm=f"{logs['norm']:.4f}/{logs['norm_2']:.4f}",
                                     angle=f"{logs['angle_deg']:.2f}/{logs['angle_deg_2']:.2f}deg")
                accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                if global_step % args.save_steps == 0:
                    save(global_step, suffix=f"-steps-{global_step}")
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(global_step)
                if args.validation_prompt and (global_step % args.validation_steps == 0 or evaluate and evaluate.due(global_step)) and not last:
                    validation_images = dti.log_validation(make_pipeline(), args, accelerator, global_step, weight_dtype, stop) or validation_images
                    dti.log_nearest_tokens(global_step, embeddings, tokenizers)
                    if evaluate and evaluate.due(global_step) and not stop.requested:  # text and subject fidelity to the trackers
                        evaluate(global_step, validation_images, accelerator)
            if stop.check(accelerator, synced):
                break
        progress.close()

        # -- 7. Final files, validation and push --
        accelerator.wait_for_everyone()
        result = SimpleNamespace(global_step=global_step, embeddings=embeddings, optimizer=optimizer, data=data, history=history, files=[],
                                 startup=startup, weight_dtype=weight_dtype, unet=unet, exit_code=128 + stop.signum if stop.requested else 0)
        if accelerator.is_main_process:
            result.files = save(global_step)
            if not stop.requested:
                from dti_concepts import plot_training_curves

                plot_training_curves(history, f"{args.output_dir}/training_curves.png")
                if args.validation_prompt:
                    validation_images = dti.log_validation(make_pipeline(), args, accelerator, global_step, weight_dtype, stop) or validation_images
            if stop.requested:  # before or during the final validation
                save_checkpoint(global_step)
                logger.info(f"Stopped at step {global_step}: embeddings and checkpoint-{global_step} saved in {args.output_dir}; "
                            f"continue with --resume_from_checkpoint latest.")
                result.exit_code = 128 + stop.signum
                return result
            dti.log_nearest_tokens(global_step, embeddings, tokenizers)
            if evaluate:
                evaluate(global_step, validation_images, accelerator)
            if args.save_as_full_pipeline:
                for e in embeddings:
                    e.fold_into_encoder()
                StableDiffusionXLPipeline.from_pretrained(**model, vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                                          tokenizer=tokenizers[0], tokenizer_2=tokenizers[1]).save_pretrained(
                    args.output_dir, safe_serialization=not args.no_safe_serialization)
            if hub_repo:
                cli.push_output_to_hub(args, hub_repo, embeddings, validation_images, sdxl=True)
            for e, path in zip(embeddings, result.files):
                logger.info(f"Done: {e.name}: {len(tokens)} vector(s) of norm {e.vectors().norm(dim=-1).mean().item():.6f} in {path}")
        return result


if __name__ == "__main__":
    raise SystemExit(cli.run_cli(main, parse_args))
