"""Validation during training: images rendered with the models in memory, their fidelity scores, the nearest
vocabulary tokens, and the training curves; one `Validation` object that every training script calls.

Validation renders with the pipeline the script builds from the models it trains (SD, SDXL, SANA, Wan), the same
seed every time, and saves PNGs under output_dir/validation/ (a video pipeline's one frame as an image; a clip of
several frames also whole, `save_clip`); with --evaluate_steps the images are scored as evaluate_dti.py scores them.
"""

import math
import os

import numpy as np
import torch

from dti_files import WriteError, atomic_write
from dti_metrics import TrainingEvaluator, encoder_ids
from dti_utils import DTIWarning, logger


__all__ = ["Validation", "log_validation", "decode_latents", "save_clip", "log_nearest_tokens", "plot_training_curves"]


class Validation:
    """A run's validation, the same in every training script: `due(step, last)` says whether a step of the loop
    validates (every `every` steps, and where the evaluator is due; the last step's comes after the loop), and
    `run(step, final=False)` renders the images (when there is a prompt), logs each vector's nearest vocabulary tokens
    and, where due or at the end, scores the images. With evaluate_steps the scoring models' processors load now (a
    wrong id fails before training), their weights at the first score; the main process only.

    make_pipeline() builds the pipeline from the models in memory at each validation; `call_kwargs` go to its call.
    `images` holds the paths of the latest images (for the model card)."""

    def __init__(
        self,
        make_pipeline,
        accelerator,
        *,
        prompt,
        num_images,
        num_inference_steps,
        every,
        seed,
        weight_dtype,
        output_dir,
        stop,
        evaluate_steps=None,
        evaluation_models=(),
        reference_images=(),
        placeholder_token=None,
        class_word=None,
        cache_dir=None,
        call_kwargs=None,
    ):
        self.make_pipeline, self.accelerator, self.stop = make_pipeline, accelerator, stop
        self.prompt, self.every, self.output_dir = prompt, every, output_dir
        self.render = {
            "num_images": num_images,
            "num_inference_steps": num_inference_steps,
            "seed": seed,
            "weight_dtype": weight_dtype,
            "call_kwargs": call_kwargs,
        }
        self.evaluator = None
        if evaluate_steps and accelerator.is_main_process:
            self.evaluator = TrainingEvaluator(
                evaluate_steps,
                model_ids=encoder_ids(evaluation_models),
                reference_images=list(reference_images),
                prompt=prompt,
                placeholder_token=placeholder_token,
                class_word=class_word,
                device=accelerator.device,
                cache_dir=cache_dir,
            )
        self.images = []

    def due(self, step, last=False):
        evaluate = self.evaluator is not None and self.evaluator.due(step)
        return bool(self.prompt) and (step % self.every == 0 or evaluate) and not last

    def run(self, step, embeddings, tokenizers, final=False):
        """Render (when there is a prompt), log the nearest tokens and score (where due, or at the end). A stop request
        ends the rendering at its next denoising step; at the end it also skips the rest. Returns the latest image
        paths."""
        if self.prompt:
            paths = log_validation(
                self.make_pipeline(),
                self.accelerator,
                prompt=self.prompt,
                output_dir=self.output_dir,
                step=step,
                stop=self.stop,
                **self.render,
            )
            self.images = paths or self.images
        if final and self.stop.requested:
            return self.images
        log_nearest_tokens(step, embeddings, tokenizers)
        if self.evaluator is not None and (final or self.evaluator.due(step)) and not self.stop.requested:
            self.evaluator(step, self.images, self.accelerator)  # text and subject fidelity to the trackers
        return self.images


