"""The command line the scripts share: the entry point, the training flags, the checks that run before anything heavy
loads, and the run's set-up (seed, trackers).

Every failure here is one `DTIError` sentence naming the flag or file; `run_cli` turns it into `error: ...` and exit
code 2 (with DTI_DEBUG=1, the full traceback of its cause first).
"""

import argparse
import glob
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback

import numpy as np

from dti_files import family_of
from dti_hub import check_hub_files
from dti_metrics import encoder_ids
from dti_utils import DTIError, logger, resolve_token_scale


__all__ = [
    # the entry point and the run's set-up
    "run_cli",
    "resolve_seed",
    "init_trackers",
    # checks before anything heavy loads
    "SCRIPTS",
    "model_family",
    "check_model",
    "load_tokenizer",
    "check_variant",
    "model_resolution",
    "earlier_run_outputs",
    "check_resolution",
    "prepare_output_dir",
    "check_data_and_output",
    # flags
    "finite_float",
    "positive_int",
    "probability",
    "non_negative",
    "LR_SCHEDULERS",
    "REPORT_TO",
    "DEFAULT_LEARNING_RATES",
    "add_training_args",
    "add_text_encoder_float32_arg",
    "check_args",
]


# ----------------------------------------------------------------------------------------------------
# The entry point and the run's set-up
# ----------------------------------------------------------------------------------------------------


def run_cli(main, parse_args, argv=None):
    """Run a script's main(parse_args(argv)) and return its exit code: 0, 2 with one `error:` line for a DTIError,
    128 + signal number when stopped by SIGINT/SIGTERM (the embedding and a checkpoint are saved by then). With
    DTI_DEBUG=1 in the environment, a DTIError's traceback (its cause included) is printed above the line."""
    try:
        result = main(parse_args(argv))
    except DTIError as e:
        if os.environ.get("DTI_DEBUG", "0").lower() not in ("", "0", "false", "no"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return getattr(result, "exit_code", 0)


def resolve_seed(seed):
    """The run's seed: `seed`, or one drawn (the same in every process) and logged when it is None. Seeds accelerate's
    generators with it and returns it: the script stores it in checkpoints and file metadata."""
    from accelerate.utils import broadcast_object_list, set_seed

    if seed is None:
        seed = broadcast_object_list([int(np.random.SeedSequence().generate_state(1)[0] % 2**31)])[0]
        logger.info(f"No --seed given: using {seed} (stored in checkpoints and in the embedding's metadata).")
    set_seed(seed)
    return seed


def init_trackers(accelerator, project_name, *, config, validation_prompt=None, placeholder_token=None):
    """Start the trackers (main process) with the run's flags as their config (the Hub token left out), and warn
    once when the validation prompt does not name the placeholder."""
    if validation_prompt and placeholder_token not in validation_prompt:
        logger.warning(
            f"--validation_prompt {validation_prompt!r} does not contain {placeholder_token}: the validation images "
            "will not show the learned concept."
        )
    if accelerator.is_main_process:
        config = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(project_name, config=config)


# ----------------------------------------------------------------------------------------------------
# Checks before anything heavy loads
# ----------------------------------------------------------------------------------------------------

SCRIPTS = {
    "sd": "train_directional_textual_inversion.py",
    "sdxl": "train_directional_textual_inversion_sdxl.py",
    "sana": "train_directional_textual_inversion_sana.py",
    "wan": "train_directional_textual_inversion_wan.py",
}
FAMILY_NAMES = {
    "sd": "a Stable Diffusion 1.x/2.x model",
    "sdxl": "an SDXL model",
    "sana": "a SANA model",
    "wan": "a Wan model",
}


def model_family(index):
    """ "sd", "sdxl", "sana" or "wan" from a pipeline's model_index.json (its class name and components)."""
    name = str(index.get("_class_name", ""))
    return family_of(name, "text_encoder_2" in index or "XL" in name)


def check_model(model, family=None, revision=None, cache_dir=None, flag="--pretrained_model_name_or_path"):
    """The base pipeline exists and is of this script's family (None takes either), read from its model_index.json
    alone (diffusers' DiffusionPipeline.load_config): one sentence at once otherwise. Returns the model index."""
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    flag = f"{flag} {model}"
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise DTIError(
                f"{flag} is a folder without model_index.json; pass a diffusers pipeline folder (unet/, vae/, "
                "text_encoder/, tokenizer/)."
            )
    elif os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise DTIError(
            f"{flag} is not a folder; pass a diffusers pipeline folder or a Hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5."
        )
    check_hub_files(
        model,
        flag=flag,
        filename="model_index.json",
        what="a diffusers pipeline",
        revision=revision,
        cache_dir=cache_dir,
    )
    try:
        index = DiffusionPipeline.load_config(model, revision=revision, cache_dir=cache_dir)
    except OSError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, LocalEntryNotFoundError) or not isinstance(
            cause, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HFValidationError)
        ):
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
            why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
            raise DTIError(
                f"{flag} is not in the local Hugging Face cache and {why}; download it first (`hf download {model}`) "
                "or pass a local folder."
            ) from e
        raise DTIError(
            f"{flag} is neither a local folder nor a diffusers pipeline on the Hub ({type(cause).__name__}); check "
            "the name, or log in with `hf auth login` for a gated or private model."
        ) from e
    found = model_family(index)
    if family is not None and found != family:
        raise DTIError(f"{flag} is {FAMILY_NAMES[found]}; use {SCRIPTS[found]} for it.")
    return index


