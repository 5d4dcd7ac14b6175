"""The command line both training scripts share: their flags, the checks that run before anything heavy loads,
the run's set-up (seed, trackers, Hub repository), the entry point, and the model card and Hub upload.

dti_utils.py is the method and its training mechanics; this module is the edge of a run, where flags, files,
models and the Hub meet the user: every failure here is one `DTIError` sentence naming the flag or file, and
`run_cli` turns it into `error: ...` and exit code 2.
"""

import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dti_utils import DTIError, _atomic_write, embedding_slug, logger, resolve_token_scale

__all__ = [
    "run_cli", "start_run", "check_model", "model_resolution", "prepare_output_dir", "TrainingImage", "to_rgb", "load_training_images",
    "warn_small_images", "add_training_args", "check_args",
    "finite_float", "positive_int", "probability", "non_negative", "LR_SCHEDULERS", "REPORT_TO",
    "create_hub_repo", "base_model_license", "loading_snippet", "write_model_card", "push_output_to_hub",
]


# ----------------------------------------------------------------------------------------------------
# The entry point and the run's set-up
# ----------------------------------------------------------------------------------------------------


def run_cli(main, parse_args, argv=None):
    """Run a script's main(parse_args(argv)) and return its exit code: 0, 2 with one `error:` line for a DTIError,
    128 + signal number when stopped by SIGINT/SIGTERM (the embedding and a checkpoint are saved by then)."""
    try:
        result = main(parse_args(argv))
    except DTIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return getattr(result, "exit_code", 0)


def start_run(accelerator, args, project_name):
    """Seed (drawn and logged when not given; stored in checkpoints and file metadata), TF32, trackers and the Hub
    repository (created now, so that a bad token fails before training). Returns the Hub repo id or None."""
    from accelerate.utils import broadcast_object_list, set_seed

    if args.seed is None:
        args.seed = broadcast_object_list([int(np.random.SeedSequence().generate_state(1)[0] % 2**31)])[0]
        logger.info(f"No --seed given: using {args.seed} (stored in checkpoints and in the embedding's metadata).")
    set_seed(args.seed)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.validation_prompt and args.placeholder_token not in args.validation_prompt:
        logger.warning(f"--validation_prompt {args.validation_prompt!r} does not contain {args.placeholder_token}: the validation images "
                       f"will not show the learned concept.")
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(project_name, config=config)
    return create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None


# ----------------------------------------------------------------------------------------------------
# Checks before anything heavy loads
# ----------------------------------------------------------------------------------------------------


SCRIPTS = {"sd": "train_directional_textual_inversion.py", "sdxl": "train_directional_textual_inversion_sdxl.py"}


def check_model(model, family=None, revision=None, cache_dir=None, flag="--pretrained_model_name_or_path"):
    """The base pipeline exists and is of this script's family (SD 1.x/2.x or SDXL; None takes either), read from its
    model_index.json alone: one sentence at once otherwise, with no minutes of Hub retries. Returns the model index."""
    flag = f"{flag} {model}"
    if os.path.isdir(model):
        index_path = os.path.join(model, "model_index.json")
        if not os.path.isfile(index_path):
            raise DTIError(f"{flag} is a folder without model_index.json; pass a diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/).")
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise DTIError(f"{flag} is not a folder; pass a diffusers pipeline folder or a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5.")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            index_path = hf_hub_download(model, "model_index.json", revision=revision, cache_dir=cache_dir, etag_timeout=10)
        except LocalEntryNotFoundError:
            why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") else "the Hub cannot be reached"
            raise DTIError(f"{flag} is not in the local Hugging Face cache and {why}; download it first (`hf download {model}`) or pass a local folder.") from None
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HFValidationError) as e:
            raise DTIError(f"{flag} is neither a local folder nor a diffusers pipeline on the Hub ({type(e).__name__}); check the name, "
                           f"or log in with `hf auth login` for a gated or private model.") from None
    with open(index_path) as f:
        index = json.load(f)
    sdxl = "text_encoder_2" in index or "XL" in str(index.get("_class_name", ""))
    if family is not None and sdxl != (family == "sdxl"):
        kind = "an SDXL model" if sdxl else "a Stable Diffusion 1.x/2.x model"
        raise DTIError(f"{flag} is {kind}; use {SCRIPTS['sdxl' if sdxl else 'sd']} for it.")
    return index


