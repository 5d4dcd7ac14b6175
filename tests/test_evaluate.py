"""evaluate_dti.py (metrics, generation, outputs, bad input), --evaluate_steps in training, and
`dti_concepts.py rescale`.

Tiny random CLIP, SigLIP and DINOv2 models are built from configs (tools/make_tiny_pipeline.py). SigLIP's real
tokenizer is SentencePiece (it needs the sentencepiece package and a trained model file); the tiny one is a Unigram
tokenizer built with `tokenizers` in the same form (word marks, lower case, "</s>" at the end and as padding). The
metric code only sees its input ids. Every score is checked against a computation written out in conftest (ByHand),
from the models' own layers and numpy, with the preprocessing done by hand."""

import csv
import glob
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import dti_cli
import dti_concepts
import dti_evaluation
import dti_metrics
import evaluate_dti
from dti_utils import DTIError

from conftest import PLACEHOLDER, cos, error_lines, noise_image, one_error, run_inprocess


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def test_scores_equal_the_cosines_of_the_encoders_outputs(encoders, by_hand):
    scorer = dti_metrics.FidelityScorer(encoders)
    images, references = [noise_image(1), noise_image(2)], [noise_image(3), noise_image(4), noise_image(5)]
    texts = ["a photo of a toy in a city street", "a red car"]
    scores = scorer.score(images, texts, scorer.reference_features(references))
    assert sorted(scores) == sorted(dti_metrics.METRICS)
    for i, (image, text) in enumerate(zip(images, texts)):
        assert scores["text_clip"][i] == pytest.approx(
            cos(by_hand.clip_image(image), by_hand.clip_text(text)), abs=1e-5
        )
        assert scores["text_siglip"][i] == pytest.approx(
            cos(by_hand.siglip_image(image), by_hand.siglip_text(text)), abs=1e-5
        )
        assert scores["subject_clip"][i] == pytest.approx(
            np.mean([cos(by_hand.clip_image(image), by_hand.clip_image(r)) for r in references]), abs=1e-5
        )
        assert scores["subject_dino"][i] == pytest.approx(
            np.mean([cos(by_hand.dino_image(image), by_hand.dino_image(r)) for r in references]), abs=1e-5
        )


def test_subject_score_of_identical_images_is_one_and_pairwise_means_are_symmetric(encoders):
    scorer = dti_metrics.FidelityScorer({"clip": encoders["clip"], "siglip": None, "dino": encoders["dino"]})
    a, b = [noise_image(6), noise_image(7)], [noise_image(8), noise_image(9), noise_image(10)]
    same = scorer.score(a, ["x", "y"], scorer.reference_features(a[:1]))
    assert same["subject_dino"][0] == pytest.approx(1.0, abs=1e-6) and same["subject_clip"][0] == pytest.approx(
        1.0, abs=1e-6
    )
    assert same["subject_dino"][1] < 1 - 1e-4  # another image is not the reference
    ab, ba = (
        scorer.score(a, ["x"] * 2, scorer.reference_features(b)),
        scorer.score(b, ["x"] * 3, scorer.reference_features(a)),
    )
    for metric in ("subject_dino", "subject_clip"):
        assert ab[metric].mean() == pytest.approx(ba[metric].mean(), abs=1e-6)  # mean of a matrix and of its transpose
    features = scorer.encoders["dino"].image_features(a + b)
    matrix = dti_metrics.cosine_matrix(features, features)
    assert torch.allclose(matrix, matrix.T, atol=1e-6) and torch.allclose(matrix.diagonal(), torch.ones(5), atol=1e-6)


def test_summary_is_mean_and_standard_error():
    values = [0.2, 0.25, 0.4, 0.1]
    assert dti_metrics.summary(values) == pytest.approx({"mean": 0.2375, "se": float(np.std(values, ddof=1) / 2)})
    assert dti_metrics.summary([0.3]) == {"mean": 0.3, "se": None}


