"""Text and subject fidelity: how DTI's results are scored, by evaluate_dti.py and by --evaluate_steps.

Text fidelity compares a generated image with its prompt (the placeholder replaced by the class word) through an
image-text model (CLIP, SigLIP); subject fidelity compares it with the reference photos through an image model
(DINOv2, CLIP). Each encoder loads once; features are unit rows, so scores are matrix products.

Two scorings (SCORINGS): "quick", this project's (cosines of CLIP-L, SigLIP so400m and DINOv2), and "paper", the
authors' evaluation of arXiv 2512.13672 (kunheek/dti): SigLIP base patch16-512 read as a probability,
sigmoid(exp(logit_scale) * cos + logit_bias), of the prompt with the class word and a full stop, and DINOv2 (and CLIP
image-image) against reference photos whose background a mask has zeroed (`apply_mask`).
"""

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dti_data import open_rgb
from dti_hub import check_hub_files
from dti_utils import DTIError, logger


__all__ = [
    "DEFAULT_ENCODERS",
    "METRICS",
    "TEXT_METRICS",
    "PAPER_ENCODERS",
    "PAPER_METRICS",
    "Scoring",
    "SCORINGS",
    "encoder_ids",
    "scoring_text",
    "apply_mask",
    "Encoder",
    "cosine_matrix",
    "text_fidelity",
    "sigmoid_text_fidelity",
    "subject_fidelity",
    "batches",
    "FidelityScorer",
    "summary",
    "class_prompt",
    "TrainingEvaluator",
    "label_font",
    "label_band",
    "labelled_grid",
]

DEFAULT_ENCODERS = {
    "clip": "openai/clip-vit-large-patch14",
    "siglip": "google/siglip-so400m-patch14-384",
    "dino": "facebook/dinov2-base",
}
# metric: (encoder, what it compares)
METRICS = {
    "text_clip": ("clip", "CLIP image-text cosine similarity to the prompt with the token replaced by the class word"),
    "text_siglip": (
        "siglip",
        "SigLIP image-text cosine similarity to the prompt with the token replaced by the class word",
    ),
    "subject_dino": (
        "dino",
        "DINOv2 (CLS token after the final layer norm) cosine similarity, mean over the reference images",
    ),
    "subject_clip": ("clip", "CLIP image-image cosine similarity, mean over the reference images"),
}
TEXT_METRICS = [m for m in METRICS if m.startswith("text_")]

# The authors' evaluation: their scripts/evaluate.py scores text with SigLIP base patch16-512 and subjects with
# DINOv2 base; CLIP image-image is their CLIPImageSimilarity class (default ViT-B/32), which evaluate.py never calls.
PAPER_ENCODERS = {
    "clip": "openai/clip-vit-base-patch32",
    "siglip": "google/siglip-base-patch16-512",
    "dino": "facebook/dinov2-base",
}
PAPER_METRICS = {
    "text_siglip": (
        "siglip",
        "SigLIP sigmoid(exp(logit_scale) * cosine + logit_bias) to the prompt with the class word in the token's "
        "place and a full stop (the authors' text score)",
    ),
    "subject_dino": (
        "dino",
        "DINOv2 (CLS token after the final layer norm) cosine similarity, mean over the (masked) reference images",
    ),
    "subject_clip": ("clip", "CLIP image-image cosine similarity, mean over the (masked) reference images"),
}


class Scoring:
    """How a protocol scores: its default encoders, its metrics ({name: (encoder, description)}), the text score
    ("cosine" or "sigmoid": SigLIP's own probability), the text length in tokens (None: the model's) and whether the
    scored text ends with a full stop."""

    def __init__(self, encoders, metrics, text_score, text_length=None, full_stop=False):
        self.encoders, self.metrics = dict(encoders), dict(metrics)
        self.text_score, self.text_length, self.full_stop = text_score, text_length, full_stop

    def describe(self):
        return {"text_score": self.text_score, "text_length": self.text_length, "full_stop": self.full_stop}


