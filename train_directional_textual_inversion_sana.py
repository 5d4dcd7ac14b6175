#!/usr/bin/env python
r"""Directional Textual Inversion for SANA: DTI on the Gemma-2 text encoder, trained with flow matching.

    python train_directional_textual_inversion_sana.py \
      --train_data_dir ./cat_toy --placeholder_token "<cat-toy>" --initializer_token toy \
      --mixed_precision bf16 --output_dir cat-toy-dti-sana

The defaults are the authors' SANA recipe (kunheek/dti, exps/ours_sana.py): SANA1.5 1.6B, 1024 px, batch 2 x
accumulation 2, learning rate 0.01 scaled by the batch (0.04 rad a step), 500 steps, kappa 5e-5, no flip, zero pad on.
The placeholder token must be lowercase: SanaPipeline lowercases every prompt. Prompts are encoded as SanaPipeline
encodes them (300 tokens, right padding, the attention mask to Gemma and to the transformer), without the "complex
human instruction" SanaPipeline prepends by default at inference: the authors train and validate without it, and the
validation images here are rendered without it too (complex_human_instruction=None); pass the same to SanaPipeline to
get what validation shows.

Output: learned_embeds.safetensors, {token: float32 (num_vectors, 2304)}, raw Gemma rows at the vocabulary's mean
norm. SanaPipeline has no load_textual_inversion: `word = dti_files.load_textual_inversion(pipe, output_dir)` adds the
tokens and writes the rows, and returns the word to write in prompts (several vectors' tokens joined without spaces).
"""

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import diffusers
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.utils import check_min_version
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Gemma2Model

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

DEFAULT_MODEL = "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers"
DEFAULT_STEPS = 500  # the authors' SANA recipe
MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_training_args(
        parser,
        default_model=DEFAULT_MODEL,
        default_resolution=1024,
        default_flip_p=0.0,
        default_kappa=5e-5,
        default_batch_size=2,
        default_accumulation=2,
        default_steps=DEFAULT_STEPS,
    )
    parser.add_argument(
        "--zero_pad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Put a random number of zero-norm tokens right after the BOS token of each training prompt (the "
        "authors' SANA default): floor(min(Exponential(mean 2), 15)) of them, drawn per sample from the seed and the "
        "step, so a resume is exact. They are attended to (unmasked) and only shift the prompt's positions, so the "
        "token does not learn a fixed position. Never used at inference. --no-zero_pad turns it off.",
    )
    cli.add_text_encoder_float32_arg(parser, "about 5 GB (Gemma-2-2B)")
    args = cli.check_args(parser.parse_args(argv), unet=False)
    if args.placeholder_token != args.placeholder_token.lower():
        raise DTIError(
            f"--placeholder_token {args.placeholder_token!r} has capital letters, but SanaPipeline lowercases every "
            f"prompt, so the token would never be matched; use {args.placeholder_token.lower()!r}."
        )
    if args.learning_rate is None:
        args.learning_rate = cli.DEFAULT_LEARNING_RATES[args.optimizer]
    return args


def preprocess(prompt):
    """What SanaPipeline does to a prompt (clean_caption=False, its default): lower case, stripped."""
    return prompt.lower().strip()


def encode_prompt(text_encoder, batch, max_sequence_length=MAX_SEQUENCE_LENGTH):
    """SANA's conditioning as SanaPipeline.encode_prompt computes it (Gemma-2 with the attention mask, right padding,
    no complex human instruction), with Gemma run only as far as the micro-batch's longest prompt reaches: Gemma is
    causal, so the rows of the real tokens are those of the pipeline's 300-token pass, and the rows after them are
    zeros, masked out in the transformer as the pipeline's are. With zero pad, the pad tokens after BOS get zero input
    embeddings. Returns (hidden states (B, 300, d), attention mask (B, 300))."""
    ids, length = batch["input_ids"][0], batch["max_length"]
    mask = (torch.arange(length, device=ids.device) < batch["lengths"].unsqueeze(1)).long()
    if "pad" in batch:
        ids, zero = data_lib.insert_zero_pad(ids, batch["pad"], length)
        embeds = text_encoder.get_input_embeddings()(ids) * (~zero).unsqueeze(-1)
    else:
        embeds = text_encoder.get_input_embeddings()(ids[:, :length])  # the placeholder rows are m * v
    hidden = text_encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    rest = max_sequence_length - length
    return F.pad(hidden, (0, 0, 0, rest)), F.pad(mask, (0, rest))


