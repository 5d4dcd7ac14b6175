"""Directional Textual Inversion (DTI): the method library both training scripts import.

DTI (Kim et al., arXiv 2512.13672) writes every learned token embedding as e = m * v with ||v|| = 1. The magnitude
m is fixed at an in-distribution value (a statistic of the encoder's own vocabulary norms); only the direction v is
trained, by Riemannian SGD on the unit sphere with a von Mises-Fisher prior centred on the initializer's direction.

The training loop is written out in each script; this file holds what it calls, one section per concern: sphere
geometry, the optimizer, tokens and the directional embedding, the data cache, embedding files (every form is written
here), checkpoints, loop mechanics, CUDA graphs and validation. The scripts' shared flags, the checks before anything
loads and the Hub are in dti_cli.py; the concept tools (and the reader of every file form) in dti_concepts.py.
"""

import contextlib
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
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import MultiProcessAdapter, get_logger
from accelerate.state import is_initialized
from PIL import Image, ImageOps

__version__ = "0.2.0"

__all__ = [
    "DTIError", "DTIWarning",  # errors
    "projx", "proju", "retr", "dist", "slerp",  # sphere geometry
    "RiemannianSGD", "rsgd",  # optimizer
    "DirectionalEmbedding", "add_directional_embedding", "vocabulary_norm_stats", "resolve_token_scale", "placeholder_token_list",
    "initializer_ids", "resolve_tokens", "add_placeholder_tokens", "nearest_vocabulary_tokens",  # tokens and the directional embedding
    "OBJECT_TEMPLATES", "STYLE_TEMPLATES", "prompt_templates", "tokenize_prompts", "caption_prompt", "training_prompts", "image_to_tensor",
    "square_view", "resized_shorter_side", "crop_positions", "build_views", "encode_views", "TrainingData", "step_generator",
    "diffusion_loss",  # data cache
    "ENCODERS", "SINGLE_FILE_KEYS", "FILE_STEMS", "EMBEDDING_EXTENSIONS", "CONVERT_TARGETS", "ConceptEmbedding", "save_embedding_file",
    "write_concept", "write_diffusers", "write_single_file", "embedding_slug", "save_training_embeddings",  # embedding files
    "CHECKPOINT_FILE", "list_checkpoints", "find_checkpoint", "check_resume", "training_state", "restore_training_state",
    "save_checkpoint",  # checkpoints
    "training_session", "StopSignals", "LossWindow", "StartupTimer", "guard_nonfinite_step", "average_gradients", "freeze_models",
    "vae_dtype", "resolve_max_train_steps", "scaled_learning_rate", "set_schedule_position", "quiet_library_notices",  # loop mechanics
    "HostSyncRecorder", "GraphedUNet", "unet_for_training",  # CUDA graphs
    "log_validation", "decode_latents", "log_nearest_tokens",  # validation
]


class _Logger(MultiProcessAdapter):
    """accelerate's logger (the main process only) during a run; a plain logger where no Accelerator exists (the
    library used on its own), where accelerate's would raise."""

    def log(self, level, msg, *args, **kwargs):
        if is_initialized():
            return super().log(level, msg, *args, **kwargs)
        kwargs.pop("main_process_only", None)
        self.logger.log(level, msg, *args, **kwargs)


logger = _Logger(get_logger("dti").logger, {})


class DTIError(Exception):
    """A user-facing error: one sentence that names the flag or file and what to do."""


class DTIWarning(UserWarning):
    """Something the user should know that does not stop the command."""


# ----------------------------------------------------------------------------------------------------
# Sphere geometry: points are unit rows; names follow geoopt's Sphere manifold
# ----------------------------------------------------------------------------------------------------


def projx(x):
    """Project x onto the unit sphere, row by row (geoopt's projx)."""
    return F.normalize(x, dim=-1, eps=1e-12)


def proju(x, u):
    """Project u onto the tangent space at x, row by row: u - <u, x> x (geoopt's proju)."""
    return u - (u * x).sum(-1, keepdim=True) * x


def retr(x, u):
    """Retraction: move from x along the tangent vector u and renormalize (geoopt's retr)."""
    return projx(x + u)


def dist(x, y):
    """Geodesic distance (angle in radians) between the directions of the rows of x and y, any norms.
    atan2 of the sine and cosine parts keeps small angles exact where arccos of a cosine near 1 does not."""
    x, y = projx(x), projx(y)
    cos = (x * y).sum(-1)
    return torch.atan2((y - cos.unsqueeze(-1) * x).norm(dim=-1), cos)


def slerp(a, b, t, eps=1e-6):
    """Spherical interpolation between the directions of rows a and b at fraction t (0 gives a, 1 gives b).
    Falls back to normalized linear interpolation when the angle is tiny, where sin(W) vanishes."""
    a, b = projx(a.float()), projx(b.float())
    omega = dist(a, b).unsqueeze(-1)
    sin_omega = torch.sin(omega)
    small = sin_omega < eps
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.where(small, torch.ones_like(sin_omega), sin_omega)
    return projx(torch.where(small, (1 - t) * a + t * b, out))


# ----------------------------------------------------------------------------------------------------
# RiemannianSGD: laid out like torch.optim.SGD (lazy state, a functional core, @torch.no_grad() step)
# ----------------------------------------------------------------------------------------------------


def rsgd(params, grads, priors, exp_avg_sqs, steps, *, lr, kappa, beta, eps, grad_scale=None, found_inf=None):
    """The DTI update of each row v of each parameter, in place, float32 whatever the parameter's dtype:

        g = grad - kappa * mu                 (the vMF prior exp(kappa mu^T v) adds -kappa mu)
        g = g - <g, v> v                      (tangent projection)
        s = beta s + (1 - beta) ||g||^2 ; g = g / (sqrt(s / (1 - beta^t)) + eps)
        v = (v - lr g) / ||v - lr g||         (retraction)

    With beta = 0 every row turns by about lr radians per step, whatever the gradient's size. A parameter whose
    gradient is not finite, or every parameter when found_inf is non-zero, keeps its value and state: decided on
    the device, with no host sync. grad_scale divides the gradients first (AMP loss scaling)."""
    for p, grad, prior, exp_avg_sq, step in zip(params, grads, priors, exp_avg_sqs, steps):
        v = p.float()
        g = grad.float()
        if grad_scale is not None:
            g = g / grad_scale.to(g.device)
        if kappa:
            g = g - kappa * prior
        g = proju(v, g)
        finite = torch.isfinite(g).all()
        if found_inf is not None:
            finite = finite & (found_inf.to(g.device) == 0)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        sq = (g * g).sum(-1, keepdim=True)
        step.add_(finite.float())
        if beta > 0:
            exp_avg_sq.copy_(torch.where(finite, beta * exp_avg_sq + (1 - beta) * sq, exp_avg_sq))
            sq = exp_avg_sq / (1 - torch.pow(beta, step.clamp_min(1)))
        update = projx(v - lr * g / (sq.sqrt() + eps))
        p.copy_(torch.where(finite, update, v).to(p.dtype))