SCORINGS = {
    "quick": Scoring(DEFAULT_ENCODERS, METRICS, "cosine"),
    # the authors' processor call: padding="max_length", max_length=64
    "paper": Scoring(PAPER_ENCODERS, PAPER_METRICS, "sigmoid", text_length=64, full_stop=True),
}


def encoder_ids(specs=(), flag="--evaluation_models", defaults=None):
    """{"clip", "siglip", "dino": model id or None}: `defaults` (DEFAULT_ENCODERS) updated with NAME=ID strings (ID
    none skips)."""
    ids = dict(defaults or DEFAULT_ENCODERS)
    for spec in specs:
        name, sep, model_id = spec.partition("=")
        if not sep or name not in ids or not model_id:
            raise DTIError(
                f"{flag} {spec!r} is not NAME=ID with NAME one of {', '.join(ids)}; e.g. "
                "clip=openai/clip-vit-large-patch14 or siglip=none."
            )
        ids[name] = model_id
    return {name: None if model_id.lower() == "none" else model_id for name, model_id in ids.items()}


def scoring_text(template, class_word, full_stop=False):
    """The text an image is scored against: its prompt template with the class word in place of {}, and with
    full_stop a trailing "." as the authors write it ("a dog in the jungle.")."""
    text = template.replace("{}", class_word)
    return f"{text}." if full_stop else text


def apply_mask(image, mask):
    """The reference photo with its background zeroed as the authors' evaluation does it: the RGB mask / 255
    multiplied into the full-resolution pixels (a soft mask, no threshold), cut to uint8, before any resize."""
    pixels = np.asarray(image.convert("RGB")) * (np.asarray(mask.convert("RGB")) / 255.0)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _pooled(output):
    return getattr(output, "pooler_output", output)  # transformers 5 returns model outputs from get_*_features


