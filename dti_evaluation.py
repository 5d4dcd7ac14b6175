"""What evaluate_dti.py renders and scores, and how: the protocols and the per-family generation table, prompt sets
and prompt files, the authors' subjects file, reference photos and their masks, embeddings and training runs.

Two protocols. "quick" is this project's: DPM-Solver++ in 30 steps, fp16 on a GPU, a CPU generator per image, and
the cosines of dti_metrics.SCORINGS["quick"]. "paper" is the authors' evaluation (kunheek/dti scripts/evaluate.py):
each family's pipeline with its own scheduler, steps and guidance (`FAMILIES`), bf16, a generator on the device per
image, seeds 0-3, and dti_metrics.SCORINGS["paper"]. Adding a family is one `Family` entry in FAMILIES: its pipeline
class, its text encoders, the pipeline defaults the authors generate with, and the call that loads an embedding.
"""

import functools
import json
import os
import re
from dataclasses import dataclass, field

import torch
from PIL import Image

import dti_data as data_lib
import dti_files as files
import dti_training as training
from dti_metrics import apply_mask
from dti_utils import DTIError, projx, resolve_token_scale, vocabulary_norm_stats


__all__ = [
    # protocols and model families
    "PROTOCOLS",
    "PAPER_SEEDS",
    "QUICK_STEPS",
    "Family",
    "FAMILIES",
    "generation_settings",
    "load_pipeline",
    "render",
    # prompt sets
    "QUICK_PROMPT_SETS",
    "LIVE_CLASSES",
    "is_live",
    "read_prompt_sets",
    "prompts_for",
    # subjects, reference photos, masks
    "read_subjects",
    "load_references",
    "mask_references",
    # embeddings and runs
    "STEPS_FILE",
    "CHECKPOINT_DIR",
    "base_norm_stats",
    "apply_checkpoint_norm",
    "load_embedding",
    "describe_method",
    "check_fits",
    "Run",
    "find_runs",
    "run_points",
]


# ----------------------------------------------------------------------------------------------------
# Protocols and model families
# ----------------------------------------------------------------------------------------------------

PROTOCOLS = ("quick", "paper")
PAPER_SEEDS = [0, 1, 2, 3]
QUICK_STEPS = 30


@dataclass(frozen=True)
class Family:
    """One model family of the evaluation.

    pipeline: the diffusers pipeline class name; encoders: the text encoders' attribute names in the order of the
    embedding's vectors (dti_files.ENCODERS); paper_call: the pipeline's own defaults that the authors' evaluation
    generates with (it passes none: steps, guidance, and for video models the size, num_frames=1 and
    output_type="pil"), written out so that metrics.json records them; pipeline_kwargs go to from_pretrained;
    every_call: arguments of every call, whatever the protocol; first_frame: the pipeline returns videos (`.frames`),
    of which the first frame is the image; quick_scheduler: the scheduler class of the quick protocol (None: the
    model's own); half: the half precision its text encoder runs in (Gemma and T5 overflow in fp16). Embeddings load
    with dti_files.load_concept (SD, SDXL: diffusers' load_textual_inversion; SANA, Wan: rows written into the
    table)."""

    pipeline: str
    encoders: tuple
    paper_call: dict
    pipeline_kwargs: dict = field(default_factory=dict)
    every_call: dict = field(default_factory=dict)
    first_frame: bool = False
    quick_scheduler: str = "DPMSolverMultistepScheduler"
    half: str = "fp16"