class RiemannianSGD(torch.optim.Optimizer):
    """Riemannian SGD on unit rows with a von Mises-Fisher prior: the DTI update (see `rsgd`).

    Parameters must hold unit rows. Per-parameter state, created at the first step (so `add_param_group` works at
    any time): `prior` (mu, float32; the parameter's direction at its first step unless `set_prior` says
    otherwise), `step` and `exp_avg_sq` (float32, per row).

    Like torch's fused optimizers it takes part in AMP loss scaling without a host sync: `torch.amp.GradScaler`
    sees `_step_supports_amp_scaling` and hands over `grad_scale` and `found_inf` as attributes; the same
    attributes can be set by hand (see `guard_nonfinite_step`)."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0.01, kappa=1e-4, beta=0.0, eps=1e-8):
        if not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= kappa < math.inf:
            raise ValueError(f"Invalid kappa: {kappa}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        super().__init__(params, dict(lr=lr, kappa=kappa, beta=beta, eps=eps))

    def _state_of(self, p):
        state = self.state[p]
        if "step" not in state:
            state.setdefault("prior", projx(p.detach().float()).clone())
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape[:-1] + (1,), dtype=torch.float32, device=p.device)
        return state

    def _init_group(self, group):
        params, grads, priors, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._state_of(p)
            params.append(p)
            grads.append(p.grad)
            priors.append(state["prior"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, priors, exp_avg_sqs, steps

    def set_prior(self, p, mu):
        """Use mu (rows, any norm) as the prior direction of parameter p instead of its first-step direction."""
        self.state[p]["prior"] = projx(mu.detach().float().to(p.device)).clone()

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
        for group in self.param_groups:
            rsgd(*self._init_group(group), lr=group["lr"], kappa=group["kappa"], beta=group["beta"], eps=group["eps"],
                 grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))
        return loss


# ----------------------------------------------------------------------------------------------------
# Tokens, vocabulary statistics and the directional embedding
# ----------------------------------------------------------------------------------------------------


def vocabulary_norm_stats(weight):
    """Mean, min and max L2 norm over the non-zero rows of an embedding matrix."""
    norms = weight.detach().float().norm(dim=-1)
    norms = norms[norms > 0]
    return {"mean": norms.mean().item(), "min": norms.min().item(), "max": norms.max().item()}


TOKEN_SCALE_WARN, TOKEN_SCALE_LIMIT = 4.0, 100.0  # multiples of the vocabulary's largest norm


def resolve_token_scale(token_scale, stats):
    """The fixed norm m: 'mean', 'min', 'max' of the vocabulary, or a positive number given as text. A number far
    beyond the vocabulary's norms is the out-of-distribution token DTI exists to avoid: warned, or refused."""
    if token_scale in ("mean", "min", "max"):
        return stats[token_scale]
    try:
        value = float(token_scale)
    except (TypeError, ValueError):
        raise DTIError(f"--token_scale must be mean, min, max or a positive number, not {token_scale!r}.")
    if not 0 < value < math.inf:
        raise DTIError(f"--token_scale must be a positive finite number, not {token_scale!r}.")
    if value > TOKEN_SCALE_LIMIT * stats["max"]:
        raise DTIError(f"--token_scale {value:g} is over {TOKEN_SCALE_LIMIT:g}x the vocabulary's largest norm ({stats['max']:.4g}); "
                       f"use mean, min, max or a number near them.")
    if value > TOKEN_SCALE_WARN * stats["max"]:
        logger.warning(f"--token_scale {value:g} is {value / stats['max']:.1f}x the vocabulary's largest norm ({stats['max']:.4g}): "
                       f"the token will be out of distribution, which DTI exists to avoid.")
    return value


def placeholder_token_list(placeholder_token, num_vectors):
    """tok, tok_1, ..., tok_{n-1}: the names diffusers' load_textual_inversion expands a token to."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


def initializer_ids(tokenizer, initializer_token, num_vectors=None, allow_multi_token=True):
    """One initializer token id per vector: a k-token initializer gives k vectors, a one-token one is copied.
    A single word that the tokenizer splits (a typo, an unknown word) is refused unless allow_multi_token."""
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if not ids:
        raise DTIError(f"--initializer_token {initializer_token!r} tokenizes to nothing; pass a real word such as 'toy'.")
    if len(ids) > 1 and len(initializer_token.split()) == 1 and not allow_multi_token:
        pieces = [tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]
        raise DTIError(f"--initializer_token {initializer_token!r} is not one token: the tokenizer splits it into {pieces}, which would "
                       f"train {len(ids)} vectors; pass a word the tokenizer knows, several words, or --allow_multi_token_initializer.")
    num_vectors = len(ids) if num_vectors is None else num_vectors
    if num_vectors < 1:
        raise DTIError(f"--num_vectors must be at least 1, not {num_vectors}.")
    if len(ids) == 1:
        return ids * num_vectors
    if len(ids) != num_vectors:
        raise DTIError(f"--initializer_token {initializer_token!r} tokenizes to {len(ids)} tokens, which gives {len(ids)} vectors, but "
                       f"--num_vectors is {num_vectors}; drop --num_vectors or use a one-token initializer.")
    return ids


def resolve_tokens(tokenizer, placeholder_token, initializer_token, num_vectors=None, allow_multi_token=False):
    """Check the concept flags against a tokenizer; return (placeholder tokens, initializer ids). Nothing is added
    to the tokenizer, so this runs before any model loads."""
    if not placeholder_token or not placeholder_token.strip():
        raise DTIError("--placeholder_token is empty; pass a new word such as '<my-concept>'.")
    if any(c.isspace() for c in placeholder_token):
        raise DTIError(f"--placeholder_token {placeholder_token!r} contains white space; use a single word such as '<my-concept>'.")
    if not initializer_token or not initializer_token.strip():
        raise DTIError("--initializer_token is empty; pass a word close to the concept, such as 'toy'.")
    init_ids = initializer_ids(tokenizer, initializer_token, num_vectors, allow_multi_token)
    tokens = placeholder_token_list(placeholder_token, len(init_ids))
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token in vocab or f"{token}</w>" in vocab:
            raise DTIError(f"--placeholder_token {token!r} is already in the tokenizer's vocabulary; choose a new word such as '<{token.strip('<>')}-dti>'.")
    return tokens, init_ids


def add_placeholder_tokens(tokenizer, text_encoder, tokens):
    """Add the tokens to the tokenizer and grow the encoder's embedding; return their ids."""
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise DTIError(f"The tokenizer already knows one of {tokens}; choose a new --placeholder_token.")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(tokens)


