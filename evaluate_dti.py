#!/usr/bin/env python
r"""Is DTI better on my concept? Generate and score images of embeddings with the same prompts and seeds.

One concept, any embeddings (training outputs, files, checkpoint-N folders, learned_embeds-steps-N files):

    python evaluate_dti.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --embeddings toy-dti toy-ti toy-ti-rescaled --reference_images ./toy \
        --class_word toy --prompts complex --output_dir eval-toy

Many subjects and checkpoints, the authors' way (their subjects file, masks and prompt sets exported to JSON):

    python evaluate_dti.py --protocol paper --model stabilityai/stable-diffusion-xl-base-1.0 \
        --runs outputs/dti-sdxl outputs/ti-sdxl --sweep 50 --subjects data/dreambooth.json \
        --reference_masks data/dreambooth_mask --prompts dti_prompt_sets.json --prompt_sets simple \
        --output_dir eval-dreambooth

--protocol quick (the default), this project's own quick look; it is not the paper's evaluation:
- generation: DPM-Solver++ in 30 steps (--num_inference_steps), the pipeline's guidance, fp16 on a GPU (float32 on a
  CPU), one CPU generator per image, seeds 0-3 (--seeds 4);
- text fidelity: cosine similarity between the image and its prompt with the token replaced by the class word, by CLIP
  ViT-L/14 (text_clip) and by SigLIP so400m (text_siglip): each encoder's projected image and text embeddings;
- subject fidelity: mean cosine similarity between the image and each reference photo, by DINOv2 base (subject_dino:
  the CLS token after the final layer norm) and by CLIP ViT-L/14 (subject_clip: projected image embeddings);
- prompts: this project's sets (simple, complex, style; 20 prompts each) or --prompts files.

--protocol paper, the evaluation of the DTI paper (arXiv 2512.13672) as the authors' code (kunheek/dti,
scripts/evaluate.py) runs it:
- generation: the pipeline's own scheduler, steps and guidance (SD: 50 steps, 7.5; SDXL: 50, 5.0), its default size,
  bf16, one generator on the device per image, seeds 0-3; a flag given explicitly overrides one and the report says so;
- text fidelity (text_siglip): SigLIP base patch16-512's probability sigmoid(exp(logit_scale) * cos + logit_bias) of
  the prompt with the class word in the token's place and a trailing full stop ("a dog in the jungle."), 64 tokens;
- subject fidelity: DINOv2 base (subject_dino) and CLIP ViT-B/32 image-image (subject_clip, which the authors' code
  defines but does not report) against the reference photos, masked with --reference_masks when given;
- prompts: the authors' sets, which this project does not ship: --prompts FILE.json as the README exports them; a
  subject whose class word is cat or dog gets a set's live prompts, any other its object prompts.

Outputs in --output_dir: metrics.json (the protocol, the models and every setting; every image's scores), metrics.csv,
report.md and report.html (the same tables, pictures and grids; the page opens in a browser), fidelity.png (text
against subject fidelity) and image grids. With --runs, also table.csv and the report's tables: per prompt set, method
and step, the mean over subjects with its standard error; curve.png: each metric over the steps of --sweep. Images are
kept under images/ and are not made again by a rerun.
"""

import argparse
import hashlib
import json
import logging
import os
import re
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

import dti_cli as cli
import dti_data as data_lib
import dti_evaluation as ev
import dti_files as files
import dti_report as report
import dti_training as training
from dti_metrics import SCORINGS, FidelityScorer, batches, encoder_ids, labelled_grid, scoring_text, summary
from dti_utils import DTIError


logger = logging.getLogger("dti.evaluate")

