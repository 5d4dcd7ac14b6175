#!/usr/bin/env python
r"""Is DTI better on my concept? Generate and score images of one or more embeddings with the same prompts and seeds.

    python evaluate_dti.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --embeddings toy-dti toy-ti toy-ti-rescaled --reference_images ./toy \
        --class_word toy --prompts complex --seeds 4 --output_dir eval-toy

Every embedding renders every prompt of every prompt set with the same seeds, then each image is scored as the DTI
paper (arXiv 2512.13672) scores it:

- text fidelity: cosine similarity between the image and its prompt with the token replaced by --class_word, by CLIP
  (text_clip) and by SigLIP (text_siglip): each encoder's projected image and text embeddings;
- subject fidelity: mean cosine similarity between the image and each reference photo, by DINOv2 (subject_dino: the CLS
  token after the final layer norm, i.e. pooler_output) and by CLIP (subject_clip: projected image embeddings).

Outputs in --output_dir: metrics.json, metrics.csv (per embedding, prompt set and prompt: mean and standard error),
report.md, grid_<set>.png (embeddings as rows, prompts as columns, first seed) and fidelity.png (text against subject
fidelity, one point per embedding and prompt set). Images are kept under images/ and are not made again by a rerun.
"""

import argparse
import csv
import functools
import hashlib
import json
import logging
import os
import re
from types import SimpleNamespace

import torch
from PIL import Image
from tqdm.auto import tqdm

import dti_cli as cli
import dti_data as data_lib
import dti_files as files
import dti_training as training
from dti_metrics import (
    DEFAULT_ENCODERS,
    METRICS,
    TEXT_METRICS,
    FidelityScorer,
    batches,
    encoder_ids,
    labelled_grid,
    summary,
)
from dti_utils import DTIError, projx, resolve_token_scale, vocabulary_norm_stats


logger = logging.getLogger("dti.evaluate")

PLOT_PAIRS = (("subject_dino", "text_siglip"), ("subject_clip", "text_clip"))  # (x, y) of each fidelity.png panel