@torch.no_grad()
def log_validation(
    pipeline,
    accelerator,
    *,
    prompt,
    num_images,
    num_inference_steps,
    seed,
    weight_dtype,
    output_dir,
    step,
    stop,
    call_kwargs=None,
):
    """Render `num_images` images of `prompt` with the models in memory (the same seed every time), save them under
    output_dir/validation/ and send them to the trackers. The UNet denoises under autocast to `weight_dtype` (not
    accelerator.autocast(), which accelerate leaves off for fp16 on a CPU, where the float32 text encoders would then
    feed a half-precision UNet); the VAE decodes outside it, in its own dtype (the SDXL VAE overflows in fp16). A stop
    request ends the validation at its next denoising step and discards it. `call_kwargs` go to the pipeline call
    (SANA: no complex human instruction; Wan: num_frames). A video pipeline's one-frame output is an image; a clip of
    several frames is also saved whole (`save_clip`) and logged as a video. Returns the image paths (of a clip, its
    first frame)."""
    from diffusers.training_utils import free_memory
    from diffusers.utils import is_wandb_available

    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    logger.info(f"Validation at step {step}: {num_images} image(s) of {prompt!r}")

    def interrupt(pipe, i, t, callback_kwargs):
        if stop.requested:
            pipe._interrupt = True  # diffusers' documented way to end a pipeline call early
        return callback_kwargs

    images, clips = [], []
    for _ in range(num_images):
        with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            output = pipeline(
                prompt,
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="latent",
                callback_on_step_end=interrupt,
                **(call_kwargs or {}),
            )
        if stop.requested:
            return []
        decoded = decode_latents(pipeline, output.frames if hasattr(output, "frames") else output.images)[0]
        if isinstance(decoded, list):  # a video pipeline's frames
            clips += [decoded] if len(decoded) > 1 else []
            decoded = decoded[0]
        images.append(decoded)
    folder = os.path.join(output_dir, "validation")
    paths = [os.path.join(folder, f"step-{step:06d}-{i}.png") for i in range(len(images))]
    try:
        for image, path in zip(images, paths):
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        clip_paths = [save_clip(clip, os.path.join(folder, f"step-{step:06d}-{i}")) for i, clip in enumerate(clips)]
    except WriteError as e:  # pictures never stop a run: the embedding and checkpoints are what matter
        logger.warning(f"Validation images at step {step} not saved: {e}")
        paths, clip_paths = [p for p in paths if os.path.isfile(p)], []
    if clip_paths:
        logger.info(f"Validation clips: {', '.join(clip_paths)}")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            pictures = np.stack([np.asarray(img) for img in images])
            tracker.writer.add_images("validation", pictures, step, dataformats="NHWC")
            for i, clip in enumerate(clips):  # (frames, H, W, C): tensorboard's video needs moviepy, frames do not
                frames = np.stack([np.asarray(frame) for frame in clip])
                tracker.writer.add_images(f"validation_clip_{i}", frames, step, dataformats="NHWC")
        elif tracker.name == "wandb" and is_wandb_available():
            import wandb

            pictures = [wandb.Image(img, caption=f"{i}: {prompt}") for i, img in enumerate(images)]
            tracker.log({"validation": pictures}, step=step)
            if clip_paths:
                tracker.log({"validation_clips": [wandb.Video(path) for path in clip_paths]}, step=step)
    del pipeline
    free_memory()
    return paths


def decode_latents(pipeline, latents):
    """PIL images from a pipeline's latents, decoded by its VAE in the VAE's dtype (as the pipelines do); for a video
    pipeline's (B, C, frames, h, w) latents, one list of PIL frames per video, as WanPipeline decodes them."""
    vae = pipeline.vae
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if latents.dim() == 5:
        shape = (1, -1, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(std).view(shape).to(latents)
        latents = latents / inverse_std + torch.tensor(mean).view(shape).to(latents)
        return pipeline.video_processor.postprocess_video(vae.decode(latents, return_dict=False)[0], output_type="pil")
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        std, mean = torch.tensor(std).view(shape).to(latents), torch.tensor(mean).view(shape).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    return pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def save_clip(frames, stem, fps=16):
    """A validation clip (PIL frames) as STEM.mp4 through diffusers' export_to_video where imageio is installed, else
    as an animated STEM.webp (PIL alone). Written atomically; returns the path."""
    from diffusers.utils import export_to_video
    from diffusers.utils.import_utils import is_imageio_available

    if is_imageio_available():
        return atomic_write(stem + ".mp4", lambda tmp: export_to_video(frames, tmp, fps=fps))

    def write(tmp):
        frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)

    return atomic_write(stem + ".webp", write)


def log_nearest_tokens(step, embeddings, tokenizers):
    for e, tok in zip(embeddings, tokenizers):
        for token, near in zip(e.tokens, e.nearest_tokens(tok)):
            logger.info(f"step {step} {e.name} {token}: nearest vocabulary tokens {near}")


def plot_training_curves(history, path):
    """Write a PNG with three panels against the step: loss, norm, angle from the initializer (degrees).

    history: a list of (step, loss, norm, angle_deg, ...). Drawn with matplotlib's Agg canvas (no display and no
    change to pyplot's global backend). Returns path, or None when history is empty (nothing is written)."""
    import warnings

    rows = [tuple(float(x) if x is not None else float("nan") for x in entry[:4]) for entry in history]
    if not rows:
        warnings.warn(f"No training history to plot; {path} was not written.", DTIWarning)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, loss, norm, angle = zip(*rows)
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    marker = "." if len(rows) <= 60 else None
    panels = (
        (loss, "loss", "loss"),
        (norm, "embedding norm", "L2 norm"),
        (angle, "angle from initializer", "degrees"),
    )
    for ax, (values, title, ylabel) in zip(fig.subplots(1, 3), panels):
        ax.plot(steps, values, marker=marker, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        finite = [v for v in values if math.isfinite(v)]
        if ylabel == "L2 norm" and finite and max(finite) - min(finite) < 1e-3 * max(finite):
            # A fixed DTI norm: show it flat at its value, not float32 round-off magnified to fill the axis.
            ax.set_ylim(0.9 * min(finite), 1.1 * max(finite))
            ax.ticklabel_format(axis="y", useOffset=False)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    except WriteError as e:  # the curves never cost the embedding, which is saved before them
        logger.warning(f"Training curves not saved: {e}")
        return None