def model_resolution(model, revision=None, cache_dir=None):
    """The model's native resolution, unet sample_size x the VAE's 2 ** (len(block_out_channels) - 1): 512 for SD 1.5,
    768 for SD 2.x 768-v. Read from the two config files alone (diffusers' load_config), before any weights load."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet, vae = (cls.load_config(model, subfolder=sub, revision=revision, cache_dir=cache_dir)
                     for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")))
        size = unet["sample_size"]
        return (max(size) if isinstance(size, (list, tuple)) else size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DTIError(f"The unet/vae config of {model} gives no default resolution ({type(e).__name__}: {e}); pass --resolution.") from None


def prepare_output_dir(output_dir, resuming):
    """--output_dir is a folder that can be created and written (a real probe file), stale temporary files of a killed
    run are removed, and a previous run's embedding that this run would replace is named."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DTIError(f"--output_dir {output_dir} is a file; pass a folder.")
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".tmp-probe-")
        os.write(fd, b"probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DTIError(f"--output_dir {output_dir} cannot be written ({e.strerror or e}); choose a folder you can write to.") from None
    for stale in glob.glob(os.path.join(glob.escape(output_dir), ".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
    if not resuming and os.path.exists(os.path.join(output_dir, "learned_embeds.safetensors")):
        logger.warning(f"{output_dir} already holds a learned_embeds.safetensors from an earlier run; this run replaces it "
                       f"(pass another --output_dir to keep it, or --resume_from_checkpoint latest to continue it).")


# ----------------------------------------------------------------------------------------------------
# The user's images: decoded once, with one sentence for every file that cannot be used
# ----------------------------------------------------------------------------------------------------


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 16384 * 16384  # Pillow's bomb check refuses beyond 2 x its 89 MP default; real photos fit here


class TrainingImage:
    """One training image: its name (file or dataset row), the decoded RGB picture and its caption (None: templates)."""

    def __init__(self, name, image, caption=None):
        self.name, self.image, self.caption = name, image, caption or None


def to_rgb(image, name):
    """EXIF orientation applied; 16-bit, float, palette, RGBA and greyscale images to 8-bit RGB (transparency on white)."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise DTIError(f"Image {name} is corrupt or truncated ({e}); remove or replace it.")
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: scale to 8 bits, convert() would clip
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":  # float TIFF: [0, 1] is the only range with a meaning we can assume
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise DTIError(f"Image {name} holds floating-point values outside [0, 1] ({values.min():.3g} to {values.max():.3g}); "
                           f"save it as an 8- or 16-bit image.")
        image = Image.fromarray((values * 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


def load_training_images(train_data_dir=None, dataset_name=None, dataset_config_name=None, image_column="image", cache_dir=None, caption_column=None):
    """The training images (TrainingImage: name, RGB picture, caption), from a folder (captions in NAME.txt beside
    NAME.jpg) or a `datasets` dataset (captions in `caption_column`)."""
    if dataset_name:
        import datasets

        try:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
        except Exception as e:
            raise DTIError(f"--dataset_name {dataset_name!r} could not be loaded ({type(e).__name__}: {e}).")
        for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
            if column is not None and column not in ds.column_names:
                raise DTIError(f"{flag} {column!r} is not a column of {dataset_name!r}; its columns are {ds.column_names}.")
        captions = ds[caption_column] if caption_column else [None] * len(ds)
        images = []
        for i, (item, caption) in enumerate(zip(ds[image_column], captions)):
            if not isinstance(item, Image.Image):
                raise DTIError(f"Row {i} of column {image_column!r} in {dataset_name!r} is not an image; pass the image column with --image_column.")
            images.append(TrainingImage(f"row {i} of {dataset_name}", to_rgb(item, f"row {i} of {dataset_name}"), " ".join(str(caption or "").split())))
        if not images:
            raise DTIError(f"--dataset_name {dataset_name!r} has no images in its train split.")
        return images
    if not train_data_dir:
        raise DTIError("No training images: pass --train_data_dir FOLDER or --dataset_name.")
    if not os.path.isdir(train_data_dir):
        raise DTIError(f"--train_data_dir {train_data_dir} is not a folder; pass the folder that holds your images.")
    names = sorted(n for n in os.listdir(train_data_dir) if not n.startswith(".") and os.path.isfile(os.path.join(train_data_dir, n)))
    image_names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    caption_files = {os.path.splitext(n)[0] + ".txt" for n in image_names} & set(names)  # NAME.txt beside NAME.jpg
    skipped = [n for n in names if n not in image_names and n not in caption_files]
    if skipped:
        logger.warning(f"Skipping {len(skipped)} file(s) in {train_data_dir} that are not images: {', '.join(skipped)}")
    if not image_names:
        raise DTIError(f"--train_data_dir {train_data_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put the concept's pictures there.")
    images = []
    for name in image_names:
        path = os.path.join(train_data_dir, name)
        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise DTIError(f"Image {path} is {image.width}x{image.height} pixels, too large to decode safely; resize it below 16384x16384.")
                images.append(TrainingImage(path, to_rgb(image, path)))
        except Image.DecompressionBombError:
            raise DTIError(f"Image {path} is too large to decode safely (Pillow's decompression-bomb limit); resize it below 16384x16384.")
        except (UnidentifiedImageError, OSError) as e:
            raise DTIError(f"Image {path} cannot be read ({e}); remove or replace it.")
    for im, name in zip(images, image_names):
        caption_file = os.path.splitext(name)[0] + ".txt"
        if caption_file in caption_files:
            try:
                with open(os.path.join(train_data_dir, caption_file), encoding="utf-8") as f:
                    im.caption = " ".join(f.read().split()) or None
            except (OSError, UnicodeDecodeError) as e:
                raise DTIError(f"Caption {os.path.join(train_data_dir, caption_file)} cannot be read as UTF-8 text ({e}); fix or remove it.")
    return images


def warn_small_images(images, resolution):
    """One warning listing the images whose shorter side is under a quarter of the training resolution."""
    small = [f"{im.name} ({im.image.width}x{im.image.height})" for im in images if min(im.image.size) < resolution / 4]
    if small:
        logger.warning(f"{len(small)} image(s) are far smaller than --resolution {resolution} and will be upscaled into blur: {', '.join(small)}")


# ----------------------------------------------------------------------------------------------------
# Flags: diffusers' textual-inversion flags (same names and meanings) plus DTI's own
# ----------------------------------------------------------------------------------------------------


def finite_float(text):
    """argparse type: a finite float (nan and inf are refused at parse time)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _bounded(kind, low=None, high=None, high_open=False):
    def parse(text):
        value = kind(text)
        if (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{')' if high_open else ']'}")
        return value
    parse.__name__ = f"{kind.__name__} {'>= ' + str(low) if low is not None else ''}"
    return parse


positive_int = _bounded(int, 1)
probability = _bounded(finite_float, 0.0, 1.0)
non_negative = _bounded(finite_float, 0.0)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "mlflow", "all", "none")


def add_training_args(parser, default_model, default_resolution, default_flip_p):
    """The flags of diffusers' textual-inversion examples (same names and meanings) plus DTI's own. default_resolution
    None: the model's own (`model_resolution`)."""
    dti = parser.add_argument_group("Directional Textual Inversion")
    dti.add_argument("--optimizer", choices=["rsgd", "adamw"], default="rsgd",
                     help="rsgd: DTI (fixed norm, Riemannian SGD on the direction). adamw: classic textual inversion (unconstrained "
                          "embedding, AdamW), for comparing TI and DTI with one script.")
    dti.add_argument("--kappa", type=non_negative, default=1e-4, help="Concentration of the von Mises-Fisher prior around the initializer's direction; 0 disables it.")
    dti.add_argument("--token_scale", default="mean", help="The fixed norm m of the learned vectors: mean, min or max of the encoder's vocabulary norms, or a number.")
    dti.add_argument("--rsgd_beta", type=_bounded(finite_float, 0.0, 1.0, high_open=True), default=0.0,
                     help="Decay of the running mean of squared tangent-gradient norms that divides the step. 0 (default) gives unit tangent "
                          "steps: each step turns every vector by about the learning rate in radians.")
    dti.add_argument("--log_steps", type=positive_int, default=10, help="Read the loss back from the device and log it every N steps (reading it every step costs a sync).")
    dti.add_argument("--allow_multi_token_initializer", action="store_true",
                     help="Accept a one-word --initializer_token that the tokenizer splits into several tokens (one vector each).")
    model = parser.add_argument_group("Model")
    model.add_argument("--pretrained_model_name_or_path", default=default_model, help=f"Hub id or local folder of the base pipeline (default: {default_model}).")
    model.add_argument("--revision", default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument("--variant", default=None, help="Variant of the weight files, e.g. fp16.")
    concept = parser.add_argument_group("Concept")
    concept.add_argument("--placeholder_token", required=True, help="The new token that stands for the concept, e.g. '<cat-toy>'.")
    concept.add_argument("--initializer_token", required=True,
                         help="Word(s) the vectors start from and the prior points to. Several words give one vector per token.")
    concept.add_argument("--num_vectors", type=positive_int, default=None,
                         help="Number of vectors for the concept (default: one per initializer token). A one-token initializer is copied.")
    concept.add_argument("--learnable_property", choices=["object", "style"], default="object", help="Prompt templates: object or style.")
    data = parser.add_argument_group("Data")
    data.add_argument("--train_data_dir", default=None,
                      help="Folder of training images; NAME.txt beside NAME.jpg is its caption (other files are skipped with a warning).")
    data.add_argument("--dataset_name", default=None, help="A `datasets` dataset instead: a Hub id or a local image folder.")
    data.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name, if it has several.")
    data.add_argument("--image_column", default="image", help="Column of --dataset_name that holds the images.")
    data.add_argument("--caption_column", default=None, help="Column of --dataset_name that holds per-image captions (default: none, the templates).")
    data.add_argument("--caption_token", default=None,
                      help="A caption is the prompt, with the placeholder written at '{}', else in place of this word (e.g. the class word "
                           "'toy', whole word, any case) unless the caption writes the placeholder itself, else prefixed ('<toy>, CAPTION'). "
                           "Images without a caption use the templates.")
    data.add_argument("--caption_dropout", type=probability, default=0.0, help="Probability that a captioned sample uses a template instead.")
    data.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are cached.")
    data.add_argument("--repeats", type=positive_int, default=100, help="How many times the images repeat in one epoch.")
    data.add_argument("--resolution", type=positive_int, default=default_resolution,
                      help="Training resolution in pixels (divisible by 8). Default: " + (f"{default_resolution}." if default_resolution else
                           "the model's own, unet sample_size x VAE scale factor from its configs (512 for SD 1.5, 768 for SD 2.x 768-v)."))
    data.add_argument("--crop_positions", type=positive_int, default=8,
                      help="Each image is resized so that its shorter side is --resolution, then cropped square at one of this many evenly "
                           "spaced positions along its longer side, drawn per sample; each view is encoded by the VAE once. The aspect ratio "
                           "is kept: the subject is never squashed.")
    data.add_argument("--center_crop", action="store_true", help="Use the central crop only.")
    data.add_argument("--flip_p", type=probability, default=default_flip_p, help="Probability of a horizontal flip.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Threads that resize the images at start-up (the loop reads cached latents).")
    train = parser.add_argument_group("Training")
    train.add_argument("--train_batch_size", type=positive_int, default=4, help="Batch size per device (the reference recipe uses 4).")
    train.add_argument("--num_train_epochs", type=positive_int, default=None, help="Train this many epochs when --max_train_steps is not given.")
    train.add_argument("--max_train_steps", type=positive_int, default=None,
                       help="Optimizer steps. Default: --num_train_epochs epochs if given, else 400 (the reference recipe).")
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1, help="Micro-batches per optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet and text encoder.")
    train.add_argument("--seed", type=int, default=None, help="Seed for data order, noise and validation (drawn and logged if unset; stored for resume).")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Precision of the UNet and VAE. Directions and optimizer state stay float32. Default: accelerate's config.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention in the UNet.")
    train.add_argument("--cuda_graphs", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                       help="Replay the UNet's training forward and backward from CUDA graphs, captured in seconds at the first step: removes "
                            "most kernel-launch overhead. auto (default): on a CUDA GPU without --compile or --gradient_checkpointing. "
                            "--cuda_graphs off (or --no-cuda_graphs) trains eagerly.")
    train.add_argument("--no-cuda_graphs", dest="cuda_graphs", action="store_const", const="off", help="Same as --cuda_graphs off.")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet for training (mode reduce-overhead, i.e. CUDA graphs, unless --cuda_graphs off). A minute "
                            "or more of compiling on the first run; pays on runs of many thousand steps.")
    train.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher; LOCAL_RANK in the environment wins.")
    opt = parser.add_argument_group("Optimizer")
    opt.add_argument("--learning_rate", type=_bounded(finite_float, 0.0), default=None,
                     help="Base learning rate. rsgd: radians per step before --scale_lr (default 0.01). adamw: default 5e-4.")
    opt.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=True,
                     help="Multiply the learning rate by batch size x gradient accumulation x processes (default on, as in the reference "
                          "recipe: 0.01 x 4 = an effective step of 0.04 rad). --no-scale_lr uses --learning_rate as is.")
    opt.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant", help="Learning-rate schedule.")
    opt.add_argument("--lr_warmup_steps", type=_bounded(int, 0), default=0, help="Warm-up steps (schedulers with warm-up only).")
    opt.add_argument("--lr_num_cycles", type=positive_int, default=1, help="Hard restarts of cosine_with_restarts.")
    opt.add_argument("--adam_beta1", type=_bounded(finite_float, 0.0, 1.0, high_open=True), default=0.9, help="adamw only.")
    opt.add_argument("--adam_beta2", type=_bounded(finite_float, 0.0, 1.0, high_open=True), default=0.999, help="adamw only.")
    opt.add_argument("--adam_weight_decay", type=non_negative, default=1e-2, help="adamw only.")
    opt.add_argument("--adam_epsilon", type=_bounded(finite_float, 0.0), default=1e-08, help="adamw only.")
    save = parser.add_argument_group("Saving")
    save.add_argument("--output_dir", default="text-inversion-model", help="Where embeddings, images, logs and checkpoints go.")
    save.add_argument("--save_steps", type=positive_int, default=500, help="Write learned_embeds-steps-N every N steps.")
    save.add_argument("--save_as_full_pipeline", action="store_true", help="Also save the whole pipeline with the token folded in.")
    save.add_argument("--no_safe_serialization", action="store_true", help="Write .bin (torch.save) instead of .safetensors.")
    save.add_argument("--checkpointing_steps", type=positive_int, default=500, help="Write a resumable checkpoint-N (kilobytes) every N steps.")
    save.add_argument("--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints.")
    save.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.')
    log = parser.add_argument_group("Logging and validation")
    log.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    log.add_argument("--report_to", choices=REPORT_TO, default="tensorboard", help="Where to log (accelerate's trackers).")
    log.add_argument("--validation_prompt", default=None, help="Prompt rendered at each validation, e.g. 'a <cat-toy> on a beach'.")
    log.add_argument("--num_validation_images", type=positive_int, default=4, help="Images per validation.")
    log.add_argument("--validation_steps", type=positive_int, default=100, help="Validate every N steps (and always at the end).")
    log.add_argument("--num_validation_inference_steps", type=positive_int, default=25, help="Denoising steps of validation images.")
    log.add_argument("--evaluate_steps", type=positive_int, default=None,
                     help="Every N steps and at the end, score the validation images as evaluate_dti.py does: text fidelity to --validation_prompt "
                          "with the placeholder read as --initializer_token, subject fidelity to the training images; logged as eval/*.")
    log.add_argument("--evaluation_models", nargs="+", default=[], metavar="NAME=ID",
                     help="--evaluate_steps' scoring models, if not evaluate_dti.py's defaults: clip=ID, siglip=ID, dino=ID (ID none skips).")
    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the embeddings, validation images and a model card.")
    hub.add_argument("--hub_token", default=None, help="Hub token (default: the stored login).")
    hub.add_argument("--hub_model_id", default=None, help="Repository name (default: the output folder's name).")
    hub.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    hub.add_argument("--push_checkpoints", action="store_true", help="Also upload checkpoint-N folders (not uploaded by default).")
    return parser


def check_args(args):
    """Checks between flags that need no model: one clear sentence per problem, before anything heavy loads."""
    args.local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank))
    if args.resolution is not None and args.resolution % 8:
        raise DTIError(f"--resolution {args.resolution} is not a multiple of 8; the VAE downsamples by 8 (try 512 or 768).")
    resolve_token_scale(args.token_scale, {"mean": 1.0, "min": 1.0, "max": math.inf})
    if args.train_data_dir is None and args.dataset_name is None:
        raise DTIError("No training images: pass --train_data_dir FOLDER or --dataset_name.")
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise DTIError("Pass either --train_data_dir or --dataset_name, not both.")
    if args.caption_column and not args.dataset_name:
        raise DTIError("--caption_column goes with --dataset_name; in a --train_data_dir folder the caption of NAME.jpg is NAME.txt beside it.")
    if args.report_to in ("wandb", "all") and __import__("importlib").util.find_spec("wandb") is None:
        raise DTIError("--report_to wandb needs wandb: pip install wandb, or use --report_to tensorboard.")
    if args.enable_xformers_memory_efficient_attention and __import__("importlib").util.find_spec("xformers") is None:
        raise DTIError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers, or drop the flag (PyTorch SDPA is used by default).")
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise DTIError("--hub_token with --report_to wandb would expose the token in the run config; log in with `hf auth login` instead.")
    if args.cuda_graphs == "on" and (args.compile or args.gradient_checkpointing):
        other = "--compile (which captures CUDA graphs itself)" if args.compile else "--gradient_checkpointing (the graph keeps the UNet's activations)"
        raise DTIError(f"--cuda_graphs does not go with {other}; drop one of them.")
    if args.evaluate_steps:  # the scoring models' names are checked here; the models load after the base model
        if not args.validation_prompt:
            raise DTIError("--evaluate_steps scores the validation images: pass --validation_prompt too, e.g. 'a <my-toy> on a beach'.")
        __import__("evaluate_dti").encoder_ids(args.evaluation_models)
    if args.learning_rate is None:
        args.learning_rate = 0.01 if args.optimizer == "rsgd" else 5e-4
    if args.learning_rate <= 0:
        raise DTIError(f"--learning_rate must be positive, not {args.learning_rate}.")
    return args


