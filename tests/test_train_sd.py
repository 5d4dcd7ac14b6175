"""End-to-end tests of train_directional_textual_inversion.py on a tiny random SD pipeline (CPU, offline): what a
run trains and writes, and how it loads in diffusers.

One run goes through the real entry point (a subprocess) and is checked from many sides; the others run
main(parse_args(...)) in this process, which costs about a second each. Other subjects have their own files: flags
(test_flags.py), data (test_data.py), resume (test_resume.py), signals (test_signals.py), failures on disk
(test_files.py), the Hub (test_hub.py).
"""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    PLACEHOLDER,
    SCRIPT,
    angle,
    read_embeds,
    row_norms,
    run_inprocess,
    run_script,
    script_defaults,
    sd_argv,
    subprocess_env,
    token_embedding_of,
    train_module,
)


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_train_sd")


DEFAULTS = script_defaults()  # the SD script's defaults, read from its parser
LR = DEFAULTS.learning_rate  # batch 1 x 1 process x 1 accumulation keeps it under --scale_lr


def vocab_id(tokenizer, word):
    return tokenizer.get_vocab()[f"{word}</w>"]


# ----------------------------------------------------------------------------------------------------
# One run through the real entry point, checked from many sides
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tiny_sd, example_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    argv = sd_argv(
        tiny_sd,
        example_images,
        out,
        "--report_to",
        "tensorboard",
        "--validation_prompt",
        f"a {PLACEHOLDER} in a japanese modern city street",
        "--save_as_full_pipeline",
        "--save_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--log_steps",
        "2",
        steps=4,
    )
    rc, stdout, stderr = run_script(argv)
    return SimpleNamespace(out=out, rc=rc, stdout=stdout, stderr=stderr)