PROMPT_SETS = {
    "simple": [
        "a photo of a {}",
        "a close-up photo of a {}",
        "a {} on a table",
        "a {} on the grass",
        "a {} in the snow",
        "a {} on a wooden floor",
        "a photo of a {} on the beach",
        "a {} in front of a white wall",
        "a {} in a kitchen",
        "a {} on a bed",
        "a photo of a {} outdoors",
        "a {} on a sidewalk",
        "a {} in a forest",
        "a {} on a blue background",
        "a {} on a rock",
        "a {} in the rain",
        "a {} on a shelf",
        "a {} in a garden",
        "a {} on a desk",
        "a {} at night",
    ],
    "complex": [
        "a {} in a Japanese modern city street at night, neon signs reflecting on the wet asphalt",
        "a {} floating in outer space next to an astronaut, with the Earth in the background",
        "an oil painting of a {} in the style of Vincent van Gogh, with swirling stars in the sky",
        "a {} wearing a tiny wizard hat, sitting on a stack of old books in a candle-lit library",
        "a watercolor illustration of a {} on a sailboat crossing a stormy sea",
        "a {} made of Lego bricks on a kitchen counter next to a cup of coffee",
        "a {} on a snowy mountain peak at sunrise, with a red backpack beside it",
        "a {} in a field of sunflowers under a dark thunderstorm sky",
        "a pencil sketch of a {} next to a vase of tulips on a windowsill",
        "a {} on the back seat of a vintage red convertible driving along a coastal road",
        "a {} in the middle of a crowded Moroccan market, surrounded by baskets of colorful spices",
        "a cubist painting of a {} playing chess against a robot",
        "a {} inside a glass terrarium with moss and tiny mushrooms, macro photograph",
        "a {} at the bottom of the ocean among coral reefs and tropical fish",
        "a {} on a wooden dock at a misty lake at dawn, with a canoe tied next to it",
        "a pixel art image of a {} in the courtyard of a fantasy castle",
        "a {} in a cyberpunk laboratory full of glowing screens and tangled cables",
        "a {} on a park bench beside an old man feeding pigeons, autumn leaves falling",
        "a Renaissance painting of a noblewoman in a velvet dress holding a {}",
        "a {} in the desert next to a cactus, with a hot air balloon in the sky",
    ],
    "style": [
        "a painting of a lighthouse in the style of {}",
        "a portrait of a woman in the style of {}",
        "a city skyline at night in the style of {}",
        "a bowl of fruit in the style of {}",
        "a mountain landscape in the style of {}",
        "a cat sleeping on a sofa in the style of {}",
        "a busy train station in the style of {}",
        "a sailboat on a calm sea in the style of {}",
        "an old car parked in a street in the style of {}",
        "a forest with a river in the style of {}",
        "a castle on a hill in the style of {}",
        "a dog running on a beach in the style of {}",
        "a cup of coffee on a table in the style of {}",
        "a robot in a garden in the style of {}",
        "a portrait of an old man in the style of {}",
        "a field of flowers in the style of {}",
        "a bridge over a river in the style of {}",
        "a bird on a branch in the style of {}",
        "a snowy village in the style of {}",
        "an astronaut on the moon in the style of {}",
    ],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        "--pretrained_model_name_or_path",
        dest="model",
        required=True,
        help="The base pipeline the embeddings were trained on (folder or Hub id); SD 1.x/2.x or "
        "SDXL, read from its model_index.json.",
    )
    parser.add_argument("--revision", default=None, help="Revision of --model on the Hub.")
    parser.add_argument("--variant", default=None, help="Variant of --model's weight files, e.g. fp16.")
    parser.add_argument(
        "--embeddings",
        nargs="+",
        required=True,
        help="Training output folders, embedding files in any form the concept tools read, "
        "checkpoint-N folders or "
        "learned_embeds-steps-N files.",
    )
    parser.add_argument(
        "--labels", nargs="+", default=None, help="A name for each embedding in the outputs (default: from its path)."
    )
    parser.add_argument(
        "--reference_images",
        nargs="+",
        required=True,
        help="The concept's photos (folders or image files): subject fidelity compares with them.",
    )
    parser.add_argument(
        "--class_word",
        required=True,
        help="What the token stands for, e.g. 'toy': text fidelity scores the prompt with this word in the token's "
        "place.",
    )
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=["simple", "complex"],
        help=f"Prompt sets: {', '.join(PROMPT_SETS)} (about 20 prompts each), or text files with one "
        "prompt a line and {} for the token.",
    )
    parser.add_argument(
        "--seeds",
        type=cli.positive_int,
        default=4,
        help="Images per prompt, seeds --first_seed, --first_seed + 1, ...; the same for every embedding.",
    )
    parser.add_argument("--first_seed", type=int, default=0, help="The first seed.")
    parser.add_argument(
        "--num_inference_steps", type=cli.positive_int, default=30, help="Denoising steps (DPM-Solver++)."
    )
    parser.add_argument(
        "--guidance_scale",
        type=cli.finite_float,
        default=None,
        help="Classifier-free guidance (default: the pipeline's, 7.5 SD, 5 SDXL).",
    )
    parser.add_argument(
        "--resolution", type=cli.positive_int, default=None, help="Image size in pixels (default: the model's)."
    )
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=4, help="Images per pipeline call and per encoder batch."
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Dtype of the pipeline (default: fp16 on a GPU, no on a CPU). The encoders score in float32.",
    )
    for name, model_id in DEFAULT_ENCODERS.items():
        parser.add_argument(
            f"--{name}_model",
            default=model_id,
            help=f"Hub id or folder of the {name} encoder (default {model_id}); none skips its metrics.",
        )
    parser.add_argument(
        "--grid_size", type=cli.positive_int, default=256, help="Side of each image in the grids, in pixels."
    )
    parser.add_argument(
        "--output_dir", default="dti-evaluation", help="Where images, metrics, report and pictures go."
    )
    parser.add_argument("--cache_dir", default=None, help="Where downloaded models are cached.")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Inputs: prompt sets, reference images, embeddings (files, folders, checkpoints)