# ----------------------------------------------------------------------------------------------------
# Model card and Hub
# ----------------------------------------------------------------------------------------------------


def create_hub_repo(args):
    """Create (or reuse) the Hub repository at the start of the run: a bad token or name fails before training."""
    from huggingface_hub import create_repo

    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        return create_repo(name, exist_ok=True, token=args.hub_token, private=args.hub_private).repo_id
    except Exception as e:
        raise DTIError(f"Could not create the Hub repository {name!r} ({type(e).__name__}: {e}); log in with `hf auth login` or pass "
                       f"--hub_token, or drop --push_to_hub.")


# The licenses of the standard bases, for when their card cannot be read (offline, gated).
KNOWN_LICENSES = {**dict.fromkeys(("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4"),
                                  "creativeml-openrail-m"),
                  **dict.fromkeys(("stabilityai/stable-diffusion-2", "stabilityai/stable-diffusion-2-base", "stabilityai/stable-diffusion-2-1",
                                   "stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-xl-base-1.0"), "openrail++")}


def base_model_license(base_model, token=None):
    """{license[, license_name, license_link]} from the base model's card (local folder or Hub), else from KNOWN_LICENSES;
    {} when unknown."""
    from huggingface_hub import ModelCard

    try:
        local = os.path.join(base_model, "README.md")
        data = ModelCard.load(local if os.path.isfile(local) else base_model, token=token).data
        if data.license:
            return {k: getattr(data, k) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}
    except Exception:
        pass
    return {"license": KNOWN_LICENSES[base_model]} if base_model in KNOWN_LICENSES else {}


