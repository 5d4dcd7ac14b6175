"""Directional Textual Inversion (DTI): the method and the tools shared by both training scripts.

DTI (Kim et al., arXiv 2512.13672) writes every learned token embedding as e = m * v with ||v|| = 1.
The magnitude m is fixed at an in-distribution value (a statistic of the encoder's own vocabulary norms);
only the direction v is trained, by Riemannian SGD on the unit sphere with a von Mises-Fisher prior
centred on the initializer's direction.

Public surface, top to bottom:
- sphere geometry: `project_to_tangent`, `retract`, `sphere_angle`, `slerp`
- `RiemannianSGD`: the optimizer (a `torch.optim.Optimizer`)
- tokens and vectors: `vocabulary_norm_stats`, `resolve_token_scale`, `add_placeholder_tokens`, `LearnedVectors`
- files: `save_embedding_file`, `load_embedding_file`
- data: `load_training_images`, `TrainingData`, the prompt templates
- training: `add_training_args`, `check_args`, `DTITrainer` (loop, checkpoints, resume, signals, validation)
- sharing: `write_model_card`, `push_output_to_hub`
- concept tools: `read_concept`, `slerp_concepts`, `inspect_embedding`, `convert_embedding`,
  `render_interpolation`, `plot_training_curves`, and the command line:

    python dti_utils.py slerp A B --alpha 0.25 0.5 0.75 --token "<mix>" --output OUT [--render MODEL]
    python dti_utils.py inspect EMB [--model MODEL] [--k 5] [--json]
    python dti_utils.py convert EMB --to diffusers|a1111|comfyui --output OUT
"""

import argparse
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger("dti")

__version__ = "0.1.0"


class DTIError(Exception):
    """A user-facing error: one sentence that names the flag or file and what to do."""


# ----------------------------------------------------------------------------------------------------
# Sphere geometry (rows are points on the unit sphere S^{d-1})
# ----------------------------------------------------------------------------------------------------


def project_to_tangent(x, u):
    """Project u onto the tangent space of the sphere at x, row by row: u - <u, x> x."""
    return u - (u * x).sum(-1, keepdim=True) * x


def retract(x, eps=1e-12):
    """Map x back onto the unit sphere by normalization, row by row."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def sphere_angle(a, b):
    """Angle in radians between the rows of a and b (any norms)."""
    cos = (retract(a) * retract(b)).sum(-1)
    return torch.arccos(cos.clamp(-1.0, 1.0))


def slerp(a, b, t, eps=1e-6):
    """Spherical interpolation between unit rows a and b at fraction t (0 gives a, 1 gives b).

    Falls back to normalized linear interpolation when the angle is tiny, where sin(W) vanishes.
    """
    a, b = retract(a.float()), retract(b.float())
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    small = sin_omega < eps
    safe = torch.where(small, torch.ones_like(sin_omega), sin_omega)
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe
    lerp = (1 - t) * a + t * b
    return retract(torch.where(small, lerp, out))


# ----------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------


class RiemannianSGD(torch.optim.Optimizer):
    """Riemannian SGD on unit rows with a von Mises-Fisher prior (the DTI update).

    For each row v of each parameter:
        g = grad - kappa * mu                 (the vMF prior exp(kappa mu^T v) adds -kappa mu)
        g = g - <g, v> v                      (tangent projection)
        s = beta s + (1 - beta) ||g||^2 ; g = g / (sqrt(s / (1 - beta^t)) + eps)
        v = (v - lr g) / ||v - lr g||         (retraction)
    With beta = 0 every row moves by an angle of about lr radians per step, whatever the gradient's size.

    The prior direction mu of a parameter defaults to its direction at construction (mu = v0). Parameters
    must hold unit rows. A step whose gradient is not finite leaves the parameter and its state unchanged,
    decided on the device without a host sync. State is float32 whatever the parameter's dtype.

    Like torch's fused optimizers it takes part in AMP loss scaling without a host sync: `torch.amp.GradScaler`
    sees `_step_supports_amp_scaling` and hands over `grad_scale` and `found_inf` as attributes, which `step`
    uses to unscale the gradient and to skip the step, on the device. The same attributes can be set by hand.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0.01, kappa=1e-4, beta=0.0, eps=1e-8):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if kappa < 0:
            raise ValueError(f"Invalid kappa: {kappa}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        super().__init__(params, dict(lr=lr, kappa=kappa, beta=beta, eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p):
        state = self.state[p]
        if "prior" not in state:
            state["prior"] = retract(p.detach().float()).clone()
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape[:-1] + (1,), dtype=torch.float32, device=p.device)

    def set_prior(self, p, mu):
        """Use mu (rows, any norm) as the prior direction of parameter p instead of its initial value."""
        self.state[p]["prior"] = retract(mu.detach().float().to(p.device)).clone()

    def load_state_dict(self, state_dict):
        # torch casts floating state to each parameter's dtype; DTI keeps its state float32 whatever the parameter.
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                self.state[p][key] = value.detach().float().to(p.device).clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step (or by hand): see the class doc
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            lr, kappa, beta, eps = group["lr"], group["kappa"], group["beta"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                v = p.float()
                g = p.grad.float()
                if grad_scale is not None:
                    g = g / grad_scale.to(g.device)
                if kappa:
                    g = g - kappa * state["prior"]
                g = project_to_tangent(v, g)
                finite = torch.isfinite(g).all()
                if found_inf is not None:
                    finite = finite & (found_inf.to(g.device) == 0)
                g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
                sq = (g * g).sum(-1, keepdim=True)
                step = state["step"] + finite.float()
                if beta > 0:
                    exp_avg_sq = torch.where(finite, beta * state["exp_avg_sq"] + (1 - beta) * sq, state["exp_avg_sq"])
                    state["exp_avg_sq"].copy_(exp_avg_sq)
                    sq = exp_avg_sq / (1 - torch.pow(beta, step.clamp_min(1)))
                update = retract(v - lr * g / (sq.sqrt() + eps))
                p.copy_(torch.where(finite, update, v).to(p.dtype))
                state["step"].copy_(step)
        return loss


# ----------------------------------------------------------------------------------------------------
# Tokens and learned vectors
# ----------------------------------------------------------------------------------------------------


def vocabulary_norm_stats(weight):
    """Mean, min and max L2 norm over the non-zero rows of an embedding matrix."""
    norms = weight.detach().float().norm(dim=-1)
    norms = norms[norms > 0]
    return {"mean": norms.mean().item(), "min": norms.min().item(), "max": norms.max().item()}


def resolve_token_scale(token_scale, stats):
    """The fixed norm m: 'mean', 'min', 'max' of the vocabulary, or a positive float given as text."""
    if token_scale in ("mean", "min", "max"):
        return stats[token_scale]
    try:
        value = float(token_scale)
    except (TypeError, ValueError):
        raise DTIError(f"--token_scale must be mean, min, max or a positive number, not {token_scale!r}.")
    if not value > 0 or not math.isfinite(value):
        raise DTIError(f"--token_scale must be a positive number, not {token_scale!r}.")
    return value


def placeholder_token_list(placeholder_token, num_vectors):
    """tok, tok_1, ..., tok_{n-1}: the names diffusers' load_textual_inversion expands a token to."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


def initializer_ids(tokenizer, initializer_token, num_vectors=None):
    """One initializer token id per vector: a k-token initializer gives k vectors, a one-token one is copied."""
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if not ids:
        raise DTIError(f"--initializer_token {initializer_token!r} tokenizes to nothing; pass a real word such as 'toy'.")
    if num_vectors is None:
        num_vectors = len(ids)
    if num_vectors < 1:
        raise DTIError(f"--num_vectors must be at least 1, not {num_vectors}.")
    if len(ids) == 1:
        return ids * num_vectors
    if len(ids) != num_vectors:
        raise DTIError(
            f"--initializer_token {initializer_token!r} tokenizes to {len(ids)} tokens, which gives "
            f"{len(ids)} vectors, but --num_vectors is {num_vectors}; drop --num_vectors or use a one-token initializer."
        )
    return ids


def resolve_tokens(tokenizer, placeholder_token, initializer_token, num_vectors=None):
    """Check the concept flags against a tokenizer; return (placeholder tokens, initializer ids).

    A multi-token initializer gives one vector per token; a one-token initializer with --num_vectors N is
    copied N times. Nothing is added to the tokenizer here, so this can run before any model loads.
    """
    if not placeholder_token or not placeholder_token.strip():
        raise DTIError("--placeholder_token is empty; pass a new word such as '<my-concept>'.")
    if any(c.isspace() for c in placeholder_token):
        raise DTIError(f"--placeholder_token {placeholder_token!r} contains white space; use a single word such as '<my-concept>'.")
    if not initializer_token or not initializer_token.strip():
        raise DTIError("--initializer_token is empty; pass a word close to the concept, such as 'toy'.")
    init_ids = initializer_ids(tokenizer, initializer_token, num_vectors)
    tokens = placeholder_token_list(placeholder_token, len(init_ids))
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token in vocab or f"{token}</w>" in vocab:
            raise DTIError(f"--placeholder_token {token!r} is already in the tokenizer's vocabulary; choose a new word such as '<{token.strip('<>')}-dti>'.")
    return tokens, init_ids


def add_placeholder_tokens(tokenizer, text_encoder, tokens):
    """Add the tokens to the tokenizer and grow the encoder's embedding; return their ids."""
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise DTIError(f"The tokenizer already knows one of {tokens}; choose a new --placeholder_token.")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(tokens)


class LearnedVectors:
    """The trainable vectors of one text encoder, spliced into its input embedding by a forward hook.

    The embedding matrix itself stays frozen: only `param` is a trainable leaf, so there is no dense
    gradient or optimizer state for the vocabulary, and every other row stays bit-identical.
    mode 'dti': param holds unit directions v and the vectors are norm * v (norm fixed).
    mode 'ti':  param holds the unconstrained embedding e (classic textual inversion).
    """

    def __init__(self, text_encoder, tokens, token_ids, init_ids, original_vocab_size, mode="dti", norm=None,
                 name="text_encoder", file_stem="learned_embeds"):
        self.text_encoder = text_encoder
        self.embedding = text_encoder.get_input_embeddings()
        self.name = name
        self.file_stem = file_stem
        self.mode = mode
        self.tokens = list(tokens)
        self.token_ids = list(token_ids)
        self.original_vocab_size = original_vocab_size
        weight = self.embedding.weight
        device = weight.device
        self.init_vectors = weight.detach()[list(init_ids)].float().clone()
        self.norm = float(norm) if norm is not None else None
        start = retract(self.init_vectors) if mode == "dti" else self.init_vectors
        self.param = torch.nn.Parameter(start.clone().to(device))
        # Vocabulary id -> row of `param` (or -1): one gather per forward, no host work.
        self._row_of_id = torch.full((weight.shape[0],), -1, dtype=torch.long, device=device)
        self._row_of_id[torch.tensor(self.token_ids, device=device)] = torch.arange(len(self.token_ids), device=device)
        self._hook = self.embedding.register_forward_hook(self._splice)

    def vectors(self):
        """The embeddings the encoder sees for the placeholder tokens, float32 (n, dim), differentiable."""
        return self.norm * self.param if self.mode == "dti" else self.param

    def _splice(self, module, args, output):
        rows = self._row_of_id[args[0]]
        vecs = self.vectors().to(output.dtype)[rows.clamp_min(0)]
        return torch.where((rows >= 0).unsqueeze(-1), vecs, output)

    def to(self, device):
        self._row_of_id = self._row_of_id.to(device)
        self.param.data = self.param.data.to(device)
        self.init_vectors = self.init_vectors.to(device)
        return self

    @torch.no_grad()
    def write_to_encoder(self):
        """Copy the vectors into the embedding rows, so the encoder works without the hook (saving pipelines)."""
        self.embedding.weight[self.token_ids] = self.vectors().to(self.embedding.weight.dtype)

    def remove_hook(self):
        self.write_to_encoder()
        self._hook.remove()

    @torch.no_grad()
    def stats(self):
        """Device tensors (no sync): mean norm and mean angle (radians) from the initializer."""
        vecs = self.vectors().float()
        return vecs.norm(dim=-1).mean(), sphere_angle(vecs, self.init_vectors).mean()

    def nearest_tokens(self, tokenizer, k=5):
        """The k vocabulary tokens nearest each vector by cosine (the original vocabulary only)."""
        near = nearest_vocabulary_tokens(self.vectors(), self.embedding.weight[: self.original_vocab_size], tokenizer, k)
        return [[token for token, _, _ in row] for row in near]


@torch.no_grad()
def nearest_vocabulary_tokens(vectors, vocab_weight, tokenizer, k=5):
    """Per vector, the k vocabulary rows nearest by cosine: lists of (token text, id, cosine)."""
    sims = retract(vectors.detach().float()) @ retract(vocab_weight.detach().float()).T
    top = sims.topk(min(k, vocab_weight.shape[0]), dim=-1)
    return [
        [(tokenizer.convert_ids_to_tokens(int(j)).replace("</w>", ""), int(j), float(c)) for c, j in zip(values, indices)]
        for values, indices in zip(top.values, top.indices)
    ]


# ----------------------------------------------------------------------------------------------------
# Embedding files
# ----------------------------------------------------------------------------------------------------


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_embedding_file(path, tensors, metadata=None):
    """Save {key: float32 tensor} atomically: safetensors (with string metadata) or, for .bin/.pt, torch.save."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    return path


EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


def load_embedding_file(path):
    """Read an embedding file without unpickling arbitrary objects: returns (tensors dict, metadata dict)."""
    if not os.path.isfile(path):
        raise DTIError(f"Embedding file {path} does not exist; pass a .safetensors, .pt or .bin file or a training output folder.")
    if not path.lower().endswith(EMBEDDING_EXTENSIONS):
        raise DTIError(f"{path} is not an embedding file; use a .safetensors, .pt or .bin file or a training output folder.")
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DTIError(f"{path} is not a plain tensor file ({type(e).__name__}); only weights-only .pt/.bin files are read, arbitrary pickles are refused.")
    return data, {}


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

imagenet_templates_small = [
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

imagenet_style_templates_small = [
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
    return imagenet_style_templates_small if learnable_property == "style" else imagenet_templates_small


def _open_rgb(image, name):
    """EXIF orientation applied, palette/RGBA/greyscale to RGB (transparency composited on white)."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise DTIError(f"Image {name} is corrupt or truncated ({e}); remove or replace it.")
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: scale to 8 bits, convert() would clip
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_training_images(train_data_dir=None, dataset_name=None, dataset_config_name=None, image_column="image", cache_dir=None):
    """The training images as RGB PIL images, from a folder or a `datasets` dataset (Hub id or local folder)."""
    if dataset_name:
        import datasets

        try:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
        except Exception as e:
            raise DTIError(f"--dataset_name {dataset_name!r} could not be loaded ({type(e).__name__}: {e}).")
        if image_column not in ds.column_names:
            raise DTIError(f"--image_column {image_column!r} is not a column of {dataset_name!r}; its columns are {ds.column_names}.")
        images = []
        for i, item in enumerate(ds[image_column]):
            if not isinstance(item, Image.Image):
                raise DTIError(f"Row {i} of column {image_column!r} in {dataset_name!r} is not an image; pass the image column with --image_column.")
            images.append(_open_rgb(item, f"row {i} of {dataset_name}"))
        if not images:
            raise DTIError(f"--dataset_name {dataset_name!r} has no images in its train split.")
        return images

    if not train_data_dir:
        raise DTIError("No training images: pass --train_data_dir FOLDER or --dataset_name.")
    if not os.path.isdir(train_data_dir):
        raise DTIError(f"--train_data_dir {train_data_dir} is not a folder; pass the folder that holds your images.")
    names = sorted(n for n in os.listdir(train_data_dir) if not n.startswith(".") and os.path.isfile(os.path.join(train_data_dir, n)))
    image_names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    skipped = [n for n in names if n not in image_names]
    if skipped:
        logger.warning(f"Skipping {len(skipped)} file(s) in {train_data_dir} that are not images: {', '.join(skipped)}")
    if not image_names:
        raise DTIError(f"--train_data_dir {train_data_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); put the concept's pictures there.")
    images = []
    for name in image_names:
        path = os.path.join(train_data_dir, name)
        try:
            image = Image.open(path)
        except (UnidentifiedImageError, OSError) as e:
            raise DTIError(f"Image {path} cannot be read ({e}); remove or replace it.")
        images.append(_open_rgb(image, path))
    return images


def image_to_tensor(image):
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def square_view(image, resolution, center_crop=False):
    """diffusers' textual-inversion view: optional centre square crop, then a bicubic resize to a square."""
    if center_crop:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)