@pytest.mark.subprocess
def test_e2e_exits_cleanly_and_writes_the_expected_files(e2e):
    assert e2e.rc == 0, e2e.stderr[-3000:]
    assert "Traceback" not in e2e.stderr
    out = e2e.out
    for name in (
        "learned_embeds.safetensors",
        "learned_embeds-steps-2.safetensors",
        "learned_embeds-steps-4.safetensors",
        "checkpoint-2/training_state.pt",
        "checkpoint-4/training_state.pt",
        "validation/step-000004-0.png",
        "model_index.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    assert not glob.glob(str(out / "**" / ".tmp-*"), recursive=True)  # no half-written files left behind
    assert Image.open(out / "validation" / "step-000004-0.png").size == (32, 32)


@pytest.mark.subprocess
def test_e2e_saved_vectors_have_the_vocabulary_mean_norm(e2e, base_vocab, tokenizer):
    tensors, meta = read_embeds(e2e.out / "learned_embeds.safetensors")
    assert list(tensors) == [PLACEHOLDER]
    vectors = tensors[PLACEHOLDER]
    assert vectors.dtype == torch.float32
    assert tuple(vectors.shape) == (1, base_vocab["weight"].shape[1])
    np.testing.assert_allclose(row_norms(vectors), base_vocab["mean"], rtol=1e-5)
    # Not the initializer's own norm: the statistic really was applied.
    toy_norm = np.linalg.norm(base_vocab["weight"][vocab_id(tokenizer, meta["initializer_token"])])
    assert abs(toy_norm - base_vocab["mean"]) / base_vocab["mean"] > 1e-3
    # The intermediate file of step 2 has the same norm too.
    steps2, _ = read_embeds(e2e.out / "learned_embeds-steps-2.safetensors")
    np.testing.assert_allclose(row_norms(steps2[PLACEHOLDER]), base_vocab["mean"], rtol=1e-5)


@pytest.mark.subprocess
def test_e2e_direction_moved_by_at_most_lr_per_step(e2e, base_vocab, tokenizer):
    vectors = read_embeds(e2e.out / "learned_embeds.safetensors")[0][PLACEHOLDER]
    step2 = read_embeds(e2e.out / "learned_embeds-steps-2.safetensors")[0][PLACEHOLDER]
    init = base_vocab["weight"][vocab_id(tokenizer, "toy")]
    turned = angle(init, vectors)[0]
    # beta = 0: every step turns the vector by ~lr radians, so after 4 steps 0 < angle <= 4 lr.
    assert 1e-4 < turned <= 4 * LR + 1e-5
    np.testing.assert_allclose(angle(step2, vectors), 0.0, atol=2 * LR + 1e-5)
    assert angle(step2, vectors)[0] > 1e-4  # steps 3 and 4 moved it


@pytest.mark.subprocess
def test_e2e_metadata(e2e, base_vocab, tiny_sd):
    _, meta = read_embeds(e2e.out / "learned_embeds.safetensors")
    assert meta["format"] == "pt"
    assert meta["method"] == "directional_textual_inversion"
    assert meta["base_model"] == str(tiny_sd)
    assert json.loads(meta["tokens"]) == [PLACEHOLDER]
    assert meta["placeholder_token"] == PLACEHOLDER
    assert meta["initializer_token"] == "toy"
    assert float(meta["norm"]) == pytest.approx(base_vocab["mean"], rel=1e-6)
    assert meta["token_scale"] == DEFAULTS.token_scale
    assert float(meta["kappa"]) == pytest.approx(DEFAULTS.kappa)
    assert meta["steps"] == "4"
    assert read_embeds(e2e.out / "learned_embeds-steps-2.safetensors")[1]["steps"] == "2"


@pytest.mark.subprocess
def test_e2e_full_pipeline_keeps_every_other_vocabulary_row(e2e, base_vocab):
    from safetensors.numpy import load_file
    from transformers import CLIPTokenizer

    saved = token_embedding_of(load_file(str(e2e.out / "text_encoder" / "model.safetensors")))
    base = base_vocab["weight"].astype(np.float32)
    n = base_vocab["vocab_size"]
    assert saved.shape == (n + 1, base.shape[1])
    assert saved.dtype == np.float32
    assert np.array_equal(saved[:n], base)  # bit-identical
    learned = read_embeds(e2e.out / "learned_embeds.safetensors")[0][PLACEHOLDER].numpy()
    np.testing.assert_array_equal(saved[n:], learned)
    tok = CLIPTokenizer.from_pretrained(str(e2e.out), subfolder="tokenizer")
    assert tok.convert_tokens_to_ids(PLACEHOLDER) == n
    assert tok.encode(f"a {PLACEHOLDER}", add_special_tokens=False)[-1] == n


@pytest.mark.subprocess
def test_e2e_tensorboard_logs_the_norm(e2e, base_vocab):
    events = glob.glob(str(e2e.out / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events, os.listdir(e2e.out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "norm", "angle_deg", "lr"} <= set(tags)
    norms = acc.Scalars("norm")
    assert [e.step for e in norms] == [2, 4]  # --log_steps 2
    for e in norms:
        assert e.value == pytest.approx(base_vocab["mean"], rel=1e-5)
    angles = [e.value for e in acc.Scalars("angle_deg")]
    assert 0 < angles[-1] <= np.degrees(4 * LR) + 1e-3
    assert all(np.isfinite(e.value) and e.value > 0 for e in acc.Scalars("loss"))
    assert "validation" in acc.Tags()["images"]


@pytest.mark.subprocess
def test_load_textual_inversion_round_trip(e2e, tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(e2e.out))
    token_id = pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    assert token_id == n
    learned = read_embeds(e2e.out / "learned_embeds.safetensors")[0][PLACEHOLDER]
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[[token_id]]
    assert torch.equal(rows.float(), learned)
    image = pipe(
        f"a {PLACEHOLDER} in a city",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 0  # a real picture, not a constant


# ----------------------------------------------------------------------------------------------------
# In-process runs: token scale, several vectors, classic TI
# ----------------------------------------------------------------------------------------------------


def test_token_scale_max(sd_args, tmp_path, base_vocab):
    run_inprocess(sd_args("--token_scale", "max", steps=2))
    tensors, meta = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")
    np.testing.assert_allclose(row_norms(tensors[PLACEHOLDER]), base_vocab["max"], rtol=1e-5)
    assert float(meta["norm"]) == pytest.approx(base_vocab["max"], rel=1e-6)
    assert meta["token_scale"] == "max"


def test_token_scale_float_with_bin_files(sd_args, tmp_path, base_vocab, tiny_sd):
    run_inprocess(sd_args("--token_scale", "0.25", "--no_safe_serialization", steps=2))
    out = tmp_path / "out"
    assert not (out / "learned_embeds.safetensors").exists()
    data = torch.load(out / "learned_embeds.bin", weights_only=True)
    assert list(data) == [PLACEHOLDER] and data[PLACEHOLDER].dtype == torch.float32
    np.testing.assert_allclose(row_norms(data[PLACEHOLDER]), 0.25, rtol=1e-5)
    # diffusers falls back to learned_embeds.bin on its own.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(out))
    row = pipe.text_encoder.get_input_embeddings().weight.detach()[pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER)]
    assert torch.equal(row.float(), data[PLACEHOLDER][0])


def test_bf16_mixed_precision_keeps_directions_and_state_float32(sd_args, tmp_path, base_vocab):
    run_inprocess(sd_args("--mixed_precision", "bf16", "--checkpointing_steps", "2", "--rsgd_beta", "0.9", steps=2))
    out = tmp_path / "out"
    tensors, _ = read_embeds(out / "learned_embeds.safetensors")
    assert tensors[PLACEHOLDER].dtype == torch.float32
    np.testing.assert_allclose(row_norms(tensors[PLACEHOLDER]), base_vocab["mean"], rtol=1e-5)
    state = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["params"][0].dtype == torch.float32
    np.testing.assert_allclose(np.linalg.norm(state["params"][0].double().numpy(), axis=-1), 1.0, atol=1e-6)
    assert {k: v.dtype for k, v in state["optimizer"]["state"][0].items()} == {
        "prior": torch.float32,
        "step": torch.float32,
        "exp_avg_sq": torch.float32,
    }


def test_multi_token_initializer_trains_one_vector_per_token_and_loads(
    sd_args, tmp_path, base_vocab, tokenizer, tiny_sd
):
    run_inprocess(sd_args("--initializer_token", "red car toy", steps=2))
    tensors, meta = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")
    vectors = tensors[PLACEHOLDER]
    assert tuple(vectors.shape) == (3, base_vocab["weight"].shape[1])
    assert json.loads(meta["tokens"]) == [PLACEHOLDER, f"{PLACEHOLDER}_1", f"{PLACEHOLDER}_2"]
    np.testing.assert_allclose(row_norms(vectors), base_vocab["mean"], rtol=1e-5)
    inits = base_vocab["weight"][[vocab_id(tokenizer, w) for w in ("red", "car", "toy")]]
    # Each vector started from its own token: after 2 steps it is within 2 lr of it, and farther from the others.
    own = angle(inits, vectors)
    assert (own <= 2 * LR + 1e-5).all()
    for i in range(3):
        for j in range(3):
            if i != j:
                assert angle(inits[j], vectors[i]) > own[i] + 0.1

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(tmp_path / "out"))
    ids = pipe.tokenizer.convert_tokens_to_ids([PLACEHOLDER, f"{PLACEHOLDER}_1", f"{PLACEHOLDER}_2"])
    assert ids == [len(pipe.tokenizer) - 3, len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1]
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[ids]
    assert rows.shape[0] == 3
    assert torch.equal(rows.float(), vectors)
    image = pipe(
        f"a {PLACEHOLDER}", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32)


def test_num_vectors_copies_a_one_token_initializer(sd_args, tmp_path, base_vocab, tokenizer):
    run_inprocess(sd_args("--num_vectors", "3", steps=1))
    vectors = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    assert tuple(vectors.shape) == (3, base_vocab["weight"].shape[1])
    np.testing.assert_allclose(row_norms(vectors), base_vocab["mean"], rtol=1e-5)
    init = base_vocab["weight"][vocab_id(tokenizer, "toy")]
    np.testing.assert_allclose(angle(init[None], vectors), LR, atol=1e-4)  # one step of lr from "toy"


def test_classic_ti_adamw_has_a_free_norm(sd_args, tmp_path, base_vocab, tokenizer):
    run_inprocess(sd_args("--optimizer", "adamw", "--learning_rate", "0.05", steps=3))
    tensors, meta = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")
    vector = tensors[PLACEHOLDER].double().numpy()[0]
    init = base_vocab["weight"][vocab_id(tokenizer, "toy")]
    assert meta["method"] == "textual_inversion"
    assert meta["norm"] == "free"
    assert meta["kappa"] == "none"
    norm = np.linalg.norm(vector)
    assert abs(norm - base_vocab["mean"]) / base_vocab["mean"] > 1e-3  # not pinned to the statistic
    assert not np.allclose(vector, init)  # it trained
    # AdamW's first steps move each coordinate by about lr: the embedding itself changed, unconstrained.
    assert np.abs(vector - init).max() == pytest.approx(3 * 0.05, rel=0.2)


def test_classic_ti_default_rate_is_the_authors_ti_baseline(sd_args, tmp_path, base_vocab, tokenizer):
    """--optimizer adamw without --learning_rate: the authors' TI baseline rate, 5e-3 before batch scaling, in both
    scripts' parsers; a first AdamW step at batch 2 moves every coordinate by 2 x the parser's rate."""
    import train_directional_textual_inversion_sdxl as sdxl

    required = ["--placeholder_token", "<x>", "--initializer_token", "x", "--train_data_dir", "d"]
    rates = {m.parse_args(required + ["--optimizer", "adamw"]).learning_rate for m in (train_module(), sdxl)}
    assert rates == {5e-3}
    run_inprocess(sd_args("--optimizer", "adamw", "--train_batch_size", "2", steps=1))
    vector = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")[0][PLACEHOLDER].double().numpy()[0]
    step = np.abs(vector - base_vocab["weight"][vocab_id(tokenizer, "toy")])
    assert step.max() == pytest.approx(2 * rates.pop(), rel=1e-2)  # Adam's first step: lr x sign(gradient)


def test_scale_lr_multiplies_the_step(sd_args, tmp_path, base_vocab, tokenizer):
    # batch 2 x accumulation 2 => effective lr 4 x the default: one step turns the vector by 4 LR rad.
    run_inprocess(sd_args("--train_batch_size", "2", "--gradient_accumulation_steps", "2", steps=1))
    vectors = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    init = base_vocab["weight"][vocab_id(tokenizer, "toy")]
    np.testing.assert_allclose(angle(init[None], vectors), 4 * LR, atol=1e-4)
    run_inprocess(
        sd_args(
            "--train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--no-scale_lr",
            steps=1,
            out=tmp_path / "noscale",
        )
    )
    vectors = read_embeds(tmp_path / "noscale" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(angle(init[None], vectors), LR, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# What a run prints: log lines above the progress bar, no alarming notices
# ----------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_log_lines_never_glue_to_the_progress_bar_and_no_alarming_notices(sd_args, tmp_path):
    """Before: '...norm=0.1124]21:46:08 - INFO ...'; transformers' torchvision notice on every command; diffusers'
    float32-modules notice on the README's own bf16 command."""
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            *map(
                str,
                sd_args(
                    "--mixed_precision",
                    "bf16",
                    "--log_steps",
                    "1",
                    "--checkpointing_steps",
                    "2",
                    "--validation_prompt",
                    "a photo",
                    steps=4,
                    out=tmp_path / "out",
                ),
            ),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "Saved" in err and "INFO" in err
    for line in err.replace("\r", "\n").splitlines():
        assert line.find(" - INFO - ") in (-1, 8), line  # a log line starts its own line: "HH:MM:SS - INFO - ..."
    assert "requires torchvision" not in err
    assert "should be kept in float32" not in err
    warning = [line for line in err.splitlines() if "does not contain" in line]
    assert len(warning) == 1 and "--validation_prompt 'a photo'" in warning[0]  # 10: the prompt lacks the token
