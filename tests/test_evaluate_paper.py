"""evaluate_dti.py --protocol paper and --runs: the authors' text score (SigLIP's sigmoid with its own logit scale and
bias, the full stop), masked references, prompt files with object and live lists, the authors' subjects file, sweeps
over the checkpoints of many runs (tables over subjects, curve, scatter, report.html) and their resume.

Every number is checked against a computation written out here or in conftest (ByHand: the tiny encoders' own layers
and numpy, the preprocessing done by hand), or recomputed from the per-image scores metrics.json holds."""

import csv
import glob
import html.parser
import json
import math
import os
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dti_cli
import dti_evaluation
import dti_files
import dti_metrics
import dti_report
import evaluate_dti
from dti_utils import DTIError

from conftest import cos, error_lines, noise_image


def vocab_mean(model):
    weight = [
        v
        for k, v in load_file(os.path.join(model, "text_encoder", "model.safetensors")).items()
        if k.endswith("token_embedding.weight")
    ][0].double()
    return float(weight.norm(dim=-1).mean())


def centre_mask(size=32, inner=(8, 24)):
    """A binary mask: white (the subject) in a centre square, black (background) around it."""
    mask = np.zeros((size, size, 3), dtype=np.uint8)
    mask[inner[0] : inner[1], inner[0] : inner[1]] = 255
    return Image.fromarray(mask)


def zero_background(image, mask):
    """The photo with the background set to 0, by numpy: what masking must amount to for a binary mask."""
    pixels = np.asarray(image).copy()
    pixels[np.asarray(mask) == 0] = 0
    return Image.fromarray(pixels)


def run_eval(argv):
    return evaluate_dti.main(evaluate_dti.parse_args([str(a) for a in argv]))


def encoder_flags(encoders):
    return ["--clip_model", encoders["clip"], "--siglip_model", encoders["siglip"], "--dino_model", encoders["dino"]]


# ----------------------------------------------------------------------------------------------------
# Pieces: masks, prompt files, subjects file, generation settings
# ----------------------------------------------------------------------------------------------------


def test_apply_mask_is_the_authors_soft_mask_at_full_resolution():
    image = noise_image(30, size=48)
    mask = Image.fromarray(np.random.default_rng(31).integers(0, 256, (48, 48), dtype=np.uint8)).convert("RGB")
    got = np.asarray(dti_metrics.apply_mask(image, mask)).astype(np.int64)
    product = np.asarray(image, dtype=np.int64) * np.asarray(mask, dtype=np.int64)
    exact = product // 255  # pixel x mask / 255, cut to an integer: a soft mask, no threshold, at full size
    assert got.shape == (48, 48, 3)
    # where x * m / 255 is a whole number, the authors' float x * (m / 255.0) may fall just below it
    assert np.array_equal(got[product % 255 != 0], exact[product % 255 != 0])
    assert np.all((exact - got)[product % 255 == 0] <= 1) and np.all(got <= exact)


def test_prompt_files_text_json_sets_and_the_live_rule(tmp_path):
    (tmp_path / "sets.json").write_text(
        json.dumps({"simple": {"object": ["a {} on a rock"], "live": ["a {} wearing a hat"]}, "style": ["{} style"]})
    )
    (tmp_path / "mine.txt").write_text("# mine\na {} at night\n\n")
    sets = dti_evaluation.read_prompt_sets([str(tmp_path / "sets.json"), str(tmp_path / "mine.txt")])
    assert sets == {
        "simple": {"object": ["a {} on a rock"], "live": ["a {} wearing a hat"]},
        "style": {"object": ["{} style"], "live": ["{} style"]},
        "mine": {"object": ["a {} at night"], "live": ["a {} at night"]},
    }
    with pytest.raises(DTIError, match="names the set 'simple' twice"):
        dti_evaluation.read_prompt_sets([str(tmp_path / "sets.json"), "simple"])  # the file's and the built-in one
    chosen = dti_evaluation.read_prompt_sets([str(tmp_path / "sets.json")], ["simple"])
    assert list(chosen) == ["simple"]
    for word, expected in (("dog", "live"), ("cat", "live"), ("stuffed animal", "object"), ("dogs", "object")):
        assert dti_evaluation.prompts_for(chosen["simple"], word) == chosen["simple"][expected]