class TrainingData:
    """What the loop samples from: cached VAE latent distributions of every view and pre-tokenized prompts.

    Images never change, so each distinct view (a crop position of an image, and its mirror when flipping)
    is encoded once; a step draws a latent from the cached mean and std, which has the distribution of
    encoding anew. `view_index[image, flip, crop]` names the cached view of each choice.
    The order is a function of (seed, epoch) and the noise a function of (seed, step, rank), so the data
    position is the step count and resuming continues exactly.
    """

    def __init__(self, latent_means, latent_stds, view_index, prompt_ids, repeats, flip_p, seed, extra=None):
        self.latent_means = latent_means  # (num_views, C, h, w) float32
        self.latent_stds = latent_stds
        self.view_index = torch.as_tensor(view_index).cpu()  # (num_images, 1 or 2 flips, crops) long; read once per epoch
        self.prompt_ids = prompt_ids  # list of (num_templates, L) tensors, one per tokenizer
        self.num_images = view_index.shape[0]
        self.length = self.num_images * repeats
        self.flip_p = flip_p
        self.seed = seed
        self.extra = extra or {}  # per-view tensors (e.g. SDXL time ids), indexed like the latents
        self._epoch_cache = {}

    @classmethod
    @torch.no_grad()
    def build(cls, views, view_index, vae, tokenizers, placeholder_string, learnable_property, repeats, flip_p, seed, device, batch_size=4, extra=None):
        """views: the distinct view tensors (3, H, W) in [-1, 1]; view_index: (images, flips, crops) into them."""
        means, stds = [], []
        for start in range(0, len(views), batch_size):
            chunk = torch.stack(views[start : start + batch_size]).to(device, dtype=vae.dtype)
            dist = vae.encode(chunk).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        texts = [t.format(placeholder_string) for t in prompt_templates(learnable_property)]
        prompt_ids = [
            tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)
            for tok in tokenizers
        ]
        extra = {k: v.to(device) for k, v in (extra or {}).items()}
        return cls(torch.cat(means), torch.cat(stds), view_index, prompt_ids, repeats, flip_p, seed, extra)

    def steps_per_epoch(self, batch_size, num_processes):
        return math.ceil(self.length / (batch_size * num_processes))

    def _epoch(self, epoch):
        """The epoch's draws, made on the CPU (the same on every device and process) and moved to the device
        once per epoch, so that a step indexes device tensors only: no host-to-device copy, which syncs."""
        if epoch not in self._epoch_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=g)
            flips = (torch.rand(self.length, generator=g) < self.flip_p).long().clamp_max(self.view_index.shape[1] - 1)
            crops = torch.randint(0, self.view_index.shape[2], (self.length,), generator=g)
            templates = torch.randint(0, self.prompt_ids[0].shape[0], (self.length,), generator=g)
            views = self.view_index[order % self.num_images, flips[order], crops[order]]
            device = self.latent_means.device
            self._epoch_cache = {epoch: (views.to(device), templates[order].to(device))}
        return self._epoch_cache[epoch]

    def batch(self, micro_step, batch_size, num_processes, rank):
        """The micro-batch of this rank at global micro-step `micro_step`: dict of device tensors."""
        per_epoch = self.steps_per_epoch(batch_size, num_processes)
        epoch, index = divmod(micro_step, per_epoch)
        views, templates = self._epoch(epoch)  # in sampling order
        span = batch_size * num_processes
        picked = slice(index * span, (index + 1) * span)
        view, template = views[picked], templates[picked]
        if len(view) < num_processes:  # every rank needs at least one sample
            missing = num_processes - len(view)
            view, template = torch.cat([view, views[:missing]]), torch.cat([template, templates[:missing]])
        view, template = view[rank::num_processes], template[rank::num_processes]
        out = {
            "mean": self.latent_means[view],
            "std": self.latent_stds[view],
            "input_ids": [ids[template] for ids in self.prompt_ids],
        }
        for key, value in self.extra.items():
            out[key] = value[view]
        return out


def build_views(images, make_view, crops_of, flip):
    """Distinct views of every image, each once: returns (view tensors, view_index (images, flips, crops), view keys).

    make_view(image, crop) -> PIL image of that crop; crops_of(image) -> list of crop keys (repeats allowed,
    they map to one view); flip adds the mirror of each view. An image with fewer crops than another
    repeats its own, so each image keeps probability 1/len(images) and its crops stay equally likely
    whenever the counts divide (all crop counts are 1 or --crop_positions).
    """
    views, keys, table = [], [], []
    for i, image in enumerate(images):
        crops = crops_of(image)
        per_flip = []
        for mirrored in ([False, True] if flip else [False]):
            row, seen = [], {}
            for crop in crops:
                if crop not in seen:
                    view = make_view(image, crop)
                    seen[crop] = len(views)
                    views.append(image_to_tensor(ImageOps.mirror(view) if mirrored else view))
                    keys.append((i, mirrored, crop))
                row.append(seen[crop])
            per_flip.append(row)
        table.append(per_flip)
    width = max(len(row) for per_flip in table for row in per_flip)  # images with fewer crops repeat theirs
    table = [[[row[j % len(row)] for j in range(width)] for row in per_flip] for per_flip in table]
    return views, torch.tensor(table, dtype=torch.long), keys


