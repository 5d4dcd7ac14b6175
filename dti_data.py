"""The training data: the user's images, their views and cached latents, the prompts, and the losses.

Images are decoded once (with one sentence for every file that cannot be used); every distinct view (a crop position
of an image, and its mirror) goes through the VAE once (SD's KL VAE, SANA's DC-AE, Wan's video VAE on one-frame
videos); prompts (templates and captions) are tokenized once. A step then draws from device tensors only:
`TrainingData.batch` indexes the cached latents and prompt ids, and the noise comes from a generator seeded by (seed,
step, rank), so the data position is the step count and a resume is exact. The losses: the denoising loss of SD/SDXL
(`diffusion_loss`) and the flow-matching loss of SANA and Wan (`flow_matching_loss`).
"""

import copy
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from dti_utils import DTIError, logger


__all__ = [
    # the user's images
    "IMAGE_EXTENSIONS",
    "TrainingImage",
    "to_rgb",
    "open_rgb",
    "load_training_images",
    "warn_small_images",
    # prompts
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "prompt_templates",
    "tokenize_prompts",
    "caption_prompt",
    "prompt_texts",
    "check_prompts",
    "training_prompts",
    "ZERO_PAD_MAX",
    "insert_zero_pad",
    # views and latents
    "image_to_tensor",
    "square_view",
    "resized_shorter_side",
    "crop_positions",
    "build_views",
    "kl_latents",
    "dc_ae_latents",
    "wan_latents",
    "encode_views",
    "cache_views",
    "TrainingData",
    # the losses
    "step_generator",
    "diffusion_loss",
    "flow_schedule",
    "flow_matching_loss",
]


# ----------------------------------------------------------------------------------------------------
# The user's images: decoded once, with one sentence for every file that cannot be used
# ----------------------------------------------------------------------------------------------------


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class TrainingImage:
    """One training image: its name (file or dataset row), the decoded RGB picture, its caption (None: templates)."""

    def __init__(self, name, image, caption=None):
        self.name, self.image, self.caption = name, image, caption or None


def to_rgb(image, name):
    """EXIF orientation applied; 16-bit, float, palette, RGBA and greyscale images to 8-bit RGB (transparency on
    white)."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise DTIError(f"Image {name} is corrupt or truncated ({e}); remove or replace it.") from e
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: scale to 8 bits, convert() would clip
        values = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":  # float TIFF: [0, 1] is the only range with a meaning we can assume
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise DTIError(
                f"Image {name} holds floating-point values outside [0, 1] ({values.min():.3g} to "
                f"{values.max():.3g}); save it as an 8- or 16-bit image."
            )
        image = Image.fromarray((values * 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


def open_rgb(path):
    """An image file as a PIL RGB image, read and closed."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _dataset_images(dataset_name, dataset_config_name, image_column, caption_column, cache_dir):
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    except (OSError, ValueError, DatasetsError) as e:
        raise DTIError(f"--dataset_name {dataset_name!r} could not be loaded ({type(e).__name__}: {e}).") from e
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in ds.column_names:
            raise DTIError(
                f"{flag} {column!r} is not a column of {dataset_name!r}; its columns are {ds.column_names}."
            )
    captions = ds[caption_column] if caption_column else [None] * len(ds)
    images = []
    for i, (item, caption) in enumerate(zip(ds[image_column], captions)):
        name = f"row {i} of {dataset_name}"
        if not isinstance(item, Image.Image):
            raise DTIError(
                f"Row {i} of column {image_column!r} in {dataset_name!r} is not an image; pass the image column "
                "with --image_column."
            )
        images.append(TrainingImage(name, to_rgb(item, name), " ".join(str(caption or "").split())))
    if not images:
        raise DTIError(f"--dataset_name {dataset_name!r} has no images in its train split.")
    return images