ENCODER_NAMES = ("clip", "siglip", "dino")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--protocol",
        choices=ev.PROTOCOLS,
        default="quick",
        help="quick (default): this project's quick look (DPM-Solver++ 30 steps, cosine scores of CLIP-L, SigLIP "
        "so400m and DINOv2). paper: the authors' evaluation (the pipeline's own scheduler, steps and guidance, bf16, "
        "SigLIP base patch16-512's sigmoid score with a full stop, DINOv2 on masked references); it needs the "
        "authors' prompt sets as --prompts FILE.json.",
    )
    parser.add_argument(
        "--model",
        "--pretrained_model_name_or_path",
        dest="model",
        required=True,
        help="The base pipeline the embeddings were trained on (folder or Hub id): "
        f"{', '.join(f.pipeline for f in ev.FAMILIES.values())}, read from its model_index.json.",
    )
    parser.add_argument("--revision", default=None, help="Revision of --model on the Hub.")
    parser.add_argument("--variant", default=None, help="Variant of --model's weight files, e.g. fp16.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--embeddings",
        nargs="+",
        help="One concept: training output folders, embedding files in any form the concept tools read, "
        "checkpoint-N folders or learned_embeds-steps-N files.",
    )
    what.add_argument(
        "--runs",
        nargs="+",
        help="Many subjects and methods: training output folders (one per subject and method; the folder's name is "
        "the subject, its parent's the method), or folders of them (outputs/<method>/<subject>/).",
    )
    parser.add_argument(
        "--sweep",
        type=cli.positive_int,
        default=None,
        help="With --runs: evaluate each run's learned_embeds-steps-N files for N a multiple of this (the authors: "
        "50 for SDXL, 100 for SANA and Wan). Default: each run's final embedding.",
    )
    parser.add_argument(
        "--subjects",
        default=None,
        help="With --runs: the authors' subjects file (data/dreambooth.json: per subject its image folder, class word "
        "and initializer). Without it, the class word is --class_word or each run's initializer and the photos are "
        "--reference_images (one subject).",
    )
    parser.add_argument(
        "--labels", nargs="+", default=None, help="A name for each of --embeddings in the outputs (default: its path)."
    )
    parser.add_argument(
        "--reference_images",
        nargs="+",
        default=None,
        help="The concept's photos (folders or image files): subject fidelity compares with them.",
    )
    parser.add_argument(
        "--reference_masks",
        default=None,
        help="Folder of one mask per reference photo, by file name (NAME.jpg: NAME.png, the photo's size; with "
        "--subjects, <subject>/NAME.png as the authors' data/dreambooth_mask). The photo is multiplied by mask / 255 "
        "before scoring, zeroing the background (DINOv2 and CLIP subject scores).",
    )
    parser.add_argument(
        "--class_word",
        default=None,
        help="What the token stands for, e.g. 'toy': text fidelity scores the prompt with this word in the token's "
        "place (required with --embeddings; cat or dog selects the live prompts of a JSON set).",
    )
    parser.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        help=f"Prompt sets: {', '.join(ev.QUICK_PROMPT_SETS)} (this project's, about 20 prompts each), text files "
        'with one prompt a line and {} for the token, or JSON files of named sets ({"simple": [...], "complex_lv1": '
        '{"object": [...], "live": [...]}}). Default: simple complex (quick); the paper protocol needs the '
        "authors' sets in a JSON file (see the README).",
    )
    parser.add_argument(
        "--prompt_sets", nargs="+", default=None, help="Keep only these sets of --prompts (default: all of them)."
    )
    parser.add_argument(
        "--seeds",
        type=cli.positive_int,
        default=None,
        help="Images per prompt, seeds --first_seed, --first_seed + 1, ... (default 4: seeds 0-3, as the paper); the "
        "same for every embedding.",
    )
    parser.add_argument("--first_seed", type=int, default=0, help="The first seed.")
    parser.add_argument(
        "--num_inference_steps",
        type=cli.positive_int,
        default=None,
        help=f"Denoising steps (default: quick {ev.QUICK_STEPS} with DPM-Solver++; paper the pipeline's own).",
    )
    parser.add_argument(
        "--guidance_scale",
        type=cli.finite_float,
        default=None,
        help="Classifier-free guidance (default: the pipeline's, 7.5 SD, 5 SDXL).",
    )
    parser.add_argument(
        "--resolution", type=cli.positive_int, default=None, help="Image size in pixels (default: the pipeline's)."
    )
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=4, help="Images per pipeline call and per encoder batch."
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Dtype of the pipeline (default: quick fp16 on a GPU, no on a CPU; paper bf16). The encoders score in "
        "float32.",
    )
    for name in ENCODER_NAMES:
        parser.add_argument(
            f"--{name}_model",
            default=None,
            help=f"Hub id or folder of the {name} encoder (default: quick {SCORINGS['quick'].encoders[name]}, paper "
            f"{SCORINGS['paper'].encoders[name]}); none skips its metrics.",
        )
    parser.add_argument(
        "--grid_size", type=cli.positive_int, default=256, help="Side of each image in the grids, in pixels."
    )
    parser.add_argument(
        "--output_dir", default="dti-evaluation", help="Where images, metrics, reports and pictures go."
    )
    parser.add_argument("--cache_dir", default=None, help="Where downloaded models are cached.")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# What to evaluate: subjects and the embeddings of each (--embeddings: one concept; --runs: many)