# ----------------------------------------------------------------------------------------------------


def load_prompt_sets(specs):
    """{set name: [prompts with {}]} from built-in names and text files (one prompt a line; blank and # lines
    skipped)."""
    sets = {}
    for spec in specs:
        if spec in PROMPT_SETS:
            name, prompts = spec, PROMPT_SETS[spec]
        elif os.path.isfile(spec):
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(spec))[0])
            with open(spec, encoding="utf-8") as f:
                lines = [(i, line.strip()) for i, line in enumerate(f, 1)]
            prompts = [line for _, line in lines if line and not line.startswith("#")]
            for i, line in lines:
                if line and not line.startswith("#") and "{}" not in line:
                    raise DTIError(
                        f"--prompts {spec} line {i} has no {{}} where the token goes ({line!r}); write e.g. 'a photo "
                        "of a {} on a beach'."
                    )
            if not prompts:
                raise DTIError(f"--prompts {spec} holds no prompts; write one prompt a line with {{}} for the token.")
        else:
            raise DTIError(
                f"--prompts {spec!r} is neither a built-in set ({', '.join(PROMPT_SETS)}) nor a text file; pass one "
                "of those."
            )
        if name in sets:
            raise DTIError(f"--prompts names the set {name!r} twice; pass each set once (rename one of the files).")
        sets[name] = list(prompts)
    return sets


def load_reference_images(paths):
    """The reference photos (PIL RGB) from folders and image files, decoded as the training scripts decode them."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            if not any(
                n.lower().endswith(data_lib.IMAGE_EXTENSIONS) and not n.startswith(".") for n in os.listdir(path)
            ):
                raise DTIError(
                    f"--reference_images {path} holds no images ({', '.join(data_lib.IMAGE_EXTENSIONS)}); pass the "
                    "folder of the concept's photos."
                )
            images += [im.image for im in data_lib.load_training_images(path)]
        elif os.path.isfile(path) and path.lower().endswith(data_lib.IMAGE_EXTENSIONS):
            with Image.open(path) as image:
                images.append(data_lib.to_rgb(image, path))
        else:
            raise DTIError(
                f"--reference_images {path} is neither a folder nor an image file; pass the concept's photos (the "
                "training images)."
            )
    return images


@functools.lru_cache(maxsize=None)
def base_norm_stats(model, name):
    """Mean, min and max norm of the encoder's base vocabulary (read once per model and encoder)."""
    return vocabulary_norm_stats(files.base_vocabulary(model, name)[0])


def _checkpoint_embedding(path):
    """A checkpoint-N folder as an embedding. It holds what trains: unit directions v under DTI, the embedding itself
    under classic TI; the DTI norm m is not stored, see `apply_checkpoint_norm`."""
    try:
        state = training.load_checkpoint(path)
    except DTIError as e:
        raise DTIError(f"--embeddings {path}: {e}") from e
    params, mode, flags = state["params"], state["mode"], state.get("flags", {})
    names = files.ENCODERS[: len(params)]
    meta = (
        {"method": "textual_inversion"}
        if mode == "adamw"
        else {"method": "directional_textual_inversion", "token_scale": str(flags.get("token_scale", "mean"))}
    )
    return files.ConceptEmbedding(
        state["tokens"][0],
        {n: p.float() for n, p in zip(names, params)},
        {n: dict(meta) for n in names},
        path,
        "checkpoint",
    )


def apply_checkpoint_norm(concept, model):
    """A DTI checkpoint's vectors m * v, with m made again as training made it: the run's --token_scale (stored in the
    checkpoint) applied to the norms of --model's vocabulary, per encoder. The same m as the run's embedding files."""
    if concept.form == "checkpoint" and concept.metadata["text_encoder"]["method"] == "directional_textual_inversion":
        for name, v in concept.vectors.items():
            norm = resolve_token_scale(concept.metadata[name]["token_scale"], base_norm_stats(model, name))
            concept.vectors[name] = norm * projx(v)
            concept.metadata[name]["norm"] = repr(norm)
    return concept