@torch.no_grad()
def nearest_vocabulary_tokens(vectors, vocab_weight, tokenizer, k=5):
    """Per vector, the k vocabulary rows nearest by cosine: lists of (token text, id, cosine)."""
    sims = projx(vectors.detach().float()) @ projx(vocab_weight.detach().float()).T
    top = sims.topk(min(k, vocab_weight.shape[0]), dim=-1)
    return [[(tokenizer.convert_ids_to_tokens(int(j)).replace("</w>", ""), int(j), float(c)) for c, j in zip(values, indices)]
            for values, indices in zip(top.values, top.indices)]


class DirectionalEmbedding:
    """The trainable vectors of one text encoder, spliced into its frozen input embedding by a forward hook.

    Only `param` is a trainable leaf: no dense gradient or optimizer state for the vocabulary, and every other row
    stays bit-identical. DTI: `param` holds unit directions v (float32) and the encoder sees `norm * v`, norm fixed.
    Classic TI (norm None): `param` holds the unconstrained embedding e."""

    def __init__(self, text_encoder, tokens, token_ids, init_ids, original_vocab_size, norm=None, name="text_encoder"):
        self.text_encoder = text_encoder
        self.embedding = text_encoder.get_input_embeddings()
        self.name, self.tokens, self.token_ids = name, list(tokens), list(token_ids)
        self.original_vocab_size = original_vocab_size
        self.norm = float(norm) if norm is not None else None
        weight = self.embedding.weight
        self.init_vectors = weight.detach()[list(init_ids)].float().clone()
        self.param = torch.nn.Parameter((projx(self.init_vectors) if self.norm is not None else self.init_vectors).clone())
        # Vocabulary id -> row of `param` (or -1): one gather per forward, no host work.
        self._row_of_id = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        self._row_of_id[torch.tensor(self.token_ids, device=weight.device)] = torch.arange(len(self.token_ids), device=weight.device)
        self._hook = self.embedding.register_forward_hook(self._splice)

    def vectors(self):
        """The embeddings the encoder sees for the placeholder tokens, float32 (n, dim), differentiable."""
        return self.norm * self.param if self.norm is not None else self.param

    def _splice(self, module, args, output):
        rows = self._row_of_id[args[0]]
        vecs = self.vectors().to(output.dtype)[rows.clamp_min(0)]
        return torch.where((rows >= 0).unsqueeze(-1), vecs, output)

    @torch.no_grad()
    def fold_into_encoder(self):
        """Write the vectors into the embedding rows and remove the hook: the encoder then stands alone (full pipeline)."""
        self.embedding.weight[self.token_ids] = self.vectors().to(self.embedding.weight.dtype)
        self._hook.remove()

    @torch.no_grad()
    def stats(self):
        """Device tensors (no sync): mean norm and mean angle (radians) from the initializer."""
        vecs = self.vectors().float()
        return vecs.norm(dim=-1).mean(), dist(vecs, self.init_vectors).mean()

    def nearest_tokens(self, tokenizer, k=5):
        """The k vocabulary tokens nearest each vector by cosine (the original vocabulary only)."""
        near = nearest_vocabulary_tokens(self.vectors(), self.embedding.weight[: self.original_vocab_size], tokenizer, k)
        return [[token for token, _, _ in row] for row in near]


def add_directional_embedding(tokenizer, text_encoder, tokens, init_ids, token_scale="mean", classic=False, name="text_encoder"):
    """Add the placeholder tokens to one tokenizer/encoder pair and splice in their trainable vectors, with this
    encoder's own norm m (a statistic of its vocabulary) and prior (its own initializer rows)."""
    vocab_weight = text_encoder.get_input_embeddings().weight
    original_vocab_size = vocab_weight.shape[0]
    norm = None if classic else resolve_token_scale(token_scale, vocabulary_norm_stats(vocab_weight))
    token_ids = add_placeholder_tokens(tokenizer, text_encoder, tokens)
    return DirectionalEmbedding(text_encoder, tokens, token_ids, init_ids, original_vocab_size, norm=norm, name=name)


# ----------------------------------------------------------------------------------------------------
# Data cache: images decoded once, every distinct view VAE-encoded once, prompts tokenized once
# ----------------------------------------------------------------------------------------------------