# ----------------------------------------------------------------------------------------------------


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text).strip("_") or "embedding"


def _entry(concept, path, *, label, slug, run, subject, step, method):
    kind = ev.describe_method(concept.metadata.get("text_encoder", {}))
    return SimpleNamespace(
        path=path,
        concept=concept,
        label=label,
        slug=slug,
        run=run,
        subject=subject,
        step=step,
        kind=kind,
        method=method or kind,
    )


def embedding_entries(args):
    """({"concept": subject}, entries) of --embeddings: one subject, the photos of --reference_images."""
    if args.class_word is None or args.reference_images is None:
        raise DTIError("--embeddings needs --class_word and --reference_images (what the token is, and its photos).")
    if args.labels is not None and len(args.labels) != len(args.embeddings):
        raise DTIError(
            f"--labels has {len(args.labels)} name(s) for {len(args.embeddings)} --embeddings; give one per embedding "
            "or none."
        )
    subject = {
        "class": args.class_word,
        "references": args.reference_images,
        "masks": args.reference_masks,
        "flag": "--reference_images",
    }
    entries, slugs = [], set()
    for i, path in enumerate(args.embeddings):
        concept, label, run = ev.load_embedding(path)
        label = args.labels[i] if args.labels else label
        slug, k = _slug(label), 2
        while slug in slugs:
            slug, k = f"{_slug(label)}-{k}", k + 1
        slugs.add(slug)
        entries.append(
            _entry(
                concept,
                path,
                label=label if slug == _slug(label) else slug,
                slug=slug,
                run=run,
                subject="concept",
                step=run[1] if run else None,
                method=None,
            )
        )
    return {"concept": subject}, entries


