"""The training data: the user's images, their views and cached latents, the prompts, and the denoising loss.

Images are decoded once (with one sentence for every file that cannot be used); every distinct view (a crop position
of an image, and its mirror) goes through the VAE once; prompts (templates and captions) are tokenized once. A step
then draws from device tensors only: `TrainingData.batch` indexes the cached latents and prompt ids, and the noise
comes from a generator seeded by (seed, step, rank), so the data position is the step count and a resume is exact.
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
    # views and latents
    "image_to_tensor",
    "square_view",
    "resized_shorter_side",
    "crop_positions",
    "build_views",
    "encode_views",
    "TrainingData",
    # the loss
    "step_generator",
    "diffusion_loss",
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


def tokenize_prompts(tokenizers, prompts, device):
    """Token ids (num_prompts, max_length) of the prompts, once per tokenizer, on the device."""
    return [
        tok(
            prompts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids.to(device)
        for tok in tokenizers
    ]


def caption_prompt(caption, placeholder, caption_token=None):
    """A caption as a training prompt: the placeholder (all its tokens) written at each `{}`, else in place of the
    placeholder's first token where the caption writes it, else of each whole-word `caption_token` (any case; the
    class word, say), else prefixed: "<toy>, a toy on a table"."""
    if "{}" in caption:
        return caption.replace("{}", placeholder)
    for word in filter(None, (placeholder.split()[0], caption_token)):
        pattern = rf"(?<!\w){re.escape(word)}(?!\w)"
        if re.search(pattern, caption, flags=re.IGNORECASE):
            return re.sub(pattern, lambda _: placeholder, caption, flags=re.IGNORECASE)
    return f"{placeholder}, {caption}"


def prompt_texts(images, tokens, *, learnable_property, caption_token=None):
    """Every training prompt as text: the templates with the placeholder (all its tokens), then one per captioned
    image. Returns (prompts, caption_rows): caption_rows[i] is image i's prompt, or -1 where it has no caption."""
    placeholder = " ".join(tokens)
    prompts = [template.format(placeholder) for template in prompt_templates(learnable_property)]
    rows = []
    for image in images:
        rows.append(len(prompts) if image.caption else -1)
        prompts += [caption_prompt(image.caption, placeholder, caption_token)] if image.caption else []
    return prompts, rows


def check_prompts(tokenizers, images, tokens, *, learnable_property, caption_token=None):
    """Before any model loads: every prompt must keep all the placeholder's tokens within the text encoder's context
    (the templates bound --num_vectors; a caption that puts the placeholder past the cut is named). A caption cut
    after the placeholder gets one warning; images without a caption while others have one, too."""
    prompts, rows = prompt_texts(images, tokens, learnable_property=learnable_property, caption_token=caption_token)
    for tokenizer in tokenizers:
        probe = copy.deepcopy(tokenizer)  # the tokens added to a copy: the real tokenizer stays as it was
        probe.add_tokens([t for t in tokens if t not in probe.get_vocab()])
        ids, limit = set(probe.convert_tokens_to_ids(tokens)), probe.model_max_length
        longest = max(len(probe(t.format(""), verbose=False).input_ids) for t in prompt_templates(learnable_property))
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
        return any(len(tok(prompt, verbose=False).input_ids) > tok.model_max_length for tok in tokenizers)

    cut = [im.name for im, row in zip(images, rows) if row >= 0 and too_long(prompts[row])]
    if cut:
        logger.warning(
            f"{len(cut)} caption(s) run past the text encoder's {tokenizers[0].model_max_length} tokens and are cut "
            f"there: {', '.join(cut)}"
        )


def training_prompts(tokenizers, images, tokens, *, learnable_property, device, caption_token=None):
    """Every prompt (prompt_texts), tokenized once per tokenizer (check_prompts has checked them). Returns
    (prompt_ids, caption_rows)."""
    prompts, rows = prompt_texts(images, tokens, learnable_property=learnable_property, caption_token=caption_token)
    return tokenize_prompts(tokenizers, prompts, device), torch.tensor(rows, dtype=torch.long)


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


@torch.no_grad()
def encode_views(vae, keys, render, device, batch_size=4):
    """The VAE's latent distribution (mean, std; float32) of every view, encoded once, a chunk at a time so that
    only `batch_size` views are ever held as float tensors. render(image index, crop) gives the PIL view."""
    means, stds = [], []
    for start in range(0, len(keys), batch_size):
        chunk = []
        for i, mirrored, crop in keys[start : start + batch_size]:
            view = render(i, crop)
            chunk.append(image_to_tensor(ImageOps.mirror(view) if mirrored else view))
        dist_ = vae.encode(torch.stack(chunk).to(device, dtype=vae.dtype)).latent_dist
        means.append(dist_.mean.float())
        stds.append(dist_.std.float())
    return torch.cat(means), torch.cat(stds)


class TrainingData:
    """What the loop samples from: cached VAE latent distributions of every view and pre-tokenized prompts.

    A step draws a latent from the cached mean and std, which has the distribution of encoding anew. The order is a
    function of (seed, epoch) and the noise of (seed, step, rank), so the data position is the step count and a
    resume continues exactly. Every micro-batch has the same size (the epoch's order wraps around to fill the last
    one), so the UNet always sees one input shape: one CUDA graph, one memory pool. A sample of a captioned image
    (caption_rows[image] >= 0, see `training_prompts`) takes its caption, or with probability caption_dropout the
    template drawn for it; the draw comes from the same (seed, epoch) stream, so a resume stays exact."""

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
    ):
        self.latent_means, self.latent_stds = latent_means, latent_stds  # (num_views, C, h, w) float32
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
            order = order[torch.arange(math.ceil(self.length / span) * span) % self.length]  # wrap to whole batches
            views = self.view_index[order % self.num_images, flips[order], crops[order]]
            device = self.latent_means.device
            self._epoch_cache = {(epoch, span): (views.to(device), prompts[order].to(device))}
        return self._epoch_cache[(epoch, span)]

    def batch(self, micro_step, batch_size, num_processes, rank):
        """The micro-batch of this rank at global micro-step `micro_step`: a dict of device tensors."""
        epoch, index = divmod(micro_step, self.steps_per_epoch(batch_size, num_processes))
        span = batch_size * num_processes
        views, templates = self._epoch(epoch, span)
        view = views[index * span : (index + 1) * span][rank::num_processes]
        template = templates[index * span : (index + 1) * span][rank::num_processes]
        out = {
            "mean": self.latent_means[view],
            "std": self.latent_stds[view],
            "input_ids": [ids[template] for ids in self.prompt_ids],
        }
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