STEPS_FILE = re.compile(r"learned_embeds-steps-(\d+)(\.\w+)$")
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)$")


def load_embedding(path):
    """(concept, default label, (run, step) or None) for an --embeddings entry (a DTI checkpoint: unit vectors)."""
    path = os.path.normpath(path)
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    checkpoint, steps = CHECKPOINT_DIR.match(os.path.basename(path)), STEPS_FILE.match(os.path.basename(path))
    if checkpoint and os.path.isdir(path):
        return _checkpoint_embedding(path), f"{run}@{checkpoint.group(1)}", (run, int(checkpoint.group(1)))
    concept = files.read_concept(path)
    if steps:
        second = os.path.join(os.path.dirname(path), f"learned_embeds_2-steps-{steps.group(1)}{steps.group(2)}")
        if (
            os.path.isfile(second) and not concept.sdxl
        ):  # an SDXL snapshot: text_encoder_2's vectors are in the sibling file
            other = files.read_concept(second)
            concept = files.ConceptEmbedding(
                concept.token,
                {"text_encoder": concept.vectors["text_encoder"], "text_encoder_2": other.vectors["text_encoder"]},
                {"text_encoder": concept.metadata["text_encoder"], "text_encoder_2": other.metadata["text_encoder"]},
                path,
                concept.form,
            )
        return concept, f"{run}@{steps.group(1)}", (run, int(steps.group(1)))
    if os.path.isdir(path):  # a training output: the last point of its run
        steps = concept.metadata.get("text_encoder", {}).get("steps", "")
        return concept, os.path.basename(path), (os.path.basename(path), int(steps)) if steps.isdigit() else None
    return concept, os.path.splitext(os.path.basename(path))[0], None


def describe_method(meta):
    """How an embedding was made, from its metadata: DTI, TI, TI rescaled to the vocabulary norm, or unknown (other
    tools' files)."""
    method = {"directional_textual_inversion": "DTI", "textual_inversion": "TI"}.get(
        meta.get("method"), meta.get("method") or "unknown"
    )
    return f"{method} rescaled to {meta['rescaled_to']}" if meta.get("rescaled_to") else method


def check_fits(concept, path, model, sdxl, widths):
    kind = "SDXL" if sdxl else "SD 1.x/2.x"
    if concept.sdxl != sdxl:
        raise DTIError(
            f"--embeddings {path} is an {'SDXL' if concept.sdxl else 'SD 1.x/2.x'} embedding but --model {model} is "
            f"{kind}; pass the base model it was trained on."
        )
    for name, vectors in concept.vectors.items():
        if vectors.shape[1] != widths[name]:
            raise DTIError(
                f"--embeddings {path} holds {vectors.shape[1]}-dim vectors for {name} but --model {model} has "
                f"{widths[name]}-dim token embeddings; pass the base model it was trained on."
            )


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text).strip("_") or "embedding"


# ----------------------------------------------------------------------------------------------------
# Pictures: the labelled grid and fidelity.png
# ----------------------------------------------------------------------------------------------------