def run_entries(args):
    """(subjects, entries) of --runs: every run's points of the sweep, its subject from --subjects (photos, class
    word) or from --reference_images and --class_word or the run's initializer."""
    runs = ev.find_runs(args.runs)
    known = ev.read_subjects(args.subjects) if args.subjects else None
    names = sorted({run.subject for run in runs})
    if known is None and args.reference_images is None:
        raise DTIError("--runs needs --subjects FILE (each subject's photos and class word) or --reference_images.")
    if known is None and len(names) > 1:
        raise DTIError(
            f"--runs holds {len(names)} subjects ({', '.join(names[:5])}) but one --reference_images; pass --subjects "
            "FILE naming each subject's photos and class word."
        )
    subjects, entries = {}, []
    for run in runs:
        points = [(step, path, *ev.load_embedding(path)) for step, path in ev.run_points(run, args.sweep)]
        if known is not None:
            if run.subject not in known:
                raise DTIError(
                    f"--runs {run.path}: subject {run.subject!r} (the folder's name) is not in --subjects "
                    f"{args.subjects}; name the run's folder after its subject."
                )
            subject = {
                "class": known[run.subject]["class"],
                "references": [known[run.subject]["path"]],
                "masks": args.reference_masks and os.path.join(args.reference_masks, run.subject),
                "flag": f"--subjects {args.subjects}: subject {run.subject!r}:",
            }
        else:
            class_word = args.class_word or points[0][2].metadata.get("text_encoder", {}).get("initializer_token")
            if not class_word:
                raise DTIError(
                    f"--runs {run.path}: its embedding names no initializer to read the class word from; pass "
                    "--class_word."
                )
            subject = {
                "class": class_word,
                "references": args.reference_images,
                "masks": args.reference_masks,
                "flag": "--reference_images",
            }
        if subjects.setdefault(run.subject, subject)["class"] != subject["class"]:
            raise DTIError(
                f"--runs: the runs of subject {run.subject!r} were initialized from different words "
                f"({subjects[run.subject]['class']!r}, {subject['class']!r}); pass --class_word or --subjects."
            )
        for step, path, concept, _, point in points:
            step = step if step is not None else (point[1] if point else None)
            where = f"{_slug(run.method)}/{_slug(run.subject)}/{'final' if args.sweep is None else step}"
            label = f"{run.method}/{run.subject}@{step if step is not None else 'final'}"
            entries.append(
                _entry(
                    concept,
                    path,
                    label=label,
                    slug=where,
                    run=(run.method, step),
                    subject=run.subject,
                    step=step,
                    method=run.method,
                )
            )
    return subjects, entries


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------


def _encoder_widths(args, family):
    from transformers import AutoConfig

    try:  # the text encoders' widths from their configs: an embedding for another model fails before any weights load
        return {
            n: AutoConfig.from_pretrained(
                args.model, subfolder=n, revision=args.revision, cache_dir=args.cache_dir
            ).hidden_size
            for n in ev.FAMILIES[family].encoders
        }
    except (OSError, ValueError) as e:
        raise DTIError(
            f"--model {args.model}: the text encoder's config could not be read ({type(e).__name__}); pass a complete "
            "diffusers pipeline."
        ) from e


def _references(subjects):
    """{subject: [PIL images]}: the photos, masked when the subject has a mask folder."""
    loaded = {}
    for name, subject in subjects.items():
        references = ev.load_references(subject["references"], flag=subject["flag"])
        if subject["masks"]:
            references = ev.mask_references(references, subject["masks"])
        subject["reference_files"] = [os.path.abspath(p) for p, _ in references]
        loaded[name] = [image for _, image in references]
    return loaded


def generate(pending, entries, *, args, family, settings, call, device, prompt_of):
    """Render every pending image: one pipeline, every embedding under its own token, one generator per image."""
    from diffusers.training_utils import free_memory

    pipe = ev.load_pipeline(
        family,
        model=args.model,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        settings=settings,
        device=device,
    )
    progress = tqdm(total=len(pending), desc="Generating", unit="image")
    for i, e in enumerate(entries):
        mine = [job for job in pending if job[0] is e]
        if not mine:
            continue
        token = f"<dti-eval-{i}>"
        word = files.load_concept(pipe, e.concept, token=token)  # SANA/Wan: the tokens joined
        files.write_text(e.settings_path, json.dumps(e.settings, indent=2))
        for batch in batches(mine, args.batch_size):
            prompts = [prompt_of(job).replace("{}", word) for job in batch]
            generators = [torch.Generator(settings["generator_device"]).manual_seed(job[3]) for job in batch]
            for (*_, path), image in zip(batch, ev.render(pipe, family, prompts, generators, call)):
                files.atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            progress.update(len(batch))
    progress.close()
    del pipe
    free_memory()