def load_tokenizer(cls, name_or_path, *, flag, subfolder=None, revision=None, cache_dir=None):
    """A tokenizer, or one sentence naming the flag: a path that does not exist, a Hub id neither cached nor
    reachable, or a folder without tokenizer files."""
    if not os.path.exists(name_or_path) and name_or_path.startswith((".", "/", "~")):
        raise DTIError(f"{flag} {name_or_path} does not exist; pass a tokenizer folder or a Hub id.")
    folder = os.path.join(name_or_path, subfolder or "")
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
    if os.path.isdir(name_or_path) and not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        # transformers would build an empty tokenizer from such a folder, which reads every word as <|endoftext|>
        raise DTIError(
            f"{flag} {name_or_path}: {folder} holds no tokenizer files ({', '.join(names[:3])}); pass the folder "
            "that holds them, or a Hub id."
        )
    check_hub_files(
        name_or_path,
        flag=flag,
        filename=f"{subfolder}/tokenizer_config.json" if subfolder else "tokenizer_config.json",
        what="a tokenizer",
        revision=revision,
        cache_dir=cache_dir,
    )
    try:
        return cls.from_pretrained(name_or_path, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError, TypeError) as e:
        raise DTIError(
            f"{flag} {name_or_path}: no tokenizer could be loaded from it ({type(e).__name__}); pass a tokenizer "
            "folder or a Hub id."
        ) from e


def check_variant(model, variant, subfolders):
    """--variant names weight files that exist in a local pipeline folder (e.g. diffusion_pytorch_model.fp16.
    safetensors in unet/): one sentence otherwise, before anything loads. Hub ids are checked by diffusers."""
    if variant is None or not os.path.isdir(model):
        return
    for sub in subfolders:
        folder = os.path.join(model, sub)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        if not any(f".{variant}." in name for name in names):
            raise DTIError(
                f"--variant {variant}: {folder} has no {variant} weight files (such as "
                f"diffusion_pytorch_model.{variant}.safetensors); drop --variant to load the model's own weights."
            )