FAMILIES = {
    "sd": Family(
        pipeline="StableDiffusionPipeline",
        encoders=("text_encoder",),
        paper_call={"num_inference_steps": 50, "guidance_scale": 7.5},
        pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False},  # a blacked-out image is scored
    ),
    "sdxl": Family(
        pipeline="StableDiffusionXLPipeline",
        encoders=("text_encoder", "text_encoder_2"),
        paper_call={"num_inference_steps": 50, "guidance_scale": 5.0},
    ),
    # SANA and Wan: the authors publish no evaluation script for them; the protocol's rule (the pipeline's own
    # defaults) gives SanaPipeline's 20 steps, guidance 4.5 and complex human instruction, and WanPipeline's 50 steps,
    # guidance 5.0 and 480 x 832 size (one frame). clean_caption would strip the <token>.
    "sana": Family(
        pipeline="SanaPipeline",
        encoders=("text_encoder",),
        paper_call={"num_inference_steps": 20, "guidance_scale": 4.5},
        every_call={"clean_caption": False},
        quick_scheduler=None,
        half="bf16",
    ),
    "wan": Family(
        pipeline="WanPipeline",
        encoders=("text_encoder",),
        paper_call={"num_inference_steps": 50, "guidance_scale": 5.0, "height": 480, "width": 832},
        every_call={"num_frames": 1, "output_type": "pil"},
        first_frame=True,
        quick_scheduler=None,
        half="bf16",
    ),
}


def generation_settings(protocol, family, index, *, device, steps, guidance, resolution, precision, seeds):
    """(settings, call, deviations) of the generation: `settings` is what metrics.json and each image folder's
    settings.json record (a rerun with other settings is refused), `call` the pipeline's keyword arguments, and
    `deviations` one line for each flag that overrides the paper protocol. steps, guidance, resolution, precision:
    the flags (None: the protocol's)."""
    fam = FAMILIES[family]
    scheduler = (index.get("scheduler") or [None, None])[1]
    if protocol == "paper":
        paper = {
            **fam.paper_call,
            "mixed_precision": "bf16",
            "scheduler": scheduler,
            "seeds": PAPER_SEEDS,
        }
        call = dict(fam.paper_call)
        chosen = {
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "mixed_precision": precision,
            "seeds": seeds,
        }
        flags = {"seeds": "--seeds/--first_seed: seeds"}
        deviations = [
            f"{flags.get(k, '--' + k)} {v} (paper: {paper[k]})"
            for k, v in chosen.items()
            if v is not None and v != paper[k]
        ]
        call.update({k: chosen[k] for k in ("num_inference_steps", "guidance_scale") if chosen[k] is not None})
        precision = precision or "bf16"
        generator_device = device.type
    else:
        scheduler = fam.quick_scheduler or scheduler
        call = {"num_inference_steps": steps or QUICK_STEPS}
        if guidance is not None:
            call["guidance_scale"] = guidance
        precision = precision or (fam.half if device.type == "cuda" else "no")
        generator_device, deviations = "cpu", []
    call.update(fam.every_call)
    if resolution is not None:
        call.update(height=resolution, width=resolution)
        if protocol == "paper":
            deviations.append(f"--resolution {resolution} (paper: the pipeline's default size)")
    settings = {
        "protocol": protocol,
        "family": family,
        "pipeline": fam.pipeline,
        "scheduler": scheduler,
        "mixed_precision": precision,
        "generator_device": generator_device,
        **{k: call.get(k) for k in ("num_inference_steps", "guidance_scale", "height", "width")},
        "call": call,
    }
    return settings, call, deviations


def load_pipeline(family, *, model, revision, variant, cache_dir, settings, device):
    """The family's pipeline in the settings' dtype on `device`, with the quick protocol's scheduler swapped in."""
    import diffusers

    fam = FAMILIES[family]
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[settings["mixed_precision"]]
    pipe = getattr(diffusers, fam.pipeline).from_pretrained(
        model, revision=revision, variant=variant, cache_dir=cache_dir, dtype=dtype, **fam.pipeline_kwargs
    )
    if settings["scheduler"] and type(pipe.scheduler).__name__ != settings["scheduler"]:
        pipe.scheduler = getattr(diffusers, settings["scheduler"]).from_config(pipe.scheduler.config)
    pipe.to(device).set_progress_bar_config(disable=True)
    return pipe


def render(pipe, family, prompts, generators, call):
    """One image (PIL) per prompt, each from its own generator; the first frame of a video family's output."""
    output = pipe(prompts, generator=generators, **call)
    return [frames[0] for frames in output.frames] if FAMILIES[family].first_frame else output.images


