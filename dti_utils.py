"""Directional Textual Inversion (DTI): the method.

DTI (Kim et al., arXiv 2512.13672) writes every learned token embedding as e = m * v with ||v|| = 1. The magnitude
m is fixed at an in-distribution value (a statistic of the encoder's own vocabulary norms); only the direction v is
trained, by Riemannian SGD on the unit sphere with a von Mises-Fisher prior centred on the initializer's direction.

This module is the method, readable in one sitting: the sphere's geometry, the optimizer, the placeholder tokens and
the directional embedding that puts m * v into a text encoder. The modules beside it hold the rest:

- dti_files.py: embedding files in every form (diffusers, AUTOMATIC1111, ComfyUI, kohya), read, written and loaded
  into a pipeline (SD, SDXL, SANA, Wan);
- dti_data.py: the user's images, their views and cached latents, the prompts, the denoising and flow-matching losses;
- dti_training.py: the training mechanics (session, signals, sync-free logging, checkpoints, the run's files);
- dti_validation.py: validation images, nearest tokens and the training curves;
- dti_graphs.py: the UNet's training step captured as CUDA graphs;
- dti_metrics.py: text and subject fidelity scores;
- dti_cli.py: the scripts' shared flags, checks before loading and entry point;
- dti_hub.py: the Hub repository, the model card and the upload;
- dti_evaluation.py and dti_report.py: evaluate_dti.py's protocols, rendering, scoring and reports.
"""

import math

import torch
import torch.nn.functional as F
from accelerate.logging import MultiProcessAdapter, get_logger
from accelerate.state import is_initialized
from torch import nn


__version__ = "0.3.0"

__all__ = [
    # errors and logging
    "DTIError",
    "DTIWarning",
    "logger",
    # sphere geometry
    "projx",
    "proju",
    "dist",
    "slerp",
    # the optimizer
    "RiemannianSGD",
    "rsgd",
    # tokens and the directional embedding
    "vocabulary_norm_stats",
    "resolve_token_scale",
    "as_tokenizer_reads",
    "placeholder_token_list",
    "initializer_ids",
    "resolve_tokens",
    "nearest_vocabulary_tokens",
    "DirectionalEmbedding",
    "add_placeholder_tokens",
    "add_directional_embedding",
]


class DTIError(Exception):
    """A user-facing error: one sentence that names the flag or file and what to do. Raised `from` its cause, which
    `DTI_DEBUG=1` prints in full (see dti_cli.run_cli)."""


class DTIWarning(UserWarning):
    """Something the user should know that does not stop the command."""


class _Logger(MultiProcessAdapter):
    """accelerate's logger (the main process only) during a run; a plain logger where no Accelerator exists (the
    library used on its own), where accelerate's would raise."""

    def log(self, level, msg, *args, **kwargs):
        if is_initialized():
            return super().log(level, msg, *args, **kwargs)
        kwargs.pop("main_process_only", None)
        self.logger.log(level, msg, *args, **kwargs)


logger = _Logger(get_logger("dti").logger, {})


# ----------------------------------------------------------------------------------------------------
# Sphere geometry: points are unit rows; names follow geoopt's Sphere manifold
# ----------------------------------------------------------------------------------------------------


def projx(x):
    """Project x onto the unit sphere, row by row (geoopt's projx)."""
    return F.normalize(x, dim=-1, eps=1e-12)


def proju(x, u):
    """Project u onto the tangent space at x, row by row: u - <u, x> x (geoopt's proju)."""
    return u - (u * x).sum(-1, keepdim=True) * x


def dist(x, y):
    """Geodesic distance (angle in radians) between the directions of the rows of x and y, any norms. atan2 of the
    sine and cosine parts keeps small angles exact where arccos of a cosine near 1 does not."""
    x, y = projx(x), projx(y)
    cos = (x * y).sum(-1)
    return torch.atan2((y - cos.unsqueeze(-1) * x).norm(dim=-1), cos)