def model_resolution(model, revision=None, cache_dir=None):
    """The model's native resolution, unet sample_size x the VAE's 2 ** (len(block_out_channels) - 1): 512 for SD
    1.5, 768 for SD 2.x 768-v. Read from the two config files alone (diffusers' load_config), before any weights
    load."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision, cache_dir=cache_dir)
        vae = AutoencoderKL.load_config(model, subfolder="vae", revision=revision, cache_dir=cache_dir)
        size = unet["sample_size"]
        return (max(size) if isinstance(size, (list, tuple)) else size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DTIError(
            f"The unet/vae config of {model} gives no default resolution ({type(e).__name__}: {e}); pass --resolution."
        ) from e


def check_resolution(model, family, resolution, revision=None, cache_dir=None):
    """SANA and Wan: --resolution is a multiple of the VAE's downsampling times the transformer's patch size (SANA 1.x:
    32, Wan 2.1: 16), read from the two config files alone, before any weights load."""
    from diffusers import AutoencoderDC, AutoencoderKLWan, SanaTransformer2DModel, WanTransformer3DModel

    vae_class, transformer_class = {
        "sana": (AutoencoderDC, SanaTransformer2DModel),
        "wan": (AutoencoderKLWan, WanTransformer3DModel),
    }[family]
    try:
        vae = vae_class.load_config(model, subfolder="vae", revision=revision, cache_dir=cache_dir)
        transformer = transformer_class.load_config(
            model, subfolder="transformer", revision=revision, cache_dir=cache_dir
        )
        if family == "sana":
            down, patch = 2 ** (len(vae["encoder_block_out_channels"]) - 1), transformer.get("patch_size", 1)
        else:
            down, patch = vae.get("scale_factor_spatial", 8), transformer.get("patch_size", (1, 2, 2))[-1]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DTIError(
            f"The vae/transformer config of {model} cannot be read ({type(e).__name__}: {e}); pass a diffusers "
            "pipeline folder or Hub id."
        ) from e
    multiple = down * patch
    if resolution % multiple:
        raise DTIError(
            f"--resolution {resolution} is not a multiple of {multiple} (the VAE's {down}x downsampling times the "
            f"transformer's patch {patch}); try {max(multiple, resolution // multiple * multiple)}."
        )
    return multiple


def earlier_run_outputs(output_dir):
    """What an earlier training run left in output_dir: its checkpoint-N folders and learned_embeds* files."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    checkpoints = [n for n in names if re.fullmatch(r"checkpoint-\d+", n)]
    embeddings = [n for n in names if n.startswith("learned_embeds") and n.endswith((".safetensors", ".bin"))]
    return checkpoints + embeddings