def main(args):
    """Generate what is missing, score everything, write the outputs. Returns a namespace with `generated` (images made
    by this call), `result` (the metrics.json content), `files` and `exit_code`."""
    training.quiet_library_notices()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )

    # -- Checks that need no model: everything a typo can break fails here, in seconds, before anything is written --
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise DTIError(f"--output_dir {args.output_dir} is a file; pass a folder (it is made if missing).")
    index = cli.check_model(args.model, None, args.revision, args.cache_dir, flag="--model")
    family = cli.model_family(index)
    paper = args.protocol == "paper"
    if args.runs is None and (args.sweep or args.subjects):
        raise DTIError("--sweep and --subjects go with --runs (training output folders); pass --runs.")
    if args.runs is not None and args.labels is not None:
        raise DTIError("--labels goes with --embeddings; with --runs the labels are the runs' method and subject.")
    if args.prompts is None and paper:
        raise DTIError(
            "--protocol paper scores the authors' prompt sets, which this project does not ship: export them to a "
            "JSON file as the README shows and pass --prompts FILE.json (or this project's, e.g. --prompts simple)."
        )
    prompt_sets = ev.read_prompt_sets(args.prompts or ["simple", "complex"], args.prompt_sets)
    if args.reference_masks is not None and not os.path.isdir(args.reference_masks):
        raise DTIError(f"--reference_masks {args.reference_masks} is not a folder; pass the folder of the masks.")
    subjects, entries = run_entries(args) if args.runs else embedding_entries(args)
    references = _references(subjects)
    scoring = SCORINGS[args.protocol]
    encoder_model_ids = encoder_ids(
        [f"{name}={getattr(args, f'{name}_model')}" for name in ENCODER_NAMES if getattr(args, f"{name}_model")],
        flag="--clip_model/--siglip_model/--dino_model",
        defaults=scoring.encoders,
    )
    if not any(encoder_model_ids.values()):
        raise DTIError("--clip_model, --siglip_model and --dino_model are all none; keep at least one to score with.")
    widths = _encoder_widths(args, family)
    for e in entries:
        ev.check_fits(e.concept, e.path, model=args.model, family=family, widths=widths)
        ev.apply_checkpoint_norm(e.concept, args.model)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or len(ev.PAPER_SEEDS))))
    settings, call, deviations = ev.generation_settings(
        args.protocol,
        family,
        index,
        device=device,
        steps=args.num_inference_steps,
        guidance=args.guidance_scale,
        resolution=args.resolution,
        precision=args.mixed_precision,
        seeds=seeds,
    )
    settings = {"model": args.model, "revision": args.revision, "variant": args.variant, **settings}
    names = ev.FAMILIES[family].encoders
    jobs = []  # (entry, set name, prompt index, seed, path) of every image
    for e in entries:
        e.class_word = subjects[e.subject]["class"]
        folder = os.path.join(args.output_dir, "images", *e.slug.split("/"))
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
        e.prompts = {name: ev.prompts_for(s, e.class_word) for name, s in prompt_sets.items()}
        for set_name, prompts in e.prompts.items():
            for j, prompt in enumerate(prompts):
                key = hashlib.sha1(prompt.encode()).hexdigest()[:8]
                for seed in seeds:
                    jobs.append(
                        (e, set_name, j, seed, os.path.join(folder, set_name, f"{j + 1:02d}-{key}-seed{seed}.png"))
                    )
    pending = [job for job in jobs if not os.path.isfile(job[4])]
    scorer = FidelityScorer(
        encoder_model_ids, device=device, cache_dir=args.cache_dir, batch_size=args.batch_size, scoring=args.protocol
    )  # processors only, for now
    logger.info(
        f"{args.protocol} protocol: {len(entries)} embedding(s) of {len(subjects)} subject(s), {len(seeds)} seed(s): "
        f"{len(jobs)} images, {len(jobs) - len(pending)} already in {args.output_dir}, {len(pending)} to make on "
        f"{device} ({settings['mixed_precision']})"
    )
    for line in deviations:
        logger.warning(f"Not the paper protocol: {line}")

    def prompt_of(job):
        return job[0].prompts[job[1]][job[2]]

    # -- 1. Generate what is missing --
    if pending:
        generate(
            pending,
            entries,
            args=args,
            family=family,
            settings=settings,
            call=call,
            device=device,
            prompt_of=prompt_of,
        )

    # -- 2. Score every image: the encoders load once; each subject's reference photos are encoded once --
    scores = {}
    progress = tqdm(total=len(jobs), desc="Scoring", unit="image")
    for name in subjects:
        reference = scorer.reference_features(references[name])
        for batch in batches([job for job in jobs if job[0].subject == name], args.batch_size):
            texts = [scoring_text(prompt_of(job), job[0].class_word, scoring.full_stop) for job in batch]
            batch_scores = scorer.score([data_lib.open_rgb(job[4]) for job in batch], texts, reference)
            for k, job in enumerate(batch):
                scores[job[4]] = {m: float(v[k]) for m, v in batch_scores.items()}
            progress.update(len(batch))
    progress.close()

    # -- 3. Aggregate and write --
    result = aggregate(
        jobs,
        scores,
        entries=entries,
        args=args,
        settings=settings,
        deviations=deviations,
        seeds=seeds,
        subjects=subjects,
        prompt_sets=prompt_sets,
        metrics={
            m: {"model": encoder_model_ids[scoring.metrics[m][0]], "description": scoring.metrics[m][1]}
            for m in scorer.metrics
        },
        family=family,
    )
    written = write_outputs(result, jobs, entries=entries, out=args.output_dir, grid_size=args.grid_size)
    for e in result["embeddings"]:
        logger.info(f"{e['label']}: " + ", ".join(f"{m} {report.fmt(s)}" for m, s in e["all"]["scores"].items()))
    logger.info(f"Wrote {', '.join(written)}")
    return SimpleNamespace(generated=len(pending), result=result, files=written, exit_code=0)