def _open_image(path):
    try:
        with Image.open(path) as image:
            return to_rgb(image, path)
    except Image.DecompressionBombError as e:  # Pillow refuses more than twice its MAX_IMAGE_PIXELS
        size = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(size.group(1)) / 1e6:.0f} megapixels" if size else "more pixels than that"
        raise DTIError(
            f"Image {path} has {pixels}; Pillow decodes at most {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels "
            "safely: resize it (a side of 4096 pixels is plenty for training)."
        ) from e
    except (UnidentifiedImageError, OSError) as e:
        raise DTIError(f"Image {path} cannot be read ({e}); remove or replace it.") from e


def _read_caption(path):
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a prompt word
            return " ".join(f.read().split()) or None
    except (OSError, UnicodeDecodeError) as e:
        raise DTIError(f"Caption {path} cannot be read as UTF-8 text ({e}); fix or remove it.") from e


def _folder_images(train_data_dir):
    if not os.path.isdir(train_data_dir):
        raise DTIError(f"--train_data_dir {train_data_dir} is not a folder; pass the folder that holds your images.")
    entries = sorted(os.listdir(train_data_dir))
    hidden = [n for n in entries if n.startswith(".")]
    folders = [n for n in entries if not n.startswith(".") and os.path.isdir(os.path.join(train_data_dir, n))]
    names = [n for n in entries if n not in hidden and n not in folders]
    if folders:
        logger.warning(
            f"Skipping {len(folders)} subfolder(s) of {train_data_dir}: {', '.join(f + '/' for f in folders)} (only "
            "the images at its top level are read, as in diffusers' example; move them up to train on them)"
        )
    if hidden:
        logger.warning(
            f"Skipping {len(hidden)} hidden file(s) in {train_data_dir} (names starting with '.', such as {hidden[0]})"
        )
    image_names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    caption_files = {os.path.splitext(n)[0] + ".txt" for n in image_names} & set(names)  # NAME.txt beside NAME.jpg
    skipped = [n for n in names if n not in image_names and n not in caption_files]
    if skipped:
        logger.warning(
            f"Skipping {len(skipped)} file(s) in {train_data_dir} that are not images: {', '.join(skipped)}"
        )
    if not image_names:
        raise DTIError(
            f"--train_data_dir {train_data_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put the concept's "
            "pictures there."
        )
    images = []
    for name in image_names:
        path = os.path.join(train_data_dir, name)
        caption_file = os.path.splitext(name)[0] + ".txt"
        image = _open_image(path)
        caption = _read_caption(os.path.join(train_data_dir, caption_file)) if caption_file in caption_files else None
        images.append(TrainingImage(path, image, caption))
    return images


def load_training_images(
    train_data_dir=None,
    dataset_name=None,
    dataset_config_name=None,
    image_column="image",
    cache_dir=None,
    caption_column=None,
):
    """The training images (TrainingImage: name, RGB picture, caption), from a folder (captions in NAME.txt beside
    NAME.jpg) or a `datasets` dataset (captions in `caption_column`)."""
    if dataset_name:
        return _dataset_images(dataset_name, dataset_config_name, image_column, caption_column, cache_dir)
    if not train_data_dir:
        raise DTIError("No training images: pass --train_data_dir FOLDER or --dataset_name.")
    return _folder_images(train_data_dir)


def warn_small_images(images, resolution):
    """One warning listing the images whose shorter side is under a quarter of the training resolution."""
    small = [f"{im.name} ({im.image.width}x{im.image.height})" for im in images if min(im.image.size) < resolution / 4]
    if small:
        logger.warning(
            f"{len(small)} image(s) are far smaller than --resolution {resolution} and will be upscaled into blur: "
            + ", ".join(small)
        )


# ----------------------------------------------------------------------------------------------------
# Prompts: the templates and the captions, tokenized once
# ----------------------------------------------------------------------------------------------------