def prepare_output_dir(output_dir, *, resuming, overwrite=False):
    """--output_dir is a folder that can be created and written (a real probe file), and it belongs to this run:
    an earlier run's checkpoints and embeddings are refused (a fresh run would replace them, and prune or later resume
    the wrong checkpoints) unless this run resumes it or `overwrite` removes them. Stale temporary files of a killed
    run are removed."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DTIError(f"--output_dir {output_dir} is a file; pass a folder.")
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".tmp-probe-")
        os.write(fd, b"probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DTIError(
            f"--output_dir {output_dir} cannot be written ({e.strerror or e}); choose a folder you can write to."
        ) from e
    earlier = [] if resuming else earlier_run_outputs(output_dir)
    if earlier and not overwrite:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise DTIError(
            f"--output_dir {output_dir} holds an earlier run's outputs ({shown}); continue that run with "
            "--resume_from_checkpoint latest, keep it and choose another --output_dir, or pass --overwrite_output_dir "
            "to replace it."
        )
    for name in earlier:  # --overwrite_output_dir: this run's checkpoints are then the only ones to prune or resume
        logger.info(f"--overwrite_output_dir: removing {os.path.join(output_dir, name)} of the earlier run")
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for stale in glob.glob(os.path.join(glob.escape(output_dir), ".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)


def check_data_and_output(train_data_dir, output_dir):
    """The output folder may not be the data folder or lie inside it: the run's own files (validation images,
    curves) would become training images the next time."""
    if not train_data_dir:
        return
    data, out = os.path.realpath(train_data_dir), os.path.realpath(output_dir)
    if out == data or out.startswith(data + os.sep):
        raise DTIError(
            f"--output_dir {output_dir} is {'' if out == data else 'inside '}the --train_data_dir {train_data_dir}; "
            "the run's images would be trained on next time: choose an --output_dir outside it."
        )


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
            interval = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}{')' if high_open else ']'}")
        return value

    parse.__name__ = f"{kind.__name__} {'>= ' + str(low) if low is not None else ''}"
    return parse


positive_int = _bounded(int, 1)
MAX_RESOLUTION = 16384  # SANA's 4K models train at 4096; no model is trained beyond 16384 px
probability = _bounded(finite_float, 0.0, 1.0)
non_negative = _bounded(finite_float, 0.0)
unit_interval_open = _bounded(finite_float, 0.0, 1.0, high_open=True)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "mlflow", "all", "none")
# Before --scale_lr. rsgd: radians per step (the reference recipe); adamw: the authors' TI baseline (5e-3, 0.02 at
# batch 4), the rate at which TI's norm inflation, which DTI removes, shows.
DEFAULT_LEARNING_RATES = {"rsgd": 0.01, "adamw": 5e-3}
MAX_LEARNING_RATE = 1.0  # rsgd: a radian a step before batch scaling; adamw: a step of the embedding's whole norm


def _add_method_args(parser, default_kappa):
    group = parser.add_argument_group("Directional Textual Inversion")
    group.add_argument(
        "--optimizer",
        choices=["rsgd", "adamw"],
        default="rsgd",
        help="rsgd: DTI (fixed norm, Riemannian SGD on the direction). adamw: classic textual inversion "
        "(unconstrained embedding, AdamW), for comparing TI and DTI with one script.",
    )
    group.add_argument(
        "--kappa",
        type=non_negative,
        default=default_kappa,
        help="Concentration of the von Mises-Fisher prior around the initializer's direction; 0 disables it.",
    )
    group.add_argument(
        "--token_scale",
        default="mean",
        help="The fixed norm m of the learned vectors: mean, min or max of the encoder's vocabulary norms, or a "
        "number.",
    )
    group.add_argument(
        "--rsgd_beta",
        type=unit_interval_open,
        default=0.0,
        help="Decay of the running mean of squared tangent-gradient norms that divides the step. 0 (default) gives "
        "unit tangent steps: each step turns every vector by about the learning rate in radians.",
    )
    group.add_argument(
        "--log_steps",
        type=positive_int,
        default=10,
        help="Read the loss back from the device and log it every N steps (reading it every step costs a sync).",
    )
    group.add_argument(
        "--allow_multi_token_initializer",
        action="store_true",
        help="Accept a one-word --initializer_token that the tokenizer splits into several tokens (one vector each).",
    )


def _add_model_and_concept_args(parser, default_model):
    model = parser.add_argument_group("Model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        default=default_model,
        help=f"Hub id or local folder of the base pipeline (default: {default_model}).",
    )
    model.add_argument("--revision", default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument("--variant", default=None, help="Variant of the weight files, e.g. fp16.")
    concept = parser.add_argument_group("Concept")
    concept.add_argument(
        "--placeholder_token", required=True, help="The new token that stands for the concept, e.g. '<cat-toy>'."
    )
    concept.add_argument(
        "--initializer_token",
        required=True,
        help="Word(s) the vectors start from and the prior points to. Several words give one vector per token.",
    )
    concept.add_argument(
        "--num_vectors",
        type=positive_int,
        default=None,
        help="Number of vectors for the concept (default: one per initializer token). A one-token initializer is "
        "copied.",
    )
    concept.add_argument(
        "--learnable_property",
        choices=["object", "style"],
        default="object",
        help="Prompt templates: object or style.",
    )


def _add_data_args(parser, default_resolution, default_flip_p):
    data = parser.add_argument_group("Data")
    data.add_argument(
        "--train_data_dir",
        default=None,
        help="Folder of training images; NAME.txt beside NAME.jpg is its caption (other files are skipped with a "
        "warning).",
    )
    data.add_argument("--dataset_name", default=None, help="A `datasets` dataset instead: a Hub id or a local folder.")
    data.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name, if it has several.")
    data.add_argument("--image_column", default="image", help="Column of --dataset_name that holds the images.")
    data.add_argument(
        "--caption_column",
        default=None,
        help="Column of --dataset_name that holds per-image captions (default: none, the templates).",
    )
    data.add_argument(
        "--caption_token",
        default=None,
        help="A caption is the prompt, with the placeholder written at '{}', else in place of this word (e.g. the "
        "class word 'toy', whole word, any case) unless the caption writes the placeholder itself, else prefixed "
        "('<toy>, CAPTION'). Images without a caption use the templates.",
    )
    data.add_argument(
        "--caption_dropout",
        type=probability,
        default=0.0,
        help="Probability that a captioned sample uses a template instead.",
    )
    data.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are cached.")
    data.add_argument(
        "--repeats", type=positive_int, default=100, help="How many times the images repeat in an epoch."
    )
    default = (
        f"{default_resolution}."
        if default_resolution
        else "the model's own, unet sample_size x VAE scale factor from its configs (512 for SD 1.5, 768 for SD 2.x "
        "768-v)."
    )
    data.add_argument(
        "--resolution",
        type=_bounded(int, 8, MAX_RESOLUTION),
        default=default_resolution,
        help="Training resolution in pixels (divisible by 8). Default: " + default,
    )
    data.add_argument(
        "--crop_positions",
        type=positive_int,
        default=8,
        help="Each image is resized so that its shorter side is --resolution, then cropped square at one of this many "
        "evenly spaced positions along its longer side, drawn per sample; each view is encoded by the VAE once. The "
        "aspect ratio is kept: the subject is never squashed.",
    )
    data.add_argument("--center_crop", action="store_true", help="Use the central crop only.")
    data.add_argument("--flip_p", type=probability, default=default_flip_p, help="Probability of a horizontal flip.")
    data.add_argument(
        "--dataloader_num_workers",
        type=_bounded(int, 0),
        default=0,
        help="Threads that resize the images at start-up (the loop reads cached latents).",
    )


def _add_training_loop_args(parser, default_batch_size, default_accumulation, default_steps):
    train = parser.add_argument_group("Training")
    train.add_argument(
        "--train_batch_size",
        type=positive_int,
        default=default_batch_size,
        help=f"Batch size per device (the reference recipe uses {default_batch_size}).",
    )
    train.add_argument(
        "--num_train_epochs",
        type=positive_int,
        default=None,
        help="Train this many epochs when --max_train_steps is not given.",
    )
    train.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help=f"Optimizer steps. Default: --num_train_epochs epochs if given, else {default_steps} (the reference "
        "recipe).",
    )
    train.add_argument(
        "--gradient_accumulation_steps",
        type=positive_int,
        default=default_accumulation,
        help="Micro-batches per optimizer step.",
    )
    train.add_argument(
        "--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet and text encoder."
    )
    train.add_argument(
        "--seed",
        type=_bounded(int, 0, 2**32 - 1),
        default=None,
        help="Seed for data order, noise and validation (drawn and logged if unset; stored for resume).",
    )
    train.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Precision of the UNet and VAE. Directions and optimizer state stay float32. Default: accelerate's "
        "config.",
    )
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    train.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention in the UNet."
    )
    train.add_argument(
        "--cuda_graphs",
        nargs="?",
        const="on",
        default="auto",
        choices=["auto", "on", "off"],
        help="Replay the UNet's training forward and backward from CUDA graphs, captured in seconds at the first "
        "step: removes most kernel-launch overhead. auto (default): on a CUDA GPU without --compile or "
        "--gradient_checkpointing. --cuda_graphs off (or --no-cuda_graphs) trains eagerly.",
    )
    train.add_argument(
        "--no-cuda_graphs", dest="cuda_graphs", action="store_const", const="off", help="Same as --cuda_graphs off."
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet for training (mode reduce-overhead, i.e. CUDA graphs, unless --cuda_graphs off). "
        "A minute or more of compiling on the first run; pays on runs of many thousand steps.",
    )
    train.add_argument(
        "--local_rank",
        type=int,
        default=-1,
        help="Accepted for diffusers' launch commands; accelerate reads the rank from the environment (LOCAL_RANK).",
    )


def _add_optimizer_args(parser):
    opt = parser.add_argument_group("Optimizer")
    opt.add_argument(
        "--learning_rate",
        type=non_negative,
        default=None,
        help="Base learning rate, before --scale_lr. rsgd: radians per step (default "
        f"{DEFAULT_LEARNING_RATES['rsgd']:g}). adamw: default {DEFAULT_LEARNING_RATES['adamw']:g}, the authors' TI "
        f"baseline ({4 * DEFAULT_LEARNING_RATES['adamw']:g} at batch 4), at which TI's norm grows as the paper shows.",
    )
    opt.add_argument(
        "--scale_lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Multiply the learning rate by batch size x gradient accumulation x processes (default on, as in the "
        "reference recipe: 0.01 x 4 = an effective step of 0.04 rad). --no-scale_lr uses --learning_rate as is.",
    )
    opt.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant", help="Learning-rate schedule.")
    opt.add_argument(
        "--lr_warmup_steps", type=_bounded(int, 0), default=0, help="Warm-up steps (schedulers with warm-up only)."
    )
    opt.add_argument("--lr_num_cycles", type=positive_int, default=1, help="Hard restarts of cosine_with_restarts.")
    opt.add_argument("--adam_beta1", type=unit_interval_open, default=0.9, help="adamw only.")
    opt.add_argument("--adam_beta2", type=unit_interval_open, default=0.999, help="adamw only.")
    opt.add_argument("--adam_weight_decay", type=non_negative, default=1e-2, help="adamw only.")
    opt.add_argument("--adam_epsilon", type=non_negative, default=1e-08, help="adamw only.")


def _add_saving_args(parser):
    save = parser.add_argument_group("Saving")
    save.add_argument(
        "--output_dir", default="text-inversion-model", help="Where embeddings, images, logs and checkpoints go."
    )
    save.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds an earlier run's checkpoints and embeddings, removing "
        "them (without it such a folder is refused; --resume_from_checkpoint continues the earlier run instead).",
    )
    save.add_argument(
        "--save_steps", type=positive_int, default=500, help="Write learned_embeds-steps-N every N steps."
    )
    save.add_argument(
        "--save_as_full_pipeline", action="store_true", help="Also save the whole pipeline with the token folded in."
    )
    save.add_argument(
        "--no_safe_serialization", action="store_true", help="Write .bin (torch.save) instead of .safetensors."
    )
    save.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=500,
        help="Write a resumable checkpoint-N (kilobytes) every N steps.",
    )
    save.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints."
    )
    save.add_argument(
        "--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.'
    )


def _add_logging_and_hub_args(parser):
    log = parser.add_argument_group("Logging and validation")
    log.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    log.add_argument(
        "--report_to", choices=REPORT_TO, default="tensorboard", help="Where to log (accelerate's trackers)."
    )
    log.add_argument(
        "--validation_prompt", default=None, help="Prompt rendered at each validation, e.g. 'a <cat-toy> on a beach'."
    )
    log.add_argument("--num_validation_images", type=positive_int, default=4, help="Images per validation.")
    log.add_argument(
        "--validation_steps",
        type=positive_int,
        default=100,
        help="Validate every N steps (and always at the end).",
    )
    log.add_argument(
        "--validation_epochs",
        type=positive_int,
        default=None,
        help="diffusers' older flag, deprecated there: validate every N epochs; turned into --validation_steps (N x "
        "the steps of an epoch) with a warning.",
    )
    log.add_argument(
        "--num_validation_inference_steps",
        type=positive_int,
        default=25,
        help="Denoising steps of validation images.",
    )
    log.add_argument(
        "--evaluate_steps",
        type=positive_int,
        default=None,
        help="Every N steps and at the end, score the validation images as evaluate_dti.py does: text fidelity to "
        "--validation_prompt with the placeholder read as --initializer_token, subject fidelity to the training "
        "images; logged as eval/*.",
    )
    log.add_argument(
        "--evaluation_models",
        nargs="+",
        default=[],
        metavar="NAME=ID",
        help="--evaluate_steps' scoring models, if not evaluate_dti.py's defaults: clip=ID, siglip=ID, dino=ID (ID "
        "none skips).",
    )
    hub = parser.add_argument_group("Hub")
    hub.add_argument(
        "--push_to_hub", action="store_true", help="Upload the embeddings, validation images and a model card."
    )
    hub.add_argument("--hub_token", default=None, help="Hub token (default: the stored login).")
    hub.add_argument("--hub_model_id", default=None, help="Repository name (default: the output folder's name).")
    hub.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    hub.add_argument(
        "--push_checkpoints", action="store_true", help="Also upload checkpoint-N folders (not uploaded by default)."
    )


def add_training_args(
    parser,
    *,
    default_model,
    default_resolution,
    default_flip_p,
    default_kappa=1e-4,
    default_batch_size=4,
    default_accumulation=1,
    default_steps=400,
):
    """The flags of diffusers' textual-inversion examples (same names and meanings) plus DTI's own, with each family's
    recipe as defaults (SD/SDXL: kappa 1e-4, batch 4 x 1, 400 steps; the authors' SANA and Wan recipes: 5e-5, 2 x 2,
    500). default_resolution None: the model's own (`model_resolution`)."""
    _add_method_args(parser, default_kappa)
    _add_model_and_concept_args(parser, default_model)
    _add_data_args(parser, default_resolution, default_flip_p)
    _add_training_loop_args(parser, default_batch_size, default_accumulation, default_steps)
    _add_optimizer_args(parser)
    _add_saving_args(parser)
    _add_logging_and_hub_args(parser)
    return parser


