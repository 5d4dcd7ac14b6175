#!/usr/bin/env python
r"""Concept tools for textual-inversion embeddings (DTI or classic; SD, SDXL, SANA, Wan): blend, inspect, convert,
rescale.

    python dti_concepts.py slerp A B --alpha 0.25 0.5 0.75 --token "<mix>" --output OUT [--render MODEL]
    python dti_concepts.py inspect EMB [--model MODEL] [--k 5] [--json]
    python dti_concepts.py convert EMB --to diffusers|a1111|comfyui --output OUT
    python dti_concepts.py rescale EMB --model MODEL --to mean|min|max|FLOAT --output OUT

Inputs are training output folders, diffusers files, AUTOMATIC1111 .pt/.safetensors and the SDXL clip_l/clip_g
single file, detected automatically (dti_files reads and writes every form); SANA (Gemma-2, width 2304) and Wan
(UMT5, width 4096) embeddings are the diffusers {token: tensor} form. The same functions are importable:
slerp_concepts, slerp_embeddings, inspect_embedding, convert_embedding, rescale_embedding, render_interpolation.
"""

import argparse
import json
import math
import os
import sys
import warnings

import torch
from PIL import Image

from dti_cli import check_model, model_family
from dti_files import (
    CONVERT_TARGETS,
    EMBEDDING_EXTENSIONS,
    ENCODERS,
    FAMILIES,
    SINGLE_FILE_KEYS,
    ConceptEmbedding,
    atomic_write,
    base_vocabulary,
    check_targets,
    diffusers_paths,
    embedding_slug,
    load_textual_inversion,
    pipeline_family,
    read_concept,
    stated_norm,
    write_concept,
    write_diffusers,
    write_single_file,
)
from dti_metrics import label_font
from dti_utils import (
    DTIError,
    DTIWarning,
    __version__,
    dist,
    initializer_ids,
    nearest_vocabulary_tokens,
    placeholder_token_list,
    slerp,
    vocabulary_norm_stats,
)


__all__ = [
    "check_slerp_pair",
    "slerp_concepts",
    "slerp_embeddings",
    "interpolation_strip",
    "render_interpolation",
    "inspect_embedding",
    "format_inspection",
    "convert_embedding",
    "rescale_target",
    "rescale_concept",
    "rescale_embedding",
    "main",
]


def _check_token(token, flag="--token"):
    if not token or not token.strip() or any(c.isspace() for c in token):
        raise DTIError(f"{flag} {token!r} must be a single word without white space, such as '<mix>'.")
    return token


def _check_file_name(output):
    """Warn when OUTPUT is a file whose stem, the prompt word in AUTOMATIC1111 and kohya, has no '-', '_' or '.': it
    may be an ordinary word, which those tools would then replace by the embedding in every prompt (the embedding_slug
    rule)."""
    stem, ext = os.path.splitext(os.path.basename(output))
    if ext.lower() in EMBEDDING_EXTENSIONS and embedding_slug(stem, file_stem=True) != stem:
        warnings.warn(
            f"--output {output}: AUTOMATIC1111 and kohya make the file name {stem!r} the prompt word, and a name "
            "without '-', '_' or '.' may be an ordinary word they would replace in every prompt; "
            f"{embedding_slug(stem, file_stem=True)}{ext} avoids that.",
            DTIWarning,
        )


def convert_embedding(path, to, output, overwrite=False):
    """Read EMB in any form and write it as `to`; tensors are copied bit for bit. Returns the paths written.
    OUTPUT is a file (.safetensors, .pt, .bin) or, without an extension, a folder (a UI's embeddings folder is added
    to); a file that exists is replaced only with overwrite, and the input never."""
    _check_output_type(output)
    concept = read_concept(path)
    if to != "diffusers" and concept.family in ("sana", "wan"):
        raise DTIError(
            f"{path} is an embedding for {FAMILIES[concept.family]}, which AUTOMATIC1111, ComfyUI and kohya do not "
            "load; use --to diffusers."
        )
    if to != "diffusers":
        _check_file_name(output)
    return write_concept(concept, output, to, overwrite=overwrite, inputs=concept.files)