def loading_snippet(repo_id, base_model, placeholder_token, sdxl=False, prompt=None, ext=".safetensors", single_file=None):
    """A complete Python block: load the base pipeline, then the embedding from repo_id (SDXL: one call per encoder, or
    with single_file=NAME from the {"clip_l", "clip_g"} file), then render the prompt. Literals go through json.dumps,
    which writes valid Python strings whatever the prompt holds."""
    q, cls = json.dumps, "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    imports = ["import torch", f"from diffusers import {cls}"]
    pairs = (("learned_embeds", "clip_l", "text_encoder", "tokenizer"), ("learned_embeds_2", "clip_g", "text_encoder_2", "tokenizer_2"))
    if single_file:
        imports += ["from huggingface_hub import hf_hub_download"] + ([] if ext == ".bin" else ["from safetensors.torch import load_file"])
        path = f"hf_hub_download({q(repo_id)}, {q(single_file)})"
        load = [f"state = torch.load({path}, weights_only=True)" if ext == ".bin" else f"state = load_file({path})"] + [
            f'pipe.load_textual_inversion(state["{key}"], token={q(placeholder_token)}, text_encoder=pipe.{enc}, tokenizer=pipe.{tok})'
            for _, key, enc, tok in pairs]
    elif sdxl:
        load = [f'pipe.load_textual_inversion({q(repo_id)}, weight_name="{stem}{ext}", token={q(placeholder_token)}, text_encoder=pipe.{enc}, '
                f'tokenizer=pipe.{tok})' for stem, _, enc, tok in pairs]
    else:
        load = [f"pipe.load_textual_inversion({q(repo_id)})"]
    code = [*imports, "", f'pipe = {cls}.from_pretrained({q(base_model)}, dtype=torch.float16).to("cuda")', *load,
            f"image = pipe({q(prompt or f'a photo of {placeholder_token}')}).images[0]"]
    return "```python\n" + "\n".join(code) + "\n```"