def step_generator(seed, micro_step, rank, device):
    """A generator whose stream depends only on (seed, step, rank): noise needs no saved RNG state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 6364136223846793005 + micro_step * 1442695040888963407 + rank * 2654435761) % (2**63))
    return g


def diffusion_loss(unet, noise_scheduler, batch, encoder_hidden_states, generator, scaling_factor, weight_dtype, shift_factor=None, added_cond_kwargs=None):
    """The denoising loss of one micro-batch: sample the cached latent, add noise, predict, MSE."""
    mean, std = batch["mean"], batch["std"]
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if shift_factor is not None:
        latents = latents - shift_factor
    latents = latents * scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy.to(weight_dtype), timesteps, encoder_hidden_states.to(weight_dtype), added_cond_kwargs=added_cond_kwargs).sample
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise DTIError(f"Unknown prediction type {noise_scheduler.config.prediction_type} in the model's scheduler config.")
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


# ----------------------------------------------------------------------------------------------------
# Command line shared by both scripts
# ----------------------------------------------------------------------------------------------------


def add_training_args(parser, default_model, default_resolution, default_flip_p):
    """The flags of diffusers' textual-inversion examples (same names and meanings) plus DTI's own."""
    dti = parser.add_argument_group("Directional Textual Inversion")
    dti.add_argument("--optimizer", choices=["rsgd", "adamw"], default="rsgd",
                     help="rsgd: DTI (fixed norm, Riemannian SGD on the direction). adamw: classic textual inversion "
                          "(unconstrained embedding, AdamW), for comparing TI and DTI with one script.")
    dti.add_argument("--kappa", type=float, default=1e-4,
                     help="Concentration of the von Mises-Fisher prior around the initializer's direction; 0 disables it.")
    dti.add_argument("--token_scale", default="mean",
                     help="The fixed norm m of the learned vectors: mean, min or max of the encoder's vocabulary norms, or a number.")
    dti.add_argument("--rsgd_beta", type=float, default=0.0,
                     help="Decay of the running mean of squared tangent-gradient norms that divides the step. "
                          "0 (default) gives unit tangent steps: each step turns every vector by about the learning rate in radians.")
    dti.add_argument("--log_steps", type=int, default=10,
                     help="Read the loss back from the device and log it every N steps (reading it every step costs a sync).")

    model = parser.add_argument_group("Model")
    model.add_argument("--pretrained_model_name_or_path", default=default_model, help=f"Hub id or local folder of the base pipeline (default: {default_model}).")
    model.add_argument("--revision", default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument("--variant", default=None, help="Variant of the weight files, e.g. fp16.")

    concept = parser.add_argument_group("Concept")
    concept.add_argument("--placeholder_token", required=True, help="The new token that stands for the concept, e.g. '<cat-toy>'.")
    concept.add_argument("--initializer_token", required=True,
                         help="Word(s) the vectors start from and the prior points to. Several tokens give one vector each.")
    concept.add_argument("--num_vectors", type=int, default=None,
                         help="Number of vectors for the concept (default: one per initializer token). A one-token initializer is copied.")
    concept.add_argument("--learnable_property", choices=["object", "style"], default="object", help="Prompt templates: object or style.")

    data = parser.add_argument_group("Data")
    data.add_argument("--train_data_dir", default=None, help="Folder of training images (other files are skipped with a warning).")
    data.add_argument("--dataset_name", default=None, help="A `datasets` dataset instead: a Hub id or a local image folder.")
    data.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name, if it has several.")
    data.add_argument("--image_column", default="image", help="Column of --dataset_name that holds the images.")
    data.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are cached.")
    data.add_argument("--repeats", type=int, default=100, help="How many times the images repeat in one epoch.")
    data.add_argument("--resolution", type=int, default=default_resolution, help="Training resolution in pixels (divisible by 8).")
    data.add_argument("--center_crop", action="store_true", help="Centre-crop images before resizing (default: resize the whole image).")
    data.add_argument("--flip_p", type=float, default=default_flip_p, help="Probability of a horizontal flip.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Threads that decode and encode the images once at start-up (the loop itself reads cached latents).")

    train = parser.add_argument_group("Training")
    train.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device (the reference recipe uses 4).")
    train.add_argument("--num_train_epochs", type=int, default=100, help="Used only when --max_train_steps is unset.")
    train.add_argument("--max_train_steps", type=int, default=400, help="Optimizer steps (the reference recipe uses 400).")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    train.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet and text encoder.")
    train.add_argument("--seed", type=int, default=None, help="Seed for data order, noise and validation (random if unset, and stored for resume).")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Precision of the UNet and VAE. Directions and optimizer state stay float32. Default: accelerate's config.")
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention in the UNet.")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet for training (CUDA graphs on a GPU). Costs a minute or more of compiling "
                            "on the first run (less with the persistent cache); pays off on long or repeated runs.")
    train.add_argument("--cuda_graphs", action="store_true",
                       help="Replay the UNet's training forward and backward from CUDA graphs, captured in seconds at the first "
                            "step (no compiler): removes most kernel-launch overhead. Needs a CUDA GPU; not with --compile "
                            "or --gradient_checkpointing.")
    train.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher; LOCAL_RANK in the environment wins.")

    opt = parser.add_argument_group("Optimizer")
    opt.add_argument("--learning_rate", type=float, default=None,
                     help="Base learning rate. rsgd: radians per step before --scale_lr (default 0.01). adamw: default 5e-4.")
    opt.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=True,
                     help="Multiply the learning rate by batch size x gradient accumulation x processes (default on, as in the "
                          "reference recipe: 0.01 x 4 = an effective step of 0.04 rad). --no-scale_lr uses --learning_rate as is.")
    opt.add_argument("--lr_scheduler", default="constant",
                     help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or "constant_with_warmup".')
    opt.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps (schedulers with warm-up only).")
    opt.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    opt.add_argument("--adam_beta1", type=float, default=0.9, help="adamw only.")
    opt.add_argument("--adam_beta2", type=float, default=0.999, help="adamw only.")
    opt.add_argument("--adam_weight_decay", type=float, default=1e-2, help="adamw only.")
    opt.add_argument("--adam_epsilon", type=float, default=1e-08, help="adamw only.")

    save = parser.add_argument_group("Saving")
    save.add_argument("--output_dir", default="text-inversion-model", help="Where embeddings, images, logs and checkpoints go.")
    save.add_argument("--save_steps", type=int, default=500, help="Write learned_embeds-steps-N every N steps.")
    save.add_argument("--save_as_full_pipeline", action="store_true", help="Also save the whole pipeline with the token folded in.")
    save.add_argument("--no_safe_serialization", action="store_true", help="Write .bin (torch.save) instead of .safetensors.")
    save.add_argument("--checkpointing_steps", type=int, default=500, help="Write a resumable checkpoint-N (kilobytes) every N steps.")
    save.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    save.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.')

    log = parser.add_argument_group("Logging and validation")
    log.add_argument("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    log.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    log.add_argument("--validation_prompt", default=None, help="Prompt rendered at each validation, e.g. 'a <cat-toy> on a beach'.")
    log.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    log.add_argument("--validation_steps", type=int, default=100, help="Validate every N steps (and always at the end).")
    log.add_argument("--num_validation_inference_steps", type=int, default=25, help="Denoising steps of validation images.")

    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the embeddings, validation images and a model card.")
    hub.add_argument("--hub_token", default=None, help="Hub token (default: the stored login).")
    hub.add_argument("--hub_model_id", default=None, help="Repository name (default: the output folder's name).")
    hub.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    hub.add_argument("--push_checkpoints", action="store_true", help="Also upload checkpoint-N folders (not uploaded by default).")
    return parser


def check_args(args):
    """Checks that need no model: one clear sentence per problem, before anything heavy loads."""
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    if args.resolution <= 0 or args.resolution % 8:
        raise DTIError(f"--resolution {args.resolution} is not a positive multiple of 8; the VAE downsamples by 8 (try 512 or 768).")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "repeats", "save_steps", "checkpointing_steps", "validation_steps", "log_steps", "num_validation_images"):
        if getattr(args, flag) < 1:
            raise DTIError(f"--{flag} must be at least 1, not {getattr(args, flag)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise DTIError(f"--max_train_steps must be at least 1, not {args.max_train_steps}.")
    if args.num_vectors is not None and args.num_vectors < 1:
        raise DTIError(f"--num_vectors must be at least 1, not {args.num_vectors}.")
    if not 0.0 <= args.flip_p <= 1.0:
        raise DTIError(f"--flip_p must be between 0 and 1, not {args.flip_p}.")
    if not 0.0 <= args.rsgd_beta < 1.0:
        raise DTIError(f"--rsgd_beta must be in [0, 1), not {args.rsgd_beta}.")
    if args.kappa < 0:
        raise DTIError(f"--kappa must be 0 or positive, not {args.kappa}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise DTIError(f"--checkpoints_total_limit must be at least 1, not {args.checkpoints_total_limit}.")
    resolve_token_scale(args.token_scale, {"mean": 1.0, "min": 1.0, "max": 1.0})
    if args.train_data_dir is None and args.dataset_name is None:
        raise DTIError("No training images: pass --train_data_dir FOLDER or --dataset_name.")
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise DTIError("Pass either --train_data_dir or --dataset_name, not both.")
    if args.report_to in ("wandb", "all"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise DTIError("--report_to wandb needs wandb: pip install wandb, or use --report_to tensorboard.")
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise DTIError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers, or drop the flag (PyTorch SDPA is used by default).")
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise DTIError("--hub_token with --report_to wandb would expose the token in the run config; log in with `hf auth login` instead.")
    if args.cuda_graphs and args.compile:
        raise DTIError("--cuda_graphs and --compile both remove launch overhead (--compile uses CUDA graphs itself); pass one of them.")
    if args.cuda_graphs and args.gradient_checkpointing:
        raise DTIError("--cuda_graphs keeps the UNet's activations in the graph's memory; drop --gradient_checkpointing, or --cuda_graphs to save memory.")
    if args.learning_rate is None:
        args.learning_rate = 0.01 if args.optimizer == "rsgd" else 5e-4
    if args.learning_rate <= 0:
        raise DTIError(f"--learning_rate must be positive, not {args.learning_rate}.")
    return args


def setup_accelerator(args, project_name):
    """Accelerator, logging, one seed for all processes (stored in checkpoints), TF32, trackers; returns (accelerator, weight_dtype)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

    # Under torchrun/accelerate launch on a machine without a GPU, accelerate forms a gloo group only with cpu=True.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=launched and not has_accelerator,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if args.seed is None:
        args.seed = broadcast_object_list([int(np.random.SeedSequence().generate_state(1)[0] % 2**31)])[0]
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        accelerator.init_trackers(project_name, config=config)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, weight_dtype


def freeze_models(args, accelerator, weight_dtype, unet, vae, text_encoders):
    """Freeze and place the models. Text encoders stay float32 (the learned rows' gradient passes through them);
    the UNet runs in the mixed-precision dtype, the VAE too unless its config asks for float32 (force_upcast)."""
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
        module.eval()
    for text_encoder in text_encoders:  # explicit: an fp16 --variant would otherwise load half-precision encoders
        text_encoder.to(accelerator.device, dtype=torch.float32)
    vae_dtype = torch.float32 if getattr(vae.config, "force_upcast", False) and weight_dtype == torch.float16 else weight_dtype
    for module, dtype in ((vae, vae_dtype), (unet, weight_dtype)):
        if module.dtype == dtype:  # the scripts load the UNet in its dtype already (diffusers warns on any dtype cast)
            module.to(accelerator.device)
        else:
            module.to(accelerator.device, dtype=dtype)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()


class GraphedUNet:
    """--cuda_graphs: the UNet's training forward and backward replayed from CUDA graphs.

    A step launches thousands of small kernels and the GPU waits on the host; a graph replays them in one launch.
    `torch.cuda.make_graphed_callables` captures a forward and a backward graph per input signature (shapes,
    dtypes, which inputs need a gradient) at its first use, from that call's inputs: a short last batch gets its
    own pair. The UNet is frozen, so the graphs differentiate with respect to the conditioning inputs only.
    Outputs live in the graph's static memory until the next replay, which the loss never holds across calls.
    A capture that fails is logged and that signature runs eagerly.
    """

    def __init__(self, unet):
        self.unet = unet
        self.graphs = {}  # signature -> graphed callable, or None where the capture failed

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        keys = sorted(added_cond_kwargs or {})
        tensors = (sample, timestep, encoder_hidden_states, *(added_cond_kwargs[k] for k in keys))

        def forward(sample, timestep, encoder_hidden_states, *added):
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=dict(zip(keys, added)) or None).sample

        signature = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        if signature not in self.graphs:
            sample_args = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
            try:
                self.graphs[signature] = torch.cuda.make_graphed_callables(forward, sample_args)
                logger.info(f"Captured the UNet's CUDA graphs for inputs {[tuple(t.shape) for t in tensors]}")
            except RuntimeError as e:
                logger.warning(f"CUDA graph capture failed ({e}); the UNet runs eagerly for inputs {[tuple(t.shape) for t in tensors]}.")
                self.graphs[signature] = None
        graphed = self.graphs[signature] or forward
        return UNet2DConditionOutput(sample=graphed(*tensors))