# ----------------------------------------------------------------------------------------------------
# Prompt sets: this project's own, text files, JSON files of named sets (the authors' object / live lists)
# ----------------------------------------------------------------------------------------------------

QUICK_PROMPT_SETS = {
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

LIVE_CLASSES = ("cat", "dog")  # the authors' is_live: only these class words take the "live" prompts


def is_live(class_word):
    """The authors' rule: a subject whose class word is "cat" or "dog" gets a set's live prompts, any other its
    object prompts."""
    return class_word in LIVE_CLASSES


def _checked(prompts, where):
    """The prompts of one list, each a string with {} where the token goes, or one sentence naming the first bad
    one."""
    if not isinstance(prompts, list) or not prompts:
        raise DTIError(f"{where} is not a non-empty list of prompts; write a list of strings with {{}} for the token.")
    for i, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str) or "{}" not in prompt:
            raise DTIError(
                f"{where} prompt {i} has no {{}} where the token goes ({prompt!r}); write e.g. 'a photo of a {{}} on "
                "a beach'."
            )
    return list(prompts)


def _json_sets(path):
    """{name: {"object": [...], "live": [...]}} of a JSON file of named sets: each a list of prompts (the same for
    every subject) or {"object": [...], "live": [...]}, as the authors' prompt sets export."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DTIError(f"--prompts {path} cannot be read as JSON ({e}); write {{set name: [prompts]}}.") from e
    if not isinstance(content, dict) or not content:
        raise DTIError(
            f'--prompts {path} is not a JSON object of named sets; write {{"simple": [...], "complex_lv1": '
            '{"object": [...], "live": [...]}}.'
        )
    sets = {}
    for name, value in content.items():
        where = f"--prompts {path} set {name!r}"
        if isinstance(value, dict):
            if sorted(value) != ["live", "object"]:
                raise DTIError(f"{where} has keys {sorted(value)}; a set with two lists has exactly object and live.")
            sets[name] = {kind: _checked(value[kind], f"{where} {kind}") for kind in ("object", "live")}
        else:
            prompts = _checked(value, where)
            sets[name] = {"object": prompts, "live": prompts}
    return sets


def _text_set(path):
    """{stem: {"object": prompts, "live": prompts}} of a text file, one prompt a line (blank and # lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.strip()) for i, line in enumerate(f, 1)]
    except (OSError, UnicodeDecodeError) as e:
        raise DTIError(f"--prompts {path} cannot be read as UTF-8 text ({e}); write one prompt a line.") from e
    prompts = [(i, line) for i, line in lines if line and not line.startswith("#")]
    for i, line in prompts:
        if "{}" not in line:
            raise DTIError(
                f"--prompts {path} line {i} has no {{}} where the token goes ({line!r}); write e.g. 'a photo of a "
                "{} on a beach'."
            )
    if not prompts:
        raise DTIError(f"--prompts {path} holds no prompts; write one prompt a line with {{}} for the token.")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(path))[0])
    return {name: {"object": [line for _, line in prompts], "live": [line for _, line in prompts]}}


def read_prompt_sets(specs, choose=None):
    """{set name: {"object": [prompts], "live": [prompts]}} from built-in names (QUICK_PROMPT_SETS), text files (one
    prompt a line; the set is named after the file) and JSON files of named sets; `choose` keeps these set names, in
    this order."""
    sets = {}
    for spec in specs:
        if spec in QUICK_PROMPT_SETS:
            found = {spec: {"object": list(QUICK_PROMPT_SETS[spec]), "live": list(QUICK_PROMPT_SETS[spec])}}
        elif os.path.isfile(spec):
            found = _json_sets(spec) if spec.lower().endswith(".json") else _text_set(spec)
        else:
            raise DTIError(
                f"--prompts {spec!r} is neither a built-in set ({', '.join(QUICK_PROMPT_SETS)}) nor a file; pass one "
                "of those, or a text or JSON file."
            )
        for name in found:
            if name in sets:
                raise DTIError(
                    f"--prompts names the set {name!r} twice; pass each set once (rename one of the files)."
                )
        sets.update(found)
    if choose:
        missing = [name for name in choose if name not in sets]
        if missing:
            raise DTIError(
                f"--prompt_sets {', '.join(missing)}: not in --prompts (which hold {', '.join(sets)}); pass names of "
                "those sets."
            )
        sets = {name: sets[name] for name in choose}
    return sets