def test_class_prompt_replaces_the_placeholder_and_its_numbered_tokens():
    assert dti_metrics.class_prompt("a <t> on a beach", "<t>", "toy") == "a toy on a beach"
    assert dti_metrics.class_prompt("a <t> <t>_1 <t>_2 near <t>", "<t>", "toy") == "a toy near toy"


# ----------------------------------------------------------------------------------------------------
# The script, end to end on the tiny pipeline
# ----------------------------------------------------------------------------------------------------


def vocab_mean(model, encoder="text_encoder"):
    weight = [
        v
        for k, v in load_file(os.path.join(model, encoder, "model.safetensors")).items()
        if k.endswith("token_embedding.weight")
    ][0].double()
    return float(weight.norm(dim=-1).mean())


@pytest.fixture
def eval_inputs(tiny_sd, encoders, tmp_path):
    """Two embeddings (a DTI-like file at the vocabulary's mean norm, a classic-TI AUTOMATIC1111 .pt of two vectors
    of norm 3), two 32 x 32 reference images, a prompt file of two prompts, and argv for two seeds."""
    os.makedirs(tmp_path / "refs")
    for i in range(2):
        noise_image(20 + i).save(tmp_path / "refs" / f"{i}.png")
    direction = torch.nn.functional.normalize(torch.randn(1, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    save_file(
        {"<a>": direction * vocab_mean(tiny_sd)},
        str(tmp_path / "dti.safetensors"),
        metadata={"method": "directional_textual_inversion"},
    )
    torch.save(
        {"string_to_param": {"*": 3.0 * torch.cat([direction.flip(-1), direction.roll(1, -1)])}, "name": "<b>"},
        tmp_path / "ti.pt",
    )  # 2 vectors
    (tmp_path / "mine.txt").write_text("a photo of a {}\n\n# a comment\na {} in a Japanese modern city street\n")
    argv = [
        "--model",
        tiny_sd,
        "--embeddings",
        tmp_path / "dti.safetensors",
        tmp_path / "ti.pt",
        "--reference_images",
        tmp_path / "refs",
        "--class_word",
        "toy",
        "--prompts",
        tmp_path / "mine.txt",
        "--seeds",
        "2",
        "--num_inference_steps",
        "2",
        "--batch_size",
        "4",
        "--clip_model",
        encoders["clip"],
        "--siglip_model",
        encoders["siglip"],
        "--dino_model",
        encoders["dino"],
        "--output_dir",
        tmp_path / "eval",
    ]
    return [str(a) for a in argv], tmp_path / "eval"


def run_eval(argv):
    return evaluate_dti.main(evaluate_dti.parse_args(argv))


def test_end_to_end_layout_json_csv_grid_and_resume(eval_inputs, by_hand):
    argv, out = eval_inputs
    first = run_eval(argv)
    assert first.generated == 8
    images = sorted(glob.glob(str(out / "images" / "*" / "mine" / "*.png")))
    assert len(images) == 8 and sorted(os.listdir(out / "images")) == ["dti", "ti"]
    for name in ("metrics.json", "metrics.csv", "report.md", "grid_mine.png", "fidelity.png"):
        assert (out / name).stat().st_size > 0

    result = json.loads((out / "metrics.json").read_text())
    assert [e["label"] for e in result["embeddings"]] == ["dti", "ti"] and result["seeds"] == [0, 1]
    assert [e["method"] for e in result["embeddings"]] == ["DTI", "unknown"]
    assert result["embeddings"][1]["norm"]["text_encoder"] == pytest.approx(3.0, rel=1e-6)
    mine = ["a photo of a {}", "a {} in a Japanese modern city street"]
    assert result["prompt_sets"] == {"mine": {"object": mine, "live": mine}} and result["protocol"] == "quick"
    # Per prompt: mean and standard error of its images' scores; one image's score against the by-hand cosine.
    references = [Image.open(out.parent / "refs" / f"{i}.png") for i in range(2)]
    for e in result["embeddings"]:
        for p in e["sets"]["mine"]["prompts"]:
            for metric in dti_metrics.METRICS:
                values = [image[metric] for image in p["images"]]
                assert p["scores"][metric]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
                assert p["scores"][metric]["se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2), abs=1e-12)
        image = e["sets"]["mine"]["prompts"][1]["images"][1]
        picture = Image.open(out / image["path"]).convert("RGB")
        assert image["text_clip"] == pytest.approx(
            cos(by_hand.clip_image(picture), by_hand.clip_text("a toy in a Japanese modern city street")), abs=1e-5
        )
        assert image["subject_dino"] == pytest.approx(
            np.mean([cos(by_hand.dino_image(picture), by_hand.dino_image(r)) for r in references]), abs=1e-5
        )

    # The CSV says what the JSON says: one row per embedding, per set, per prompt.
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 2 * (1 + 1 + 2)
    for row in rows:
        e = next(e for e in result["embeddings"] if e["label"] == row["embedding"])
        group = e["all"] if row["prompt_set"] == "all" else e["sets"][row["prompt_set"]]
        if row["prompt_index"]:
            group = group["prompts"][int(row["prompt_index"]) - 1]
            assert row["prompt"] == group["prompt"]
        assert int(row["n"]) == group["n"]
        for metric, score in group["scores"].items():
            assert float(row[f"{metric}_mean"]) == score["mean"] and float(row[f"{metric}_se"]) == score["se"]

    # The grid: embeddings as rows, prompts as columns, the first seed's images, under a band of labels.
    grid = np.asarray(Image.open(out / "grid_mine.png").convert("RGB"))
    band = dti_metrics.label_band(32)
    assert grid.shape[0] == band + 2 * 32 and grid.shape[1] > 2 * 32
    margin = grid.shape[1] - 2 * 32
    for r, label in enumerate(["dti", "ti"]):
        for c in range(2):
            (cell,) = glob.glob(str(out / "images" / label / "mine" / f"{c + 1:02d}-*-seed0.png"))
            top, left = band + 32 * r, margin + 32 * c
            assert np.array_equal(grid[top : top + 32, left : left + 32], np.asarray(Image.open(cell).convert("RGB")))

    # A second run makes nothing new and gives the same numbers.
    mtimes = {p: os.stat(p).st_mtime_ns for p in images}
    second = run_eval(argv)
    assert second.generated == 0 and {p: os.stat(p).st_mtime_ns for p in images} == mtimes
    assert second.result == result
    # Other settings on the same folder are refused rather than mixed with the old images.
    assert dti_cli.run_cli(evaluate_dti.main, evaluate_dti.parse_args, argv + ["--num_inference_steps", "3"]) == 2


def test_checkpoint_gives_the_vectors_saved_at_its_step(sd_args, tiny_sd, tmp_path):
    run_inprocess(sd_args("--checkpointing_steps", 2, "--save_steps", 2, steps=2))
    concept, label, run = dti_evaluation.load_embedding(str(tmp_path / "out" / "checkpoint-2"))
    assert label == "out@2" and run == ("out", 2)
    vectors = dti_evaluation.apply_checkpoint_norm(concept, tiny_sd).vectors["text_encoder"]
    saved = load_file(tmp_path / "out" / "learned_embeds-steps-2.safetensors")[PLACEHOLDER]
    assert torch.allclose(vectors, saved, rtol=0, atol=1e-6)
    assert vectors.norm(dim=-1).item() == pytest.approx(vocab_mean(tiny_sd), rel=1e-6)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_references", "--reference_images"),
        ("width", "holds 48-dim vectors for text_encoder"),
        ("sdxl_file", "is an embedding for SDXL but --model"),
        ("sana_file", "is an embedding for SANA (Gemma-2 text encoder) but --model"),
        ("unknown_set", "--prompts 'fancy' is neither a built-in set"),
        ("no_braces", "line 2 has no {}"),
    ],
)
def test_bad_input_is_one_error_line_before_any_model_loads(case, expected, tiny_sd, example_images, tmp_path, capsys):
    save_file({"<a>": torch.randn(1, 32)}, str(tmp_path / "ok.safetensors"))
    argv = [
        "--model",
        tiny_sd,
        "--embeddings",
        tmp_path / "ok.safetensors",
        "--reference_images",
        example_images,
        "--class_word",
        "toy",
        "--prompts",
        "simple",
        "--output_dir",
        tmp_path / "eval",
        "--clip_model",
        tmp_path / "no-such-model",
    ]  # would fail if loaded
    if case == "no_references":
        os.makedirs(tmp_path / "empty")
        argv[5] = tmp_path / "empty"
    elif case == "width":
        save_file({"<a>": torch.randn(1, 48)}, str(tmp_path / "ok.safetensors"))
    elif case == "sdxl_file":
        save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}, str(tmp_path / "ok.safetensors"))
    elif case == "sana_file":  # the same width as the SD model's: only the stated family tells them apart
        save_file({"<a>": torch.randn(1, 32)}, str(tmp_path / "ok.safetensors"), metadata={"family": "sana"})
    elif case == "unknown_set":
        argv[9] = "fancy"
    else:
        (tmp_path / "p.txt").write_text("a photo of a {}\na photo of a dog\n")
        argv[9] = tmp_path / "p.txt"
    assert dti_cli.run_cli(evaluate_dti.main, evaluate_dti.parse_args, [str(a) for a in argv]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert expected in line
    assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------------------------------
# --evaluate_steps in training
# ----------------------------------------------------------------------------------------------------


def test_evaluate_steps_logs_the_scores_to_the_tracker(sd_args, encoders, by_hand, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    models = [f"{name}={path}" for name, path in encoders.items()]
    run_inprocess(
        sd_args(
            "--evaluate_steps",
            2,
            "--validation_prompt",
            f"a photo of {PLACEHOLDER}",
            "--evaluation_models",
            *models,
            "--report_to",
            "tensorboard",
            steps=3,
        )
    )
    logged = {}
    for events in glob.glob(str(tmp_path / "out" / "logs" / "**" / "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(events)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            logged.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    logged = {tag: steps for tag, steps in logged.items() if tag.startswith("eval/")}
    assert sorted(logged) == sorted(f"eval/{m}" for m in dti_metrics.METRICS)
    assert all(sorted(steps) == [2, 3] for steps in logged.values())  # every 2nd step and the end
    image = Image.open(tmp_path / "out" / "validation" / "step-000002-0.png").convert("RGB")
    assert logged["eval/text_clip"][2] == pytest.approx(
        cos(by_hand.clip_image(image), by_hand.clip_text("a photo of toy")), abs=1e-5
    )


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--evaluate_steps", "2"], "--validation_prompt"),
        (
            ["--evaluate_steps", "2", "--validation_prompt", "a <toy-dti>", "--evaluation_models", "blip=x"],
            "--evaluation_models 'blip=x'",
        ),
    ],
)
def test_evaluate_steps_bad_flags(extra, expected, sd_args, capsys):
    from conftest import run_cli_inprocess

    assert run_cli_inprocess(sd_args(*extra)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert expected in line


# ----------------------------------------------------------------------------------------------------
# rescale
# ----------------------------------------------------------------------------------------------------


def vocab_norms(model, encoder="text_encoder"):
    weight = [
        v
        for k, v in load_file(os.path.join(model, encoder, "model.safetensors")).items()
        if k.endswith("token_embedding.weight")
    ][0].double()
    norms = weight.norm(dim=-1)
    return {"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())}


def assert_rescaled(new, old, norm):
    new, old = new.double(), old.double()
    assert torch.allclose(new.norm(dim=-1), torch.full((new.shape[0],), norm, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (torch.nn.functional.cosine_similarity(new, old, dim=-1) >= 1 - 1e-7).all()


def rescale_cli(*argv):
    from dti_concepts import main

    return main(["rescale", *[str(a) for a in argv]])


def test_rescale_a1111_pt_keeps_the_form_direction_and_records_the_old_norms(tiny_sd, tmp_path):
    old = torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * torch.tensor([[4.0], [9.0]])
    torch.save({"string_to_param": {"*": old}, "name": "my-ti", "step": 500}, tmp_path / "my-ti.pt")
    assert rescale_cli(tmp_path / "my-ti.pt", "--model", tiny_sd, "--to", "min", "--output", tmp_path / "out") == 0
    data = torch.load(tmp_path / "out" / "my-ti.pt", weights_only=True)  # the same AUTOMATIC1111 form, same name
    assert data["name"] == "my-ti" and data["step"] == 500
    assert_rescaled(data["string_to_param"]["*"], old, vocab_norms(tiny_sd)["min"])
    assert json.loads(data["metadata"]["original_norms"])["text_encoder"] == pytest.approx(
        old.double().norm(dim=-1).tolist(), rel=1e-6
    )
    assert (
        rescale_cli(tmp_path / "my-ti.pt", "--model", tiny_sd, "--to", "0.25", "--output", tmp_path / "quarter.pt")
        == 0
    )
    assert_rescaled(torch.load(tmp_path / "quarter.pt", weights_only=True)["string_to_param"]["*"], old, 0.25)


def test_rescale_diffusers_output_to_the_vocabulary_mean(sd_args, tiny_sd, tmp_path):
    old = torch.randn(1, 32) * 5
    save_file({"<ti>": old}, str(tmp_path / "ti.safetensors"), metadata={"method": "textual_inversion"})
    assert (
        rescale_cli(tmp_path / "ti.safetensors", "--model", tiny_sd, "--output", tmp_path / "rescaled.safetensors")
        == 0
    )
    tensors = load_file(tmp_path / "rescaled.safetensors")
    assert list(tensors) == ["<ti>"]
    assert_rescaled(tensors["<ti>"], old, vocab_norms(tiny_sd)["mean"])
    assert dti_evaluation.describe_method(
        dti_concepts.read_concept(str(tmp_path / "rescaled.safetensors")).metadata["text_encoder"]
    ).startswith("TI rescaled to mean")


def test_rescale_sdxl_single_file_sets_each_encoders_own_norm(tiny_sdxl, tmp_path):
    old = {"clip_l": torch.randn(2, 32) * 3, "clip_g": torch.randn(2, 64) * 7}
    save_file(old, str(tmp_path / "x.safetensors"))
    assert rescale_cli(tmp_path / "x.safetensors", "--model", tiny_sdxl, "--output", tmp_path / "out") == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "x.safetensors"), framework="pt") as f:
        new, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert sorted(new) == ["clip_g", "clip_l"]
    assert_rescaled(new["clip_l"], old["clip_l"], vocab_norms(tiny_sdxl, "text_encoder")["mean"])
    assert_rescaled(new["clip_g"], old["clip_g"], vocab_norms(tiny_sdxl, "text_encoder_2")["mean"])
    original = json.loads(metadata["original_norms"])
    assert original["text_encoder_2"] == pytest.approx(old["clip_g"].double().norm(dim=-1).tolist(), rel=1e-6)


def test_rescale_keeps_existing_files_unless_overwrite(tiny_sd, tmp_path, capsys):
    save_file({"<ti>": torch.randn(1, 32) * 4}, str(tmp_path / "ti.safetensors"))
    argv = [tmp_path / "ti.safetensors", "--model", tiny_sd, "--output", tmp_path / "out"]
    assert rescale_cli(*argv) == 0
    before = (tmp_path / "out" / "learned_embeds.safetensors").read_bytes()
    assert rescale_cli(*argv, "--to", "max") == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "learned_embeds.safetensors").read_bytes() == before
    assert rescale_cli(*argv, "--to", "max", "--overwrite") == 0
    assert_rescaled(
        load_file(tmp_path / "out" / "learned_embeds.safetensors")["<ti>"],
        load_file(tmp_path / "ti.safetensors")["<ti>"],
        vocab_norms(tiny_sd)["max"],
    )


@pytest.mark.parametrize(
    "extra, expected", [(["--to", "huge"], "--to must be"), (["--output", "SAME"], "is the input")]
)
def test_rescale_bad_flags(extra, expected, tiny_sd, tmp_path, capsys):
    save_file({"<ti>": torch.randn(1, 32)}, str(tmp_path / "ti.safetensors"))
    argv = ["--model", tiny_sd, "--output", tmp_path / "out", *extra]
    argv = [tmp_path / "ti.safetensors" if a == "SAME" else a for a in argv]
    assert rescale_cli(tmp_path / "ti.safetensors", *argv) == 2
    assert expected in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Errors in seconds: an output that is a file, scoring models neither cached nor reachable
# ----------------------------------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_one_sentence(eval_inputs, tmp_path, capsys):
    """Before: a traceback after the models loaded."""
    blocker = tmp_path / "report"
    blocker.write_text("mine")
    argv = [*eval_inputs[0], "--output_dir", str(blocker)]
    assert dti_cli.run_cli(evaluate_dti.main, evaluate_dti.parse_args, argv) == 2
    one_error(capsys, f"--output_dir {blocker} is a file")
    assert blocker.read_text() == "mine"


def test_scoring_models_neither_cached_nor_reachable_fail_at_once(monkeypatch):
    """Before: the default encoders without the Hub retried for more than 2 minutes. Offline, and with the Hub's host
    not answering, the sentence comes at once (one connection with a 3 s timeout)."""
    import time

    from huggingface_hub import constants

    import dti_hub
    from dti_metrics import FidelityScorer

    start = time.perf_counter()
    with pytest.raises(DTIError, match="--clip_model openai/clip-vit-large-patch14 is not in the local .* HF_HUB_OFF"):
        FidelityScorer({"clip": "openai/clip-vit-large-patch14"})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    dti_hub.hub_unreachable.cache_clear()
    try:
        with pytest.raises(DTIError, match="--dino_model facebook/dinov2-base .* and hub.invalid does not answer"):
            FidelityScorer({"dino": "facebook/dinov2-base"})
    finally:
        dti_hub.hub_unreachable.cache_clear()
    assert time.perf_counter() - start < 10


# ----------------------------------------------------------------------------------------------------
# SANA and Wan: generated through the project's loader, the tokens joined as the loader returns them
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sana", "wan"])
def test_sana_and_wan_embeddings_are_generated_through_the_loader(family, request, encoders, tmp_path):
    """The evaluation's image equals one made by hand: the family's pipeline from the model folder, the embedding put
    in by dti_files.load_textual_inversion, its returned word in the prompt, the same seed and call."""
    import diffusers

    import dti_files

    model = request.getfixturevalue(f"tiny_{family}")
    (tmp_path / "refs").mkdir()
    noise_image(30).save(tmp_path / "refs" / "0.png")
    vectors = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    save_file({"<toy>": vectors}, str(tmp_path / "emb.safetensors"), metadata={"family": family})
    (tmp_path / "one.txt").write_text("a photo of a {}\n")
    argv = ["--model", model, "--embeddings", tmp_path / "emb.safetensors", "--reference_images", tmp_path / "refs"]
    argv += ["--class_word", "toy", "--prompts", tmp_path / "one.txt", "--seeds", "1", "--num_inference_steps", "2"]
    argv += ["--resolution", "32", "--output_dir", tmp_path / "eval"]
    argv += [f"--{name}_model={path}" for name, path in encoders.items()]
    result = run_eval([str(a) for a in argv])
    assert result.generated == 1 and result.result["family"] == family
    (made,) = glob.glob(str(tmp_path / "eval" / "images" / "*" / "one" / "*.png"))

    pipe = getattr(diffusers, "SanaPipeline" if family == "sana" else "WanPipeline").from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    word = dti_files.load_textual_inversion(pipe, str(tmp_path / "emb.safetensors"), token="<dti-eval-0>")
    assert word == "<dti-eval-0><dti-eval-0>_1"  # two vectors, joined without a space
    call = {"num_inference_steps": 2, "height": 32, "width": 32, "generator": torch.Generator().manual_seed(0)}
    call.update({"clean_caption": False} if family == "sana" else {"num_frames": 1, "output_type": "pil"})
    output = pipe([f"a photo of a {word}"], **call)
    by_hand = output.images[0] if family == "sana" else output.frames[0][0]
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(by_hand))