def compile_for_training(args, unet):
    """The callable the training loss calls for the UNet: the UNet itself, GraphedUNet (--cuda_graphs), or the UNet
    under torch.compile (--compile; CUDA graphs on a GPU too, after a compile that takes a minute or more).

    Validation keeps the eager UNet, so its other shapes cost no recompiles or captures.
    Inductor's persistent caches (on by default, TORCHINDUCTOR_CACHE_DIR) make a second run on the machine start fast."""
    if args.cuda_graphs:
        if torch.device(unet.device).type != "cuda":
            raise DTIError(f"--cuda_graphs needs a CUDA GPU and this run is on {unet.device}; drop the flag.")
        return GraphedUNet(unet)
    if not args.compile:
        return unet
    mode = "reduce-overhead" if torch.device(unet.device).type == "cuda" else None
    return torch.compile(unet, mode=mode, dynamic=False)


def add_concept(args, tokenizer, text_encoder, tokens, init_ids, name="text_encoder", file_stem="learned_embeds"):
    """Add the placeholder tokens to one tokenizer/encoder pair and return its LearnedVectors (its own norm m and prior)."""
    vocab_weight = text_encoder.get_input_embeddings().weight
    original_vocab_size = vocab_weight.shape[0]
    norm = resolve_token_scale(args.token_scale, vocabulary_norm_stats(vocab_weight)) if args.optimizer == "rsgd" else None
    token_ids = add_placeholder_tokens(tokenizer, text_encoder, tokens)
    mode = "dti" if args.optimizer == "rsgd" else "ti"
    return LearnedVectors(text_encoder, tokens, token_ids, init_ids, original_vocab_size, mode=mode, norm=norm, name=name, file_stem=file_stem)


def run_main(main, parse_args):
    """Parse the flags and run a script's main(): a DTIError becomes one line on stderr and exit code 2."""
    try:
        return main(parse_args())
    except DTIError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "training_state.pt"


def list_checkpoints(output_dir):
    """checkpoint-N folders under output_dir that hold a complete state, oldest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        suffix = os.path.basename(path).split("-", 1)[1]
        if suffix.isdigit() and os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def resolve_resume_path(output_dir, resume_from_checkpoint):
    """The checkpoint folder to resume from, None to start fresh ('latest' with none found)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new training run.")
            return None
        return found[-1]
    path = resume_from_checkpoint
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(output_dir, path)
    if not os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        raise DTIError(f"--resume_from_checkpoint {resume_from_checkpoint}: no {CHECKPOINT_FILE} there; pass a checkpoint-N folder or 'latest'.")
    return path


def save_checkpoint(output_dir, step, state, total_limit=None):
    """Write checkpoint-N atomically (a temporary folder renamed), pruning the oldest beyond total_limit."""
    existing = list_checkpoints(output_dir)
    if total_limit is not None and len(existing) >= total_limit:
        for old in existing[: len(existing) - total_limit + 1]:
            logger.info(f"Removing old checkpoint {old} (--checkpoints_total_limit {total_limit})")
            shutil.rmtree(old)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-checkpoint-")
    torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
    os.chmod(tmp, 0o777 & ~_UMASK)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(path):
    return torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------

NONFINITE_PATIENCE = 20  # consecutive non-finite steps before giving up


class _StopSignals:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nReceived {signal.Signals(signum).name}: saving the embedding and a checkpoint, then stopping.", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def training_metadata(args, concept, steps):
    """The safetensors metadata of an embedding file: enough to know how it was made."""
    return {
        "method": "directional_textual_inversion" if args.optimizer == "rsgd" else "textual_inversion",
        "dti_version": __version__,
        "base_model": args.pretrained_model_name_or_path,
        "text_encoder": concept.name,
        "placeholder_token": args.placeholder_token,
        "tokens": json.dumps(concept.tokens),
        "initializer_token": args.initializer_token,
        "norm": repr(concept.norm) if concept.norm is not None else "free",
        "token_scale": args.token_scale,
        "kappa": repr(args.kappa) if args.optimizer == "rsgd" else "none",
        "steps": str(steps),
    }