def prompts_for(prompt_set, class_word):
    """The prompts of one set for a subject: the live list for cats and dogs, the object list otherwise."""
    return prompt_set["live" if is_live(class_word) else "object"]


# ----------------------------------------------------------------------------------------------------
# Subjects (the authors' data/dreambooth.json), reference photos and their masks
# ----------------------------------------------------------------------------------------------------


def _subject_folder(path, subjects_file, name):
    """A subject's image folder: as written, else beside the subjects file, else one level up (the authors'
    data/dreambooth.json names data/dreambooth/<subject> from their repository's root)."""
    here = os.path.dirname(os.path.abspath(subjects_file))
    for folder in (path, os.path.join(here, path), os.path.join(os.path.dirname(here), path)):
        if os.path.isdir(folder):
            return folder
    raise DTIError(
        f"--subjects {subjects_file}: subject {name!r} has path {path!r}, which is not a folder here nor beside the "
        "file; put its photos there or fix the path."
    )


def read_subjects(path):
    """{subject: {"class": class word, "path": folder of its photos, "initialization": initializer}} of the authors'
    subjects file ({subject: {"path", "class", "initialization", "template", "images"?}}; template and images unused,
    as in their evaluation, which reads every image of the folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DTIError(
            f"--subjects {path} cannot be read as JSON ({e}); pass the authors' data/dreambooth.json."
        ) from e
    if not isinstance(content, dict) or not content:
        raise DTIError(f"--subjects {path} is not a JSON object of subjects; pass the authors' data/dreambooth.json.")
    subjects = {}
    for name, entry in content.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry.get("class"):
            raise DTIError(
                f'--subjects {path}: subject {name!r} has no "path" and "class"; each subject needs its image '
                "folder and class word."
            )
        subjects[name] = {
            "class": str(entry["class"]),
            "path": _subject_folder(entry["path"], path, name),
            "initialization": entry.get("initialization"),
        }
    return subjects


def load_references(paths, flag="--reference_images"):
    """The reference photos as [(file path, PIL RGB)], from folders and image files, decoded as the training scripts
    decode them (EXIF orientation applied)."""
    references = []
    for path in paths:
        if os.path.isdir(path):
            if not any(
                n.lower().endswith(data_lib.IMAGE_EXTENSIONS) and not n.startswith(".") for n in os.listdir(path)
            ):
                raise DTIError(
                    f"{flag} {path} holds no images ({', '.join(data_lib.IMAGE_EXTENSIONS)}); pass the folder of the "
                    "concept's photos."
                )
            references += [(im.name, im.image) for im in data_lib.load_training_images(path)]
        elif os.path.isfile(path) and path.lower().endswith(data_lib.IMAGE_EXTENSIONS):
            with Image.open(path) as image:
                references.append((path, data_lib.to_rgb(image, path)))
        else:
            raise DTIError(
                f"{flag} {path} is neither a folder nor an image file; pass the concept's photos (the training "
                "images)."
            )
    return references


def mask_references(references, mask_dir):
    """The references with their background zeroed by their masks (dti_metrics.apply_mask): the mask of photo
    NAME.jpg is mask_dir/NAME.png, an image of the photo's size (white: the subject; black: background)."""
    masked = []
    for path, image in references:
        mask_path = os.path.join(mask_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        if not os.path.isfile(mask_path):
            raise DTIError(
                f"--reference_masks: no mask {mask_path} for the reference image {path}; add one (same name, .png) "
                "for every reference image."
            )
        try:
            with Image.open(mask_path) as mask:
                mask.load()
                if mask.size != image.size:
                    raise DTIError(
                        f"--reference_masks: mask {mask_path} is {mask.width}x{mask.height} but {path} is "
                        f"{image.width}x{image.height}; make the mask the size of its image."
                    )
                masked.append((path, apply_mask(image, mask)))
        except OSError as e:
            raise DTIError(f"--reference_masks: mask {mask_path} cannot be read ({e}); replace it.") from e
    return masked


# ----------------------------------------------------------------------------------------------------
# Embeddings: files, folders, checkpoints; training runs and their checkpoints
# ----------------------------------------------------------------------------------------------------

STEPS_FILE = re.compile(r"learned_embeds-steps-(\d+)(\.\w+)$")
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)$")


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
        if os.path.isfile(second) and not concept.sdxl:  # an SDXL snapshot: text_encoder_2's vectors are beside it
            concept = files.join_encoders(path, concept, path, second)
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