OBJECT_TEMPLATES = [  # diffusers' imagenet_templates_small
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [  # diffusers' imagenet_style_templates_small
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a cropped painting in the style of {}",
    "a good painting in the style of {}", "a close-up painting in the style of {}", "a rendition in the style of {}",
    "a nice painting in the style of {}", "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


def prompt_templates(learnable_property):
    return STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES


def tokenize_prompts(tokenizers, prompts, device):
    """Token ids (num_prompts, max_length) of the prompts, once per tokenizer, on the device."""
    return [tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)
            for tok in tokenizers]


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


def training_prompts(tokenizers, images, tokens, learnable_property, device, caption_token=None):
    """Every prompt, tokenized once per tokenizer: the templates, then one row per captioned image. Returns
    (prompt_ids, caption_rows): caption_rows[i] is image i's row, or -1 where it has no caption (it uses the templates)."""
    placeholder = " ".join(tokens)
    prompts = [template.format(placeholder) for template in prompt_templates(learnable_property)]
    rows = []
    for image in images:
        rows.append(len(prompts) if image.caption else -1)
        prompts += [caption_prompt(image.caption, placeholder, caption_token)] if image.caption else []
    captioned = [im for im, row in zip(images, rows) if row >= 0]
    if 0 < len(captioned) < len(images):
        logger.warning(f"{len(captioned)} of {len(images)} images have a caption; the other {len(images) - len(captioned)} use the {learnable_property} templates.")
    cut = [im.name for im, row in zip(images, rows) if row >= 0 and any(len(tok(prompts[row], verbose=False).input_ids) > tok.model_max_length for tok in tokenizers)]
    if cut:
        logger.warning(f"{len(cut)} caption(s) run past the text encoder's {tokenizers[0].model_max_length} tokens and are cut there: {', '.join(cut)}")
    return tokenize_prompts(tokenizers, prompts, device), torch.tensor(rows, dtype=torch.long)


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
        for mirrored in ([False, True] if flip else [False]):
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

    def __init__(self, latent_means, latent_stds, view_index, prompt_ids, repeats, flip_p, seed, extra=None, caption_rows=None, caption_dropout=0.0):
        self.latent_means, self.latent_stds = latent_means, latent_stds  # (num_views, C, h, w) float32
        self.view_index = torch.as_tensor(view_index).cpu()  # (images, 1 or 2 flips, crops) long; read once per epoch
        self.prompt_ids = prompt_ids  # list of (num_prompts, L) tensors, one per tokenizer
        self.num_images = self.view_index.shape[0]
        self.length = self.num_images * repeats
        self.flip_p, self.seed = flip_p, seed
        self.extra = extra or {}  # per-view tensors (SDXL time ids), indexed like the latents
        self.caption_rows = None if caption_rows is None or (caption_rows < 0).all() else caption_rows.cpu()
        self.num_templates = self.prompt_ids[0].shape[0] - (0 if self.caption_rows is None else int((self.caption_rows >= 0).sum()))
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
            if self.caption_rows is not None:  # the image's caption unless dropped; an image without one keeps its template
                caption = self.caption_rows[torch.arange(self.length) % self.num_images]
                prompts = torch.where((torch.rand(self.length, generator=g) >= self.caption_dropout) & (caption >= 0), caption, prompts)
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
        out = {"mean": self.latent_means[view], "std": self.latent_stds[view], "input_ids": [ids[template] for ids in self.prompt_ids]}
        out.update({key: value[view] for key, value in self.extra.items()})
        return out


def step_generator(seed, micro_step, rank, device):
    """A generator whose stream depends only on (seed, step, rank): noise needs no saved RNG state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 6364136223846793005 + micro_step * 1442695040888963407 + rank * 2654435761) % (2**63))
    return g


def diffusion_loss(unet, noise_scheduler, batch, encoder_hidden_states, generator, vae_config, weight_dtype, added_cond_kwargs=None):
    """The denoising loss of one micro-batch: sample the cached latent, add noise, predict, MSE against the
    scheduler's target (the noise, or the velocity for v-prediction models)."""
    mean, std = batch["mean"], batch["std"]
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if getattr(vae_config, "shift_factor", None) is not None:
        latents = latents - vae_config.shift_factor
    latents = latents * vae_config.scaling_factor
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
# Embedding files: the one writer of every form (trainer and concept tools alike; dti_concepts reads them)
# ----------------------------------------------------------------------------------------------------

ENCODERS = ("text_encoder", "text_encoder_2")  # diffusers' attribute names
SINGLE_FILE_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # the SDXL single file (A1111, ComfyUI, kohya)
FILE_STEMS = {"text_encoder": "learned_embeds", "text_encoder_2": "learned_embeds_2"}  # diffusers' training outputs
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_pickle(path, obj):
    # torch.save's legacy (non-zip) format: AUTOMATIC1111's safe unpickler refuses the zip entries torch.save writes now
    # (.format_version, .storage_alignment); torch.load(weights_only=True), diffusers, ComfyUI and kohya read both.
    _atomic_write(path, lambda tmp: torch.save(obj, tmp, _use_new_zipfile_serialization=False))
    return path


def save_embedding_file(path, tensors, metadata=None):
    """Save {key: float32 tensor} atomically: safetensors (with string metadata) or, for .bin/.pt, torch.save."""
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    if not path.lower().endswith(".safetensors"):
        return _save_pickle(path, tensors)
    from safetensors.torch import save_file

    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


class ConceptEmbedding:
    """One learned concept in any file form: its token and a (num_vectors, dim) tensor per text encoder.

    vectors: {"text_encoder": tensor} for SD 1.x/2.x, plus "text_encoder_2" for SDXL (clip_l / clip_g).
    metadata: {encoder name: {str: str}} as stored in the files. form: "diffusers", "diffusers-folder", "a1111",
    "sdxl-single-file"."""

    def __init__(self, token, vectors, metadata=None, source=None, form=None):
        self.token = token
        self.vectors = {name: vectors[name] for name in ENCODERS if name in vectors}
        self.metadata = {name: dict((metadata or {}).get(name, {})) for name in self.vectors}
        self.source, self.form = source, form

    @property
    def sdxl(self):
        return "text_encoder_2" in self.vectors

    @property
    def num_vectors(self):
        return next(iter(self.vectors.values())).shape[0]

    def describe(self):
        return f"{self.source or self.token}: {'SDXL (2 text encoders)' if self.sdxl else 'SD (1 text encoder)'}, {self.num_vectors} vector(s)"

    def __repr__(self):
        dims = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.vectors.items())
        return f"ConceptEmbedding(token={self.token!r}, {dims}, form={self.form!r})"