class DTITrainer:
    """The training loop both scripts share: optimizer, schedule, checkpoints, logging, validation, saving.

    The script supplies what is model-specific: the learned vectors of each text encoder (`concepts`), the
    cached data, `compute_loss(batch, generator) -> scalar` and `make_pipeline() -> pipeline` for validation.
    """

    def __init__(self, accelerator, args, concepts, tokenizers, data, compute_loss, make_pipeline, weight_dtype, combined_file=None):
        self.accelerator = accelerator
        self.args = args
        self.concepts = concepts
        self.tokenizers = tokenizers
        self.data = data
        self.compute_loss = compute_loss
        self.make_pipeline = make_pipeline
        self.weight_dtype = weight_dtype
        self.combined_file = combined_file  # SDXL: (file stem, [key per concept]) for the single-file form
        self.output_dir = args.output_dir
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.updates_per_epoch = math.ceil(data.steps_per_epoch(args.train_batch_size, self.world) / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * self.updates_per_epoch
        self.max_train_steps = args.max_train_steps
        self.global_step = 0
        self.validation_images = []
        self.history = []  # (step, loss, norm, angle_deg) at each log read-back

        lr = args.learning_rate
        if args.scale_lr:
            lr = lr * args.gradient_accumulation_steps * args.train_batch_size * self.world
        self.effective_lr = lr
        params = [c.param for c in concepts]
        if args.optimizer == "rsgd":
            optimizer = RiemannianSGD(params, lr=lr, kappa=args.kappa, beta=args.rsgd_beta)
        else:
            adamw = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
            try:  # fused AdamW reads found_inf on the device, like RiemannianSGD: no host sync to skip a step
                optimizer = torch.optim.AdamW(params, fused=True, **adamw)
            except (RuntimeError, ValueError):  # a device without fused kernels: skip on the host
                optimizer = torch.optim.AdamW(params, **adamw)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=self.max_train_steps, num_cycles=args.lr_num_cycles,
        )
        # Prepared for fp16 loss scaling; gradients are averaged across processes by hand (a few KB).
        self.optimizer = accelerator.prepare(optimizer)

    # -- state ------------------------------------------------------------------------------------------

    def state_dict(self):
        return {
            "format": "dti-checkpoint-1",
            "global_step": self.global_step,
            "seed": self.args.seed,
            "params": [c.param.detach().float().cpu() for c in self.concepts],
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else {},
            "tokens": self.concepts[0].tokens,
            "mode": self.args.optimizer,
            "layout": [self.world, self.args.train_batch_size, self.args.gradient_accumulation_steps],
        }

    def load_state_dict(self, state, path):
        if state.get("tokens") != self.concepts[0].tokens or state.get("mode") != self.args.optimizer:
            raise DTIError(
                f"Checkpoint {path} was made for tokens {state.get('tokens')} with --optimizer {state.get('mode')}; "
                f"this run has {self.concepts[0].tokens} with --optimizer {self.args.optimizer}. Use the same flags or a new --output_dir."
            )
        if len(state["params"]) != len(self.concepts) or any(p.shape != c.param.shape for p, c in zip(state["params"], self.concepts)):
            raise DTIError(f"Checkpoint {path} holds vectors of other shapes than this model's; resume with the same base model.")
        layout = [self.world, self.args.train_batch_size, self.args.gradient_accumulation_steps]
        if state["layout"] != layout:
            logger.warning(f"Checkpoint {path} was made with (processes, batch, accumulation) = {state['layout']}, now {layout}: the data order will differ from an uninterrupted run.")
        with torch.no_grad():
            for c, p in zip(self.concepts, state["params"]):
                c.param.copy_(p.to(c.param.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"] and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.global_step = int(state["global_step"])
        self.args.seed = int(state["seed"])
        self.data.seed = self.args.seed

    # -- files ------------------------------------------------------------------------------------------

    def save_embeddings(self, steps_suffix=None):
        """learned_embeds[_2][-steps-N].safetensors (and the SDXL single file), main process only, atomic."""
        if not self.accelerator.is_main_process:
            return []
        ext = ".bin" if self.args.no_safe_serialization else ".safetensors"
        suffix = f"-steps-{steps_suffix}" if steps_suffix is not None else ""
        written = []
        for c in self.concepts:
            path = os.path.join(self.output_dir, f"{c.file_stem}{suffix}{ext}")
            written.append(save_embedding_file(path, {self.args.placeholder_token: c.vectors()}, training_metadata(self.args, c, self.global_step)))
        if self.combined_file is not None:
            stem, keys = self.combined_file
            path = os.path.join(self.output_dir, f"{stem}{suffix}{ext}")
            meta = training_metadata(self.args, self.concepts[0], self.global_step)
            meta["text_encoder"] = "both"
            meta["norm"] = json.dumps({k: c.norm for k, c in zip(keys, self.concepts)})
            written.append(save_embedding_file(path, {k: c.vectors() for k, c in zip(keys, self.concepts)}, meta))
        return written

    def save_checkpoint(self):
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.output_dir, self.global_step, self.state_dict(), self.args.checkpoints_total_limit)
            logger.info(f"Saved {path}")

    # -- validation and logging -------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self):
        accelerator, args = self.accelerator, self.args
        if not args.validation_prompt or not accelerator.is_main_process:
            return []
        logger.info(f"Validation at step {self.global_step}: {args.num_validation_images} images of {args.validation_prompt!r}")
        pipeline = self.make_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        device = accelerator.device
        generator = torch.Generator(device=device).manual_seed(args.seed)
        autocast = torch.autocast(device.type, dtype=self.weight_dtype) if self.weight_dtype != torch.float32 else torch.autocast(device.type, enabled=False)
        images = []
        with autocast:
            for _ in range(args.num_validation_images):
                images.append(pipeline(args.validation_prompt, num_inference_steps=args.num_validation_inference_steps, generator=generator).images[0])
        folder = os.path.join(self.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for i, image in enumerate(images):
            path = os.path.join(folder, f"step-{self.global_step:06d}-{i}.png")
            image.save(path)
            paths.append(path)
        self.validation_images = paths
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(img) for img in images]), self.global_step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(img, caption=f"{i}: {args.validation_prompt}") for i, img in enumerate(images)]}, step=self.global_step)
        del pipeline
        return paths

    def log_nearest_tokens(self):
        if not self.accelerator.is_main_process:
            return
        for c, tok in zip(self.concepts, self.tokenizers):
            for token, near in zip(c.tokens, c.nearest_tokens(tok)):
                logger.info(f"step {self.global_step} {c.name} {token}: nearest vocabulary tokens {near}")

    # -- the loop ---------------------------------------------------------------------------------------

    def _sync_stats(self, loss_sum, nonfinite, window, stop_requested):
        """One device->host read of the window's figures, averaged over processes.

        Returns (mean finite loss, non-finite steps, {concept name: (norm, angle in degrees)}, stop flag)."""
        per_concept = [x for c in self.concepts for x in c.stats()]
        flag = torch.tensor(float(stop_requested), device=loss_sum.device)
        figures = torch.stack([loss_sum, nonfinite, flag, *per_concept])
        if self.world > 1:
            figures = self.accelerator.reduce(figures, reduction="mean")
        values = figures.tolist()
        loss_sum, nonfinite, stop = values[:3]
        nonfinite = round(nonfinite)
        geometry = {c.name: (values[3 + 2 * i], math.degrees(values[4 + 2 * i])) for i, c in enumerate(self.concepts)}
        return loss_sum / max(window - nonfinite, 1), nonfinite, geometry, stop > 0

    def train_step(self):
        """One optimizer step (all micro-batches), with no device->host sync (either optimizer, any precision).

        Returns the step's loss and whether it was finite, both as device tensors."""
        args, accelerator = self.args, self.accelerator
        accum = args.gradient_accumulation_steps
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            micro_step = self.global_step * accum + micro
            batch = self.data.batch(micro_step, args.train_batch_size, self.world, self.rank)
            generator = step_generator(args.seed, micro_step, self.rank, accelerator.device)
            loss = self.compute_loss(batch, generator) / accum
            accelerator.backward(loss)
            step_loss = step_loss + loss.detach()
        if self.world > 1:
            for c in self.concepts:
                c.param.grad = accelerator.reduce(c.param.grad, reduction="mean")
        finite = torch.isfinite(step_loss)
        inner = self.optimizer.optimizer
        if accelerator.scaler is not None:
            # fp16: GradScaler hands grad_scale and found_inf to the optimizer, which skips an overflow on the device
            # (an overflow of the scaled gradient calibrates the scale; it is not a bad step).
            self.optimizer.step()
        else:
            finite = torch.stack([finite, *(torch.isfinite(c.param.grad).all() for c in self.concepts)]).all()
            if getattr(inner, "_step_supports_amp_scaling", False):
                inner.found_inf = (~finite).float()  # the same contract without a scaler: skipped on the device
                self.optimizer.step()
                del inner.found_inf
            elif finite.item():  # an optimizer without that contract: skip on the host
                self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, finite

    def fit(self):
        args, accelerator = self.args, self.accelerator
        from tqdm.auto import tqdm

        resume_path = resolve_resume_path(self.output_dir, args.resume_from_checkpoint)
        if resume_path is not None:
            self.load_state_dict(load_checkpoint(resume_path), resume_path)
            logger.info(f"Resumed from {resume_path} at step {self.global_step}")

        logger.info("***** Running training *****")
        logger.info(f"  Images = {self.data.num_images} x {args.repeats} repeats, batch {args.train_batch_size} per device x {self.world} processes x {args.gradient_accumulation_steps} accumulation")
        logger.info(f"  Optimizer = {args.optimizer}, effective learning rate = {self.effective_lr:g}, steps = {self.max_train_steps}")
        for c in self.concepts:
            logger.info(f"  {c.name}: tokens {c.tokens}, norm {'free (classic TI)' if c.norm is None else f'{c.norm:.6f}'}")

        progress = tqdm(range(self.max_train_steps), initial=self.global_step, desc="Steps", disable=not accelerator.is_local_main_process)
        device = accelerator.device
        zero = torch.zeros((), device=device)
        loss_sum, nonfinite, window, consecutive_bad = zero.clone(), zero.clone(), 0, 0
        interrupted = None
        with _StopSignals() as signals:
            while self.global_step < self.max_train_steps:
                step_loss, finite = self.train_step()
                self.global_step += 1
                progress.update(1)
                loss_sum = loss_sum + torch.where(finite, step_loss, zero)
                nonfinite = nonfinite + (~finite).float()
                window += 1

                last = self.global_step == self.max_train_steps
                if window >= args.log_steps or last or (self.world == 1 and signals.signum is not None):
                    loss_avg, bad, geometry, stop = self._sync_stats(loss_sum, nonfinite, window, signals.signum is not None)
                    if bad:
                        logger.warning(f"Skipped {bad} of the last {window} steps: the loss was not finite.")
                    consecutive_bad = consecutive_bad + bad if bad == window else bad
                    logs = {"loss": loss_avg, "lr": self.lr_scheduler.get_last_lr()[0]}
                    for i, (name, (norm, angle)) in enumerate(geometry.items()):
                        suffix = "" if i == 0 else f"_{i + 1}"
                        logs[f"norm{suffix}"], logs[f"angle_deg{suffix}"] = norm, angle
                    self.history.append((self.global_step, loss_avg if bad < window else float("nan"), logs["norm"], logs["angle_deg"]))
                    progress.set_postfix(loss=f"{loss_avg:.4f}", norm=f"{logs['norm']:.4f}", angle=f"{logs['angle_deg']:.2f}deg")
                    accelerator.log(logs, step=self.global_step)
                    loss_sum, nonfinite, window = zero.clone(), zero.clone(), 0
                    if consecutive_bad >= NONFINITE_PATIENCE:
                        self.save_embeddings()
                        raise DTIError(
                            f"The loss was not finite for {consecutive_bad} steps in a row (at step {self.global_step}); the last good "
                            f"embedding is in {self.output_dir}. Try --mixed_precision bf16 or no, or a lower --learning_rate."
                        )
                    if stop:
                        interrupted = signals.signum or signal.SIGTERM
                        break

                if accelerator.is_main_process:
                    if self.global_step % args.save_steps == 0:
                        self.save_embeddings(steps_suffix=self.global_step)
                    if self.global_step % args.checkpointing_steps == 0:
                        self.save_checkpoint()
                if self.global_step % args.validation_steps == 0 and not last:
                    self.validate()
                    self.log_nearest_tokens()
        progress.close()

        if interrupted is not None:
            self.save_embeddings()
            self.save_checkpoint()
            accelerator.wait_for_everyone()
            accelerator.end_training()
            print(f"Stopped at step {self.global_step}: embedding and checkpoint-{self.global_step} saved in {self.output_dir}; "
                  f"continue with --resume_from_checkpoint latest.", file=sys.stderr)
            sys.exit(128 + int(interrupted))
        return self.global_step

    def finish(self):
        """Final files, validation, nearest tokens: call after fit()."""
        self.accelerator.wait_for_everyone()
        files = self.save_embeddings()
        if self.accelerator.is_main_process:
            plot_training_curves(self.history, os.path.join(self.output_dir, "training_curves.png"))
        self.validate()
        self.log_nearest_tokens()
        return files

    def publish(self, load_full_pipeline, sdxl=False):
        """--save_as_full_pipeline and --push_to_hub (main process), then close the trackers."""
        args = self.args
        if self.accelerator.is_main_process:
            if args.save_as_full_pipeline:
                for c in self.concepts:
                    c.remove_hook()  # fold the vectors into the embedding rows
                load_full_pipeline().save_pretrained(args.output_dir, safe_serialization=not args.no_safe_serialization)
            if args.push_to_hub:
                push_output_to_hub(args, self.concepts, self.validation_images, sdxl=sdxl)
            for c in self.concepts:
                norms = c.vectors().norm(dim=-1)
                logger.info(f"Done: {c.name}: {len(c.tokens)} vector(s) of norm {norms.mean().item():.6f} in {os.path.join(args.output_dir, c.file_stem)}.*")
        self.accelerator.end_training()


# ----------------------------------------------------------------------------------------------------
# Model card and Hub
# ----------------------------------------------------------------------------------------------------


def base_model_license(base_model, token=None):
    """The license in the base model's card (local folder or Hub), or None when it cannot be read."""
    from huggingface_hub import ModelCard

    try:
        local = os.path.join(base_model, "README.md")
        card = ModelCard.load(local if os.path.isfile(local) else base_model, token=token)
        return card.data.license
    except Exception:
        return None


def loading_snippet(repo_id, base_model, placeholder_token, sdxl=False, prompt=None):
    prompt = prompt or f"a photo of {placeholder_token}"
    if sdxl:
        return f'''```python
import torch
from diffusers import StableDiffusionXLPipeline
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

pipe = StableDiffusionXLPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
pipe.load_textual_inversion("{repo_id}", weight_name="learned_embeds.safetensors", token="{placeholder_token}",
                            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion("{repo_id}", weight_name="learned_embeds_2.safetensors", token="{placeholder_token}",
                            text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
image = pipe("{prompt}").images[0]
```'''
    return f'''```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
pipe.load_textual_inversion("{repo_id}")
image = pipe("{prompt}").images[0]
```'''


def write_model_card(output_dir, repo_id, args, concepts, image_paths, sdxl=False, license=None):
    """README.md with YAML (base_model, license, tags), the validation images and a loading snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    method = "Directional Textual Inversion (DTI)" if args.optimizer == "rsgd" else "textual inversion (AdamW)"
    card_data = ModelCardData(
        license=license or "other",
        base_model=args.pretrained_model_name_or_path,
        library_name="diffusers",
        tags=["stable-diffusion-xl" if sdxl else "stable-diffusion", "text-to-image", "diffusers",
              "textual_inversion", "directional-textual-inversion"],
        inference=True,
    )
    norms = ", ".join(f"{c.name}: {c.norm:.4f}" if c.norm is not None else f"{c.name}: free" for c in concepts)
    images = "\n".join(f"![validation image {i}]({os.path.relpath(p, output_dir)})" for i, p in enumerate(image_paths))
    body = f"""
# {args.placeholder_token}: {method} on {args.pretrained_model_name_or_path}