def test_subjects_file_paths_as_the_authors_write_them(tmp_path):
    """data/dreambooth.json names data/dreambooth/<subject> from the repository's root: found from the file's
    parent folder when the current folder is elsewhere."""
    os.makedirs(tmp_path / "data" / "dreambooth" / "cat")
    (tmp_path / "data" / "dreambooth.json").write_text(
        json.dumps(
            {
                "cat": {
                    "path": "data/dreambooth/cat",
                    "images": ["00.jpg"],
                    "class": "cat",
                    "initialization": "cat",
                    "template": "imagenet_small",
                }
            }
        )
    )
    subjects = dti_evaluation.read_subjects(str(tmp_path / "data" / "dreambooth.json"))
    assert list(subjects) == ["cat"] and (subjects["cat"]["class"], subjects["cat"]["initialization"]) == (
        "cat",
        "cat",
    )
    assert os.path.samefile(subjects["cat"]["path"], tmp_path / "data" / "dreambooth" / "cat")


def test_generation_settings_per_family_and_protocol():
    cpu = torch.device("cpu")
    index = {"scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    none = {"steps": None, "guidance": None, "resolution": None, "precision": None}
    settings, call, deviations = dti_evaluation.generation_settings(
        "paper", "sdxl", index, device=cpu, seeds=[0, 1, 2, 3], **none
    )
    assert call == {"num_inference_steps": 50, "guidance_scale": 5.0} and deviations == []
    assert (settings["scheduler"], settings["mixed_precision"], settings["generator_device"]) == (
        "EulerDiscreteScheduler",
        "bf16",
        "cpu",
    )
    settings, call, deviations = dti_evaluation.generation_settings(
        "paper", "sd", index, device=cpu, seeds=[0], **{**none, "steps": 2}
    )
    assert call == {"num_inference_steps": 2, "guidance_scale": 7.5}
    assert [d.split()[0] for d in deviations] == ["--num_inference_steps", "--seeds/--first_seed:"]
    settings, call, deviations = dti_evaluation.generation_settings(
        "quick", "sd", index, device=cpu, seeds=[0], **none
    )
    assert call == {"num_inference_steps": dti_evaluation.QUICK_STEPS} and deviations == []
    assert (settings["scheduler"], settings["mixed_precision"]) == ("DPMSolverMultistepScheduler", "no")


# ----------------------------------------------------------------------------------------------------
# --protocol paper on one concept: the text score by hand, masked references
# ----------------------------------------------------------------------------------------------------


def test_paper_text_score_by_hand_and_masks_zero_the_background(tiny_sd, encoders, by_hand, tmp_path):
    os.makedirs(tmp_path / "refs")
    os.makedirs(tmp_path / "masks")
    for i in range(2):
        noise_image(40 + i).save(tmp_path / "refs" / f"{i:02d}.jpg", quality=95)
        centre_mask(inner=(6 + 2 * i, 26)).save(tmp_path / "masks" / f"{i:02d}.png")
    direction = torch.nn.functional.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(5)), dim=-1)
    dti_files.save_embedding_file(str(tmp_path / "toy.safetensors"), {"<a>": direction * vocab_mean(tiny_sd)})
    (tmp_path / "p.txt").write_text("a {} in the jungle\n")
    argv = ["--protocol", "paper", "--model", tiny_sd, "--embeddings", tmp_path / "toy.safetensors"]
    argv += ["--reference_images", tmp_path / "refs", "--class_word", "toy", "--prompts", tmp_path / "p.txt"]
    argv += ["--seeds", 2, "--num_inference_steps", 2, "--output_dir", tmp_path / "eval", *encoder_flags(encoders)]
    run_eval(argv + ["--reference_masks", tmp_path / "masks"])
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())

    # What was run, recorded: the protocol, the models, every setting, and the two flags that leave the paper's.
    assert result["protocol"] == "paper" and sorted(result["metrics"]) == [
        "subject_clip",
        "subject_dino",
        "text_siglip",
    ]
    assert {m: info["model"] for m, info in result["metrics"].items()} == {
        "text_siglip": encoders["siglip"],
        "subject_dino": encoders["dino"],
        "subject_clip": encoders["clip"],
    }
    g = result["generation"]
    assert (g["scheduler"], g["guidance_scale"], g["num_inference_steps"], g["mixed_precision"]) == (
        "DDPMScheduler",  # the tiny pipeline's own
        7.5,
        2,
        "bf16",
    )
    assert g["image_size"] == [32, 32] and result["seeds"] == [0, 1]
    assert [d.split()[0] for d in result["deviations"]] == ["--num_inference_steps", "--seeds/--first_seed:"]
    assert result["scoring"] == {"text_score": "sigmoid", "text_length": 64, "full_stop": True, "batch_size": 4}

    references = [Image.open(tmp_path / "refs" / f"{i:02d}.jpg").convert("RGB") for i in range(2)]
    masked = [zero_background(r, Image.open(tmp_path / "masks" / f"{i:02d}.png")) for i, r in enumerate(references)]
    prompt = result["embeddings"][0]["sets"]["p"]["prompts"][0]
    assert prompt["text"] == "a toy in the jungle."
    unmasked_dino = []
    for image in prompt["images"]:
        picture = Image.open(tmp_path / "eval" / image["path"]).convert("RGB")
        expected = by_hand.siglip_probability(picture, "a toy in the jungle.")
        assert image["text_siglip"] == pytest.approx(expected, abs=1e-6)
        assert abs(expected - by_hand.siglip_probability(picture, "a toy in the jungle")) > 1e-4  # the "." counts
        for metric, features in (("subject_dino", by_hand.dino_image), ("subject_clip", by_hand.clip_image)):
            expected = np.mean([cos(features(picture), features(r)) for r in masked])
            assert image[metric] == pytest.approx(expected, abs=1e-6)
        unmasked_dino.append(np.mean([cos(by_hand.dino_image(picture), by_hand.dino_image(r)) for r in references]))
    assert prompt["scores"]["text_siglip"]["mean"] == pytest.approx(
        np.mean([i["text_siglip"] for i in prompt["images"]]), abs=1e-12
    )

    # Without the masks: the same images (none made again), the unmasked references' scores.
    again = run_eval(argv)
    assert again.generated == 0
    images = again.result["embeddings"][0]["sets"]["p"]["prompts"][0]["images"]
    assert [i["subject_dino"] for i in images] == pytest.approx(unmasked_dino, abs=1e-6)
    assert all(abs(a["subject_dino"] - b["subject_dino"]) > 1e-4 for a, b in zip(images, prompt["images"]))