def embedding_slug(token, file_stem=False):
    """'<cat-toy>' -> 'cat-toy'. file_stem=True: the single file's stem, which AUTOMATIC1111 and kohya make the prompt word
    (ComfyUI: `embedding:STEM`). A1111 swaps the embedding in wherever the stem's tokens occur, so the stem keeps a '-',
    '_' or '.' inside, which CLIP's tokenizer splits off: it is never one vocabulary word ('<toy>' -> 'toy-ti', not 'toy')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "", token or "").strip("._-") or "embedding"
    return slug if not file_stem or re.search(r"[._-]", slug) else f"{slug}-ti"


def _encoder_metadata(concept, name):
    meta = {k: v for k, v in concept.metadata.get(name, {}).items() if k != "format"}
    meta.update(text_encoder=name, placeholder_token=concept.token, tokens=json.dumps(placeholder_token_list(concept.token, concept.num_vectors)))
    return meta


def _norm_or_none(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def write_single_file(concept, path):
    """The AUTOMATIC1111/ComfyUI/kohya single file: SDXL {"clip_l", "clip_g"}; SD {token: tensor} (.safetensors, the key
    diffusers takes as the token; the others take any single key) or {"string_to_param": {"*": ...}, "name", "step"} (.pt)."""
    meta = _encoder_metadata(concept, "text_encoder")
    if concept.sdxl:
        meta["text_encoder"] = "both"
        meta["norm"] = json.dumps({SINGLE_FILE_KEYS[n]: _norm_or_none(concept.metadata.get(n, {}).get("norm")) for n in concept.vectors})
        return save_embedding_file(path, {SINGLE_FILE_KEYS[n]: v for n, v in concept.vectors.items()}, meta)
    if path.lower().endswith(".safetensors"):
        return save_embedding_file(path, {concept.token: concept.vectors["text_encoder"]}, meta)
    step = meta.get("steps", "")
    return _save_pickle(path, {"string_to_token": {"*": 265}, "string_to_param": {"*": concept.vectors["text_encoder"].detach().float().cpu().contiguous().clone()},
                               "name": concept.token, "step": int(step) if step.isdigit() else 0, "sd_checkpoint": None,
                               "sd_checkpoint_name": meta.get("base_model"), "metadata": meta})


def write_diffusers(concept, output, single_file=False, suffix="", ext=".safetensors"):
    """diffusers form: a {token: tensor} file (SD, OUTPUT ending in .safetensors/.bin) or a folder with
    learned_embeds{suffix}{ext} (+ learned_embeds_2 for SDXL; with single_file also the <slug> single file)."""
    if output.lower().endswith(EMBEDDING_EXTENSIONS):
        if concept.sdxl:
            raise DTIError(f"--output {output} is a file, but an SDXL embedding in diffusers form is two files; pass a folder.")
        return [save_embedding_file(output, {concept.token: concept.vectors["text_encoder"]}, _encoder_metadata(concept, "text_encoder"))]
    written = [save_embedding_file(os.path.join(output, FILE_STEMS[name] + suffix + ext), {concept.token: vecs}, _encoder_metadata(concept, name))
               for name, vecs in concept.vectors.items()]
    if single_file and concept.sdxl:
        written.append(write_single_file(concept, os.path.join(output, embedding_slug(concept.token, file_stem=True) + suffix + ext)))
    return written


CONVERT_TARGETS = ("diffusers", "a1111", "comfyui")


def write_concept(concept, output, to="diffusers", single_file=False):
    """Write a concept in the form `to` (diffusers, a1111, comfyui); returns the paths written."""
    if to not in CONVERT_TARGETS:
        raise DTIError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, not {to!r}.")
    if to == "diffusers":
        return write_diffusers(concept, output, single_file=single_file)
    if not output.lower().endswith(EMBEDDING_EXTENSIONS):
        output = os.path.join(output, embedding_slug(concept.token, file_stem=True) + ".safetensors")
    return [write_single_file(concept, output)]


def save_training_embeddings(output_dir, args, embeddings, step, suffix=""):
    """The training outputs: learned_embeds[_2]{suffix} and, for SDXL, the single file, with metadata saying how they
    were made. If output_dir cannot be written, the files go to a new temporary folder named in the error."""
    method = "directional_textual_inversion" if args.optimizer == "rsgd" else "textual_inversion"
    metadata = {e.name: {"method": method, "dti_version": __version__, "base_model": args.pretrained_model_name_or_path,
                         "initializer_token": args.initializer_token, "norm": repr(e.norm) if e.norm is not None else "free",
                         "token_scale": args.token_scale, "kappa": repr(args.kappa) if args.optimizer == "rsgd" else "none",
                         "steps": str(step), "seed": str(args.seed)} for e in embeddings}
    concept = ConceptEmbedding(args.placeholder_token, {e.name: e.vectors().detach() for e in embeddings}, metadata, form="diffusers-folder")
    ext = ".bin" if args.no_safe_serialization else ".safetensors"
    try:
        return write_diffusers(concept, output_dir, single_file=True, suffix=suffix, ext=ext)
    except OSError as e:
        rescue = tempfile.mkdtemp(prefix="dti-rescue-")
        write_diffusers(concept, rescue, single_file=True, suffix=suffix, ext=ext)
        raise DTIError(f"Could not write the embedding to {output_dir} ({e.strerror or e}); it was saved to {rescue} instead.") from e


# ----------------------------------------------------------------------------------------------------
# Checkpoints: kilobytes (directions, optimizer state, step, seed, flags, history), written atomically
# ----------------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "training_state.pt"
CHECKPOINT_FORMAT = "dti-checkpoint-2"
FIXED_FLAGS = ("placeholder_token", "initializer_token", "num_vectors", "optimizer")  # the state means nothing under others
REPORTED_FLAGS = ("learning_rate", "scale_lr", "kappa", "rsgd_beta", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "train_batch_size",
                  "gradient_accumulation_steps", "num_processes", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                  "token_scale", "max_train_steps", "mixed_precision", "pretrained_model_name_or_path")


def list_checkpoints(output_dir):
    """checkpoint-N folders under output_dir that hold a state file, oldest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*")):
        suffix = os.path.basename(path).split("-", 1)[1]
        if suffix.isdigit() and os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def _load_checkpoint(path):
    try:
        state = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DTIError(f"Checkpoint {path} cannot be read ({type(e).__name__}): the file is damaged or not a DTI checkpoint; "
                       f"resume from another checkpoint-N or start a new --output_dir.") from None
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("dti-checkpoint-"):
        raise DTIError(f"Checkpoint {path} is not a DTI checkpoint; resume from another checkpoint-N or start a new --output_dir.")
    return state


def find_checkpoint(output_dir, resume_from_checkpoint):
    """(path, state) of the checkpoint to resume from, or (None, None). 'latest' skips checkpoints that do not load
    (with a warning naming each) and takes the newest good one; a path that does not load is an error."""
    if resume_from_checkpoint is None:
        return None, None
    if resume_from_checkpoint == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            try:
                return path, _load_checkpoint(path)
            except DTIError as e:
                logger.warning(f"Skipping {path}: {e}")
        logger.warning(f"--resume_from_checkpoint latest: no usable checkpoint in {output_dir}; starting a new training run.")
        return None, None
    path = resume_from_checkpoint
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(output_dir, path)
    if not os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        raise DTIError(f"--resume_from_checkpoint {resume_from_checkpoint}: no {CHECKPOINT_FILE} there; pass a checkpoint-N folder or 'latest'.")
    return path, _load_checkpoint(path)