The token `{args.placeholder_token}` ({len(concepts[0].tokens)} vector(s), initialized from `{args.initializer_token}`) was learned with {method}
for {args.max_train_steps} steps. DTI keeps each vector at a fixed in-distribution norm ({norms}) and learns its direction on the sphere
(kappa {args.kappa}), so the token keeps following the rest of the prompt. See [Directional Textual Inversion](https://arxiv.org/abs/2512.13672).

{images or "No validation images were made (pass --validation_prompt)."}

## Use it

{loading_snippet(repo_id, args.pretrained_model_name_or_path, args.placeholder_token, sdxl, args.validation_prompt)}

Files: {", ".join(f"`{c.file_stem}.safetensors`" for c in concepts)}{" and the single-file `clip_l`/`clip_g` form for AUTOMATIC1111 and ComfyUI" if sdxl else " (also readable by AUTOMATIC1111 and ComfyUI)"}.
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    path = os.path.join(output_dir, "README.md")
    _atomic_write(path, lambda tmp: card.save(tmp))
    return path


def push_output_to_hub(args, concepts, image_paths, sdxl=False):
    """Create the repo and upload embeddings, validation images and the card; checkpoints/logs only if asked."""
    from huggingface_hub import create_repo, upload_folder

    repo_name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        repo_id = create_repo(repo_name, exist_ok=True, token=args.hub_token, private=args.hub_private).repo_id
    except Exception as e:
        raise DTIError(f"Could not create the Hub repository {repo_name!r} ({type(e).__name__}: {e}); the output in {args.output_dir} is complete. "
                       f"Log in with `hf auth login` or pass --hub_token, then retry with: hf upload {repo_name} {args.output_dir} --exclude 'checkpoint-*/*' 'logs/*'")
    write_model_card(args.output_dir, repo_id, args, concepts, image_paths, sdxl=sdxl, license=base_model_license(args.pretrained_model_name_or_path, args.hub_token))
    ignore = ["logs/*", "logs/**", ".tmp-*", "*/.tmp-*"]
    if not args.push_checkpoints:
        ignore += ["checkpoint-*", "checkpoint-*/*"]
    try:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Upload textual inversion embedding", ignore_patterns=ignore, token=args.hub_token)
    except Exception as e:
        raise DTIError(f"Upload to {repo_id} failed ({type(e).__name__}: {e}); the output in {args.output_dir} is complete. "
                       f"Retry with: hf upload {repo_id} {args.output_dir} --exclude 'checkpoint-*/*' 'logs/*'")
    logger.info(f"Uploaded to https://huggingface.co/{repo_id}")
    return repo_id


# ----------------------------------------------------------------------------------------------------
# Concept tools: read any embedding form, blend (slerp), inspect, convert, plot training curves.
#
#     python dti_utils.py slerp A B --alpha 0.25 0.5 0.75 --token "<mix>" --output OUT [--render MODEL]
#     python dti_utils.py inspect EMB [--model MODEL] [--k 5] [--json]
#     python dti_utils.py convert EMB --to diffusers|a1111|comfyui --output OUT
# ----------------------------------------------------------------------------------------------------

# Internal names of the text encoders (diffusers' attribute names) and their names in the other forms.
CONCEPT_ENCODERS = ("text_encoder", "text_encoder_2")
SINGLE_FILE_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
DIFFUSERS_FILE_STEMS = {"text_encoder": "learned_embeds", "text_encoder_2": "learned_embeds_2"}
CONVERT_TARGETS = ("diffusers", "a1111", "comfyui")


class DTIWarning(UserWarning):
    """Something the user should know that does not stop the command (e.g. inputs with different norms)."""


class ConceptEmbedding:
    """One learned concept in any file form: its token and a (num_vectors, dim) tensor per text encoder.

    vectors: {"text_encoder": tensor} for SD 1.x/2.x, plus "text_encoder_2" for SDXL (clip_l / clip_g).
    metadata: {encoder name: {str: str}} as stored in the files (safetensors metadata).
    form: how it was read: "diffusers", "diffusers-folder", "a1111", "sdxl-single-file".
    """

    def __init__(self, token, vectors, metadata=None, source=None, form=None):
        self.token = token
        self.vectors = {name: vectors[name] for name in CONCEPT_ENCODERS if name in vectors}
        self.metadata = {name: dict((metadata or {}).get(name, {})) for name in self.vectors}
        self.source = source
        self.form = form

    @property
    def sdxl(self):
        return "text_encoder_2" in self.vectors

    @property
    def num_vectors(self):
        return next(iter(self.vectors.values())).shape[0]

    def describe(self):
        kind = "SDXL (2 text encoders)" if self.sdxl else "SD (1 text encoder)"
        return f"{self.source or self.token}: {kind}, {self.num_vectors} vector(s)"

    def __repr__(self):
        dims = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.vectors.items())
        return f"ConceptEmbedding(token={self.token!r}, {dims}, form={self.form!r})"


def embedding_slug(token):
    """The file stem AUTOMATIC1111 and ComfyUI use as the prompt word: '<cat-toy>' -> 'cat-toy'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "", token or "").strip("._-") or "embedding"


def _check_token(token, flag="--token"):
    if not token or not token.strip() or any(c.isspace() for c in token):
        raise DTIError(f"{flag} {token!r} must be a single word without white space, such as '<mix>'.")
    return token


def _norm_or_none(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _as_matrix(value, path, key):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise DTIError(f"{path}: entry {key!r} is not a float tensor ({type(value).__name__}); this is not a textual-inversion embedding file.")
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise DTIError(f"{path}: entry {key!r} has shape {tuple(value.shape)}; an embedding is (num_vectors, dim).")
    return value.detach().cpu()


def read_embedding_data(path):
    """(data dict, metadata) of one embedding file; never unpickles arbitrary objects.

    .safetensors through safetensors; .pt/.bin through torch.load(weights_only=True) (load_embedding_file);
    anything else, unreadable files and non-dict contents raise DTIError.
    """
    try:
        data, metadata = load_embedding_file(path)
    except DTIError:
        raise
    except Exception as e:
        raise DTIError(f"{path} cannot be read as an embedding file ({type(e).__name__}: {e}); check that the download is complete.")
    if not isinstance(data, dict) or not data:
        raise DTIError(f"{path} holds {type(data).__name__} {'(empty)' if isinstance(data, dict) else ''}, not a dict of tensors; this is not a textual-inversion embedding file.")
    return data, {str(k): str(v) for k, v in (metadata or {}).items()}


def _concept_from_data(data, metadata, path):
    stem = os.path.splitext(os.path.basename(path))[0]
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise DTIError(f"{path}: 'string_to_param' is not a dict of tensors; the AUTOMATIC1111 file is damaged.")
        key = "*" if "*" in params else next(iter(params))
        meta = dict(metadata)
        stored = data.get("metadata")
        if isinstance(stored, dict):
            meta.update({str(k): str(v) for k, v in stored.items()})
        name = data.get("name")
        token = name if isinstance(name, str) and name.strip() else meta.get("placeholder_token", stem)
        if "step" in data and "steps" not in meta and data["step"] is not None:
            meta["steps"] = str(data["step"])
        return ConceptEmbedding(token, {"text_encoder": _as_matrix(params[key], path, "string_to_param")},
                                {"text_encoder": meta}, path, "a1111")
    if "emb_params" in data:  # AUTOMATIC1111 / kohya .safetensors
        token = metadata.get("placeholder_token") or metadata.get("name") or stem
        return ConceptEmbedding(token, {"text_encoder": _as_matrix(data["emb_params"], path, "emb_params")},
                                {"text_encoder": metadata}, path, "a1111")
    if "clip_l" in data or "clip_g" in data:  # SDXL single file
        missing = [k for k in ("clip_l", "clip_g") if k not in data]
        if missing:
            raise DTIError(f"{path} has {'clip_l' if 'clip_l' in data else 'clip_g'} but no {missing[0]}; an SDXL embedding file holds both.")
        norms = {}
        if metadata.get("norm", "").startswith("{"):
            try:
                norms = json.loads(metadata["norm"])
            except ValueError:
                norms = {}
        vectors, metas = {}, {}
        for name, key in SINGLE_FILE_KEYS.items():
            vectors[name] = _as_matrix(data[key], path, key)
            meta = dict(metadata)
            meta["text_encoder"] = name
            if isinstance(norms, dict) and key in norms:
                meta["norm"] = repr(float(norms[key])) if norms[key] is not None else "free"
            metas[name] = meta
        if vectors["text_encoder"].shape[0] != vectors["text_encoder_2"].shape[0]:
            raise DTIError(f"{path} holds {vectors['text_encoder'].shape[0]} clip_l vectors but {vectors['text_encoder_2'].shape[0]} clip_g vectors; the file is damaged.")
        token = metadata.get("placeholder_token") or stem
        return ConceptEmbedding(token, vectors, metas, path, "sdxl-single-file")
    if len(data) == 1:  # diffusers {token: tensor}
        token, value = next(iter(data.items()))
        meta = dict(metadata)
        meta.setdefault("text_encoder", "text_encoder")
        return ConceptEmbedding(str(token), {"text_encoder": _as_matrix(value, path, token)}, {"text_encoder": meta}, path, "diffusers")
    raise DTIError(
        f"{path} has keys {sorted(map(str, data))[:6]}, which is no embedding form this tool knows; expected {{token: tensor}}, "
        f"'string_to_param', 'emb_params' or 'clip_l'/'clip_g'."
    )


def _find_file(folder, stem):
    for ext in EMBEDDING_EXTENSIONS:
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    return None


def read_concept(path):
    """Read an embedding file or a training output folder (SD or SDXL) in any supported form."""
    if not os.path.isdir(path):
        return _concept_from_data(*read_embedding_data(path), path)
    first, second = _find_file(path, "learned_embeds"), _find_file(path, "learned_embeds_2")
    if first:
        concept = _concept_from_data(*read_embedding_data(first), first)
        if concept.sdxl:
            return concept
        if second:
            other = _concept_from_data(*read_embedding_data(second), second)
            if other.sdxl:
                raise DTIError(f"{second} holds both encoders' vectors; a learned_embeds_2 file holds text_encoder_2's only.")
            if other.num_vectors != concept.num_vectors:
                raise DTIError(f"{first} has {concept.num_vectors} vector(s) but {second} has {other.num_vectors}; the folder mixes two trainings.")
            if other.token != concept.token:
                warnings.warn(f"{first} names the token {concept.token!r} but {second} names {other.token!r}; using {concept.token!r}.", DTIWarning)
            meta2 = dict(other.metadata["text_encoder"])
            meta2["text_encoder"] = "text_encoder_2"
            meta1 = dict(concept.metadata["text_encoder"])
            return ConceptEmbedding(concept.token, {"text_encoder": concept.vectors["text_encoder"], "text_encoder_2": other.vectors["text_encoder"]},
                                    {"text_encoder": meta1, "text_encoder_2": meta2}, path, "diffusers-folder")
        concept.source = path
        concept.form = "diffusers-folder"
        return concept
    if second:
        raise DTIError(f"{path} has learned_embeds_2 but no learned_embeds file; an SDXL output needs both.")
    candidates = sorted(
        n for n in os.listdir(path)
        if n.lower().endswith(EMBEDDING_EXTENSIONS) and not n.startswith(".") and "-steps-" not in n and os.path.isfile(os.path.join(path, n))
    )
    if len(candidates) == 1:
        return _concept_from_data(*read_embedding_data(os.path.join(path, candidates[0])), os.path.join(path, candidates[0]))
    if not candidates:
        raise DTIError(f"{path} holds no learned_embeds.safetensors (or any embedding file); pass a training output folder or an embedding file.")
    raise DTIError(f"{path} holds several embedding files ({', '.join(candidates[:5])}) and no learned_embeds.safetensors; pass one file.")


# -- writing ------------------------------------------------------------------------------------------


def _encoder_metadata(concept, name):
    meta = dict(concept.metadata.get(name, {}))
    meta.pop("format", None)
    meta["text_encoder"] = name
    meta["placeholder_token"] = concept.token
    meta["tokens"] = json.dumps(placeholder_token_list(concept.token, concept.num_vectors))
    return meta


def _single_file_metadata(concept):
    meta = _encoder_metadata(concept, "text_encoder")
    meta["text_encoder"] = "both"
    meta["norm"] = json.dumps({SINGLE_FILE_KEYS[n]: _norm_or_none(concept.metadata.get(n, {}).get("norm")) for n in concept.vectors})
    return meta


def _save_a1111_pt(path, concept):
    meta = _encoder_metadata(concept, "text_encoder")
    step = meta.get("steps", "")
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": concept.vectors["text_encoder"].detach().cpu().contiguous().clone()},
        "name": concept.token,
        "step": int(step) if step.isdigit() else 0,
        "sd_checkpoint": None,
        "sd_checkpoint_name": meta.get("base_model"),
        "metadata": meta,
    }
    _atomic_write(path, lambda tmp: torch.save(data, tmp))
    return path


def write_single_file(concept, path):
    """The AUTOMATIC1111/ComfyUI/kohya single file: SDXL {"clip_l", "clip_g"}; SD {"emb_params"} (.safetensors)
    or {"string_to_param": {"*": ...}, "name", "step"} (.pt)."""
    if concept.sdxl:
        tensors = {SINGLE_FILE_KEYS[n]: v for n, v in concept.vectors.items()}
        return save_embedding_file(path, tensors, _single_file_metadata(concept))
    if path.lower().endswith(".safetensors"):
        meta = _encoder_metadata(concept, "text_encoder")
        meta["name"] = concept.token
        return save_embedding_file(path, {"emb_params": concept.vectors["text_encoder"]}, meta)
    return _save_a1111_pt(path, concept)


def write_diffusers(concept, output, single_file=False):
    """diffusers form: a {token: tensor} file (SD, OUTPUT ending in .safetensors/.bin) or a folder with
    learned_embeds.safetensors (+ learned_embeds_2.safetensors for SDXL; with single_file, also <slug>.safetensors)."""
    if output.lower().endswith(EMBEDDING_EXTENSIONS):
        if concept.sdxl:
            raise DTIError(f"--output {output} is a file, but an SDXL embedding in diffusers form is two files; pass a folder.")
        return [save_embedding_file(output, {concept.token: concept.vectors["text_encoder"]}, _encoder_metadata(concept, "text_encoder"))]
    written = []
    for name, vecs in concept.vectors.items():
        path = os.path.join(output, DIFFUSERS_FILE_STEMS[name] + ".safetensors")
        written.append(save_embedding_file(path, {concept.token: vecs}, _encoder_metadata(concept, name)))
    if single_file and concept.sdxl:
        written.append(write_single_file(concept, os.path.join(output, embedding_slug(concept.token) + ".safetensors")))
    return written


def write_concept(concept, output, to="diffusers", single_file=False):
    """Write a concept in the form `to` (diffusers, a1111, comfyui); returns the paths written."""
    if to not in CONVERT_TARGETS:
        raise DTIError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, not {to!r}.")
    if to == "diffusers":
        return write_diffusers(concept, output, single_file=single_file)
    if not output.lower().endswith(EMBEDDING_EXTENSIONS):
        output = os.path.join(output, embedding_slug(concept.token) + ".safetensors")
    elif output.lower().endswith(".bin"):
        raise DTIError(f"--output {output}: AUTOMATIC1111 and ComfyUI read .safetensors or .pt; use one of those.")
    return [write_single_file(concept, output)]


def convert_embedding(path, to, output):
    """Read EMB in any form and write it as `to`; tensors are copied bit for bit. Returns the paths written."""
    concept = read_concept(path)
    return write_concept(concept, output, to)


# -- slerp --------------------------------------------------------------------------------------------


def _row_norms(x):
    return x.double().norm(dim=-1)


def check_slerp_pair(a, b):
    """Raise DTIError when two concepts cannot be blended; warn when their norms or base models differ."""
    if set(a.vectors) != set(b.vectors):
        raise DTIError(f"{a.describe()} but {b.describe()}; slerp needs two embeddings for the same kind of model.")
    for name in a.vectors:
        va, vb = a.vectors[name], b.vectors[name]
        if va.shape[0] != vb.shape[0]:
            raise DTIError(f"{a.source} has {va.shape[0]} vector(s) but {b.source} has {vb.shape[0]} vector(s)"
                           f"{' (' + name + ')' if a.sdxl else ''}; slerp needs the same number of vectors in both.")
        if va.shape[1] != vb.shape[1]:
            raise DTIError(f"{a.source} has {va.shape[1]}-dim vectors but {b.source} has {vb.shape[1]}-dim ones ({name}); "
                           f"they were trained for different text encoders and cannot be blended.")
        for src, v in ((a.source, va), (b.source, vb)):
            if not torch.isfinite(v).all() or (_row_norms(v) == 0).any():
                raise DTIError(f"{src} holds a zero or non-finite vector ({name}); it has no direction to interpolate.")
        if (sphere_angle(va.double(), vb.double()) > math.pi - 1e-4).any():
            raise DTIError(f"{a.source} and {b.source} have a pair of opposite vectors ({name}); no unique path joins them on the sphere.")
        na, nb = _row_norms(va), _row_norms(vb)
        if not torch.allclose(na, nb, rtol=1e-5, atol=0):
            warnings.warn(
                f"{a.source} and {b.source} have different norms ({name}: {_fmt_norms(na)} vs {_fmt_norms(nb)}), as a classic "
                f"textual-inversion file does: the direction is slerped and the norm interpolated linearly.", DTIWarning)
    bases = [c.metadata.get("text_encoder", {}).get("base_model") for c in (a, b)]
    if all(bases) and bases[0] != bases[1]:
        warnings.warn(f"{a.source} was trained on {bases[0]} and {b.source} on {bases[1]}; the blend may not mean much.", DTIWarning)


def _fmt_norms(norms):
    return ", ".join(f"{float(n):.4g}" for n in norms)


def slerp_concepts(a, b, alpha, token):
    """The blend of two concepts at fraction alpha (0 gives a, 1 gives b), per text encoder and per vector:
    direction by spherical interpolation, norm linearly ((1 - alpha) |a| + alpha |b|; equal norms stay exact).
    Call check_slerp_pair(a, b) first for the checks and warnings."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise DTIError(f"--alpha {alpha:g} is outside [0, 1]; 0 gives the first embedding, 1 the second.")
    vectors, metadata = {}, {}
    for name in a.vectors:
        va, vb = a.vectors[name].float(), b.vectors[name].float()
        if alpha == 0.0:
            blend = va.clone()
        elif alpha == 1.0:
            blend = vb.clone()
        else:
            norm = (1.0 - alpha) * _row_norms(va) + alpha * _row_norms(vb)
            blend = (slerp(va.double(), vb.double(), alpha).double() * norm.unsqueeze(-1)).float()
        vectors[name] = blend
        norms = _row_norms(blend)
        uniform = bool((norms.max() - norms.min()) <= 1e-6 * norms.max())
        metadata[name] = {
            "method": "slerp",
            "dti_version": __version__,
            "sources": json.dumps([a.source, b.source]),
            "source_tokens": json.dumps([a.token, b.token]),
            "alpha": repr(alpha),
            "norm": repr(float(norms.mean())) if uniform else json.dumps([float(n) for n in norms]),
        }
        stated = a.metadata[name].get("norm")
        if uniform and stated == b.metadata[name].get("norm") and _norm_or_none(stated):
            if abs(float(norms.mean()) - float(stated)) <= 1e-6 * float(stated):
                metadata[name]["norm"] = stated  # both inputs state the same m and the blend has it
        base = a.metadata[name].get("base_model") or b.metadata[name].get("base_model")
        if base:
            metadata[name]["base_model"] = base
    return ConceptEmbedding(token, vectors, metadata, source=None, form="diffusers-folder")