def _trackers():
    """accelerate's trackers and its own check that each one's package is installed."""
    from accelerate.utils import (
        is_comet_ml_available,
        is_mlflow_available,
        is_tensorboard_available,
        is_wandb_available,
    )

    return {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "comet_ml": is_comet_ml_available,
        "mlflow": is_mlflow_available,
    }


def check_memory_for_resolution(resolution):
    """Refuse a resolution whose views would not fit in this machine's memory: each image is resized to it (8-bit
    RGB, up to twice as long as it is wide) and encoded four views at a time as float32 tensors: about 64 bytes a
    pixel of the square view, before the VAE's own activations."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no figure to compare with
        return
    needed = 64 * resolution * resolution
    if needed > memory:
        largest = int((memory / 64) ** 0.5) // 8 * 8
        raise DTIError(
            f"--resolution {resolution} needs about {needed / 2**30:.0f} GiB of memory for its image views, and this "
            f"machine has {memory / 2**30:.0f} GiB; use at most {largest} (the models train at 512 to 1024)."
        )


def add_text_encoder_float32_arg(parser, size):
    """SANA and Wan: --text_encoder_float32 (their text encoder runs in bf16 under --mixed_precision bf16)."""
    parser.add_argument(
        "--text_encoder_float32",
        action="store_true",
        help="Run the text encoder in float32 under --mixed_precision bf16 too (it runs in bf16 there by default, as "
        f"the authors run it; in float32 otherwise: it overflows in fp16). Costs {size} more memory. The learned "
        "directions and their optimizer state are float32 either way; on tiny models a bf16 encoder moved them by "
        "under a fifth of one step's turn after 20 steps (README).",
    )


def check_args(args, unet=True):
    """Checks between flags that need no model: one clear sentence per problem, before anything heavy loads. Reads
    the flags only. unet=False: a transformer model (SANA, Wan), which CUDA graphs do not capture."""
    from diffusers.utils import is_xformers_available

    if args.resolution is not None and args.resolution % 8:
        raise DTIError(
            f"--resolution {args.resolution} is not a multiple of 8; the VAE downsamples by 8 (try 512 or 768)."
        )
    if args.resolution is not None:
        check_memory_for_resolution(args.resolution)
    resolve_token_scale(args.token_scale, {"mean": 1.0, "min": 1.0, "max": math.inf})
    if args.train_data_dir is None and args.dataset_name is None:
        raise DTIError("No training images: pass --train_data_dir FOLDER or --dataset_name.")
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise DTIError("Pass either --train_data_dir or --dataset_name, not both.")
    check_data_and_output(args.train_data_dir, args.output_dir)
    if args.caption_column and not args.dataset_name:
        raise DTIError(
            "--caption_column goes with --dataset_name; in a --train_data_dir folder the caption of NAME.jpg is "
            "NAME.txt beside it."
        )
    for tracker, available in _trackers().items():
        if args.report_to in (tracker, "all") and not available():
            raise DTIError(
                f"--report_to {tracker} needs the {tracker} package: pip install {tracker.replace('_', '-')}, or use "
                "--report_to tensorboard (installed with requirements.txt) or none."
            )
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise DTIError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers, or drop the flag "
            "(PyTorch SDPA is used by default)."
        )
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise DTIError(
            "--hub_token with --report_to wandb would expose the token in the run config; log in with "
            "`hf auth login` instead."
        )
    if args.cuda_graphs == "on" and not unet:
        raise DTIError(
            "--cuda_graphs captures the SD and SDXL UNets only; this model's transformer trains eagerly (or with "
            "--compile): drop the flag."
        )
    if args.cuda_graphs == "on" and (args.compile or args.gradient_checkpointing):
        other = (
            "--compile (which captures CUDA graphs itself)"
            if args.compile
            else "--gradient_checkpointing (the graph keeps the UNet's activations)"
        )
        raise DTIError(f"--cuda_graphs does not go with {other}; drop one of them.")
    if args.evaluate_steps:  # the scoring models' names are checked here; the models load after the base model
        if not args.validation_prompt:
            raise DTIError(
                "--evaluate_steps scores the validation images: pass --validation_prompt too, e.g. "
                "'a <my-toy> on a beach'."
            )
        encoder_ids(args.evaluation_models)
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise DTIError(f"--learning_rate must be positive, not {args.learning_rate}.")
    if args.learning_rate is not None and args.learning_rate > MAX_LEARNING_RATE:
        unit = "radians a step for rsgd" if args.optimizer == "rsgd" else "for adamw, on rows of norm about 0.4"
        raise DTIError(
            f"--learning_rate {args.learning_rate:g} is far beyond any useful rate ({unit}), and overflows the "
            f"embedding; use at most {MAX_LEARNING_RATE:g} (the defaults: rsgd {DEFAULT_LEARNING_RATES['rsgd']:g}, "
            f"adamw {DEFAULT_LEARNING_RATES['adamw']:g})."
        )
    return args