def slerp(a, b, t, eps=1e-6):
    """Spherical interpolation between the directions of rows a and b at fraction t (0 gives a, 1 gives b). Falls back
    to normalized linear interpolation when the angle is tiny, where sin(W) vanishes."""
    a, b = projx(a.float()), projx(b.float())
    omega = dist(a, b).unsqueeze(-1)
    sin_omega = torch.sin(omega)
    small = sin_omega < eps
    blend = torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b
    blend = blend / torch.where(small, torch.ones_like(sin_omega), sin_omega)
    return projx(torch.where(small, (1 - t) * a + t * b, blend))


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
    any time): `prior` (mu, float32: the parameter's direction at its first step, unless `state[p]["prior"]` was set
    before), `step` and `exp_avg_sq` (float32, per row).

    Like torch's fused optimizers it takes part in AMP loss scaling without a host sync: `torch.amp.GradScaler`
    sees `_step_supports_amp_scaling` and hands over `grad_scale` and `found_inf` as attributes; the same
    attributes can be set by hand (see dti_training.guard_nonfinite_step)."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0.01, kappa=1e-4, beta=0.0, eps=1e-8):
        if not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= kappa < math.inf:
            raise ValueError(f"Invalid kappa: {kappa}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
        super().__init__(params, {"lr": lr, "kappa": kappa, "beta": beta, "eps": eps})

    def _init_group(self, group):
        params, grads, priors, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:  # lazy: the prior is the parameter's direction at its first step, unless preset
                state.setdefault("prior", projx(p.detach().float()).clone())
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape[:-1] + (1,), dtype=torch.float32, device=p.device)
            params.append(p)
            grads.append(p.grad)
            priors.append(state["prior"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, priors, exp_avg_sqs, steps

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
            rsgd(
                *self._init_group(group),
                lr=group["lr"],
                kappa=group["kappa"],
                beta=group["beta"],
                eps=group["eps"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
            )
        return loss


# ----------------------------------------------------------------------------------------------------
# Tokens: the placeholder, its initializer and the fixed norm m
# ----------------------------------------------------------------------------------------------------

TOKEN_SCALE_WARN, TOKEN_SCALE_LIMIT = 4.0, 100.0  # multiples of the vocabulary's largest norm


def vocabulary_norm_stats(weight):
    """Mean, min and max L2 norm over the non-zero rows of an embedding matrix."""
    norms = weight.detach().float().norm(dim=-1)
    norms = norms[norms > 0]
    return {"mean": norms.mean().item(), "min": norms.min().item(), "max": norms.max().item()}


def resolve_token_scale(token_scale, stats):
    """The fixed norm m: 'mean', 'min', 'max' of the vocabulary, or a positive number given as text. A number far
    beyond the vocabulary's norms is the out-of-distribution token DTI exists to avoid: warned, or refused."""
    if token_scale in ("mean", "min", "max"):
        return stats[token_scale]
    try:
        value = float(token_scale)
    except (TypeError, ValueError) as e:
        raise DTIError(f"--token_scale must be mean, min, max or a positive number, not {token_scale!r}.") from e
    if not 0 < value < math.inf:
        raise DTIError(f"--token_scale must be a positive finite number, not {token_scale!r}.")
    largest = stats["max"]
    if value > TOKEN_SCALE_LIMIT * largest:
        raise DTIError(
            f"--token_scale {value:g} is over {TOKEN_SCALE_LIMIT:g}x the vocabulary's largest norm ({largest:.4g}); "
            "use mean, min, max or a number near them."
        )
    if value > TOKEN_SCALE_WARN * largest:
        logger.warning(
            f"--token_scale {value:g} is {value / largest:.1f}x the vocabulary's largest norm ({largest:.4g}): "
            "the token will be out of distribution, which DTI exists to avoid."
        )
    return value


def placeholder_token_list(placeholder_token, num_vectors):
    """tok, tok_1, ..., tok_{n-1}: the names diffusers' load_textual_inversion expands a token to."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


def initializer_ids(tokenizer, initializer_token, num_vectors=None, allow_multi_token=True):
    """One initializer token id per vector: a k-token initializer gives k vectors, a one-token one is copied.
    A single word that the tokenizer splits (a typo, an unknown word) is refused unless allow_multi_token."""
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if not ids:
        raise DTIError(
            f"--initializer_token {initializer_token!r} tokenizes to nothing; pass a real word such as 'toy'."
        )
    if len(ids) > 1 and len(initializer_token.split()) == 1 and not allow_multi_token:
        pieces = [tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]
        raise DTIError(
            f"--initializer_token {initializer_token!r} is not one token: the tokenizer splits it into {pieces}, "
            f"which would train {len(ids)} vectors; pass a word the tokenizer knows, several words, or "
            "--allow_multi_token_initializer."
        )
    num_vectors = len(ids) if num_vectors is None else num_vectors
    if num_vectors < 1:
        raise DTIError(f"--num_vectors must be at least 1, not {num_vectors}.")
    if len(ids) == 1:
        return ids * num_vectors
    if len(ids) != num_vectors:
        raise DTIError(
            f"--initializer_token {initializer_token!r} tokenizes to {len(ids)} tokens, which gives {len(ids)} "
            f"vectors, but --num_vectors is {num_vectors}; drop --num_vectors or use a one-token initializer."
        )
    return ids


def as_tokenizer_reads(tokenizer, text):
    """`text` as the tokenizer's normalizer turns it before matching (CLIP's lowercases: '<Cat-Toy>' is read as
    '<cat-toy>'), or unchanged for a tokenizer without one."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    return normalizer.normalize_str(text) if normalizer is not None else text


def resolve_tokens(tokenizer, placeholder_token, initializer_token, num_vectors=None, allow_multi_token=False):
    """Check the concept flags against a tokenizer; return (placeholder tokens, initializer ids). Nothing is added
    to the tokenizer, so this runs before any model loads. A placeholder the tokenizer would change in prompts (CLIP
    lowercases them; an added token keeps its case, so '<Cat-Toy>' with two vectors would match one) is written as
    the tokenizer reads it, with a warning: diffusers' load_textual_inversion then finds every vector."""
    if not placeholder_token or not placeholder_token.strip():
        raise DTIError("--placeholder_token is empty; pass a new word such as '<my-concept>'.")
    if any(c.isspace() for c in placeholder_token):
        raise DTIError(
            f"--placeholder_token {placeholder_token!r} contains white space; use a single word such as "
            "'<my-concept>'."
        )
    read = as_tokenizer_reads(tokenizer, placeholder_token)
    if read != placeholder_token:
        logger.warning(
            f"--placeholder_token {placeholder_token!r} is trained as {read!r}, as the tokenizer reads prompts; write "
            f"{read!r} in prompts (diffusers expands a multi-vector token only as the files name it)."
        )
        placeholder_token = read
    if not initializer_token or not initializer_token.strip():
        raise DTIError("--initializer_token is empty; pass a word close to the concept, such as 'toy'.")
    init_ids = initializer_ids(tokenizer, initializer_token, num_vectors, allow_multi_token)
    tokens = placeholder_token_list(placeholder_token, len(init_ids))
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token in vocab or f"{token}</w>" in vocab:
            raise DTIError(
                f"--placeholder_token {token!r} is already in the tokenizer's vocabulary; choose a new word such "
                f"as '<{token.strip('<>')}-dti>'."
            )
    return tokens, init_ids


@torch.no_grad()
def nearest_vocabulary_tokens(vectors, vocab_weight, tokenizer, k=5):
    """Per vector, the k vocabulary rows nearest by cosine: lists of (token text, id, cosine)."""
    sims = projx(vectors.detach().float()) @ projx(vocab_weight.detach().float()).T
    top = sims.topk(min(k, vocab_weight.shape[0]), dim=-1)
    return [
        [(tokenizer.convert_ids_to_tokens(int(j)).replace("</w>", ""), int(j), float(c)) for c, j in zip(cos, ids)]
        for cos, ids in zip(top.values, top.indices)
    ]


# ----------------------------------------------------------------------------------------------------
# The directional embedding: the text encoder's input embedding with m * v in the placeholder rows
# ----------------------------------------------------------------------------------------------------


class DirectionalEmbedding(nn.Module):
    """The text encoder's input embedding with the placeholder tokens' learned vectors in their rows. Installed with
    `set_input_embeddings`, so `print(text_encoder)` shows it, and usable wherever an `nn.Embedding` is (`weight`,
    `num_embeddings`, `embedding_dim`).

    DTI: `param` holds unit directions v (float32, one row per placeholder token) and those tokens get `norm * v`
    with `norm` fixed. Classic TI (norm None): `param` holds the free embedding e. Only `param` trains: no dense
    gradient or optimizer state for the vocabulary. Every row comes from the encoder's own module (`base`, frozen),
    so a prompt without the placeholder gives bit-identical hidden states, and the module's own scaling is kept:
    transformers' Gemma multiplies its rows by `embed_scale` (sqrt(hidden)) inside the module, and the learned rows
    get the same factor, so `norm` and the saved vectors are raw-table values."""

    def __init__(self, base, token_ids, init_ids, *, tokens, vocab_size, norm=None, name="text_encoder"):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.name = name
        self.token_ids = [int(i) for i in token_ids]
        self.tokens = list(tokens)
        self.vocab_size = vocab_size  # the rows of the original vocabulary (nearest_tokens searches these)
        self.norm = float(norm) if norm is not None else None
        weight = base.weight
        init_vectors = weight.detach()[list(init_ids)].float().clone()
        self.register_buffer("init_vectors", init_vectors, persistent=False)
        self.param = nn.Parameter((projx(init_vectors) if self.norm is not None else init_vectors).clone())
        # Vocabulary id -> row of `param` (or -1): one gather per forward, no host work.
        row_of_id = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        row_of_id[torch.tensor(self.token_ids, device=weight.device)] = torch.arange(len(self.token_ids))
        self.register_buffer("row_of_id", row_of_id, persistent=False)

    @property
    def weight(self):
        return self.base.weight

    @property
    def num_embeddings(self):
        return self.base.weight.shape[0]

    @property
    def embedding_dim(self):
        return self.base.weight.shape[1]

    def vectors(self):
        """The rows the placeholder tokens get (before the module's own scale), float32 (n, dim), differentiable."""
        return self.norm * self.param if self.norm is not None else self.param

    def forward(self, input_ids):
        out = self.base(input_ids)
        rows = self.row_of_id[input_ids]
        learned = self.vectors().to(self.weight.dtype)[rows.clamp_min(0)]
        scale = getattr(self.base, "embed_scale", None)
        if scale is not None:  # as the base module scales its rows (Gemma: `embedding * embed_scale`)
            learned = learned * (scale.to(self.weight.dtype) if torch.is_tensor(scale) else scale)
        return torch.where((rows >= 0).unsqueeze(-1), learned.to(out.dtype), out)

    def extra_repr(self):
        norm = "free (classic textual inversion)" if self.norm is None else f"{self.norm:.6g}"
        return f"tokens={self.tokens}, norm={norm}"

    @torch.no_grad()
    def fold(self):
        """Write the vectors into the table's rows and return the base module, which then stands alone: install it
        with `set_input_embeddings` to save a full pipeline."""
        self.base.weight[self.token_ids] = self.vectors().to(self.base.weight.dtype)
        return self.base

    @torch.no_grad()
    def stats(self):
        """Device tensors (no sync): mean norm and mean angle (radians) from the initializer."""
        vectors = self.vectors().float()
        return vectors.norm(dim=-1).mean(), dist(vectors, self.init_vectors).mean()

    def nearest_tokens(self, tokenizer, k=5):
        """The k vocabulary tokens nearest each vector by cosine (the original vocabulary only)."""
        near = nearest_vocabulary_tokens(self.vectors(), self.weight[: self.vocab_size], tokenizer, k)
        return [[token for token, _, _ in row] for row in near]


def add_placeholder_tokens(tokenizer, text_encoder, tokens):
    """Add new tokens to the tokenizer and return their ids. The encoder's table grows (without mean resizing) only
    when a new id falls past its end: a UMT5 table is larger than its tokenizer, and the new tokens take unused rows,
    so the table keeps its shape."""
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    if max(token_ids) >= text_encoder.get_input_embeddings().weight.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return token_ids


def add_directional_embedding(
    tokenizer, text_encoder, tokens, init_ids, token_scale="mean", classic=False, name="text_encoder"
):
    """Add the placeholder tokens to one tokenizer/encoder pair and install their DirectionalEmbedding, with this
    encoder's own norm m (a statistic of the rows its tokenizer can reach) and prior (its own initializer rows).
    The tokens are added with add_placeholder_tokens. Returns the installed module."""
    reachable = min(len(tokenizer), text_encoder.get_input_embeddings().weight.shape[0])
    weight = text_encoder.get_input_embeddings().weight
    norm = None if classic else resolve_token_scale(token_scale, vocabulary_norm_stats(weight[:reachable]))
    vocab = tokenizer.get_vocab()
    if any(token in vocab for token in tokens):
        raise DTIError(f"The tokenizer already knows one of {tokens}; choose a new --placeholder_token.")
    token_ids = add_placeholder_tokens(tokenizer, text_encoder, tokens)
    embedding = DirectionalEmbedding(
        text_encoder.get_input_embeddings(),
        token_ids,
        init_ids,
        norm=norm,
        tokens=tokens,
        name=name,
        vocab_size=reachable,
    )
    text_encoder.set_input_embeddings(embedding)
    return embedding