def _alpha_folder(output, alpha):
    return os.path.join(output, f"alpha-{alpha:g}")


def slerp_embeddings(a_path, b_path, alphas=(0.5,), output="slerp", token=None, render=None, prompt="a photo of {}", seed=0, steps=30):
    """Blend two embeddings (files or training folders, SD or SDXL) at each alpha and write training-style folders:
    OUTPUT itself for one alpha, OUTPUT/alpha-A for several. With render=MODEL, also OUTPUT/interpolation.png.
    Returns {"folders": [...], "alphas": [...], "strip": path or None}."""
    if output.lower().endswith(EMBEDDING_EXTENSIONS):
        raise DTIError(f"--output {output} looks like a file; slerp writes a folder (like a training output), pass a folder name.")
    alphas = list(dict.fromkeys(float(x) for x in alphas))
    if not alphas:
        raise DTIError("--alpha needs at least one value in [0, 1].")
    for alpha in alphas:
        if not 0.0 <= alpha <= 1.0 or not math.isfinite(alpha):
            raise DTIError(f"--alpha {alpha:g} is outside [0, 1]; 0 gives the first embedding, 1 the second.")
    if render is not None and "{}" not in prompt:
        raise DTIError(f"--prompt {prompt!r} has no {{}} where the token goes; use e.g. 'a photo of {{}}'.")
    a, b = read_concept(a_path), read_concept(b_path)
    if token is None:
        token = f"<{embedding_slug(a.token)}-{embedding_slug(b.token)}>"
    _check_token(token)
    check_slerp_pair(a, b)
    folders = []
    for alpha in alphas:
        folder = output if len(alphas) == 1 else _alpha_folder(output, alpha)
        write_diffusers(slerp_concepts(a, b, alpha, token), folder, single_file=True)
        folders.append(folder)
    strip = None
    if render is not None:
        strip = render_interpolation(render, folders, alphas, prompt, seed=seed, steps=steps,
                                     output_path=os.path.join(output, "interpolation.png"), token=token)
    return {"folders": folders, "alphas": alphas, "strip": strip}


# -- rendering ----------------------------------------------------------------------------------------