def aggregate(jobs, scores, *, entries, args, settings, deviations, seeds, subjects, prompt_sets, metrics, family):
    """metrics.json's content: the settings, and per embedding, prompt set and prompt the mean and standard error of
    its images' scores (every image's scores too); with --runs, the table over subjects."""
    names = ev.FAMILIES[family].encoders

    def group(paths):
        return {"n": len(paths), "scores": {m: summary([scores[p][m] for p in paths]) for m in metrics}}

    first = data_lib.open_rgb(jobs[0][4])
    result = {
        "mode": "runs" if args.runs else "embeddings",
        "protocol": args.protocol,
        "model": args.model,
        "family": family,
        "generation": {**settings, "image_size": list(first.size)},
        "scoring": {**SCORINGS[args.protocol].describe(), "batch_size": args.batch_size},
        "deviations": deviations,
        "seeds": seeds,
        "prompt_sets": prompt_sets,
        "metrics": metrics,
        "subjects": {
            name: {
                "class": s["class"],
                "live": ev.is_live(s["class"]),
                "references": s["reference_files"],
                "masks": os.path.abspath(s["masks"]) if s["masks"] else None,
            }
            for name, s in subjects.items()
        },
        "embeddings": [],
    }
    if not args.runs:
        concept = result["subjects"]["concept"]
        result.update(
            class_word=concept["class"],
            reference_images=[os.path.abspath(p) for p in args.reference_images],
            num_reference_images=len(concept["references"]),
            reference_masks=concept["masks"],
        )
    for e in entries:
        mine = [job for job in jobs if job[0] is e]
        item = {
            "label": e.label,
            "source": os.path.abspath(e.path),
            "run": list(e.run) if e.run else None,
            "method": e.method,
            "kind": e.kind,
            "subject": e.subject,
            "step": e.step,
            "class_word": e.class_word,
            "norm": {n: float(e.concept.vectors[n].float().norm(dim=-1).mean()) for n in names},
            "vocabulary_mean_norm": {n: ev.base_norm_stats(args.model, n)["mean"] for n in names},
            "all": group([job[4] for job in mine]),
            "sets": {},
        }
        for set_name, prompts in e.prompts.items():
            in_set = [job for job in mine if job[1] == set_name]
            item["sets"][set_name] = {**group([job[4] for job in in_set]), "prompts": []}
            for j, prompt in enumerate(prompts):
                paths = [job[4] for job in in_set if job[2] == j]
                item["sets"][set_name]["prompts"].append(
                    {
                        "index": j + 1,
                        "prompt": prompt,
                        "text": scoring_text(prompt, e.class_word, SCORINGS[args.protocol].full_stop),
                        **group(paths),
                        "images": [
                            {"seed": s, "path": os.path.relpath(p, args.output_dir), **scores[p]}
                            for s, p in zip(seeds, paths)
                        ],
                    }
                )
        result["embeddings"].append(item)
    if args.runs:
        result["table"] = report.subject_table(result["embeddings"], list(metrics))
    return result


