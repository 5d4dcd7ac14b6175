"""The Hub: the repository made at the start of a run, the model card in diffusers' conventions, the upload.

The card says how the embedding was made and how to load it: a complete diffusers snippet (one call per encoder for
SDXL, or from the single file; SANA and Wan through this project's dti_files.load_textual_inversion, as their
pipelines have no loader) and the file name and prompt word for AUTOMATIC1111, ComfyUI and kohya.
"""

import functools
import json
import os
import re
import socket
import urllib.parse

from dti_files import FILE_STEMS, SINGLE_FILE_KEYS, TOKENIZERS, atomic_write, embedding_slug
from dti_utils import DTIError, logger


__all__ = [
    "hub_unreachable",
    "check_hub_files",
    "create_hub_repo",
    "base_model_license",
    "loading_snippet",
    "family_snippet",
    "write_model_card",
    "push_output_to_hub",
]


# ----------------------------------------------------------------------------------------------------
# Reaching the Hub: in seconds, or one sentence (huggingface_hub alone retries for minutes without a network)
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def hub_unreachable():
    """Why the Hub cannot be asked, in a few words ("HF_HUB_OFFLINE is set", "huggingface.co does not answer"), or
    None when it can. One TCP connection with a 3 s timeout, made once per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return f"{host} does not answer"
    return None


def check_hub_files(name, *, flag, filename, what, revision=None, cache_dir=None):
    """A Hub id that is neither cached (its `filename`) nor reachable is one sentence at once: the libraries would
    retry for minutes. Local paths and reachable ids pass (the libraries then say what is wrong with them)."""
    from huggingface_hub import try_to_load_from_cache

    if os.path.exists(name) or name.startswith((".", "/", "~")):
        return
    try:
        cached = try_to_load_from_cache(name, filename, cache_dir=cache_dir, revision=revision)
    except ValueError:  # not a valid repo id: the library's own error names it
        return
    why = None if isinstance(cached, str) else hub_unreachable()
    if why:
        raise DTIError(
            f"{flag} {name} is not in the local Hugging Face cache and {why}; download it first (`hf download "
            f"{name}`) or pass a local folder of {what}."
        )


def create_hub_repo(name, *, token=None, private=False):
    """Create (or reuse) the Hub repository at the start of the run: a bad token or name fails before training."""
    from huggingface_hub import create_repo

    try:
        return create_repo(name, exist_ok=True, token=token, private=private).repo_id
    except Exception as e:  # any failure at the Hub (network, HTTP, token, name) is this one sentence
        raise DTIError(
            f"Could not create the Hub repository {name!r} ({type(e).__name__}: {e}); log in with `hf auth login` or "
            "pass --hub_token, or drop --push_to_hub."
        ) from e


# The licenses of the standard bases, for when their card cannot be read (offline, gated).
KNOWN_LICENSES = {
    **dict.fromkeys(
        (
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "runwayml/stable-diffusion-v1-5",
            "CompVis/stable-diffusion-v1-4",
        ),
        "creativeml-openrail-m",
    ),
    **dict.fromkeys(
        (
            "stabilityai/stable-diffusion-2",
            "stabilityai/stable-diffusion-2-base",
            "stabilityai/stable-diffusion-2-1",
            "stabilityai/stable-diffusion-2-1-base",
            "stabilityai/stable-diffusion-xl-base-1.0",
        ),
        "openrail++",
    ),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "apache-2.0",
}


def base_model_license(base_model, token=None):
    """{license[, license_name, license_link]} from the base model's card (local folder or Hub), else from
    KNOWN_LICENSES; {} when unknown."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    try:
        local = os.path.join(base_model, "README.md")
        data = ModelCard.load(local if os.path.isfile(local) else base_model, token=token).data
        if data.license:
            return {k: getattr(data, k) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}
    except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, ValueError):  # offline, gated, no card
        pass
    return {"license": KNOWN_LICENSES[base_model]} if base_model in KNOWN_LICENSES else {}


def loading_snippet(
    repo_id, base_model, placeholder_token, sdxl=False, prompt=None, ext=".safetensors", single_file=None
):
    """A complete Python block: load the base pipeline, then the embedding from repo_id (SDXL: one call per encoder,
    or with single_file=NAME from the {"clip_l", "clip_g"} file), then render the prompt. Literals go through
    json.dumps, which writes valid Python strings whatever the prompt holds."""
    q, cls = json.dumps, "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    imports = ["import torch", f"from diffusers import {cls}"]
    token = q(placeholder_token)
    if single_file:
        imports.append("from huggingface_hub import hf_hub_download")
        imports += [] if ext == ".bin" else ["from safetensors.torch import load_file"]
        path = f"hf_hub_download({q(repo_id)}, {q(single_file)})"
        load = [f"state = torch.load({path}, weights_only=True)" if ext == ".bin" else f"state = load_file({path})"]
        load += [
            f'pipe.load_textual_inversion(state["{key}"], token={token}, '
            f"text_encoder=pipe.{enc}, tokenizer=pipe.{TOKENIZERS[enc]})"
            for enc, key in SINGLE_FILE_KEYS.items()
        ]
    elif sdxl:
        load = [
            f'pipe.load_textual_inversion({q(repo_id)}, weight_name="{stem}{ext}", token={token}, '
            f"text_encoder=pipe.{enc}, tokenizer=pipe.{TOKENIZERS[enc]})"
            for enc, stem in FILE_STEMS.items()
        ]
    else:
        load = [f"pipe.load_textual_inversion({q(repo_id)})"]
    code = [
        *imports,
        "",
        f'pipe = {cls}.from_pretrained({q(base_model)}, dtype=torch.float16).to("cuda")',
        *load,
        f"image = pipe({q(prompt or f'a photo of {placeholder_token}')}).images[0]",
    ]
    return "```python\n" + "\n".join(code) + "\n```"