def _check_output_type(output):
    """--output is a file of an embedding type or a folder."""
    extension = os.path.splitext(output.rstrip("/"))[1]
    if extension and extension.lower() not in EMBEDDING_EXTENSIONS and not os.path.isdir(output):
        raise DTIError(
            f"--output {output}: {extension} is no embedding file type; use .safetensors or .pt (or a folder name "
            "without an extension)."
        )


# -- slerp --------------------------------------------------------------------------------------------


def _row_norms(x):
    return x.double().norm(dim=-1)


def check_slerp_pair(a, b):
    """Raise DTIError when two concepts cannot be blended; warn when their norms or base models differ."""
    if set(a.vectors) != set(b.vectors) or None not in (a.family, b.family) and a.family != b.family:
        raise DTIError(f"{a.describe()} but {b.describe()}; slerp needs two embeddings for the same kind of model.")
    for name in a.vectors:
        va, vb = a.vectors[name], b.vectors[name]
        if va.shape[0] != vb.shape[0]:
            raise DTIError(
                f"{a.source} has {va.shape[0]} vector(s) but {b.source} has {vb.shape[0]} vector(s)"
                f"{' (' + name + ')' if a.sdxl else ''}; slerp needs the same number of vectors in both."
            )
        if va.shape[1] != vb.shape[1]:
            raise DTIError(
                f"{a.source} has {va.shape[1]}-dim vectors but {b.source} has {vb.shape[1]}-dim ones ({name}); "
                f"they were trained for different text encoders and cannot be blended."
            )
        for src, v in ((a.source, va), (b.source, vb)):
            if not torch.isfinite(v).all() or (_row_norms(v) == 0).any():
                raise DTIError(
                    f"{src} holds a zero or non-finite vector ({name}); it has no direction to interpolate."
                )
        if (dist(va.double(), vb.double()) > math.pi - 1e-4).any():
            raise DTIError(
                f"{a.source} and {b.source} have a pair of opposite vectors ({name}); no unique path joins them on "
                "the sphere."
            )
        na, nb = _row_norms(va), _row_norms(vb)
        if not torch.allclose(na, nb, rtol=1e-5, atol=0):
            warnings.warn(
                f"{a.source} and {b.source} have different norms ({name}: {_fmt_norms(na)} vs {_fmt_norms(nb)}), as a "
                "classic textual-inversion file does: the direction is slerped and the norm interpolated linearly.",
                DTIWarning,
            )
    bases = [c.metadata.get("text_encoder", {}).get("base_model") for c in (a, b)]
    if all(bases) and bases[0] != bases[1]:
        warnings.warn(
            f"{a.source} was trained on {bases[0]} and {b.source} on {bases[1]}; the blend may not mean much.",
            DTIWarning,
        )


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
        if uniform and stated == b.metadata[name].get("norm") and stated_norm(stated):
            if abs(float(norms.mean()) - float(stated)) <= 1e-6 * float(stated):
                metadata[name]["norm"] = stated  # both inputs state the same m and the blend has it
        base = a.metadata[name].get("base_model") or b.metadata[name].get("base_model")
        if base:
            metadata[name]["base_model"] = base
        if a.family or b.family:
            metadata[name]["family"] = a.family or b.family
    return ConceptEmbedding(token, vectors, metadata, source=None, form="diffusers-folder")


def _alpha_folder(output, alpha):
    return os.path.join(output, f"alpha-{alpha:g}")