def write_model_card(output_dir, repo_id, args, embeddings, image_paths, sdxl=False, license=None):
    """README.md in diffusers' conventions (load_or_create_model_card + populate_model_card): an existing card of repo_id
    is kept, with the tags added; a new one gets the base model's license, base_model (a Hub id only), the validation
    images and snippets for diffusers and for AUTOMATIC1111/ComfyUI/kohya."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    dti, license = args.optimizer == "rsgd", license or {}
    base, token, ext = args.pretrained_model_name_or_path, args.placeholder_token, ".bin" if args.no_safe_serialization else ".safetensors"
    stem, hub_base = embedding_slug(token, file_stem=True), None if os.path.exists(base) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) else base
    method = "Directional Textual Inversion (DTI)" if dti else "classic textual inversion (AdamW, free norm)"
    about = (f" DTI keeps each vector at a fixed in-distribution norm ({', '.join(f'{e.name}: {e.norm:.4f}' for e in embeddings)}) and learns its "
             f"direction on the sphere (kappa {args.kappa}), so the token keeps following the rest of the prompt. See "
             f"[Directional Textual Inversion](https://arxiv.org/abs/2512.13672).") if dti else ""
    sections = [f"# `{token}`: {method} on {base}",
                f"The token `{token}` ({len(embeddings[0].tokens)} vector(s), initialized from `{args.initializer_token}`) was learned with {method} "
                f"for {args.max_train_steps} steps.{about}",
                "\n".join(f"![validation image {i}]({os.path.relpath(p, output_dir)})" for i, p in enumerate(image_paths))
                or "No validation images were made (pass --validation_prompt).",
                "## Use it with diffusers", loading_snippet(repo_id, base, token, sdxl, args.validation_prompt, ext)]
    if sdxl:
        sections += [f"Or from the single file `{stem}{ext}`, which holds both encoders' vectors:",
                     loading_snippet(repo_id, base, token, sdxl, args.validation_prompt, ext, single_file=stem + ext)]
    sections += ["## AUTOMATIC1111, ComfyUI, kohya",
                 f"{'Put' if sdxl else f'Save `learned_embeds{ext}` as'} `{stem}{ext}` in the embeddings folder and write `{stem}` in the prompt "
                 f"(ComfyUI: `embedding:{stem}`; kohya: `--textual_inversion_embeddings {stem}{ext}`)."
                 + (f" Not `learned_embeds{ext}` or `learned_embeds_2{ext}`: each holds one text encoder's vectors only." if sdxl else "")]
    if not license:
        sections.append(f"The license of the base model `{base}` could not be read, so this card says `other`: check it before use.")
    card = load_or_create_model_card(repo_id, token=args.hub_token, from_training=True, model_description="\n\n".join(sections), base_model=hub_base,
                                     license=license.get("license", "other"), inference=True)
    for key in ("license_name", "license_link"):  # the base's own terms, for a card that says `other`
        if card.data.license == "other" and key in license and getattr(card.data, key, None) is None:
            setattr(card.data, key, license[key])
    family = "stable-diffusion-xl" if sdxl else "stable-diffusion"
    tags = ["text-to-image", "diffusers", "diffusers-training", family, f"{family}-diffusers", "textual_inversion"] + ["directional-textual-inversion"] * dti
    populate_model_card(card, tags=[t for t in tags if t not in (card.data.tags or [])])
    path = os.path.join(output_dir, "README.md")
    _atomic_write(path, card.save)
    return path


def push_output_to_hub(args, repo_id, embeddings, image_paths, sdxl=False):
    """Upload the embeddings, validation images and the card; checkpoints only with --push_checkpoints."""
    from huggingface_hub import upload_folder

    write_model_card(args.output_dir, repo_id, args, embeddings, image_paths, sdxl=sdxl, license=base_model_license(args.pretrained_model_name_or_path, args.hub_token))
    ignore = ["logs/*", "logs/**", ".tmp-*", "*/.tmp-*"] + ([] if args.push_checkpoints else ["checkpoint-*", "checkpoint-*/*"])
    try:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Upload textual inversion embedding", ignore_patterns=ignore, token=args.hub_token)
    except Exception as e:
        raise DTIError(f"Upload to {repo_id} failed ({type(e).__name__}: {e}); the output in {args.output_dir} is complete. "
                       f"Retry with: hf upload {repo_id} {args.output_dir} --exclude 'checkpoint-*/*' 'logs/*'")
    logger.info(f"Uploaded to https://huggingface.co/{repo_id}")