# ----------------------------------------------------------------------------------------------------
# --runs --sweep: two subjects x two methods x two checkpoints
# ----------------------------------------------------------------------------------------------------


def write_run(folder, *, vectors_at, initializer, adamw):
    """A training output as the SD script writes it (dti_files.save_training_embeddings): learned_embeds-steps-N at
    each step of vectors_at ({step: (1, 32) tensor}) and the final learned_embeds at the last."""
    for step, vectors in vectors_at.items():
        embedding = SimpleNamespace(name="text_encoder", norm=None if adamw else float(vectors.norm()), vectors=None)
        embedding.vectors = lambda v=vectors: v
        run_info = {"base_model": "tiny", "initializer_token": initializer, "token_scale": "mean", "seed": 0}
        for suffix in (f"-steps-{step}", "") if step == max(vectors_at) else (f"-steps-{step}",):
            dti_files.save_training_embeddings(
                str(folder), [embedding], token="<x>", run_info=run_info, step=step, suffix=suffix
            )


@pytest.fixture
def runs(tiny_sd, tmp_path):
    """outputs/{dti,ti}/{dog_a,toy_b} with checkpoints at steps 1..4, the authors' subjects file (data/dreambooth.json
    naming data/dreambooth/<subject>), masks in data/dreambooth_mask/<subject>/, and a JSON of prompt sets."""
    norm = vocab_mean(tiny_sd)
    for s, (subject, word) in enumerate((("dog_a", "dog"), ("toy_b", "toy"))):
        os.makedirs(tmp_path / "data" / "dreambooth" / subject)
        os.makedirs(tmp_path / "data" / "dreambooth_mask" / subject)
        for i in range(2):
            noise_image(60 + 10 * s + i).save(tmp_path / "data" / "dreambooth" / subject / f"{i:02d}.png")
            centre_mask().save(tmp_path / "data" / "dreambooth_mask" / subject / f"{i:02d}.png")
        for m, method in enumerate(("dti", "ti")):
            g = torch.Generator().manual_seed(100 * s + m)
            vectors_at = {
                step: torch.nn.functional.normalize(torch.randn(1, 32, generator=g), dim=-1)
                * (norm if m == 0 else 3.0)
                for step in range(1, 5)
            }
            write_run(tmp_path / "outputs" / method / subject, vectors_at=vectors_at, initializer=word, adamw=m == 1)
    subjects = {
        name: {"path": f"data/dreambooth/{name}", "class": word, "initialization": word, "template": "imagenet_small"}
        for name, word in (("dog_a", "dog"), ("toy_b", "toy"), ("unused", "vase"))
    }
    os.makedirs(tmp_path / "data" / "dreambooth" / "unused")
    (tmp_path / "data" / "dreambooth.json").write_text(json.dumps(subjects))
    (tmp_path / "sets.json").write_text(
        json.dumps({"simple": {"object": ["a {} on a rock"], "live": ["a {} wearing a hat"]}, "style": ["{} style"]})
    )
    return tmp_path