def strip_label_height(image_height):
    """Height in pixels of the label band under each image of an interpolation strip."""
    return max(16, image_height // 12)


def interpolation_strip(images, labels):
    """Images side by side (all resized to the first one's size), each label centred in a white band below."""
    from PIL import ImageDraw, ImageFont

    if not images:
        raise DTIError("No images to put in the strip.")
    w, h = images[0].size
    band = strip_label_height(h)
    strip = Image.new("RGB", (w * len(images), h + band), "white")
    draw = ImageDraw.Draw(strip)

    def font_of(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            return ImageFont.load_default()

    for i, (image, label) in enumerate(zip(images, labels)):
        image = image.convert("RGB")
        if image.size != (w, h):
            image = image.resize((w, h))
        strip.paste(image, (i * w, 0))
        # The largest font (up to 60% of the band) whose text fits the image width; tiny images get the bare number.
        for text in (label, label.split()[-1]):
            for size in range(max(8, int(band * 0.6)), 5, -1):
                font = font_of(size)
                left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
                if right - left <= w - 2:
                    break
            if right - left <= w - 2:
                break
        x = i * w + (w - (right - left)) / 2 - left
        y = h + (band - (bottom - top)) / 2 - top
        draw.text((x, y), text, fill="black", font=font)
    return strip


def _load_render_pipeline(model):
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except Exception as e:
        raise DTIError(f"--render {model} could not be loaded as a diffusers pipeline ({type(e).__name__}: {e}); pass an SD or SDXL pipeline folder.")
    if not hasattr(pipe, "load_textual_inversion"):
        raise DTIError(f"--render {model} is a {type(pipe).__name__}, which cannot load textual-inversion embeddings; pass an SD or SDXL pipeline.")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_into_pipeline(pipe, folder, token, model):
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    concept = read_concept(folder)
    if concept.sdxl != sdxl:
        raise DTIError(f"--render {model} is an {'SDXL' if sdxl else 'SD'} pipeline but the embeddings are for {'SDXL' if concept.sdxl else 'SD'}; "
                       f"pass the base model they were trained on.")
    try:
        if sdxl:
            pipe.load_textual_inversion(folder, weight_name="learned_embeds.safetensors", token=token,
                                        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(folder, weight_name="learned_embeds_2.safetensors", token=token,
                                        text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(folder, token=token)
    except ValueError as e:
        raise DTIError(f"The embedding in {folder} does not fit --render {model} ({e}); pass the base model it was trained on.")


def render_interpolation(model, folders, alphas, prompt="a photo of {}", seed=0, steps=30, output_path="interpolation.png", token="<mix>"):
    """Load the pipeline once, load each blended embedding under its own token, render the prompt with the
    same seed for each, and write a labelled strip (alpha under each image). Returns output_path."""
    if "{}" not in prompt:
        raise DTIError(f"--prompt {prompt!r} has no {{}} where the token goes; use e.g. 'a photo of {{}}'.")
    if steps < 1:
        raise DTIError(f"--steps must be at least 1, not {steps}.")
    pipe = _load_render_pipeline(model)
    base = embedding_slug(token)
    images = []
    for i, folder in enumerate(folders):
        distinct = f"<{base}-alpha{i}>"
        _load_into_pipeline(pipe, folder, distinct, model)
        generator = torch.Generator("cpu").manual_seed(seed)
        images.append(pipe(prompt.replace("{}", distinct), num_inference_steps=steps, generator=generator).images[0])
    strip = interpolation_strip(images, [f"alpha {alpha:g}" for alpha in alphas])
    _atomic_write(output_path, lambda tmp: strip.save(tmp, format="PNG"))
    return output_path


# -- inspect ------------------------------------------------------------------------------------------


def _input_embedding_weight(model, name):
    """The text encoder's token embedding matrix (V, dim), float32: read straight from the safetensors of a
    local pipeline folder when possible, else through transformers (local folder or Hub id)."""
    folder = os.path.join(model, name)
    if os.path.isdir(folder):
        from safetensors import safe_open

        for file in sorted(os.listdir(folder)):
            if file.endswith(".safetensors"):
                with safe_open(os.path.join(folder, file), framework="pt") as f:
                    for key in f.keys():
                        if key.endswith("token_embedding.weight"):
                            return f.get_tensor(key).float()
    elif os.path.isdir(model):
        raise DTIError(f"--model {model} has no {name} folder; pass a diffusers pipeline folder of the base model.")
    from transformers import CLIPTextModel

    try:
        encoder = CLIPTextModel.from_pretrained(model, subfolder=name)
    except Exception as e:
        raise DTIError(f"--model {model}: its {name} could not be loaded ({type(e).__name__}: {e}); pass a diffusers pipeline folder or Hub id.")
    return encoder.get_input_embeddings().weight.detach().float()


def _load_tokenizer(model, name):
    from transformers import AutoTokenizer

    sub = "tokenizer" if name == "text_encoder" else "tokenizer_2"
    try:
        return AutoTokenizer.from_pretrained(model, subfolder=sub)
    except Exception as e:
        raise DTIError(f"--model {model}: its {sub} could not be loaded ({type(e).__name__}: {e}); pass a diffusers pipeline folder or Hub id.")


def inspect_embedding(path, model=None, k=5):
    """What an embedding holds, as a dict (the --json output). Per encoder and vector: the norm; with a model,
    the vocabulary's norm statistics, the norm relative to their mean, the k nearest vocabulary tokens by
    cosine, and the angle to the initializer named in the metadata."""
    if k < 1:
        raise DTIError(f"--k must be at least 1, not {k}.")
    concept = read_concept(path)
    tokens = placeholder_token_list(concept.token, concept.num_vectors)
    report = {"path": path, "form": concept.form, "token": concept.token, "tokens": tokens,
              "num_vectors": concept.num_vectors, "sdxl": concept.sdxl, "model": model, "encoders": {}}
    for name, vecs in concept.vectors.items():
        vecs = vecs.float()
        meta = concept.metadata.get(name, {})
        norms = vecs.norm(dim=-1)
        entry = {"dim": vecs.shape[1], "file_key": SINGLE_FILE_KEYS[name] if concept.form == "sdxl-single-file" else None,
                 "metadata": meta, "vectors": [{"index": i, "token": tokens[i], "norm": float(norms[i])} for i in range(len(vecs))]}
        if model is not None:
            # A learned_embeds_2 file passed alone is read as one encoder; its metadata says which one it is.
            model_encoder = meta.get("text_encoder") if not concept.sdxl and meta.get("text_encoder") in CONCEPT_ENCODERS else name
            weight = _input_embedding_weight(model, model_encoder)
            tokenizer = _load_tokenizer(model, model_encoder)
            if weight.shape[1] != vecs.shape[1]:
                raise DTIError(f"{path} holds {vecs.shape[1]}-dim vectors for {model_encoder} but --model {model} has {weight.shape[1]}-dim rows; "
                               f"pass the base model it was trained on{' (' + meta['base_model'] + ')' if meta.get('base_model') else ''}.")
            weight = weight[: min(weight.shape[0], tokenizer.vocab_size)]  # the base vocabulary, no added tokens
            stats = vocabulary_norm_stats(weight)
            entry["vocabulary"] = {"size": weight.shape[0], **stats}
            near = nearest_vocabulary_tokens(vecs, weight, tokenizer, k)
            init_rows = None
            initializer = meta.get("initializer_token")
            if initializer:
                entry["initializer_token"] = initializer
                try:
                    init_rows = weight[initializer_ids(tokenizer, initializer, len(vecs))]
                except DTIError as e:  # the file's initializer does not fit this model: report it, no angle
                    entry["initializer_note"] = str(e)
            angles = torch.rad2deg(sphere_angle(vecs, init_rows)) if init_rows is not None else None
            for i, item in enumerate(entry["vectors"]):
                item["norm_to_vocab_mean"] = item["norm"] / stats["mean"]
                item["nearest"] = [{"token": token, "id": j, "cosine": c} for token, j, c in near[i]]
                item["angle_to_initializer_deg"] = float(angles[i]) if angles is not None else None
        report["encoders"][name] = entry
    return report


def format_inspection(report):
    """The human-readable text of an inspect_embedding() report."""
    lines = [f"{report['token']}: {report['num_vectors']} vector(s), {'SDXL' if report['sdxl'] else 'SD'}, "
             f"{report['form']} form, from {report['path']}"]
    for name, entry in report["encoders"].items():
        meta = entry["metadata"]
        head = f"{name}{' (' + entry['file_key'] + ')' if entry.get('file_key') else ''}: dim {entry['dim']}"
        if meta.get("method"):
            head += f", method {meta['method']}"
        if meta.get("norm"):
            head += f", norm in metadata {meta['norm']}"
        lines.append(head)
        vocab = entry.get("vocabulary")
        if vocab:
            lines.append(f"  vocabulary norms ({vocab['size']} rows): mean {vocab['mean']:.4f}, min {vocab['min']:.4f}, max {vocab['max']:.4f}")
        if entry.get("initializer_note"):
            lines.append(f"  no angle to the initializer: {entry['initializer_note']}")
        for item in entry["vectors"]:
            text = f"  [{item['index']}] {item['token']}: norm {item['norm']:.4f}"
            if "norm_to_vocab_mean" in item:
                text += f" ({item['norm_to_vocab_mean']:.2f}x vocabulary mean)"
            if item.get("angle_to_initializer_deg") is not None:
                text += f", {item['angle_to_initializer_deg']:.1f} deg from initializer {entry['initializer_token']!r}"
            lines.append(text)
            if item.get("nearest"):
                lines.append("      nearest: " + ", ".join(f"{n['token']} ({n['cosine']:.3f})" for n in item["nearest"]))
    first = next(iter(report["encoders"].values()))["metadata"]
    shown = {k: v for k, v in first.items() if k not in ("format",)}
    if shown:
        lines.append("metadata: " + "; ".join(f"{k}={v}" for k, v in shown.items()))
    if report["model"] is None:
        base = first.get("base_model")
        lines.append(f"Pass --model {base or 'BASE_MODEL'} for vocabulary norms, nearest tokens and the angle to the initializer.")
    return "\n".join(lines)


# -- training curves ----------------------------------------------------------------------------------


def plot_training_curves(history, path):
    """Write a PNG with three panels against the step: loss, norm, angle from the initializer (degrees).

    history: a list of (step, loss, norm, angle_deg). Drawn with matplotlib's Agg canvas (no display and no
    change to pyplot's global backend). Returns path, or None when history is empty (nothing is written).
    """
    rows = [tuple(float(x) if x is not None else float("nan") for x in entry[:4]) for entry in history]
    if not rows:
        logger.warning(f"No training history to plot; {path} was not written.")
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DTIError("matplotlib is needed to plot training curves; pip install matplotlib.")
    steps, loss, norm, angle = zip(*rows)
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    marker = "." if len(rows) <= 60 else None
    for ax, values, title, ylabel in zip(fig.subplots(1, 3), (loss, norm, angle),
                                         ("loss", "embedding norm", "angle from initializer"), ("loss", "L2 norm", "degrees")):
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
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


# -- command line -------------------------------------------------------------------------------------


def build_concept_parser():
    parser = argparse.ArgumentParser(
        prog="dti_utils.py",
        description="Tools for textual-inversion embeddings (DTI or classic, SD or SDXL): blend, inspect, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("slerp", help="blend two embeddings on the sphere", description=(
        "Blend two embeddings (files or training output folders, SD or SDXL): the direction by spherical interpolation, "
        "the norm linearly (DTI embeddings share the norm m, so blends keep it exactly). Writes training-style folders "
        "that load with pipe.load_textual_inversion(folder): OUTPUT for one alpha, OUTPUT/alpha-A for several."))
    p.add_argument("a", metavar="A", help="First embedding (alpha 0): file or training output folder.")
    p.add_argument("b", metavar="B", help="Second embedding (alpha 1).")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="Fractions in [0, 1] (several give one folder each). Default 0.5.")
    p.add_argument("--token", default=None, help="Token of the blend, e.g. '<mix>'. Default: '<A-B>' from the inputs' tokens.")
    p.add_argument("--output", required=True, help="Output folder.")
    p.add_argument("--render", metavar="MODEL", default=None, help="Also render one image per alpha with this pipeline (folder or Hub id) into OUTPUT/interpolation.png.")
    p.add_argument("--prompt", default="a photo of {}", help="Prompt for --render; {} is replaced by the token. Default 'a photo of {}'.")
    p.add_argument("--seed", type=int, default=0, help="Seed for --render, the same for every alpha. Default 0.")
    p.add_argument("--steps", type=int, default=30, help="Inference steps for --render. Default 30.")

    p = sub.add_parser("inspect", help="norms, nearest tokens, angle to the initializer", description=(
        "Show what an embedding holds: each vector's norm and the file's metadata; with --model also the vocabulary's "
        "norm statistics, the norm relative to their mean, the k nearest vocabulary tokens and the angle to the initializer."))
    p.add_argument("emb", metavar="EMB", help="Embedding file or training output folder.")
    p.add_argument("--model", default=None, help="Base model (diffusers folder or Hub id) for vocabulary comparisons.")
    p.add_argument("--k", type=int, default=5, help="Nearest tokens per vector. Default 5.")
    p.add_argument("--json", action="store_true", help="Print machine-readable JSON only.")

    p = sub.add_parser("convert", help="convert between diffusers, AUTOMATIC1111 and ComfyUI forms", description=(
        "Convert an embedding (form detected automatically) to: diffusers ({token: tensor} file for SD, or a folder with "
        "learned_embeds[_2].safetensors), a1111 / comfyui (SD: emb_params .safetensors, or string_to_param .pt; "
        "SDXL: one clip_l/clip_g file). OUTPUT without a file extension is a folder. Tensors are copied bit for bit."))
    p.add_argument("emb", metavar="EMB", help="Embedding file or training output folder.")
    p.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="Target form.")
    p.add_argument("--output", required=True, help="Output file (.safetensors, .pt; .bin for diffusers) or folder.")
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None):
    """`python dti_utils.py slerp|inspect|convert ...`: 0 on success; a DTIError prints `error: ...` and gives 2."""
    args = build_concept_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DTIWarning)
        warnings.showwarning = _print_warning
        try:
            if args.command == "slerp":
                result = slerp_embeddings(args.a, args.b, args.alpha, args.output, token=args.token, render=args.render,
                                          prompt=args.prompt, seed=args.seed, steps=args.steps)
                for alpha, folder in zip(result["alphas"], result["folders"]):
                    print(f"alpha {alpha:g}: {folder}")
                if result["strip"]:
                    print(f"interpolation strip: {result['strip']}")
            elif args.command == "inspect":
                report = inspect_embedding(args.emb, model=args.model, k=args.k)
                print(json.dumps(report, indent=2) if args.json else format_inspection(report))
            elif args.command == "convert":
                for path in convert_embedding(args.emb, args.to, args.output):
                    print(f"wrote {path}")
        except DTIError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