OBJECT_TEMPLATES = [  # diffusers' imagenet_templates_small
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [  # diffusers' imagenet_style_templates_small
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


def prompt_templates(learnable_property):
    return STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES


def _tokenize(tok, prompts, max_length=None):
    return tok(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=max_length or tok.model_max_length,
        return_tensors="pt",
    )


def tokenize_prompts(tokenizers, prompts, device, max_length=None):
    """Token ids (num_prompts, max_length) of the prompts, once per tokenizer, on the device. max_length None: each
    tokenizer's model_max_length (CLIP's 77)."""
    return [_tokenize(tok, prompts, max_length).input_ids.to(device) for tok in tokenizers]


def caption_prompt(caption, placeholder, caption_token=None, token=None):
    """A caption as a training prompt: the placeholder (all its tokens) written at each `{}`, else in place of the
    placeholder's first token (`token`, default the placeholder's first word) where the caption writes it, else of
    each whole-word `caption_token` (any case; the class word, say), else prefixed: "<toy>, a toy on a table"."""
    if "{}" in caption:
        return caption.replace("{}", placeholder)
    for word in filter(None, (token or placeholder.split()[0], caption_token)):
        pattern = rf"(?<!\w){re.escape(word)}(?!\w)"
        if re.search(pattern, caption, flags=re.IGNORECASE):
            return re.sub(pattern, lambda _: placeholder, caption, flags=re.IGNORECASE)
    return f"{placeholder}, {caption}"


def prompt_texts(images, tokens, *, learnable_property, caption_token=None, preprocess=None, joiner=" "):
    """Every training prompt as text: the templates with the placeholder (the tokens joined by `joiner`: SANA's and
    Wan's tokenizers make a space its own token, so ""), then one per captioned image; `preprocess(text)` is what the
    family's pipeline does to a prompt (SANA lowercases it). Returns (prompts, caption_rows): caption_rows[i] is image
    i's prompt, or -1 where it has no caption (it uses the templates)."""
    placeholder = joiner.join(tokens)
    prompts = [template.format(placeholder) for template in prompt_templates(learnable_property)]
    rows = []
    for image in images:
        rows.append(len(prompts) if image.caption else -1)
        prompts += (
            [caption_prompt(image.caption, placeholder, caption_token, token=tokens[0])] if image.caption else []
        )
    prompts = [preprocess(prompt) for prompt in prompts] if preprocess else prompts
    return prompts, rows


def check_prompts(
    tokenizers, images, tokens, *, learnable_property, caption_token=None, max_length=None, preprocess=None, joiner=" "
):
    """Before any model loads: every prompt must keep all the placeholder's tokens within the text encoder's context
    (max_length, else the tokenizer's model_max_length): the templates bound --num_vectors, and a caption that puts
    the placeholder past the cut is named. A caption cut after the placeholder gets one warning; images without a
    caption while others have one, too. The other arguments are training_prompts'."""
    prompts, rows = prompt_texts(
        images,
        tokens,
        learnable_property=learnable_property,
        caption_token=caption_token,
        preprocess=preprocess,
        joiner=joiner,
    )
    templates = prompt_texts([], [""], learnable_property=learnable_property, preprocess=preprocess)[0]
    for tokenizer in tokenizers:
        probe = copy.deepcopy(tokenizer)  # the tokens added to a copy: the real tokenizer stays as it was
        probe.add_tokens([t for t in tokens if t not in probe.get_vocab()])
        ids, limit = set(probe.convert_tokens_to_ids(tokens)), max_length or probe.model_max_length
        longest = max(len(probe(t, verbose=False).input_ids) for t in templates)
        if longest + len(tokens) > limit:
            raise DTIError(
                f"--num_vectors {len(tokens)}: the {learnable_property} templates with {len(tokens)} placeholder "
                f"tokens run to {longest + len(tokens)} tokens, past the text encoder's {limit}, and the vectors "
                f"past the cut would never train; use at most {limit - longest} vectors."
            )
        for image, row in zip(images, rows):
            if row < 0:
                continue
            positions = [k for k, i in enumerate(probe(prompts[row], verbose=False).input_ids) if i in ids]
            if positions and positions[-1] >= limit - 1:  # the last position is the end-of-text token
                raise DTIError(
                    f"The caption of {image.name} puts the placeholder at token {positions[-1] + 1}, past the text "
                    f"encoder's {limit} tokens, where it is cut off: the image would train without it. Shorten the "
                    "caption or write the placeholder ({} or the --caption_token word) nearer its start."
                )
    captioned = [row for row in rows if row >= 0]
    if 0 < len(captioned) < len(images):
        logger.warning(
            f"{len(captioned)} of {len(images)} images have a caption; the other {len(images) - len(captioned)} use "
            f"the {learnable_property} templates."
        )

    def too_long(prompt):
        return any(
            len(tok(prompt, verbose=False).input_ids) > (max_length or tok.model_max_length) for tok in tokenizers
        )

    cut = [im.name for im, row in zip(images, rows) if row >= 0 and too_long(prompts[row])]
    if cut:
        logger.warning(
            f"{len(cut)} caption(s) run past the text encoder's {max_length or tokenizers[0].model_max_length} tokens "
            f"and are cut there: {', '.join(cut)}"
        )


def training_prompts(
    tokenizers,
    images,
    tokens,
    *,
    learnable_property,
    device,
    caption_token=None,
    max_length=None,
    preprocess=None,
    joiner=" ",
    lengths=False,
):
    """Every prompt (prompt_texts), tokenized once per tokenizer (check_prompts has checked them). Returns
    (prompt_ids, caption_rows); max_length None pads to the tokenizer's model_max_length. lengths=True adds a third
    value: each prompt's real length in tokens of the first tokenizer (CPU)."""
    prompts, rows = prompt_texts(
        images,
        tokens,
        learnable_property=learnable_property,
        caption_token=caption_token,
        preprocess=preprocess,
        joiner=joiner,
    )
    encoded = [_tokenize(tok, prompts, max_length) for tok in tokenizers]
    ids, rows = [e.input_ids.to(device) for e in encoded], torch.tensor(rows, dtype=torch.long)
    if not lengths:
        return ids, rows
    return ids, rows, encoded[0].attention_mask.sum(1)


ZERO_PAD_MAX = 15  # the authors' cap on SANA's zero-norm pad tokens


def insert_zero_pad(input_ids, pad, length):
    """SANA's zero pad (the authors' --zero_pad): `pad[b]` tokens right after row b's first token (BOS), which the
    caller gives zero input embeddings; the prompt moves right by pad[b]. Returns the ids (B, length), cut at
    `length`, and the pad positions (B, length) bool."""
    positions = torch.arange(length, device=input_ids.device)
    shift = pad.unsqueeze(1)
    source = (positions - shift).clamp(0, input_ids.shape[1] - 1)
    return torch.gather(input_ids, 1, source), (positions >= 1) & (positions <= shift)


# ----------------------------------------------------------------------------------------------------
# Views: every crop position of every image (and its mirror), VAE-encoded once
# ----------------------------------------------------------------------------------------------------


def image_to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def square_view(image, resolution, center_crop=False):
    """diffusers' textual-inversion view: optional centre square crop, then a bicubic resize to a square."""
    if center_crop:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)


def resized_shorter_side(image, resolution):
    """The image resized (bicubic) so that its shorter side is `resolution`, aspect ratio kept."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    return image.resize(size, resample=Image.Resampling.BICUBIC)


def crop_positions(image, resolution, center_crop, positions):
    """(top, left) corners of square crops: the centre, or `positions` evenly spaced along the long side."""
    free_y, free_x = image.height - resolution, image.width - resolution
    if center_crop or (free_x == 0 and free_y == 0):
        return [(free_y // 2, free_x // 2)]
    fractions = [i / max(positions - 1, 1) for i in range(positions)] if positions > 1 else [0.5]
    return [(round(free_y * f), round(free_x * f)) for f in fractions]


def build_views(images, crops_of, flip):
    """The distinct views of every image: returns (keys, view_index). keys[v] = (image index, mirrored, crop) names
    view v; view_index[image, flip, crop] is the view of each choice. crops_of(image) lists crop keys (repeats map to
    one view); flip adds the mirror of each. An image with fewer crops repeats its own, so each image keeps
    probability 1/len(images) and its crops stay equally likely whenever the counts divide."""
    keys, table = [], []
    for i, image in enumerate(images):
        crops, per_flip = crops_of(image), []
        for mirrored in [False, True] if flip else [False]:
            row, seen = [], {}
            for crop in crops:
                if crop not in seen:
                    seen[crop] = len(keys)
                    keys.append((i, mirrored, crop))
                row.append(seen[crop])
            per_flip.append(row)
        table.append(per_flip)
    width = max(len(row) for per_flip in table for row in per_flip)
    table = [[[row[j % len(row)] for j in range(width)] for row in per_flip] for per_flip in table]
    return keys, torch.tensor(table, dtype=torch.long)


def kl_latents(vae, pixels):
    """SD and SDXL: the KL VAE's latent distribution, (mean, std) float32; scaled in the loss."""
    dist_ = vae.encode(pixels).latent_dist
    return dist_.mean.float(), dist_.std.float()


def dc_ae_latents(vae, pixels):
    """SANA: the DC-AE's latent times its scaling factor (as SanaPipeline divides it back), float32. The DC-AE is
    deterministic: no distribution, no std."""
    return (vae.encode(pixels).latent * vae.config.scaling_factor).float(), None


def wan_latents(vae, pixels):
    """Wan: each image as a one-frame video (B, 3, 1, H, W); the posterior's mode (as the authors train), normalised
    per channel by the VAE's latents_mean and latents_std, the inverse of WanPipeline's decode; float32, no std."""
    z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    return (z - mean) * (1.0 / std), None


@torch.no_grad()
def encode_views(vae, keys, render, device, batch_size=4, encode=kl_latents):
    """The latents of every view (`encode(vae, pixels)`: kl_latents, dc_ae_latents or wan_latents), each encoded once,
    a chunk at a time so that only `batch_size` views are ever held as float tensors. render(image index, crop) gives
    the PIL view. Returns (means, stds) float32; stds is None for a deterministic encoder."""
    means, stds = [], []
    for start in range(0, len(keys), batch_size):
        chunk = []
        for i, mirrored, crop in keys[start : start + batch_size]:
            view = render(i, crop)
            chunk.append(image_to_tensor(ImageOps.mirror(view) if mirrored else view))
        mean, std = encode(vae, torch.stack(chunk).to(device, dtype=vae.dtype))
        means.append(mean)
        stds.append(std)
    return torch.cat(means), None if stds[0] is None else torch.cat(stds)


def cache_views(vae, resized, *, resolution, center_crop, positions, flip, device, encode=kl_latents):
    """Every distinct view of the resized images (their square crops of side `resolution`, crop_positions, and with
    `flip` their mirrors; build_views) VAE-encoded once (encode_views). Returns (keys, view_index, means, stds)."""
    keys, view_index = build_views(
        resized, lambda image: crop_positions(image, resolution, center_crop, positions), flip=flip
    )

    def render(i, corner):
        top, left = corner
        return resized[i].crop((left, top, left + resolution, top + resolution))

    means, stds = encode_views(vae, keys, render, device, encode=encode)
    return keys, view_index, means, stds


class TrainingData:
    """What the loop samples from: cached VAE latents of every view and pre-tokenized prompts.

    A step draws a latent from the cached mean and std, which has the distribution of encoding anew (latent_stds
    None: a deterministic encoder, the mean is the latent). The order is a function of (seed, epoch) and the noise of
    (seed, step, rank), so the data position is the step count and a resume continues exactly. Every micro-batch has
    the same size (the epoch's order wraps around to fill the last one), so the UNet always sees one input shape: one
    CUDA graph, one memory pool. A sample of a captioned image (caption_rows[image] >= 0, see `training_prompts`)
    takes its caption, or with probability caption_dropout the template drawn for it; the draw comes from the same
    (seed, epoch) stream, so a resume stays exact.

    prompt_lengths (CPU, the real length of each prompt row) adds "lengths" (device) and "max_length" (an int, the
    longest in the micro-batch, known on the host without a sync) to each batch, for encoders that run only as far
    as the prompts reach. zero_pad (SANA, the authors' --zero_pad) draws, from the same (seed, epoch) stream, a number
    of zero-norm pad tokens for each sample, floor(min(Exponential(mean 2), 15)), added to "lengths" and given as
    "pad" (see `insert_zero_pad`)."""

    def __init__(
        self,
        latent_means,
        latent_stds,
        view_index,
        prompt_ids,
        *,
        repeats,
        flip_p,
        seed,
        extra=None,
        caption_rows=None,
        caption_dropout=0.0,
        prompt_lengths=None,
        zero_pad=False,
    ):
        self.latent_means, self.latent_stds = latent_means, latent_stds  # (num_views, C, [frames,] h, w) float32
        self.view_index = torch.as_tensor(view_index).cpu()  # (images, 1 or 2 flips, crops) long; read once per epoch
        self.prompt_ids = prompt_ids  # list of (num_prompts, L) tensors, one per tokenizer
        self.num_images = self.view_index.shape[0]
        self.length = self.num_images * repeats
        self.flip_p, self.seed = flip_p, seed
        self.extra = extra or {}  # per-view tensors (SDXL time ids), indexed like the latents
        self.caption_rows = None if caption_rows is None or (caption_rows < 0).all() else caption_rows.cpu()
        num_captions = 0 if self.caption_rows is None else int((self.caption_rows >= 0).sum())
        self.num_templates = self.prompt_ids[0].shape[0] - num_captions
        self.caption_dropout = caption_dropout
        self.prompt_lengths = None if prompt_lengths is None else torch.as_tensor(prompt_lengths).long().cpu()
        self._lengths = None if prompt_lengths is None else self.prompt_lengths.to(self.latent_means.device)
        self.zero_pad = zero_pad
        self._epoch_cache = {}

    def steps_per_epoch(self, batch_size, num_processes):
        return math.ceil(self.length / (batch_size * num_processes))

    def _epoch(self, epoch, span):
        """The epoch's draws, made on the CPU (the same in every process) and moved to the device once per epoch, so
        that a step only indexes device tensors: no host-to-device copy, which would sync."""
        if (epoch, span) not in self._epoch_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=g)
            flips = (torch.rand(self.length, generator=g) < self.flip_p).long().clamp_max(self.view_index.shape[1] - 1)
            crops = torch.randint(0, self.view_index.shape[2], (self.length,), generator=g)
            prompts = torch.randint(0, self.num_templates, (self.length,), generator=g)
            if self.caption_rows is not None:  # the image's caption unless dropped; else its template
                caption = self.caption_rows[torch.arange(self.length) % self.num_images]
                kept = (torch.rand(self.length, generator=g) >= self.caption_dropout) & (caption >= 0)
                prompts = torch.where(kept, caption, prompts)
            pads = torch.zeros(self.length, dtype=torch.long)
            if self.zero_pad:  # drawn after every other draw: the streams of runs without it are unchanged
                pads = torch.empty(self.length).exponential_(0.5, generator=g).clamp_max(ZERO_PAD_MAX).long()
            order = order[torch.arange(math.ceil(self.length / span) * span) % self.length]  # wrap to whole batches
            views = self.view_index[order % self.num_images, flips[order], crops[order]]
            device = self.latent_means.device
            host = {"prompts": prompts[order], "pads": pads[order]}  # what the host needs to know, without a sync
            device_ = {"views": views.to(device), "prompts": prompts[order].to(device), "pads": pads[order].to(device)}
            self._epoch_cache = {(epoch, span): (device_, host)}
        return self._epoch_cache[(epoch, span)]

    def batch(self, micro_step, batch_size, num_processes, rank):
        """The micro-batch of this rank at global micro-step `micro_step`: a dict of device tensors (and, with
        prompt_lengths, the int "max_length")."""
        epoch, index = divmod(micro_step, self.steps_per_epoch(batch_size, num_processes))
        span = batch_size * num_processes
        drawn, host = self._epoch(epoch, span)
        this = slice(index * span, (index + 1) * span)
        view = drawn["views"][this][rank::num_processes]
        template = drawn["prompts"][this][rank::num_processes]
        out = {"mean": self.latent_means[view], "input_ids": [ids[template] for ids in self.prompt_ids]}
        if self.latent_stds is not None:
            out["std"] = self.latent_stds[view]
        if self.prompt_lengths is not None:
            width = self.prompt_ids[0].shape[1]
            host_lengths = self.prompt_lengths[host["prompts"][this][rank::num_processes]]
            out["lengths"] = self._lengths[template]
            if self.zero_pad:
                host_lengths = host_lengths + host["pads"][this][rank::num_processes]
                out["pad"] = drawn["pads"][this][rank::num_processes]
                out["lengths"] = (out["lengths"] + out["pad"]).clamp_max(width)
            out["max_length"] = int(host_lengths.clamp_max(width).max())
        out.update({key: value[view] for key, value in self.extra.items()})
        return out