def slerp_embeddings(
    a_path,
    b_path,
    alphas=(0.5,),
    output="slerp",
    token=None,
    render=None,
    prompt="a photo of {}",
    seed=0,
    steps=30,
    overwrite=False,
):
    """Blend two embeddings (files or training folders, SD or SDXL) at each alpha and write training-style folders:
    OUTPUT itself for one alpha, OUTPUT/alpha-A for several; with render=MODEL, also OUTPUT/interpolation.png. An
    OUTPUT ending in .safetensors/.pt/.bin is one file instead (one alpha), the form every UI reads
    (write_single_file); its strip is OUTPUT-interpolation.png. Returns {"outputs": [folder or file per alpha],
    "alphas": [...], "strip": path or None}. Nothing is written over an existing file unless overwrite, nor ever
    over an input; a --render that cannot work is refused before anything is written."""
    to_file = output.lower().endswith(EMBEDDING_EXTENSIONS)
    alphas = list(dict.fromkeys(float(x) for x in alphas))
    if not alphas:
        raise DTIError("--alpha needs at least one value in [0, 1].")
    if to_file and len(alphas) > 1:
        raise DTIError(
            f"--output {output} is one file but --alpha gives {len(alphas)} blends; pass a folder (one alpha-A folder "
            "per blend)."
        )
    for alpha in alphas:
        if not 0.0 <= alpha <= 1.0 or not math.isfinite(alpha):
            raise DTIError(f"--alpha {alpha:g} is outside [0, 1]; 0 gives the first embedding, 1 the second.")
    if render is not None:
        _check_render_args(prompt, steps)
        check_model(render, flag="--render")
    a, b = read_concept(a_path), read_concept(b_path)
    if token is None:
        token = f"<{embedding_slug(a.token)}-{embedding_slug(b.token)}>"
    _check_token(token)
    check_slerp_pair(a, b)
    if to_file:
        _check_file_name(output)
    blends = [
        (slerp_concepts(a, b, alpha, token), output if len(alphas) == 1 else _alpha_folder(output, alpha))
        for alpha in alphas
    ]
    strip_path = (
        os.path.splitext(output)[0] + "-interpolation.png" if to_file else os.path.join(output, "interpolation.png")
    )
    targets = [p for blend, target in blends for p in ([target] if to_file else diffusers_paths(blend, target, True))]
    check_targets(
        targets + ([strip_path] if render is not None else []), overwrite=overwrite, inputs=a.files + b.files
    )
    outputs = []
    for blend, target in blends:
        if to_file:
            write_single_file(blend, target, overwrite=overwrite)
        else:
            write_diffusers(blend, target, single_file=True, overwrite=overwrite)
        outputs.append(target)
    strip = None
    if render is not None:
        strip = render_interpolation(
            render, outputs, alphas, prompt, seed=seed, steps=steps, output_path=strip_path, token=token
        )
    return {"outputs": outputs, "alphas": alphas, "strip": strip}