def check_resume(path, state, args, tokens, num_processes):
    """Before any model loads: refuse a resume under flags that make the state meaningless, refuse one with nothing
    left to train, and report each flag that differs from the checkpoint's (the new value governs)."""
    flags = state.get("flags", {})
    recorded = {"placeholder_token": state["tokens"][0], "num_vectors": len(state["tokens"]), "optimizer": state.get("mode"), **flags}
    now = {"placeholder_token": tokens[0], "num_vectors": len(tokens), "num_processes": num_processes, **vars(args)}
    for flag in FIXED_FLAGS:
        if flag in recorded and recorded[flag] != now[flag]:
            raise DTIError(f"Checkpoint {path} was made with --{flag} {recorded[flag]!r} and this run has {now[flag]!r}; the saved state "
                           f"means nothing under another {flag.replace('_', ' ')}: use the same flag or a new --output_dir.")
    if args.max_train_steps <= state["global_step"]:
        raise DTIError(f"Checkpoint {path} is at step {state['global_step']} and --max_train_steps is {args.max_train_steps}: nothing "
                       f"to train; raise --max_train_steps to continue (the outputs in {args.output_dir} are left as they are).")
    for flag in REPORTED_FLAGS:
        if flag in flags and flags[flag] != now.get(flag):
            logger.info(f"Resume: --{flag} is {now.get(flag)!r} (the checkpoint had {flags[flag]!r}); the new value governs.")
    if args.seed != state["seed"]:
        logger.info(f"Resume: the checkpoint's seed {state['seed']} is kept (not {args.seed}) so that data order and noise continue.")
    args.seed = int(state["seed"])


def training_state(step, args, embeddings, optimizer, accelerator, history):
    """The checkpoint's content: everything an exact resume needs, in kilobytes."""
    flags = {k: getattr(args, k) for k in FIXED_FLAGS + REPORTED_FLAGS if hasattr(args, k)}
    flags["num_processes"] = accelerator.num_processes
    return {"format": CHECKPOINT_FORMAT, "global_step": step, "seed": args.seed, "tokens": embeddings[0].tokens, "mode": args.optimizer,
            "params": [e.param.detach().float().cpu() for e in embeddings], "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {}, "flags": flags, "history": list(history)}


def restore_training_state(path, state, embeddings, optimizer, lr_scheduler, accelerator):
    """Load the directions, the optimizer's per-parameter state (prior, step, running average) and the scaler, and put
    the schedule at the checkpoint's step. The optimizer's hyperparameters stay those of this run's flags.
    Returns (global_step, history)."""
    if len(state["params"]) != len(embeddings) or any(p.shape != e.param.shape for p, e in zip(state["params"], embeddings)):
        raise DTIError(f"Checkpoint {path} holds vectors of shapes {[tuple(p.shape) for p in state['params']]}, but this model's are "
                       f"{[tuple(e.param.shape) for e in embeddings]}; resume with the base model it was trained on.")
    with torch.no_grad():
        for e, p in zip(embeddings, state["params"]):
            e.param.copy_(p.to(e.param.device))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, flags in zip(optimizer.param_groups, groups):
        group.update(flags)
    if state["scaler"] and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    step = int(state["global_step"])
    set_schedule_position(lr_scheduler, step)
    logger.info(f"Resumed from {path} at step {step}")
    return step, [tuple(h) for h in state.get("history", [])]


def set_schedule_position(lr_scheduler, step):
    """Put a LambdaLR schedule (every diffusers schedule is one) at `step`, from its current base learning rates."""
    lr_scheduler.last_epoch = step
    for group, base, factor in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base * factor(step)


def save_checkpoint(output_dir, step, state, total_limit=None):
    """Write checkpoint-N (a temporary folder renamed when complete), then prune the oldest beyond total_limit:
    a crash at any point leaves the previous checkpoints intact."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = None
    try:
        tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-checkpoint-")
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        raise DTIError(f"Could not write checkpoint-{step} in {output_dir} ({e.strerror or e}); "
                       f"{'the previous checkpoints are intact (' + os.path.basename(kept[-1]) + ' is the newest)' if kept else 'no checkpoint was written'}. "
                       f"Free some space or fix the folder, then resume with --resume_from_checkpoint latest.") from None
    if total_limit is not None:
        older = [p for p in list_checkpoints(output_dir) if p != final]
        for old in older[: max(len(older) + 1 - total_limit, 0)]:
            logger.info(f"Removing old checkpoint {old} (--checkpoints_total_limit {total_limit})")
            shutil.rmtree(old)
    return final


# ----------------------------------------------------------------------------------------------------
# Loop mechanics: the session, stop signals, the sync-free loss window, non-finite steps, start-up timing
# ----------------------------------------------------------------------------------------------------

NONFINITE_PATIENCE = 20  # consecutive non-finite steps before the run stops


class StopSignals:
    """SIGINT/SIGTERM ask the run to stop: the loop saves and exits at the next step boundary (a validation stops at
    its next denoising step). A second signal raises KeyboardInterrupt at once; the session still saves the
    embedding (kilobytes, milliseconds) on the way out."""

    def __init__(self, is_main_process=True):
        self.signum, self.is_main_process, self.save_on_abort, self._previous = None, is_main_process, None, {}

    @property
    def requested(self):
        return self.signum is not None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.is_main_process:  # every process of a torchrun job gets the signal; one line is enough
            print(f"\nReceived {signal.Signals(signum).name}: saving the embedding and a checkpoint, then stopping "
                  f"(again to stop at once).", file=sys.stderr, flush=True)

    def check(self, accelerator, synced):
        """Whether to stop now: at once in one process; with several, where they all meet (`synced`), through
        accelerate's trigger, so that every process stops at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        if not synced:
            return False
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _no_torchvision_notice(record):
    return "requires torchvision" not in record.getMessage()


def quiet_library_notices():
    """Silence notices that are noise for this program: transformers announcing, at every start, that its image
    processors fall back to PIL where torchvision is missing (the scripts use none). One filter however often called."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_no_torchvision_notice)


@contextlib.contextmanager
def training_session(args, project_name):
    """One run's accelerator, logging and stop signals, torn down on every exit path: on an error or a second
    Ctrl-C the embedding is saved first (StopSignals.save_on_abort), then the trackers are closed and accelerate's
    process-wide state is released, so that main() can run again in the same process. Yields (accelerator, stop)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration
    from tqdm.contrib.logging import logging_redirect_tqdm

    quiet_library_notices()
    # Under torchrun/accelerate launch on a machine without a GPU, accelerate forms a gloo group only with cpu=True.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=launched and not has_accelerator, mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    stop = StopSignals(accelerator.is_main_process)
    try:
        with logging_redirect_tqdm(), stop:  # log lines never glue to the progress bar
            try:
                yield accelerator, stop
            except BaseException:
                if stop.save_on_abort is not None and accelerator.is_main_process:
                    with contextlib.suppress(Exception):
                        print(f"The embedding so far is saved: {', '.join(stop.save_on_abort())}", file=sys.stderr)
                raise
    finally:
        accelerator.end_training()  # closes the trackers
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate has no public reset of its singletons
        GradientState._reset_state()


class LossWindow:
    """The step losses summed on the device and read back every `every` steps (or at `last`), one sync per read,
    averaged over processes with each embedding's norm and angle from its initializer. Non-finite steps are counted
    on the device; `patience` of them in a row stop the run with a DTIError."""

    def __init__(self, every, device, patience=NONFINITE_PATIENCE):
        self.every, self.patience, self.zero = every, patience, torch.zeros((), device=device)
        self.consecutive_bad = 0
        self._reset()

    def _reset(self):
        self.loss_sum, self.nonfinite, self.size = self.zero.clone(), self.zero.clone(), 0

    def add(self, loss, finite):
        self.loss_sum = self.loss_sum + torch.where(finite, loss, self.zero)
        self.nonfinite = self.nonfinite + (~finite).float()
        self.size += 1

    def due(self, last=False):
        return self.size >= self.every or (last and self.size > 0)

    def read(self, step, accelerator, embeddings, output_dir):
        """{loss, norm, angle_deg (and norm_2, angle_deg_2 for a second encoder)}: the window's figures."""
        figures = torch.stack([self.loss_sum, self.nonfinite, *(x for e in embeddings for x in e.stats())])
        if accelerator.num_processes > 1:
            figures = accelerator.reduce(figures, reduction="mean")
        values = figures.tolist()
        bad, size = round(values[1]), self.size
        self._reset()
        self.consecutive_bad = self.consecutive_bad + bad if bad == size else bad
        if bad:
            logger.warning(f"Skipped {bad} of the last {size} steps: the loss or a gradient was not finite.")
        if self.consecutive_bad >= self.patience:
            raise DTIError(f"The loss was not finite for {self.consecutive_bad} steps in a row (at step {step}); the last good embedding "
                           f"is saved in {output_dir}. Try --mixed_precision bf16 or no, or a lower --learning_rate.")
        logs = {"loss": values[0] / (size - bad) if bad < size else float("nan")}
        for i in range(len(embeddings)):
            suffix = "" if i == 0 else f"_{i + 1}"
            logs[f"norm{suffix}"], logs[f"angle_deg{suffix}"] = values[2 + 2 * i], math.degrees(values[3 + 2 * i])
        return logs


def guard_nonfinite_step(optimizer, loss, params):
    """Make the coming optimizer.step() skip itself when the loss or a gradient is not finite, decided on the device:
    RiemannianSGD and fused AdamW read `found_inf` (the contract of torch's fused optimizers). Under fp16 loss
    scaling the GradScaler sets found_inf itself (an overflow calibrates the scale and is not a bad step).
    Returns the device flag `finite`."""
    if getattr(optimizer, "scaler", None) is not None:
        return torch.isfinite(loss)
    finite = torch.stack([torch.isfinite(loss), *(torch.isfinite(p.grad).all() for p in params if p.grad is not None)]).all()
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = (~finite).float()
    elif not finite.item():  # an optimizer without that contract: skip on the host
        for p in params:
            p.grad = None
    return finite


def average_gradients(accelerator, params):
    """Average the trainable vectors' gradients (a few KB) across processes: every rank then takes the same step."""
    if accelerator.num_processes > 1:
        for p in params:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def scaled_learning_rate(args, num_processes):
    """--learning_rate, times batch x accumulation x processes with --scale_lr (for rsgd: the step's angle in radians)."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes


def resolve_max_train_steps(args, num_images, num_processes):
    """--max_train_steps; else --num_train_epochs whole epochs of optimizer steps; else the recipe's 400."""
    if args.max_train_steps is None:
        micro_steps = math.ceil(num_images * args.repeats / (args.train_batch_size * num_processes))
        args.max_train_steps = args.num_train_epochs * math.ceil(micro_steps / args.gradient_accumulation_steps) if args.num_train_epochs else 400
    return args.max_train_steps


def freeze_models(args, accelerator, weight_dtype, unet, vae, text_encoders):
    """Freeze and place the models. Text encoders stay float32 (the learned rows' gradient passes through them); the
    UNet runs in the mixed-precision dtype, the VAE too unless its config asks for float32 (force_upcast). The scripts
    load each in its dtype already: a cast here would make diffusers warn."""
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False).eval()
    for module, dtype in ((vae, vae_dtype(vae.config, weight_dtype)), (unet, weight_dtype), *((e, torch.float32) for e in text_encoders)):
        module.to(accelerator.device) if module.dtype == dtype else module.to(accelerator.device, dtype=dtype)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()