FAMILY_PIPELINES = {"sana": "SanaPipeline", "wan": "WanPipeline"}


def family_snippet(repo_id, base_model, placeholder_token, family, prompt=None):
    """SANA and Wan: a complete Python block that loads the base pipeline, downloads the repository and loads the
    embedding with this project's dti_files.load_textual_inversion (their pipelines have no loader), then renders the
    prompt with the token replaced by the word it returns (several vectors' tokens joined without spaces)."""
    q, cls = json.dumps, FAMILY_PIPELINES[family]
    prompt = q(prompt or f"a photo of {placeholder_token}")
    call = f"pipe({prompt}.replace({q(placeholder_token)}, word)"
    render = {
        "sana": f"image = {call}, complex_human_instruction=None).images[0]",
        "wan": f'image = {call}, num_frames=1, output_type="pil").frames[0][0]',
    }[family]
    code = [
        "import torch",
        f"from diffusers import {cls}",
        "from huggingface_hub import snapshot_download",
        "",
        "from dti_files import load_textual_inversion  # from the Directional Textual Inversion scripts",
        "",
        f'pipe = {cls}.from_pretrained({q(base_model)}, dtype=torch.bfloat16).to("cuda")',
        f"word = load_textual_inversion(pipe, snapshot_download({q(repo_id)}))",
        render,
    ]
    return "```python\n" + "\n".join(code) + "\n```"


def _card_sections(
    repo_id,
    *,
    base_model,
    token,
    initializer_token,
    embeddings,
    image_paths,
    output_dir,
    steps,
    validation_prompt,
    kappa,
    ext,
    license,
    family,
):
    dti, sdxl = embeddings[0].norm is not None, family == "sdxl"
    stem = embedding_slug(token, file_stem=True)
    local = os.path.exists(base_model)  # a folder on the training machine: named, never its absolute path
    shown = os.path.basename(os.path.normpath(base_model)) if local else base_model
    method = "Directional Textual Inversion (DTI)" if dti else "classic textual inversion (AdamW, free norm)"
    about = ""
    if dti:
        norms = ", ".join(f"{e.name}: {e.norm:.4f}" for e in embeddings)
        about = (
            f" DTI keeps each vector at a fixed in-distribution norm ({norms}) and learns its direction on the sphere "
            f"(kappa {kappa}), so the token keeps following the rest of the prompt. See "
            "[Directional Textual Inversion](https://arxiv.org/abs/2512.13672)."
        )
    images = "\n".join(f"![validation image {i}]({os.path.relpath(p, output_dir)})" for i, p in enumerate(image_paths))
    sections = [
        f"# `{token}`: {method} on {shown}",
        f"The token `{token}` ({len(embeddings[0].tokens)} vector(s), initialized from `{initializer_token}`) was "
        f"learned with {method} for {steps} steps.{about}",
        images or "No validation images were made (pass --validation_prompt).",
        "## Use it with diffusers",
    ]
    local_note = (
        [
            f"`{shown}` is the base model's folder on the machine that trained this embedding: put the base model's "
            "Hub id or your own copy's path in its place."
        ]
        if local
        else []
    )
    if family in FAMILY_PIPELINES:
        sections += [
            family_snippet(repo_id, shown, token, family, validation_prompt),
            *local_note,
            "AUTOMATIC1111, ComfyUI and kohya do not load textual-inversion embeddings for this model.",
        ]
        return sections + _license_note(shown, license)
    sections += [loading_snippet(repo_id, shown, token, sdxl, validation_prompt, ext), *local_note]
    if sdxl:
        sections += [
            f"Or from the single file `{stem}{ext}`, which holds both encoders' vectors:",
            loading_snippet(repo_id, shown, token, sdxl, validation_prompt, ext, single_file=stem + ext),
        ]
    where = "Put" if sdxl else f"Save `learned_embeds{ext}` as"
    ui = (
        f"{where} `{stem}{ext}` in the embeddings folder and write `{stem}` in the prompt (ComfyUI: "
        f"`embedding:{stem}`; kohya: `--textual_inversion_embeddings {stem}{ext}`)."
    )
    if sdxl:
        ui += f" Not `learned_embeds{ext}` or `learned_embeds_2{ext}`: each holds one text encoder's vectors only."
    sections += ["## AUTOMATIC1111, ComfyUI, kohya", ui]
    return sections + _license_note(shown, license)