def check_fits(concept, path, *, model, family, widths):
    """The embedding has vectors for the family's text encoders, of their widths, or one sentence."""
    names = FAMILIES[family].encoders
    if sorted(concept.vectors) != sorted(names) or concept.family not in (None, family):
        kind = files.FAMILIES[concept.family or "sd"]
        raise DTIError(
            f"--embeddings {path} is an embedding for {kind} but --model {model} is {FAMILIES[family].pipeline}; pass "
            "the base model it was trained on."
        )
    for name, vectors in concept.vectors.items():
        if vectors.shape[1] != widths[name]:
            raise DTIError(
                f"--embeddings {path} holds {vectors.shape[1]}-dim vectors for {name} but --model {model} has "
                f"{widths[name]}-dim token embeddings; pass the base model it was trained on."
            )


@dataclass(frozen=True)
class Run:
    """A training output folder: its method (the folder that holds it, e.g. dti-sdxl) and its subject (its name)."""

    path: str
    method: str
    subject: str


def _is_run(folder):
    return any(n.startswith("learned_embeds") for n in os.listdir(folder))


def find_runs(dirs):
    """The training runs of --runs: each folder is a run (it holds learned_embeds files) or holds runs, one folder
    per subject (the authors' outputs/<method>/<subject>/ layout). A run's method is its parent folder's name."""
    runs = []
    for folder in dirs:
        if not os.path.isdir(folder):
            raise DTIError(f"--runs {folder} is not a folder; pass training output folders or folders of them.")
        folder = os.path.abspath(folder)
        found = [folder] if _is_run(folder) else []
        found = found or [
            os.path.join(folder, n)
            for n in sorted(os.listdir(folder))
            if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)) and _is_run(os.path.join(folder, n))
        ]
        if not found:
            raise DTIError(
                f"--runs {folder} holds no learned_embeds files, nor folders that do; pass training output folders "
                "(--output_dir of the training scripts) or a folder of them."
            )
        runs += [Run(path, os.path.basename(os.path.dirname(path)), os.path.basename(path)) for path in found]
    seen = {}
    for run in runs:
        if (run.method, run.subject) in seen:
            raise DTIError(
                f"--runs: {run.path} and {seen[run.method, run.subject]} are both method {run.method!r} on subject "
                f"{run.subject!r}; pass each run once."
            )
        seen[run.method, run.subject] = run.path
    return runs


def run_points(run, sweep):
    """[(step, path)] to evaluate of a run: with `sweep` N, its learned_embeds-steps-M files with M a multiple of N;
    without, its final embedding (step None)."""
    if not sweep:
        return [(None, run.path)]
    points = {}
    for name in sorted(os.listdir(run.path), key=lambda n: not n.endswith(".safetensors")):  # .safetensors first
        m = STEPS_FILE.match(name)
        if m and int(m.group(1)) % sweep == 0:
            points.setdefault(int(m.group(1)), os.path.join(run.path, name))
    if not points:
        raise DTIError(
            f"--runs {run.path} has no learned_embeds-steps-N file with N a multiple of --sweep {sweep}; pass a "
            f"--sweep that its --save_steps divides, or train with --save_steps {sweep}."
        )
    return sorted(points.items())