def strip_label_height(image_height):
    """Height in pixels of the label band under each image of an interpolation strip."""
    return max(16, image_height // 12)


def interpolation_strip(images, labels):
    """Images side by side (all resized to the first one's size), each label centred in a white band below."""
    from PIL import ImageDraw

    if not images:
        raise DTIError("No images to put in the strip.")
    from diffusers.utils import make_image_grid

    w, h = images[0].size
    band = strip_label_height(h)
    strip = Image.new("RGB", (w * len(images), h + band), "white")
    strip.paste(make_image_grid([im.convert("RGB").resize((w, h)) for im in images], rows=1, cols=len(images)), (0, 0))
    draw = ImageDraw.Draw(strip)

    for i, label in enumerate(labels):
        # The largest font (up to 60% of the band) whose text fits the image width; tiny images get the bare number.
        for text in (label, label.split()[-1]):
            for size in range(max(8, int(band * 0.6)), 5, -1):
                font = label_font(size)
                left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
                if right - left <= w - 2:
                    break
            if right - left <= w - 2:
                break
        x = i * w + (w - (right - left)) / 2 - left
        y = h + (band - (bottom - top)) / 2 - top
        draw.text((x, y), text, fill="black", font=font)
    return strip


def _check_render_args(prompt, steps):
    if "{}" not in prompt:
        raise DTIError(f"--prompt {prompt!r} has no {{}} where the token goes; use e.g. 'a photo of {{}}'.")
    if steps < 1:
        raise DTIError(f"--steps must be at least 1, not {steps}.")


def _load_render_pipeline(model):
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # SANA's Gemma-2 and Wan's UMT5 overflow in fp16: bf16 for them
        bf16 = model_family(DiffusionPipeline.load_config(model)) in ("sana", "wan")
        dtype = torch.float32 if device == "cpu" else torch.bfloat16 if bf16 else torch.float16
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError, TypeError) as e:
        raise DTIError(
            f"--render {model} could not be loaded as a diffusers pipeline ({type(e).__name__}: {e}); pass an SD, "
            "SDXL, SANA or Wan pipeline folder."
        ) from e
    if pipeline_family(pipe) in ("sd", "sdxl") and not hasattr(pipe, "load_textual_inversion"):
        raise DTIError(
            f"--render {model} is a {type(pipe).__name__}, which cannot load textual-inversion embeddings; pass an "
            "SD, SDXL, SANA or Wan pipeline."
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_into_pipeline(pipe, path, token, model):
    """Load the embedding at path (folder or file, any form) under `token` (dti_files.load_textual_inversion: each
    encoder's vectors into its own encoder); returns the word to write in the prompt."""
    try:
        return load_textual_inversion(pipe, path, token=token)
    except ValueError as e:
        raise DTIError(
            f"The embedding in {path} does not fit --render {model} ({e}); pass the base model it was trained on."
        ) from e


def _render(pipe, prompt, steps, generator):
    """One image of `prompt`; a video pipeline (Wan) renders one frame, SANA without its complex human instruction
    (as DTI trains)."""
    family = pipeline_family(pipe)
    extra = {"wan": {"num_frames": 1, "output_type": "pil"}, "sana": {"complex_human_instruction": None}}
    output = pipe(prompt, num_inference_steps=steps, generator=generator, **extra.get(family, {}))
    return output.frames[0][0] if family == "wan" else output.images[0]


def render_interpolation(
    model, paths, alphas, prompt="a photo of {}", seed=0, steps=30, output_path="interpolation.png", token="<mix>"
):
    """Load the pipeline once, load each blended embedding (folder or file) under its own token, render the prompt with
    the same seed for each, and write a labelled strip (alpha under each image). Returns output_path."""
    _check_render_args(prompt, steps)
    pipe = _load_render_pipeline(model)
    base = embedding_slug(token)
    images = []
    for i, path in enumerate(paths):
        word = _load_into_pipeline(pipe, path, f"<{base}-alpha{i}>", model)
        generator = torch.Generator("cpu").manual_seed(seed)
        images.append(_render(pipe, prompt.replace("{}", word), steps, generator))
    strip = interpolation_strip(images, [f"alpha {alpha:g}" for alpha in alphas])
    atomic_write(output_path, lambda tmp: strip.save(tmp, format="PNG"))
    return output_path


# -- inspect ------------------------------------------------------------------------------------------


def _model_encoder(concept, name):
    """The model's encoder for the concept's vectors `name`: a learned_embeds_2 file passed alone is read as one
    encoder; its metadata says which one it is."""
    meta = concept.metadata.get(name, {})
    return meta.get("text_encoder") if not concept.sdxl and meta.get("text_encoder") in ENCODERS else name


def _check_width(path, vecs, model_encoder, model, weight, meta):
    if weight.shape[1] != vecs.shape[1]:
        raise DTIError(
            f"{path} holds {vecs.shape[1]}-dim vectors for {model_encoder} but --model {model} has "
            f"{weight.shape[1]}-dim rows; pass the base model it was trained "
            f"on{' (' + meta['base_model'] + ')' if meta.get('base_model') else ''}."
        )


def inspect_embedding(path, model=None, k=5):
    """What an embedding holds, as a dict (the --json output). Per encoder and vector: the norm; with a model,
    the vocabulary's norm statistics, the norm relative to their mean, the k nearest vocabulary tokens by
    cosine, and the angle to the initializer named in the metadata."""
    if k < 1:
        raise DTIError(f"--k must be at least 1, not {k}.")
    concept = read_concept(path)
    tokens = placeholder_token_list(concept.token, concept.num_vectors)
    report = {
        "path": path,
        "form": concept.form,
        "token": concept.token,
        "tokens": tokens,
        "num_vectors": concept.num_vectors,
        "sdxl": concept.sdxl,
        "family": concept.family,
        "model": model,
        "encoders": {},
    }
    for name, vecs in concept.vectors.items():
        vecs = vecs.float()
        meta = concept.metadata.get(name, {})
        norms = vecs.norm(dim=-1)
        entry = {
            "dim": vecs.shape[1],
            "file_key": SINGLE_FILE_KEYS[name] if concept.form == "sdxl-single-file" else None,
            "metadata": meta,
            "vectors": [
                {
                    "index": i,
                    "token": tokens[i],
                    "norm": float(norms[i]),
                    "finite": bool(torch.isfinite(vecs[i]).all()),
                }
                for i in range(len(vecs))
            ],
        }
        if model is not None:
            model_encoder = _model_encoder(concept, name)
            weight, tokenizer = base_vocabulary(model, model_encoder)
            _check_width(path, vecs, model_encoder, model, weight, meta)
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
            angles = torch.rad2deg(dist(vecs, init_rows)) if init_rows is not None else None
            for i, item in enumerate(entry["vectors"]):
                item["norm_to_vocab_mean"] = item["norm"] / stats["mean"]
                item["nearest"] = [{"token": token, "id": j, "cosine": c} for token, j, c in near[i]]
                item["angle_to_initializer_deg"] = float(angles[i]) if angles is not None else None
        report["encoders"][name] = entry
    return report


SHORT_NAMES = {None: "SD", "sd": "SD", "sdxl": "SDXL", "sana": "SANA", "wan": "Wan"}


def format_inspection(report):
    """The human-readable text of an inspect_embedding() report."""
    lines = [
        f"{report['token']}: {report['num_vectors']} vector(s), {SHORT_NAMES[report['family']]}, "
        f"{report['form']} form, from {report['path']}"
    ]
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
            lines.append(
                f"  vocabulary norms ({vocab['size']} rows): mean {vocab['mean']:.4f}, min {vocab['min']:.4f}, max "
                f"{vocab['max']:.4f}"
            )
        if entry.get("initializer_note"):
            lines.append(f"  no angle to the initializer: {entry['initializer_note']}")
        for item in entry["vectors"]:
            text = f"  [{item['index']}] {item['token']}: norm {item['norm']:.4f}"
            if not item["finite"]:
                text += "  ** NOT FINITE: this vector is NaN or infinite; the embedding is broken and will not work **"
            if "norm_to_vocab_mean" in item:
                text += f" ({item['norm_to_vocab_mean']:.2f}x vocabulary mean)"
            if item.get("angle_to_initializer_deg") is not None:
                text += f", {item['angle_to_initializer_deg']:.1f} deg from initializer {entry['initializer_token']!r}"
            lines.append(text)
            if item.get("nearest"):
                lines.append(
                    "      nearest: " + ", ".join(f"{n['token']} ({n['cosine']:.3f})" for n in item["nearest"])
                )
    first = next(iter(report["encoders"].values()))["metadata"]
    shown = {k: v for k, v in first.items() if k not in ("format",)}
    if shown:
        lines.append("metadata: " + "; ".join(f"{k}={v}" for k, v in shown.items()))
    if report["model"] is None:
        base = first.get("base_model")
        lines.append(
            f"Pass --model {base or 'BASE_MODEL'} for vocabulary norms, nearest tokens and the angle to the "
            "initializer."
        )
    return "\n".join(lines)


# -- rescale ------------------------------------------------------------------------------------------


def rescale_target(to, stats):
    """The norm --to names: mean, min or max of the vocabulary's norms, or a positive number."""
    if to in ("mean", "min", "max"):
        return stats[to]
    try:
        value = float(to)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < math.inf:
        raise DTIError(f"--to must be mean, min, max or a positive number, not {to!r}.")
    return value


def rescale_concept(concept, model, to="mean"):
    """The concept with every vector set to the norm `to` of the model's vocabulary (per text encoder), its direction
    kept: the post-hoc "rescale" baseline of the DTI paper for a classic textual-inversion embedding. The metadata
    keeps the original norms ("original_norms", JSON {encoder: [norm per vector]}) and the target ("rescaled_to")."""
    original = {name: [float(n) for n in _row_norms(v)] for name, v in concept.vectors.items()}
    vectors, metadata = {}, {}
    for name, vecs in concept.vectors.items():
        model_encoder = _model_encoder(concept, name)
        weight, _ = base_vocabulary(model, model_encoder)
        _check_width(concept.source, vecs, model_encoder, model, weight, concept.metadata.get(name, {}))
        norms = _row_norms(vecs)
        if not torch.isfinite(vecs).all() or (norms == 0).any():
            raise DTIError(
                f"{concept.source} holds a zero or non-finite vector ({name}); it has no direction to keep."
            )
        target = rescale_target(to, vocabulary_norm_stats(weight))
        vectors[name] = (vecs.double() / norms.unsqueeze(-1) * target).float()
        metadata[name] = {
            **concept.metadata.get(name, {}),
            "norm": repr(target),
            "rescaled_to": f"{to} ({model})" if to in ("mean", "min", "max") else str(to),
            "original_norms": json.dumps(original),
        }
        metadata[name].setdefault("base_model", model)
    return ConceptEmbedding(concept.token, vectors, metadata, source=concept.source, form=concept.form)


def rescale_embedding(path, model, to, output, overwrite=False):
    """Read EMB in any form, rescale it (rescale_concept) and write it in the same form: a folder or a file at OUTPUT
    (a file that exists is replaced only with overwrite, the input never). Returns the paths written."""
    if os.path.abspath(output) == os.path.abspath(path):
        raise DTIError(f"--output {output} is the input; choose another name so that the original embedding is kept.")
    _check_output_type(output)
    original = read_concept(path)
    is_file = output.lower().endswith(EMBEDDING_EXTENSIONS)
    single = original.form in ("a1111", "sdxl-single-file") or (is_file and original.sdxl)
    if single:
        ext = os.path.splitext(path)[1] if original.form in ("a1111", "sdxl-single-file") else ".safetensors"
        paths = [output if is_file else os.path.join(output, embedding_slug(original.token) + ext)]
    else:
        paths = diffusers_paths(original, output, single_file=original.form == "diffusers-folder")
    check_targets(paths, overwrite=overwrite, inputs=original.files)  # before the model's vocabulary loads
    concept = rescale_concept(original, model, to)
    if single:
        return [write_single_file(concept, paths[0], overwrite=overwrite, inputs=original.files)]
    single_file = original.form == "diffusers-folder"
    return write_diffusers(concept, output, single_file=single_file, overwrite=overwrite, inputs=original.files)


def build_concept_parser():
    parser = argparse.ArgumentParser(
        prog="dti_concepts.py",
        description="Tools for textual-inversion embeddings (DTI or classic, SD or SDXL): blend, inspect, convert, "
        "rescale.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "slerp",
        help="blend two embeddings on the sphere",
        description=(
            "Blend two embeddings (files or training output folders, SD or SDXL): the direction by spherical "
            "interpolation, the norm linearly (DTI embeddings share the norm m, so blends keep it exactly). Writes "
            "training-style folders that load with pipe.load_textual_inversion(folder): OUTPUT for one alpha, "
            "OUTPUT/alpha-A for several; or, for one alpha, the single file OUTPUT.safetensors (or .pt/.bin) that "
            "AUTOMATIC1111, ComfyUI and kohya read."
        ),
    )
    p.add_argument("a", metavar="A", help="First embedding (alpha 0): file or training output folder.")
    p.add_argument("b", metavar="B", help="Second embedding (alpha 1).")
    p.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=[0.5],
        help="Fractions in [0, 1] (several give one folder each). Default 0.5.",
    )
    p.add_argument(
        "--token", default=None, help="Token of the blend, e.g. '<mix>'. Default: '<A-B>' from the inputs' tokens."
    )
    p.add_argument("--output", required=True, help="Output folder, or one .safetensors/.pt/.bin file (one alpha).")
    p.add_argument(
        "--render",
        metavar="MODEL",
        default=None,
        help="Also render one image per alpha with this pipeline (folder or Hub id) into OUTPUT/interpolation.png "
        "(for a file OUTPUT: OUTPUT-interpolation.png beside it).",
    )
    p.add_argument(
        "--prompt",
        default="a photo of {}",
        help="Prompt for --render; {} is replaced by the token. Default 'a photo of {}'.",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed for --render, the same for every alpha. Default 0.")
    p.add_argument("--steps", type=int, default=30, help="Inference steps for --render. Default 30.")
    p.add_argument(
        "--overwrite", action="store_true", help="Replace files that already exist at --output (never the inputs)."
    )

    p = sub.add_parser(
        "inspect",
        help="norms, nearest tokens, angle to the initializer",
        description=(
            "Show what an embedding holds: each vector's norm and the file's metadata; with --model also the "
            "vocabulary's norm statistics, the norm relative to their mean, the k nearest vocabulary tokens and the "
            "angle to the initializer."
        ),
    )
    p.add_argument("emb", metavar="EMB", help="Embedding file or training output folder.")
    p.add_argument("--model", default=None, help="Base model (diffusers folder or Hub id) for vocabulary comparisons.")
    p.add_argument("--k", type=int, default=5, help="Nearest tokens per vector. Default 5.")
    p.add_argument("--json", action="store_true", help="Print machine-readable JSON only.")

    p = sub.add_parser(
        "convert",
        help="convert between diffusers, AUTOMATIC1111 and ComfyUI forms",
        description=(
            "Convert an embedding (form detected automatically) to: diffusers ({token: tensor} file for SD, or a "
            "folder with learned_embeds[_2].safetensors), a1111 / comfyui (SD: {token: tensor} .safetensors, or "
            "string_to_param .pt; SDXL: one clip_l/clip_g file). OUTPUT without a file extension is a folder, where "
            "a1111 / comfyui write NAME.safetensors: the prompt word in AUTOMATIC1111 (ComfyUI: embedding:NAME), "
            "kept distinct from ordinary words ('<toy>' gives toy-ti). Tensors are copied bit for bit."
        ),
    )
    p.add_argument("emb", metavar="EMB", help="Embedding file or training output folder.")
    p.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="Target form.")
    p.add_argument("--output", required=True, help="Output file (.safetensors, .pt or .bin) or folder.")
    p.add_argument(
        "--overwrite", action="store_true", help="Replace files that already exist at --output (never the input)."
    )

    p = sub.add_parser(
        "rescale",
        help="set every vector to the vocabulary's norm, keeping its direction",
        description=(
            "Set the norm of every vector of an embedding (classic TI, AUTOMATIC1111 .pt, SDXL single file, ...) to "
            "the norm of the model's vocabulary, per text encoder, keeping each direction: the DTI paper's 'rescale' "
            "baseline. Writes the input's form; the metadata keeps the original norms."
        ),
    )
    p.add_argument("emb", metavar="EMB", help="Embedding file or training output folder.")
    p.add_argument(
        "--model", required=True, help="The base model (diffusers folder or Hub id) whose vocabulary gives the norm."
    )
    p.add_argument("--to", default="mean", help="mean (default), min or max of the vocabulary's norms, or a number.")
    p.add_argument(
        "--output", required=True, help="Output folder, or file (.safetensors, or .pt for an AUTOMATIC1111 .pt input)."
    )
    p.add_argument(
        "--overwrite", action="store_true", help="Replace files that already exist at --output (never the input)."
    )
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None):
    """`python dti_concepts.py slerp|inspect|convert ...`: 0 on success; a DTIError prints `error: ...` and gives 2."""
    args = build_concept_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", DTIWarning)
        warnings.showwarning = _print_warning
        try:
            if args.command == "slerp":
                result = slerp_embeddings(
                    args.a,
                    args.b,
                    args.alpha,
                    args.output,
                    token=args.token,
                    render=args.render,
                    prompt=args.prompt,
                    seed=args.seed,
                    steps=args.steps,
                    overwrite=args.overwrite,
                )
                for alpha, path in zip(result["alphas"], result["outputs"]):
                    print(f"alpha {alpha:g}: {path}")
                if result["strip"]:
                    print(f"interpolation strip: {result['strip']}")
            elif args.command == "inspect":
                report = inspect_embedding(args.emb, model=args.model, k=args.k)
                print(json.dumps(report, indent=2) if args.json else format_inspection(report))
            elif args.command in ("convert", "rescale"):
                if args.command == "convert":
                    written = convert_embedding(args.emb, args.to, args.output, overwrite=args.overwrite)
                else:
                    written = rescale_embedding(args.emb, args.model, args.to, args.output, overwrite=args.overwrite)
                for path in written:
                    print(f"wrote {path}")
        except DTIError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