class Encoder:
    """One scoring model from transformers' AutoProcessor and AutoModel. The processor loads at once (a wrong id or a
    missing tokenizer library fails in seconds); the weights load at the first use."""

    def __init__(self, name, model_id, device="cpu", cache_dir=None, flag="--{}_model "):
        from transformers import AutoProcessor

        self.name, self.model_id, self.device, self.cache_dir = name, model_id, torch.device(device), cache_dir
        self.model = None
        check_hub_files(model_id, flag=flag.format(name).strip(), filename="config.json", what=f"a {name} model")
        try:
            self.processor = AutoProcessor.from_pretrained(model_id, cache_dir=cache_dir)
        except (OSError, ValueError, ImportError) as e:
            why = " ".join(str(e).split())[:200]
            hint = "; pip install sentencepiece for SigLIP's tokenizer" if "sentencepiece" in why.lower() else ""
            raise DTIError(
                f"{flag.format(name)}{model_id} could not be loaded ({type(e).__name__}: {why}){hint}; pass a Hub id "
                f"or folder of a {name} model, or none to skip its metrics."
            ) from e
        self.image_processor = getattr(self.processor, "image_processor", self.processor)

    def load(self):
        if self.model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.model_id, cache_dir=self.cache_dir, dtype=torch.float32)
            self.model = model.to(self.device).eval()
        return self

    @torch.no_grad()
    def image_features(self, images):
        """Unit feature rows (n, d) float32: projected image embeddings (CLIP, SigLIP), or for a vision-only model
        (DINOv2) the CLS token of its last hidden state, after the final layer norm (DINOv2's pooler_output)."""
        self.load()
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device)
        if hasattr(self.model, "get_image_features"):
            features = _pooled(self.model.get_image_features(pixel_values=pixels))
        else:
            features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return F.normalize(features.float(), dim=-1)

    def check_sigmoid(self, flag):
        """The model has SigLIP's logit_bias (read from its config, before any weights load), or one sentence."""
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(self.model_id, cache_dir=self.cache_dir).model_type
        except (OSError, ValueError) as e:
            raise DTIError(f"{flag}{self.model_id}: its config could not be read ({type(e).__name__}).") from e
        if not model_type.startswith("siglip"):
            raise DTIError(
                f"{flag}{self.model_id} is a {model_type} model, but the paper's text score is SigLIP's "
                "sigmoid(logit_scale, logit_bias); pass a SigLIP model (google/siglip-base-patch16-512) or none."
            )

    def logit_scale_and_bias(self):
        """SigLIP's exp(logit_scale) and logit_bias, as floats."""
        self.load()
        return float(self.model.logit_scale.detach().float().exp()), float(self.model.logit_bias.detach().float())

    @torch.no_grad()
    def text_features(self, texts, length=None):
        """Unit rows (n, d) of projected text embeddings, padded to `length` tokens (None: the model's length, as
        SigLIP was trained)."""
        self.load()
        tokenizer = self.processor.tokenizer
        length = length or min(tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        ids = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        ids = ids.input_ids.to(self.device)
        return F.normalize(_pooled(self.model.get_text_features(input_ids=ids)).float(), dim=-1)


def cosine_matrix(a, b):
    """Cosine similarities between the rows of a and the rows of b: (len(a), len(b))."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def text_fidelity(image_features, text_features):
    """Per image: the cosine between it and its own text."""
    return (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(-1)


def sigmoid_text_fidelity(image_features, text_features, scale, bias):
    """Per image: SigLIP's probability that it matches its own text, sigmoid(scale * cosine + bias) with the model's
    scale = exp(logit_scale) and bias = logit_bias (the diagonal of sigmoid(logits_per_image))."""
    return torch.sigmoid(scale * text_fidelity(image_features, text_features) + bias)


def subject_fidelity(image_features, reference_features):
    """Per image: its mean cosine over the reference images."""
    return cosine_matrix(image_features, reference_features).mean(dim=1)


def batches(items, size):
    """items in lists of `size` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class FidelityScorer:
    """The encoders, loaded once, and a scoring's metrics (SCORINGS: quick, the four METRICS; paper, PAPER_METRICS) of
    a list of images against their texts and the reference images. model_ids: {"clip", "siglip", "dino": id or
    None}."""

    def __init__(self, model_ids, device="cpu", cache_dir=None, batch_size=16, flag="--{}_model ", scoring="quick"):
        self.scoring = SCORINGS[scoring]
        self.encoders = {
            name: Encoder(name, model_id, device, cache_dir, flag) for name, model_id in model_ids.items() if model_id
        }
        self.metrics = [m for m, (name, _) in self.scoring.metrics.items() if name in self.encoders]
        if self.scoring.text_score == "sigmoid" and "siglip" in self.encoders:
            self.encoders["siglip"].check_sigmoid(flag.format("siglip"))
        self.batch_size = batch_size

    def _image_features(self, encoder, images):
        return torch.cat([encoder.image_features(chunk) for chunk in batches(images, self.batch_size)])

    def reference_features(self, images):
        """{encoder name: unit features} of the reference images, for every encoder a subject metric uses."""
        names = {self.scoring.metrics[m][0] for m in self.metrics if m.startswith("subject_")}
        return {name: self._image_features(self.encoders[name], images) for name in names}

    def score(self, images, texts, reference):
        """{metric: float64 numpy array, one score per image}."""
        used = {self.scoring.metrics[m][0] for m in self.metrics}
        features = {name: self._image_features(self.encoders[name], images) for name in used}
        scores = {}
        for metric in self.metrics:
            name = self.scoring.metrics[metric][0]
            if metric.startswith("text_"):
                encoder, length = self.encoders[name], self.scoring.text_length
                text = torch.cat(
                    [encoder.text_features(chunk, length) for chunk in batches(list(texts), self.batch_size)]
                )
                if self.scoring.text_score == "sigmoid":
                    scores[metric] = sigmoid_text_fidelity(features[name], text, *encoder.logit_scale_and_bias())
                else:
                    scores[metric] = text_fidelity(features[name], text)
            else:
                scores[metric] = subject_fidelity(features[name], reference[name])
        return {m: s.double().cpu().numpy() for m, s in scores.items()}


def summary(values):
    """{"mean", "se"} of a list of scores; the standard error is the sample standard deviation / sqrt(n) (None for
    n < 2)."""
    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return {"mean": float(values.mean()), "se": se}


# ----------------------------------------------------------------------------------------------------
# --evaluate_steps in the training scripts
# ----------------------------------------------------------------------------------------------------


def class_prompt(prompt, placeholder_token, class_word):
    """The prompt with the placeholder (and its numbered tokens tok_1 ..., if written out) replaced by the class
    word."""
    token = re.escape(placeholder_token)
    return re.sub(rf"{token}(?:_\d+)?(?:\s+{token}_\d+)*", class_word, prompt)


class TrainingEvaluator:
    """--evaluate_steps N in the training scripts: the validation images of every N-th step scored as evaluate_dti.py
    scores them, text fidelity to the validation prompt with the placeholder read as the class word (the initializer)
    and subject fidelity to the training images, sent to the trackers (eval/<metric>) and the progress log."""

    def __init__(
        self, every, *, model_ids, reference_images, prompt, placeholder_token, class_word, device, cache_dir
    ):
        self.every = every
        self.scorer = FidelityScorer(model_ids, device=device, cache_dir=cache_dir, flag="--evaluation_models {}=")
        self.reference = self.scorer.reference_features(reference_images)
        self.text = class_prompt(prompt, placeholder_token, class_word)

    def due(self, step):
        return step % self.every == 0

    def __call__(self, step, image_paths, accelerator):
        images = [open_rgb(path) for path in image_paths]
        scores = self.scorer.score(images, [self.text] * len(images), self.reference)
        logs = {f"eval/{metric}": float(values.mean()) for metric, values in scores.items()}
        accelerator.log(logs, step=step)
        figures = ", ".join(f"{metric} {value:.4f}" for metric, value in logs.items())
        logger.info(f"step {step} evaluation of {len(images)} validation image(s) ({self.text!r}): {figures}")
        return logs


# ----------------------------------------------------------------------------------------------------
# Pictures of results: labelled grids
# ----------------------------------------------------------------------------------------------------


def label_font(size):
    """Pillow's default font at `size` pixels (a fixed bitmap font before Pillow 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def label_band(size):
    """Height of the band of column labels above a grid of images of this side."""
    return max(16, size // 10)


def labelled_grid(rows, row_labels, column_labels, size):
    """Images (rows of equal length) resized to size x size in make_image_grid's layout, column labels in a band
    above, row labels in a margin on the left. The images sit in the bottom-right (len(cols) * size, len(rows) *
    size)."""
    from diffusers.utils import make_image_grid

    band = label_band(size)
    font = label_font(max(8, int(band * 0.6)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(measure.textbbox((0, 0), label, font=font)[2] for label in row_labels) + 8
    grid = make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(rows[0]), resize=size)
    canvas = Image.new("RGB", (margin + grid.width, band + grid.height), "white")
    canvas.paste(grid, (margin, band))
    draw = ImageDraw.Draw(canvas)

    def put(text, x, y, centre):  # x: the centre or the left edge; y: the middle (no anchors: bitmap fonts have none)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text(
            (x - (right - left) / 2 - left if centre else x - left, y - (bottom - top) / 2 - top),
            text,
            fill="black",
            font=font,
        )

    for j, label in enumerate(column_labels):
        put(label, margin + j * size + size / 2, band / 2, centre=True)
    for i, label in enumerate(row_labels):
        put(label, 4, band + i * size + size / 2, centre=False)
    return canvas