def plot_fidelity(entries, metric_ids, path):
    """fidelity.png: per panel, subject fidelity (x) against text fidelity (y), one point per embedding and prompt set
    with standard-error bars; the checkpoints of one run joined in step order. Agg canvas, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    pairs = [(x, y) for x, y in PLOT_PAIRS if x in metric_ids and y in metric_ids]
    if not pairs:
        return None
    fig = Figure(figsize=(6.5 * len(pairs), 5.5), dpi=100)
    FigureCanvasAgg(fig)
    markers = "osD^vP*X"
    sets = list(dict.fromkeys(s for e in entries for s in e["sets"]))
    colors = {e["label"]: f"C{i % 10}" for i, e in enumerate(entries)}
    for ax, (x, y) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs):
        for k, name in enumerate(sets):
            for e in entries:
                scores = e["sets"][name]["scores"]
                ax.errorbar(
                    scores[x]["mean"],
                    scores[y]["mean"],
                    xerr=scores[x]["se"] or 0,
                    yerr=scores[y]["se"] or 0,
                    fmt=markers[k % len(markers)],
                    color=colors[e["label"]],
                    capsize=3,
                )
                ax.annotate(
                    e["label"],
                    (scores[x]["mean"], scores[y]["mean"]),
                    textcoords="offset points",
                    xytext=(5, 5),
                    fontsize=8,
                )
            runs = {}
            for e in entries:
                if e.get("run"):
                    runs.setdefault(e["run"][0], []).append((e["run"][1], e["sets"][name]["scores"]))
            for points in runs.values():
                if len(points) > 1:
                    points.sort(key=lambda p: p[0])
                    ax.plot(
                        [p[1][x]["mean"] for p in points],
                        [p[1][y]["mean"] for p in points],
                        color="grey",
                        linewidth=0.8,
                        zorder=0,
                    )
        ax.set_xlabel(f"subject fidelity: {x} ({metric_ids[x]})", fontsize=9)
        ax.set_ylabel(f"text fidelity: {y} ({metric_ids[y]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(
            handles=[
                Line2D([], [], marker=markers[k % len(markers)], color="black", linestyle="none", label=name)
                for k, name in enumerate(sets)
            ],
            title="prompt set",
            fontsize=8,
        )
    fig.suptitle("Up and to the right is better: follows the prompt and keeps the likeness")
    fig.tight_layout()
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


# ----------------------------------------------------------------------------------------------------
# Outputs: metrics.json, metrics.csv, report.md
# ----------------------------------------------------------------------------------------------------


def _fmt(score):
    return f"{score['mean']:.4f} ± {score['se']:.4f}" if score["se"] is not None else f"{score['mean']:.4f}"


def write_csv(result, path):
    metrics = list(result["metrics"])
    header = ["embedding", "method", "prompt_set", "prompt_index", "prompt", "n"] + [
        f"{m}_{s}" for m in metrics for s in ("mean", "se")
    ]

    def row(e, set_name, index, prompt, group):
        values = [v for m in metrics for v in (group["scores"][m]["mean"], group["scores"][m]["se"])]
        return [e["label"], e["method"], set_name, index, prompt, group["n"]] + [
            "" if v is None else repr(v) for v in values
        ]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(header)
            for e in result["embeddings"]:
                out.writerow(row(e, "all", "", "", e["all"]))
                for set_name, group in e["sets"].items():
                    out.writerow(row(e, set_name, "", "", group))
                    for p in group["prompts"]:
                        out.writerow(row(e, set_name, p["index"], p["prompt"], p))

    files.atomic_write(path, write)


def write_report(result, path, pictures):
    metrics = result["metrics"]
    lines = [
        f"# Evaluation on {result['model']}",
        "",
        f"Class word `{result['class_word']}`, seeds {result['seeds']}, {result['num_inference_steps']} steps, "
        f"{result['num_reference_images']} reference image(s). Each cell: mean ± standard error over the images.",
        "",
        "| metric | model | what it measures |",
        "|---|---|---|",
    ]
    lines += [f"| `{m}` | `{info['model']}` | {info['description']} |" for m, info in metrics.items()]
    if "fidelity.png" in pictures:
        lines += ["", "![text against subject fidelity](fidelity.png)"]
    for set_name in result["prompt_sets"]:
        lines += [
            "",
            f"## Prompt set `{set_name}`",
            "",
            "| embedding | method | norm | " + " | ".join(metrics) + " |",
            "|---|---|---|" + "---|" * len(metrics),
        ]
        for e in result["embeddings"]:
            norms = ", ".join(f"{n:.4g} ({n / e['vocabulary_mean_norm'][k]:.2f}x vocab)" for k, n in e["norm"].items())
            lines.append(
                f"| {e['label']} | {e['method']} | {norms} | "
                + " | ".join(_fmt(e["sets"][set_name]["scores"][m]) for m in metrics)
                + " |"
            )
        if f"grid_{set_name}.png" in pictures:
            lines += [
                "",
                f"![grid of {set_name}](grid_{set_name}.png)",
                "",
                f"Rows: embeddings; columns: the prompts below; seed {result['seeds'][0]}.",
            ]
        lines += [
            "",
            "<details><summary>Per prompt</summary>",
            "",
            "| # | prompt | "
            + " | ".join(f"{e['label']} {m}" for e in result["embeddings"] for m in TEXT_METRICS if m in metrics)
            + " |",
            "|---|---|" + "---|" * sum(m in metrics for m in TEXT_METRICS) * len(result["embeddings"]),
        ]
        for i, prompt in enumerate(result["prompt_sets"][set_name]):
            cells = [
                _fmt(e["sets"][set_name]["prompts"][i]["scores"][m])
                for e in result["embeddings"]
                for m in TEXT_METRICS
                if m in metrics
            ]
            lines.append(f"| {i + 1} | {prompt} | " + " | ".join(cells) + " |")
        lines += ["", "</details>"]
    files.write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------


def main(args):
    """Generate what is missing, score everything, write the outputs. Returns a namespace with `generated` (images made
    by this call), `result` (the metrics.json content), `files` and `exit_code`."""
    training.quiet_library_notices()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )

    # -- Checks that need no model: everything a typo can break fails here, in seconds --
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise DTIError(f"--output_dir {args.output_dir} is a file; pass a folder (it is made if missing).")
    index = cli.check_model(args.model, None, args.revision, args.cache_dir, flag="--model")
    sdxl = "text_encoder_2" in index
    prompt_sets = load_prompt_sets(args.prompts)
    references = load_reference_images(args.reference_images)
    if args.labels is not None and len(args.labels) != len(args.embeddings):
        raise DTIError(
            f"--labels has {len(args.labels)} name(s) for {len(args.embeddings)} --embeddings; give one per embedding "
            "or none."
        )
    encoder_model_ids = encoder_ids(
        [f"{name}={getattr(args, f'{name}_model')}" for name in DEFAULT_ENCODERS],
        flag="--clip_model/--siglip_model/--dino_model",
    )
    if not any(encoder_model_ids.values()):
        raise DTIError("--clip_model, --siglip_model and --dino_model are all none; keep at least one to score with.")
    from transformers import AutoConfig

    names = files.ENCODERS if sdxl else files.ENCODERS[:1]
    try:  # the text encoders' widths from their configs: an embedding for another model fails before any weights load
        widths = {
            n: AutoConfig.from_pretrained(
                args.model, subfolder=n, revision=args.revision, cache_dir=args.cache_dir
            ).hidden_size
            for n in names
        }
    except (OSError, ValueError) as e:
        raise DTIError(
            f"--model {args.model}: the text encoder's config could not be read ({type(e).__name__}); pass a complete "
            "diffusers pipeline."
        ) from e
    entries, slugs = [], set()
    for i, path in enumerate(args.embeddings):
        concept, label, run = load_embedding(path)
        check_fits(concept, path, args.model, sdxl, widths)
        apply_checkpoint_norm(concept, args.model)
        label = args.labels[i] if args.labels else label
        slug, k = _slug(label), 2
        while slug in slugs:
            slug, k = f"{_slug(label)}-{k}", k + 1
        slugs.add(slug)
        entries.append(
            SimpleNamespace(
                path=path, concept=concept, label=label if slug == _slug(label) else slug, slug=slug, run=run
            )
        )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.mixed_precision or ("fp16" if device.type == "cuda" else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    settings = {
        "model": args.model,
        "revision": args.revision,
        "variant": args.variant,
        "mixed_precision": precision,
        "scheduler": "DPMSolverMultistepScheduler",
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
    }
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    jobs = []  # (entry, set name, prompt index, seed, path) of every image
    for e in entries:
        folder = os.path.join(args.output_dir, "images", e.slug)
        digest = hashlib.sha256(
            b"".join(e.concept.vectors[n].float().contiguous().numpy().tobytes() for n in names)
        ).hexdigest()
        e.settings = {**settings, "embedding_sha256": digest, "source": os.path.abspath(e.path)}
        e.settings_path = os.path.join(folder, "settings.json")
        if os.path.isfile(e.settings_path):
            with open(e.settings_path) as f:
                old = json.load(f)
            changed = [
                f"{k} {old.get(k)!r} -> {v!r}" for k, v in e.settings.items() if k != "source" and old.get(k) != v
            ]
            if changed:
                raise DTIError(
                    f"{folder} holds images of {e.label} made with other settings ({'; '.join(changed)}); pass "
                    "another --output_dir, or delete that folder to make them again."
                )
        for set_name, prompts in prompt_sets.items():
            for j, prompt in enumerate(prompts):
                key = hashlib.sha1(prompt.encode()).hexdigest()[:8]
                for seed in seeds:
                    jobs.append(
                        (e, set_name, j, seed, os.path.join(folder, set_name, f"{j + 1:02d}-{key}-seed{seed}.png"))
                    )
    pending = [job for job in jobs if not os.path.isfile(job[4])]
    scorer = FidelityScorer(
        encoder_model_ids, device=device, cache_dir=args.cache_dir, batch_size=args.batch_size
    )  # processors only, for now
    logger.info(
        f"{len(entries)} embedding(s) x {sum(map(len, prompt_sets.values()))} prompt(s) x {len(seeds)} seed(s): "
        f"{len(jobs)} images, {len(jobs) - len(pending)} already in {args.output_dir}, {len(pending)} to make on "
        f"{device} ({precision})"
    )

    # -- 1. Generate what is missing: one pipeline, every embedding under its own token, one generator per image --
    if pending:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.training_utils import free_memory

        extra = (
            {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
        )  # a blacked-out image would be scored
        cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipe = cls.from_pretrained(
            args.model, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir, dtype=dtype, **extra
        )
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.to(device).set_progress_bar_config(disable=True)
        call = {"num_inference_steps": args.num_inference_steps, "height": args.resolution, "width": args.resolution}
        if args.guidance_scale is not None:
            call["guidance_scale"] = args.guidance_scale
        progress = tqdm(total=len(pending), desc="Generating", unit="image")
        for i, e in enumerate(entries):
            mine = [job for job in pending if job[0] is e]
            if not mine:
                continue
            token = f"<dti-eval-{i}>"
            for name, tokenizer in zip(names, ("tokenizer", "tokenizer_2")):
                pipe.load_textual_inversion(
                    e.concept.vectors[name].float(),
                    token=token,
                    text_encoder=getattr(pipe, name),
                    tokenizer=getattr(pipe, tokenizer),
                )
            os.makedirs(os.path.dirname(e.settings_path), exist_ok=True)
            files.write_text(e.settings_path, json.dumps(e.settings, indent=2))
            for batch in batches(mine, args.batch_size):
                prompts = [prompt_sets[set_name][j].replace("{}", token) for _, set_name, j, _, _ in batch]
                generators = [torch.Generator("cpu").manual_seed(seed) for *_, seed, _ in batch]
                images = pipe(prompts, generator=generators, **call).images
                for (*_, path), image in zip(batch, images):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    files.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
                progress.update(len(batch))
        progress.close()
        del pipe
        free_memory()

    # -- 2. Score every image: the encoders load once; the reference photos are encoded once --
    reference = scorer.reference_features(references)
    scores = {}
    progress = tqdm(total=len(jobs), desc="Scoring", unit="image")
    for batch in batches(jobs, args.batch_size):
        texts = [prompt_sets[set_name][j].replace("{}", args.class_word) for _, set_name, j, _, _ in batch]
        batch_scores = scorer.score([data_lib.open_rgb(job[4]) for job in batch], texts, reference)
        for k, job in enumerate(batch):
            scores[job[4]] = {m: float(v[k]) for m, v in batch_scores.items()}
        progress.update(len(batch))
    progress.close()

    # -- 3. Aggregate and write: JSON, CSV, report, grids, fidelity plot --
    def group(paths):
        return {"n": len(paths), "scores": {m: summary([scores[p][m] for p in paths]) for m in scorer.metrics}}

    result = {
        "model": args.model,
        "sdxl": sdxl,
        "class_word": args.class_word,
        "seeds": seeds,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "mixed_precision": precision,
        "reference_images": [os.path.abspath(p) for p in args.reference_images],
        "num_reference_images": len(references),
        "prompt_sets": prompt_sets,
        "metrics": {
            m: {"model": encoder_model_ids[METRICS[m][0]], "description": METRICS[m][1]} for m in scorer.metrics
        },
        "embeddings": [],
    }
    for e in entries:
        mine = [job for job in jobs if job[0] is e]
        item = {
            "label": e.label,
            "source": os.path.abspath(e.path),
            "run": list(e.run) if e.run else None,
            "method": describe_method(e.concept.metadata.get("text_encoder", {})),
            "norm": {n: float(e.concept.vectors[n].float().norm(dim=-1).mean()) for n in names},
            "vocabulary_mean_norm": {n: base_norm_stats(args.model, n)["mean"] for n in names},
            "all": group([job[4] for job in mine]),
            "sets": {},
        }
        for set_name, prompts in prompt_sets.items():
            in_set = [job for job in mine if job[1] == set_name]
            item["sets"][set_name] = {**group([job[4] for job in in_set]), "prompts": []}
            for j, prompt in enumerate(prompts):
                paths = [job[4] for job in in_set if job[2] == j]
                item["sets"][set_name]["prompts"].append(
                    {
                        "index": j + 1,
                        "prompt": prompt,
                        "text": prompt.replace("{}", args.class_word),
                        **group(paths),
                        "images": [
                            {"seed": s, "path": os.path.relpath(p, args.output_dir), **scores[p]}
                            for s, p in zip(seeds, paths)
                        ],
                    }
                )
        result["embeddings"].append(item)

    out = args.output_dir
    written = [os.path.join(out, "metrics.json"), os.path.join(out, "metrics.csv")]
    files.write_text(written[0], json.dumps(result, indent=2))
    write_csv(result, written[1])
    pictures = []
    for set_name, prompts in prompt_sets.items():
        rows = [
            [data_lib.open_rgb(job[4]) for job in jobs if job[0] is e and job[1] == set_name and job[3] == seeds[0]]
            for e in entries
        ]
        size = min(args.grid_size, rows[0][0].width)
        grid = labelled_grid(rows, [e.label for e in entries], [str(j + 1) for j in range(len(prompts))], size)
        files.atomic_write(os.path.join(out, f"grid_{set_name}.png"), lambda tmp: grid.save(tmp, format="PNG"))
        pictures.append(f"grid_{set_name}.png")
    plot_ids = {m: info["model"] for m, info in result["metrics"].items()}
    if plot_fidelity(result["embeddings"], plot_ids, os.path.join(out, "fidelity.png")):
        pictures.append("fidelity.png")
    write_report(result, os.path.join(out, "report.md"), pictures)
    written += [os.path.join(out, p) for p in pictures] + [os.path.join(out, "report.md")]
    for e in result["embeddings"]:
        logger.info(f"{e['label']}: " + ", ".join(f"{m} {_fmt(s)}" for m, s in e["all"]["scores"].items()))
    logger.info(f"Wrote {', '.join(written)}")
    return SimpleNamespace(generated=len(pending), result=result, files=written, exit_code=0)


if __name__ == "__main__":
    raise SystemExit(cli.run_cli(main, parse_args))