def test_runs_without_subjects_file_read_the_class_word_from_the_run(runs, tiny_sd):
    """One subject, its photos from --reference_images: the class word is the run's initializer (in the embedding's
    metadata) unless --class_word says otherwise; the final embedding without --sweep, every step with it."""
    base = ["--model", tiny_sd, "--runs", runs / "outputs" / "dti" / "dog_a", runs / "outputs" / "ti" / "dog_a"]
    base += ["--reference_images", runs / "data" / "dreambooth" / "dog_a"]
    subjects, entries = evaluate_dti.run_entries(evaluate_dti.parse_args([str(a) for a in base]))
    assert subjects["dog_a"]["class"] == "dog"
    assert sorted((e.method, e.step, e.slug) for e in entries) == [
        ("dti", 4, "dti/dog_a/final"),
        ("ti", 4, "ti/dog_a/final"),
    ]
    argv = [str(a) for a in base + ["--class_word", "puppy", "--sweep", 1]]
    subjects, entries = evaluate_dti.run_entries(evaluate_dti.parse_args(argv))
    assert subjects["dog_a"]["class"] == "puppy" and sorted(e.step for e in entries) == [1, 1, 2, 2, 3, 3, 4, 4]


class Page(html.parser.HTMLParser):
    """report.html as images (src) and tables (rows of cell texts)."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self.cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_runs_sweep_tables_curve_scatter_report_html_and_resume(runs, tiny_sd, encoders, monkeypatch):
    monkeypatch.chdir(runs.parent)  # not the subjects file's folder: its paths resolve from the file's
    out = runs / "eval"
    argv = ["--protocol", "paper", "--model", tiny_sd, "--runs", runs / "outputs" / "dti", runs / "outputs" / "ti"]
    argv += ["--sweep", 2, "--subjects", runs / "data" / "dreambooth.json"]
    argv += ["--reference_masks", runs / "data" / "dreambooth_mask", "--prompts", runs / "sets.json"]
    argv += ["--prompt_sets", "simple", "--seeds", 2, "--num_inference_steps", 2, "--output_dir", out]
    first = run_eval(argv + encoder_flags(encoders))
    assert first.generated == 2 * 2 * 2 * 2  # subjects x methods x steps {2, 4} of 1..4 x seeds
    result = json.loads((out / "metrics.json").read_text())
    metrics = sorted(result["metrics"])
    assert metrics == ["subject_clip", "subject_dino", "text_siglip"]
    # The subjects file's class words, and the authors' live rule: the dog gets the live prompt, the toy the object.
    assert {s: (v["class"], v["live"]) for s, v in result["subjects"].items()} == {
        "dog_a": ("dog", True),
        "toy_b": ("toy", False),
    }
    for e in result["embeddings"]:
        prompt = e["sets"]["simple"]["prompts"][0]
        assert prompt["prompt"] == ("a {} wearing a hat" if e["subject"] == "dog_a" else "a {} on a rock")
        assert prompt["text"] == prompt["prompt"].replace("{}", e["class_word"]) + "."
    assert sorted((e["method"], e["subject"], e["step"], e["kind"]) for e in result["embeddings"]) == [
        (m, s, step, kind) for m, kind in (("dti", "DTI"), ("ti", "TI")) for s in ("dog_a", "toy_b") for step in (2, 4)
    ]

    # The table: per method and step, the mean over subjects of each subject's mean over its images, and the standard
    # error over subjects, recomputed here from the per-image scores.
    table = result["table"]
    assert [(r["method"], r["step"], r["n_subjects"]) for r in table] == [
        ("dti", 2, 2),
        ("dti", 4, 2),
        ("ti", 2, 2),
        ("ti", 4, 2),
    ]
    for row in table:
        for metric in metrics:
            per_subject = [
                np.mean([i[metric] for p in e["sets"]["simple"]["prompts"] for i in p["images"]])
                for e in sorted(result["embeddings"], key=lambda e: e["subject"])
                if (e["method"], e["step"]) == (row["method"], row["step"])
            ]
            assert row["scores"][metric]["mean"] == pytest.approx(np.mean(per_subject), abs=1e-12)
            assert row["scores"][metric]["se"] == pytest.approx(np.std(per_subject, ddof=1) / math.sqrt(2), abs=1e-12)
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [(r["method"], r["step"]) for r in rows] == [(r["method"], str(r["step"])) for r in table]
    assert all(float(c[f"{m}_mean"]) == r["scores"][m]["mean"] for c, r in zip(rows, table) for m in metrics)

    # The pictures and the page: every image of report.html exists (relative paths), its tables hold the numbers.
    for name in ("curve.png", "fidelity.png", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    page = Page()
    page.feed((out / "report.html").read_text())
    assert {"curve.png", "fidelity.png"} <= set(page.images)
    assert sorted(p for p in page.images if p.startswith("grids/")) == [
        "grids/dog_a--simple.png",
        "grids/toy_b--simple.png",
    ]
    assert all(Image.open(out / src).size[0] > 0 for src in page.images)
    summary_table = next(t for t in page.tables if t[0][:3] == ["method", "kind", "step"])
    assert [cells[:4] for cells in summary_table[1:]] == [[r["method"], r["kind"], str(r["step"]), "2"] for r in table]
    column = summary_table[0].index("text_siglip")
    assert [cells[column] for cells in summary_table[1:]] == [
        dti_report.fmt(r["scores"]["text_siglip"]) for r in table
    ]
    per_subject_tables = [t for t in page.tables if t[0][:2] == ["subject", "class"]]
    assert len(per_subject_tables) == 4 and [c[:2] for c in per_subject_tables[0][1:]] == [
        ["dog_a", "dog"],
        ["toy_b", "toy"],
    ]

    # A rerun makes nothing new and gives the same numbers.
    images = sorted(glob.glob(str(out / "images" / "**" / "*.png"), recursive=True))
    assert len(images) == 16
    mtimes = {p: os.stat(p).st_mtime_ns for p in images}
    second = run_eval(argv + encoder_flags(encoders))
    assert second.generated == 0 and {p: os.stat(p).st_mtime_ns for p in images} == mtimes
    assert second.result == result


def chromium_screenshot(page, shot):
    """A headless Chromium screenshot of a local page, as RGB pixels."""
    subprocess.run(
        [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        + ["--window-size=1300,1800", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (.ci/run installs Debian's package)")
def test_report_html_shows_its_pictures_in_a_browser(tmp_path):
    """report.html in headless Chromium: the pictures it names by relative path load. The plots draw the two methods
    in matplotlib's C0 blue and C1 orange; the page itself draws only black and greys, so those colours on the
    screenshot come from the pictures, and vanish when the pictures are moved away."""
    metric_ids = {"text_siglip": "siglip", "subject_dino": "dino"}
    table = [
        {
            "prompt_set": "simple",
            "method": method,
            "kind": method.upper(),
            "step": step,
            "n_subjects": 2,
            "scores": {m: {"mean": 0.3 + 0.1 * k + 0.01 * step, "se": 0.02} for m in metric_ids},
            "subjects": {s: dict.fromkeys(metric_ids, 0.3 + 0.1 * k) for s in ("a", "b")},
        }
        for k, method in enumerate(("dti", "ti"))
        for step in (50, 100)
    ]
    pictures = ["curve.png", "fidelity.png"]
    dti_report.plot_curves(table, metric_ids, str(tmp_path / pictures[0]))
    dti_report.plot_fidelity(dti_report.table_points(table), metric_ids, str(tmp_path / pictures[1]))
    result = {
        "mode": "runs",
        "protocol": "paper",
        "model": "m",
        "generation": {
            **{"pipeline": "StableDiffusionXLPipeline", "scheduler": "EulerDiscreteScheduler"},
            **{"num_inference_steps": 50, "guidance_scale": 5.0, "mixed_precision": "bf16"},
            **{"generator_device": "cuda", "image_size": [1024, 1024]},
        },
        "deviations": [],
        "seeds": [0, 1, 2, 3],
        "metrics": {m: {"model": i, "description": m} for m, i in metric_ids.items()},
        "subjects": {s: {"class": "toy", "live": False, "masks": "masks"} for s in ("a", "b")},
        "prompt_sets": {"simple": {"object": ["a {}"], "live": ["a {}"]}},
        "table": table,
    }
    dti_report.write_reports(result, str(tmp_path), pictures)
    colours = ((31, 119, 180), (255, 127, 14))

    def coloured(pixels, colour):
        return int((np.abs(pixels - colour).sum(-1) < 40).sum())

    shown = chromium_screenshot(tmp_path / "report.html", tmp_path / "shot.png")
    assert all(coloured(shown, c) > 200 for c in colours)
    os.makedirs(tmp_path / "moved")
    for name in pictures:
        os.rename(tmp_path / name, tmp_path / "moved" / name)
    missing = chromium_screenshot(tmp_path / "report.html", tmp_path / "moved" / "shot.png")
    assert all(coloured(missing, c) == 0 for c in colours)


# ----------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_mask", "no mask"),
        ("paper_without_prompts", "--protocol paper scores the authors' prompt sets"),
        ("subject_not_in_file", "is not in --subjects"),
        ("sweep_matches_nothing", "--sweep 7"),
        ("sweep_without_runs", "--sweep and --subjects go with --runs"),
        ("unknown_set", "--prompt_sets fancy"),
        ("json_without_braces", "set 'simple' object prompt 1 has no {}"),
        ("several_subjects_one_folder", "pass --subjects"),
    ],
)
def test_bad_input_is_one_sentence_and_nothing_written(case, expected, runs, tiny_sd, capsys):
    out = runs / "eval"
    argv = ["--protocol", "paper", "--model", tiny_sd, "--runs", runs / "outputs" / "dti", "--sweep", 2]
    argv += ["--subjects", runs / "data" / "dreambooth.json", "--prompts", runs / "sets.json", "--output_dir", out]
    argv += ["--reference_masks", runs / "data" / "dreambooth_mask", "--clip_model", runs / "no-such-model"]
    if case == "missing_mask":
        os.remove(runs / "data" / "dreambooth_mask" / "toy_b" / "01.png")
    elif case == "paper_without_prompts":
        argv = argv[: argv.index("--prompts")] + argv[argv.index("--prompts") + 2 :]
    elif case == "subject_not_in_file":
        os.rename(runs / "outputs" / "dti" / "toy_b", runs / "outputs" / "dti" / "toy_c")
    elif case == "sweep_matches_nothing":
        argv[argv.index("--sweep") + 1] = 7
    elif case == "sweep_without_runs":
        argv[argv.index("--runs") : argv.index("--runs") + 2] = ["--embeddings", runs / "outputs" / "dti" / "dog_a"]
    elif case == "unknown_set":
        argv += ["--prompt_sets", "fancy"]
    elif case == "json_without_braces":
        (runs / "sets.json").write_text(json.dumps({"simple": {"object": ["a rock"], "live": ["a {} in a hat"]}}))
    else:
        argv[argv.index("--subjects") : argv.index("--subjects") + 2] = ["--reference_images", runs / "data"]
    assert dti_cli.run_cli(evaluate_dti.main, evaluate_dti.parse_args, [str(a) for a in argv]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert expected in line
    assert not out.exists()