def main(args, callback=None):
    """Train; returns a namespace with the step reached, the embedding, the optimizer, the data and the files.
    `callback(step, loss=..., finite=..., embeddings=..., optimizer=...)` runs after every optimizer step."""
    timer = training.StartupTimer()
    model = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "cache_dir": args.cache_dir,
    }
    index = cli.check_model(args.pretrained_model_name_or_path, "sana", args.revision, args.cache_dir)
    cli.check_variant(args.pretrained_model_name_or_path, args.variant, ("transformer", "vae", "text_encoder"))
    cli.check_resolution(args.pretrained_model_name_or_path, "sana", args.resolution, args.revision, args.cache_dir)
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
        tokenizer = AutoTokenizer.from_pretrained(**model, subfolder="tokenizer")
        tokenizer.padding_side = "right"  # as SanaPipeline sets it
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
        data_lib.warn_small_images(images, args.resolution)
        data_lib.check_prompts(
            [tokenizer],
            images,
            tokens,
            learnable_property=args.learnable_property,
            caption_token=args.caption_token,
            max_length=MAX_SEQUENCE_LENGTH,
            preprocess=preprocess,
            joiner="",
        )
        epoch = training.steps_per_epoch(
            num_images=len(images),
            repeats=args.repeats,
            batch_size=args.train_batch_size,
            num_processes=accelerator.num_processes,
            accumulation=args.gradient_accumulation_steps,
        )
        if args.max_train_steps is None:  # whole epochs with --num_train_epochs, else the recipe's 500 steps
            args.max_train_steps = args.num_train_epochs * epoch if args.num_train_epochs else DEFAULT_STEPS
        if args.validation_epochs is not None:  # diffusers' deprecated flag, in steps
            args.validation_steps = args.validation_epochs * epoch
            logger.warning(f"--validation_epochs is deprecated; validating every {args.validation_steps} steps.")
        checkpoint_path, checkpoint = training.find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is not None:  # the checkpoint's seed continues its data order and noise
            args.seed = training.check_resume(
                checkpoint_path,
                checkpoint,
                flags=vars(args),
                family="sana",
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
            "directional_textual_inversion_sana",
            config=vars(args),
            validation_prompt=args.validation_prompt,
            placeholder_token=args.placeholder_token,
        )
        hub_repo = None
        if args.push_to_hub and accelerator.is_main_process:  # made now: a bad token fails before training
            name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            hub_repo = create_hub_repo(name, token=args.hub_token, private=args.hub_private)
        timer.mark("checks")

        # -- 1. Load the models, each straight in the dtype it runs in: the transformer in the mixed-precision dtype,
        #       Gemma-2 in bf16 under bf16 (as the authors; else float32, or with --text_encoder_float32), the DC-AE
        #       float32 (it encodes once) --
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(**model, subfolder="scheduler")  # shift 1
        text_encoder = Gemma2Model.from_pretrained(
            **model,
            subfolder="text_encoder",
            variant=args.variant,
            dtype=training.text_encoder_dtype(weight_dtype, float32=args.text_encoder_float32),
        )
        vae = AutoencoderDC.from_pretrained(**model, subfolder="vae", variant=args.variant, dtype=torch.float32)
        transformer = SanaTransformer2DModel.from_pretrained(
            **model, subfolder="transformer", variant=args.variant, dtype=weight_dtype
        )
        training.freeze_models(
            transformer,
            vae,
            [text_encoder],
            device=accelerator.device,
            xformers=args.enable_xformers_memory_efficient_attention,
            gradient_checkpointing=args.gradient_checkpointing,
        )

        # Validation renders with the models in memory and the model's own scheduler (flow DPM-Solver, shift 3), with
        # the text handled as in training: no complex human instruction, and no resolution binning. With
        # --evaluate_steps the scoring models load now (their weights at the first score).
        def make_pipeline():
            return diffusers.SanaPipeline(
                tokenizer=tokenizer,
                text_encoder=text_encoder,
                vae=vae,
                transformer=transformer,
                scheduler=getattr(diffusers, index["scheduler"][1]).from_pretrained(**model, subfolder="scheduler"),
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
            call_kwargs={
                "height": args.resolution,
                "width": args.resolution,
                "use_resolution_binning": False,
                "complex_human_instruction": None,
            },
        )
        timer.mark("models")

        # -- 2. Add the placeholder tokens and install their directional embedding in Gemma-2: the tokens get m * v
        #       (m from the raw table; Gemma's sqrt(hidden) scale applies to them as to every row), only v trains --
        embedding = add_directional_embedding(
            tokenizer, text_encoder, tokens, init_ids, token_scale=args.token_scale, classic=args.optimizer == "adamw"
        )

        # -- 3. Data: every distinct view VAE-encoded once through the DC-AE (deterministic: the latent itself); the
        #       prompts (templates and captions, lowercased, the tokens joined without spaces) tokenized once --
        res = args.resolution
        with ThreadPoolExecutor(max(args.dataloader_num_workers, 1)) as pool:
            resized = list(pool.map(lambda image: data_lib.resized_shorter_side(image.image, res), images))
        _, view_index, means, _ = data_lib.cache_views(
            vae,
            resized,
            resolution=res,
            center_crop=args.center_crop,
            positions=args.crop_positions,
            flip=args.flip_p > 0,
            device=accelerator.device,
            encode=data_lib.dc_ae_latents,
        )
        prompt_ids, caption_rows, prompt_lengths = data_lib.training_prompts(
            [tokenizer],
            images,
            tokens,
            learnable_property=args.learnable_property,
            device=accelerator.device,
            caption_token=args.caption_token,
            max_length=MAX_SEQUENCE_LENGTH,
            preprocess=preprocess,
            joiner="",
            lengths=True,
        )
        data = data_lib.TrainingData(
            means,
            None,
            view_index,
            prompt_ids,
            repeats=args.repeats,
            flip_p=args.flip_p,
            seed=args.seed,
            caption_rows=caption_rows,
            caption_dropout=args.caption_dropout,
            prompt_lengths=prompt_lengths,
            zero_pad=args.zero_pad,
        )
        schedule = data_lib.flow_schedule(noise_scheduler, accelerator.device)
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
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=args.max_train_steps,
            num_cycles=args.lr_num_cycles,
            last_epoch=global_step - 1,
        )
        optimizer = accelerator.prepare(optimizer)  # fp16 loss scaling; the gradients are averaged by hand (a few KB)
        train_transformer = unet_for_training(  # CUDA graphs capture the UNets only: eager, or --compile
            transformer,
            cuda_graphs="off",
            compile=args.compile,
            gradient_checkpointing=args.gradient_checkpointing,
        )

        # The files the main process writes: embeddings (with how they were made), checkpoints, the upload.
        run_files = training.RunFiles(
            args.output_dir,
            [embedding],
            family="sana",
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
        logger.info(f"  Prompt word {files.prompt_word(tokens, 'sana')} (lowercase: SanaPipeline lowercases prompts)")
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
                hidden, mask = encode_prompt(text_encoder, batch)
                loss = data_lib.flow_matching_loss(
                    train_transformer,
                    schedule,
                    batch,
                    hidden,
                    generator=data_lib.step_generator(args.seed, micro_step, rank, accelerator.device),
                    weight_dtype=weight_dtype,
                    encoder_attention_mask=mask,
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
            transformer=transformer,
            text_encoder=text_encoder,
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
                pipeline = diffusers.SanaPipeline.from_pretrained(
                    **model, text_encoder=text_encoder, vae=vae, transformer=transformer, tokenizer=tokenizer
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