def _license_note(base_model, license):
    if license:
        return []
    return [
        f"The license of the base model `{base_model}` could not be read, so this card says `other`: check it "
        "before use."
    ]


def _card_tail(*, token, embeddings, details):
    """What diffusers' card template leaves as TODOs: how to use (above), the limitations, the training details."""
    dti = embeddings[0].norm is not None
    limits = (
        "A textual-inversion token learns a concept from a few photos: it carries their lighting, backgrounds and "
        "any shared object along with the subject, and a concept far from the base model's training data is learned "
        "less well."
    )
    limits += (
        " DTI fixes the token's norm at the vocabulary's own scale, so it keeps following the rest of the prompt; a "
        "subject whose likeness needs more than the learned direction can show less detail than classic TI at its "
        "inflated norm."
        if dti
        else " Classic TI lets the token's norm grow out of distribution, which can drown the rest of a long prompt."
    )
    rows = ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in (details or {}).items()]
    training = "\n".join(rows) if details else f"`{token}` was trained on the concept's photos."
    return "\n\n".join(
        [
            "## Intended uses & limitations",
            "Use the snippets above.",
            "#### Limitations and bias",
            limits,
            "## Training details",
            training,
        ]
    )


def write_model_card(
    output_dir,
    repo_id,
    *,
    base_model,
    token,
    initializer_token,
    embeddings,
    image_paths,
    steps,
    validation_prompt=None,
    kappa=None,
    ext=".safetensors",
    license=None,
    hub_token=None,
    details=None,
    family="sd",
):
    """README.md in diffusers' conventions (load_or_create_model_card + populate_model_card): an existing card of
    repo_id is kept, with the tags added; a new one gets the base model's license, base_model (a Hub id only), the
    validation images, snippets for diffusers and for AUTOMATIC1111/ComfyUI/kohya, and in place of the template's
    TODOs the limitations and the training details (`details`: {setting: value}). family: "sd", "sdxl", "sana" or
    "wan"."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    license = license or {}
    hub_base = (
        None if os.path.exists(base_model) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base_model) else base_model
    )
    sections = _card_sections(
        repo_id,
        base_model=base_model,
        token=token,
        initializer_token=initializer_token,
        embeddings=embeddings,
        image_paths=image_paths,
        output_dir=output_dir,
        steps=steps,
        validation_prompt=validation_prompt,
        kappa=kappa,
        ext=ext,
        license=license,
        family=family,
    )
    card = load_or_create_model_card(
        repo_id,
        token=hub_token,
        from_training=True,
        model_description="\n\n".join(sections),
        base_model=hub_base,
        license=license.get("license", "other"),
        inference=True,
    )
    heading = "## Intended uses & limitations"
    if heading in card.text and "[TODO:" in card.text:  # a new card from diffusers' template: its TODOs filled in
        card.text = (
            card.text.split(heading)[0] + _card_tail(token=token, embeddings=embeddings, details=details) + "\n"
        )
    for key in ("license_name", "license_link"):  # the base's own terms, for a card that says `other`
        if card.data.license == "other" and key in license and getattr(card.data, key, None) is None:
            setattr(card.data, key, license[key])
    family_tags = {
        "sd": ["stable-diffusion", "stable-diffusion-diffusers"],
        "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
        "sana": ["sana"],
        "wan": ["wan", "text-to-video"],
    }[family]
    tags = ["text-to-image", "diffusers", "diffusers-training", *family_tags, "textual_inversion"]
    tags += ["directional-textual-inversion"] if embeddings[0].norm is not None else []
    populate_model_card(card, tags=[t for t in tags if t not in (card.data.tags or [])])
    return atomic_write(os.path.join(output_dir, "README.md"), card.save)


def push_output_to_hub(output_dir, repo_id, *, hub_token=None, push_checkpoints=False, **card):
    """Write the model card (write_model_card's keyword arguments in `card`) and upload the output folder: the
    embeddings, validation images and the card; checkpoints only with push_checkpoints."""
    from huggingface_hub import upload_folder

    base = card["base_model"]
    license = base_model_license(base, hub_token)
    write_model_card(output_dir, repo_id, hub_token=hub_token, license=license, **card)
    ignore = ["logs/*", "logs/**", ".tmp-*", "*/.tmp-*"]
    ignore += [] if push_checkpoints else ["checkpoint-*", "checkpoint-*/*"]
    try:
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message="Upload textual inversion embedding",
            ignore_patterns=ignore,
            token=hub_token,
        )
    except Exception as e:  # any failure of the upload (network, HTTP, token): the output on disk is complete
        raise DTIError(
            f"Upload to {repo_id} failed ({type(e).__name__}: {e}); the output in {output_dir} is complete. Retry "
            f"with: hf upload {repo_id} {output_dir} --exclude 'checkpoint-*/*' 'logs/*'"
        ) from e
    logger.info(f"Uploaded to https://huggingface.co/{repo_id}")