def vae_dtype(vae_config, weight_dtype):
    """The VAE's dtype: float32 where its config asks for it under fp16 (the SDXL VAE overflows in fp16)."""
    return torch.float32 if weight_dtype == torch.float16 and getattr(vae_config, "force_upcast", False) else weight_dtype


class StartupTimer:
    """Where the time goes before the first step: `mark(phase)` closes a phase, `report()` logs them on one line.
    `started` is when the script began importing; a second run in the same process counts from its own start."""

    _counted = set()

    def __init__(self, started):
        now = time.perf_counter()
        if started in StartupTimer._counted:
            started = now
        StartupTimer._counted.add(started)
        self.started, self.last, self.phases = started, now, {"imports": now - started}

    def mark(self, phase):
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def report(self):
        now = time.perf_counter()
        logger.info("Start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + f"; {now - self.started:.1f} s to the first step")
        return dict(self.phases, total=now - self.started, at=now)


# ----------------------------------------------------------------------------------------------------
# CUDA graphs: the UNet's training forward and backward in one replay
# ----------------------------------------------------------------------------------------------------

_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2", "allclose"}


class HostSyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that records every aten op that reads a device value on the host (`syncs`: .item(), nonzero,
    boolean-mask indexing, ...) or mixes devices (`cross_device`: a host<->device copy). On a GPU either one stalls
    the host, and either one breaks a CUDA graph capture."""

    def __init__(self):
        super().__init__()
        self.syncs, self.cross_device = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name.startswith("index") and any(t.dtype == torch.bool for t in tensors[1:]):
            self.syncs.append(f"{name} with a boolean mask")  # the result's size depends on the mask's values
        # A 0-dim CPU tensor in a device op is a wrapped scalar (baked into a graph); a copy of one is a real transfer.
        moved = [t for t in tensors if t.dim() > 0 or t.device.type != "cpu" or name in ("_to_copy", "copy_")]
        devices = {t.device.type for t in moved} | ({torch.device(kwargs["device"]).type} if kwargs.get("device") is not None else set())
        if len(devices) > 1:
            self.cross_device.append(name)
        return func(*args, **kwargs)


class GraphedUNet:
    """The UNet's training forward and backward replayed from CUDA graphs (the default on CUDA).

    A step launches thousands of small kernels and the GPU waits on the host; a graph replays them in one launch.
    Every micro-batch has one shape, so there is one capture per run. Before it, one eager forward and backward run
    on the capture stream under HostSyncRecorder: it warms up kernels and workspaces for that stream, and a host
    read or copy seen there (which would break the capture) keeps the run eager, with one warning. Separate leaves
    for that run and no warm-up inside make_graphed_callables keep every autograd node on one stream. A capture
    that fails anyway stops the run with one sentence: the process's CUDA state is not trusted after it. The UNet
    is frozen, so the graphs differentiate with respect to the conditioning inputs only."""

    def __init__(self, unet):
        self.unet, self.graphed, self.signature = unet, None, None

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        keys = sorted(added_cond_kwargs or {})
        tensors = (sample, timestep, encoder_hidden_states, *(added_cond_kwargs[k] for k in keys))

        def forward(sample, timestep, encoder_hidden_states, *added):
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=dict(zip(keys, added)) or None).sample

        signature = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        if self.graphed is None:
            self.signature, self.graphed = signature, self._capture(forward, tensors)
        elif signature != self.signature:  # never with TrainingData's equal-sized batches; correct either way
            logger.warning(f"The UNet got inputs of another shape than the captured graph's; this call runs eagerly: {signature}")
            return UNet2DConditionOutput(sample=forward(*tensors))
        return UNet2DConditionOutput(sample=self.graphed(*tensors))

    def _capture(self, forward, tensors):
        cuda = tensors[0].is_cuda
        if cuda:
            if torch.cuda.graph.default_capture_stream is None:
                torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
            torch.cuda.graph.default_capture_stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on this one
        # Everything the capture touches is made on the capture stream, so autograd nodes never point at another stream.
        try:
            with torch.cuda.stream(torch.cuda.graph.default_capture_stream) if cuda else contextlib.nullcontext():
                leaves = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
                with HostSyncRecorder() as recorder:
                    out = forward(*leaves)
                    torch.autograd.grad(out.float().sum(), [t for t in leaves if t.requires_grad])
                sample_args = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
            if cuda:
                torch.cuda.synchronize()
            problem = (recorder.syncs + recorder.cross_device)[:3]
        except RuntimeError as e:  # nothing was captured yet: the process is sound and can train eagerly
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem:
            logger.warning(f"The UNet's training pass cannot be held in a CUDA graph ({problem}: it reads from or copies to the host, "
                           f"or fails); training eagerly.")
            return forward
        start = time.perf_counter()
        try:
            graphed = torch.cuda.make_graphed_callables(forward, sample_args, num_warmup_iters=0)
        except Exception as e:
            raise DTIError(f"CUDA graph capture of the UNet failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           f"rerun with --cuda_graphs off.") from e
        logger.info(f"Captured the UNet's training forward and backward as CUDA graphs in {time.perf_counter() - start:.1f} s "
                    f"(inputs {[tuple(t.shape) for t in tensors]})")
        return graphed


def unet_for_training(args, unet):
    """What the loss calls for the UNet: GraphedUNet (--cuda_graphs, the default on CUDA), the UNet under
    torch.compile (--compile: CUDA graphs too unless --cuda_graphs off), or the UNet itself. Validation always uses
    the eager UNet, so its shapes cost no capture or recompile."""
    on_cuda = torch.device(unet.device).type == "cuda"
    if args.compile:
        mode = "reduce-overhead" if on_cuda and args.cuda_graphs != "off" else None
        return torch.compile(unet, mode=mode, dynamic=False)
    if args.cuda_graphs == "off":
        return unet
    reason = None if on_cuda else f"this run is on {unet.device}"
    reason = reason or ("--gradient_checkpointing is on" if args.gradient_checkpointing else None)
    if reason is None:
        return GraphedUNet(unet)
    if args.cuda_graphs == "on":
        raise DTIError(f"--cuda_graphs needs a CUDA GPU and {reason}; drop the flag.")
    logger.info(f"CUDA graphs off: {reason}; the UNet runs eagerly.")
    return unet


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def log_validation(pipeline, args, accelerator, step, weight_dtype, stop=None):
    """Render --num_validation_images images of --validation_prompt with the models in memory (same seed every
    time), save them under output_dir/validation/ and send them to the trackers. The UNet denoises under autocast;
    the VAE decodes outside it, in its own dtype (the SDXL VAE overflows in fp16). A stop request ends the
    validation at its next denoising step and discards it. Returns the image paths."""
    from diffusers.training_utils import free_memory

    pipeline.set_progress_bar_config(disable=True)
    device = accelerator.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    logger.info(f"Validation at step {step}: {args.num_validation_images} image(s) of {args.validation_prompt!r}")

    def interrupt(pipe, i, t, callback_kwargs):
        if stop is not None and stop.requested:
            pipe._interrupt = True  # diffusers' documented way to end a pipeline call early
        return callback_kwargs

    images = []
    for _ in range(args.num_validation_images):
        with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            latents = pipeline(args.validation_prompt, num_inference_steps=args.num_validation_inference_steps, generator=generator,
                               output_type="latent", callback_on_step_end=interrupt).images
        if stop is not None and stop.requested:
            return []
        images.append(decode_latents(pipeline, latents)[0])
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"step-{step:06d}-{i}.png") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(img) for img in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=f"{i}: {args.validation_prompt}") for i, img in enumerate(images)]}, step=step)
    del pipeline
    free_memory()
    return paths


def decode_latents(pipeline, latents):
    """PIL images from a pipeline's latents, decoded by its VAE in the VAE's dtype (as the pipelines do)."""
    vae = pipeline.vae
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    return pipeline.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def log_nearest_tokens(step, embeddings, tokenizers):
    for e, tok in zip(embeddings, tokenizers):
        for token, near in zip(e.tokens, e.nearest_tokens(tok)):
            logger.info(f"step {step} {e.name} {token}: nearest vocabulary tokens {near}")