def _grid(out, name, rows, *, row_labels, size):
    """A labelled grid of images (rows of files) as out/name; the images' own size if smaller than `size`."""
    images = [[data_lib.open_rgb(p) for p in row] for row in rows]
    grid = labelled_grid(
        images,
        row_labels=row_labels,
        column_labels=[str(j + 1) for j in range(len(rows[0]))],
        size=min(size, images[0][0].width),
    )
    path = os.path.join(out, *name.split("/"))
    files.atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return name


def write_outputs(result, jobs, *, entries, out, grid_size):
    """metrics.json, the CSVs, the grids (first seed), fidelity.png (and curve.png with --runs), report.md and
    report.html; returns the paths written."""
    written = [os.path.join(out, "metrics.json"), os.path.join(out, "metrics.csv")]
    files.write_text(written[0], json.dumps(result, indent=2))
    report.write_csv(result, written[1])
    seed, pictures = result["seeds"][0], []

    def first_seed(e, set_name):
        return [job[4] for job in jobs if job[0] is e and job[1] == set_name and job[3] == seed]

    metric_ids = {m: info["model"] for m, info in result["metrics"].items()}
    if result["mode"] == "runs":
        written.append(os.path.join(out, "table.csv"))
        report.write_table_csv(result, written[-1])
        for subject in result["subjects"]:
            last = {}
            for e in entries:  # each method's last step
                if e.subject == subject and (e.method not in last or (e.step or 0) > (last[e.method].step or 0)):
                    last[e.method] = e
            for set_name in result["prompt_sets"]:
                rows = [first_seed(e, set_name) for e in last.values()]
                labels = [f"{e.method}@{e.step}" if e.step is not None else e.method for e in last.values()]
                name = f"grids/{_slug(subject)}--{set_name}.png"
                pictures.append(_grid(out, name, rows, row_labels=labels, size=grid_size))
        if report.plot_curves(result["table"], metric_ids, os.path.join(out, "curve.png")):
            pictures.append("curve.png")
        points = report.table_points(result["table"])
    else:
        for set_name in result["prompt_sets"]:
            rows = [first_seed(e, set_name) for e in entries]
            labels = [e.label for e in entries]
            pictures.append(_grid(out, f"grid_{set_name}.png", rows, row_labels=labels, size=grid_size))
        points = [
            {
                "label": e["label"],
                "group": e["run"][0] if e["run"] else e["label"],
                "order": e["step"],
                "sets": e["sets"],
            }
            for e in result["embeddings"]
        ]
    if report.plot_fidelity(points, metric_ids, os.path.join(out, "fidelity.png")):
        pictures.append("fidelity.png")
    written += [os.path.join(out, p) for p in pictures] + report.write_reports(result, out, pictures)
    return written


if __name__ == "__main__":
    raise SystemExit(cli.run_cli(main, parse_args))