# ----------------------------------------------------------------------------------------------------
# The loss: noise from (seed, step, rank), the target of the model's scheduler
# ----------------------------------------------------------------------------------------------------


def step_generator(seed, micro_step, rank, device):
    """A generator whose stream depends only on (seed, step, rank): noise needs no saved RNG state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 6364136223846793005 + micro_step * 1442695040888963407 + rank * 2654435761) % (2**63))
    return g


def diffusion_loss(
    unet, noise_scheduler, batch, encoder_hidden_states, *, generator, vae_config, weight_dtype, added_cond_kwargs=None
):
    """The denoising loss of one micro-batch: sample the cached latent, add noise, predict, MSE against the
    scheduler's target (the noise, or the velocity for v-prediction models)."""
    mean, std = batch["mean"], batch["std"]
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if getattr(vae_config, "shift_factor", None) is not None:
        latents = latents - vae_config.shift_factor
    latents = latents * vae_config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    config = noise_scheduler.config
    timesteps = torch.randint(
        0, config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = encoder_hidden_states.to(weight_dtype)
    pred = unet(noisy.to(weight_dtype), timesteps, hidden, added_cond_kwargs=added_cond_kwargs).sample
    if config.prediction_type == "epsilon":
        target = noise
    elif config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise DTIError(f"Unknown prediction type {config.prediction_type} in the model's scheduler config.")
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def flow_schedule(scheduler, device):
    """(sigmas, timesteps) of a flow-matching scheduler's training grid on the device, moved once. SANA's and Wan's
    folders hold a DPM-Solver/UniPC config whose `flow_shift` FlowMatchEulerDiscreteScheduler.from_pretrained does
    not read: its grid has shift 1.0, sigma = t / 1000 for t = 1000 .. 1, which the authors train with."""
    return scheduler.sigmas.to(device, torch.float32), scheduler.timesteps.to(device, torch.float32)


def flow_matching_loss(transformer, schedule, batch, encoder_hidden_states, *, generator, weight_dtype, **kwargs):
    """The flow-matching loss of one micro-batch (SANA, Wan): x_t = (1 - s) x0 + s eps with s drawn uniformly from
    the schedule's grid (index = floor(u * N), u ~ U[0, 1), as diffusers' weighting "none"), the transformer's
    prediction against eps - x0, MSE. The noise, then u, come from `generator`; `kwargs` go to the transformer (SANA:
    encoder_attention_mask)."""
    sigmas, timesteps = schedule
    x0 = batch["mean"]
    if "std" in batch:
        x0 = x0 + batch["std"] * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    u = torch.rand((x0.shape[0],), generator=generator, device=x0.device)
    index = (u * sigmas.shape[0]).long().clamp_max(sigmas.shape[0] - 1)
    sigma = sigmas[index].view(-1, *[1] * (x0.dim() - 1))
    noisy = (1.0 - sigma) * x0 + sigma * noise
    pred = transformer(
        hidden_states=noisy.to(weight_dtype),
        encoder_hidden_states=encoder_hidden_states.to(weight_dtype),
        timestep=timesteps[index],
        return_dict=False,
        **kwargs,
    )[0]
    return F.mse_loss(pred.float(), (noise - x0).float(), reduction="mean")
