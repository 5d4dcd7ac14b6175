"""End-to-end tests of train_directional_textual_inversion.py on a tiny random SD pipeline (CPU, offline).

One run goes through the real entry point (a subprocess) and is checked from many sides; the others run
main(parse_args(...)) in this process, which costs about a second each.
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dti_cli
import dti_utils
from conftest import (
    PLACEHOLDER,
    SCRIPT,
    StepRecorder,
    error_lines,
    read_embeds,
    run_cli_inprocess,
    run_inprocess,
    run_script,
    sd_argv,
    subprocess_env,
    token_embedding_of,
    train_module,
    training_outputs,
)

LR = 0.01  # the script's default rsgd learning rate; batch 1 x 1 process x 1 accumulation keeps it under --scale_lr


def np_angle(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    dot = (a * b).sum(-1)
    return np.arctan2(np.linalg.norm(b - dot[..., None] * a, axis=-1), dot)


def row_norms(t):
    return np.linalg.norm(t.double().numpy(), axis=-1)


def vocab_id(tokenizer, word):
    return tokenizer.get_vocab()[f"{word}</w>"]


# ----------------------------------------------------------------------------------------------------
# One run through the real entry point, checked from many sides
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tiny_sd, example_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    argv = sd_argv(
        tiny_sd, example_images, out,
        "--report_to", "tensorboard",
        "--validation_prompt", f"a {PLACEHOLDER} in a japanese modern city street",
        "--save_as_full_pipeline",
        "--save_steps", "2",
        "--checkpointing_steps", "2",
        "--log_steps", "2",
        steps=4,
    )
    rc, stdout, stderr = run_script(argv)
    return SimpleNamespace(out=out, rc=rc, stdout=stdout, stderr=stderr)


@pytest.mark.subprocess
def test_e2e_exits_cleanly_and_writes_the_expected_files(e2e):
    assert e2e.rc == 0, e2e.stderr[-3000:]
    assert "Traceback" not in e2e.stderr
    out = e2e.out
    for name in ("learned_embeds.safetensors", "learned_embeds-steps-2.safetensors", "learned_embeds-steps-4.safetensors",
                 "checkpoint-2/training_state.pt", "checkpoint-4/training_state.pt", "validation/step-000004-0.png",
                 "model_index.json", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json"):
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
    angle = np_angle(init, vectors.numpy())[0]
    # beta = 0: every step turns the vector by ~lr radians, so after 4 steps 0 < angle <= 4 lr.
    assert 1e-4 < angle <= 4 * LR + 1e-5
    np.testing.assert_allclose(np_angle(step2.numpy(), vectors.numpy()), 0.0, atol=2 * LR + 1e-5)
    assert np_angle(step2.numpy(), vectors.numpy())[0] > 1e-4  # steps 3 and 4 moved it


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
    assert meta["token_scale"] == "mean"
    assert float(meta["kappa"]) == pytest.approx(1e-4)
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
    image = pipe(f"a {PLACEHOLDER} in a city", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
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
        "prior": torch.float32, "step": torch.float32, "exp_avg_sq": torch.float32}


def test_multi_token_initializer_trains_one_vector_per_token_and_loads(sd_args, tmp_path, base_vocab, tokenizer, tiny_sd):
    run_inprocess(sd_args("--initializer_token", "red car toy", steps=2))
    tensors, meta = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")
    vectors = tensors[PLACEHOLDER]
    assert tuple(vectors.shape) == (3, base_vocab["weight"].shape[1])
    assert json.loads(meta["tokens"]) == [PLACEHOLDER, f"{PLACEHOLDER}_1", f"{PLACEHOLDER}_2"]
    np.testing.assert_allclose(row_norms(vectors), base_vocab["mean"], rtol=1e-5)
    inits = base_vocab["weight"][[vocab_id(tokenizer, w) for w in ("red", "car", "toy")]]
    # Each vector started from its own token: after 2 steps it is within 2 lr of it, and farther from the others.
    own = np_angle(inits, vectors.numpy())
    assert (own <= 2 * LR + 1e-5).all()
    for i in range(3):
        for j in range(3):
            if i != j:
                assert np_angle(inits[j], vectors[i].numpy()) > own[i] + 0.1

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(tmp_path / "out"))
    ids = pipe.tokenizer.convert_tokens_to_ids([PLACEHOLDER, f"{PLACEHOLDER}_1", f"{PLACEHOLDER}_2"])
    assert ids == [len(pipe.tokenizer) - 3, len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1]
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[ids]
    assert rows.shape[0] == 3
    assert torch.equal(rows.float(), vectors)
    image = pipe(f"a {PLACEHOLDER}", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_num_vectors_copies_a_one_token_initializer(sd_args, tmp_path, base_vocab, tokenizer):
    run_inprocess(sd_args("--num_vectors", "3", steps=1))
    vectors = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    assert tuple(vectors.shape) == (3, base_vocab["weight"].shape[1])
    np.testing.assert_allclose(row_norms(vectors), base_vocab["mean"], rtol=1e-5)
    init = base_vocab["weight"][vocab_id(tokenizer, "toy")]
    np.testing.assert_allclose(np_angle(init[None], vectors.numpy()), LR, atol=1e-4)  # one step of lr from "toy"


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


def test_scale_lr_multiplies_the_step(sd_args, tmp_path, base_vocab, tokenizer):
    # batch 2 x accumulation 2 => effective lr 4 x 0.01: one step turns the vector by 0.04 rad.
    run_inprocess(sd_args("--train_batch_size", "2", "--gradient_accumulation_steps", "2", steps=1))
    vectors = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    init = base_vocab["weight"][vocab_id(tokenizer, "toy")]
    np.testing.assert_allclose(np_angle(init[None], vectors.numpy()), 4 * LR, atol=1e-4)
    run_inprocess(sd_args("--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--no-scale_lr", steps=1, out=tmp_path / "noscale"))
    vectors = read_embeds(tmp_path / "noscale" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(np_angle(init[None], vectors.numpy()), LR, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ----------------------------------------------------------------------------------------------------


def checkpoint_steps(out):
    """Sorted N of the complete checkpoint-N folders in out."""
    found = glob.glob(os.path.join(str(out), "checkpoint-*", "training_state.pt"))
    return sorted(int(os.path.basename(os.path.dirname(p)).split("-")[1]) for p in found)


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_exact_resume_with_optimizer_and_scheduler_state(sd_args, tmp_path):
    flags = ("--rsgd_beta", "0.9", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "0.05", "--checkpointing_steps", "4",
             "--log_steps", "4")
    a, b = tmp_path / "a", tmp_path / "b"
    run_inprocess(sd_args(*flags, "--checkpoints_total_limit", "1", steps=8, out=a))
    # --checkpoints_total_limit 1 keeps only the newest checkpoint; a checkpoint is kilobytes, not a text encoder.
    assert training_outputs(a) == ["checkpoint-8", "learned_embeds.safetensors"]
    assert _dir_size(a / "checkpoint-8") < 64 * 1024

    run_inprocess(sd_args(*flags, steps=8, out=b))
    assert sorted(p for p in os.listdir(b) if p.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-8"]
    assert _dir_size(b / "checkpoint-4") < 64 * 1024
    os.remove(b / "learned_embeds.safetensors")
    shutil.rmtree(b / "checkpoint-8")

    recorder = StepRecorder()
    run_inprocess(sd_args(*flags, "--resume_from_checkpoint", "latest", steps=8, out=b), recorder)
    assert recorder.steps == [5, 6, 7, 8]  # it really continued from step 4
    ea, meta_a = read_embeds(a / "learned_embeds.safetensors")
    eb, meta_b = read_embeds(b / "learned_embeds.safetensors")
    assert meta_a["steps"] == meta_b["steps"] == "8"
    np.testing.assert_allclose(eb[PLACEHOLDER].numpy(), ea[PLACEHOLDER].numpy(), rtol=0, atol=1e-6)
    # Both checkpoint-8 hold the same optimizer state.
    sa = torch.load(a / "checkpoint-8" / "training_state.pt", weights_only=True)
    sb = torch.load(b / "checkpoint-8" / "training_state.pt", weights_only=True)
    assert sa["global_step"] == sb["global_step"] == 8
    for key in ("prior", "exp_avg_sq", "step"):
        np.testing.assert_allclose(sb["optimizer"]["state"][0][key].numpy(), sa["optimizer"]["state"][0][key].numpy(), atol=1e-6)
    # The training history travels in the checkpoint: the resumed run's curve covers the whole run.
    assert [h[0] for h in sb["history"]] == [h[0] for h in sa["history"]] == [4, 8]
    np.testing.assert_allclose(np.array(sb["history"]), np.array(sa["history"]), rtol=1e-5)


def test_exact_resume_with_gradient_accumulation_and_a_drawn_seed(sd_args, tmp_path):
    flags = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "3")
    a, b = tmp_path / "a", tmp_path / "b"
    run_inprocess(sd_args(*flags, steps=6, out=b, seed=None))  # no --seed: one is drawn and stored
    seed = torch.load(b / "checkpoint-3" / "training_state.pt", weights_only=True)["seed"]
    assert isinstance(seed, int)
    uninterrupted_b = read_embeds(b / "learned_embeds.safetensors")[0][PLACEHOLDER]
    run_inprocess(sd_args(*flags, steps=6, out=a, seed=seed))
    ea = read_embeds(a / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(uninterrupted_b.numpy(), ea.numpy(), atol=1e-6)

    os.remove(b / "learned_embeds.safetensors")
    shutil.rmtree(b / "checkpoint-6")
    recorder = StepRecorder()
    run_inprocess(sd_args(*flags, "--resume_from_checkpoint", "latest", steps=6, out=b, seed=None), recorder)  # a new seed is drawn, the stored one wins
    assert recorder.steps == [4, 5, 6]
    eb = read_embeds(b / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(eb.numpy(), ea.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_in_half_precision_ends_within_a_tenth_of_a_step(sd_args, tmp_path, precision):
    """fp16/bf16 resume: the state is restored exactly (loss scale included), but half-precision CPU kernels are not
    bitwise reproducible from one process to the next on every CPU, so the bound is a tenth of one step's turn
    (0.04 rad); a resume that lost any state ends a whole step or more away."""
    flags = ("--mixed_precision", precision, "--train_batch_size", "2", "--checkpointing_steps", "2")
    a, b = tmp_path / "a", tmp_path / "b"
    run_inprocess(sd_args(*flags, steps=4, out=a))
    run_inprocess(sd_args(*flags, steps=2, out=b))
    recorder = StepRecorder()
    run_inprocess(sd_args(*flags, "--resume_from_checkpoint", "latest", steps=4, out=b), recorder)
    assert recorder.steps == [3, 4]
    ea, eb = (read_embeds(out / "learned_embeds.safetensors")[0][PLACEHOLDER].double().numpy() for out in (a, b))
    step_deg = np.degrees(0.01 * 2)  # --learning_rate 0.01 x batch 2
    assert np.degrees(np_angle(ea, eb)).max() <= 0.1 * step_deg


def test_resume_with_other_tokens_is_refused(sd_args, tmp_path, capsys):
    run_inprocess(sd_args("--checkpointing_steps", "2", steps=2))
    code = run_cli_inprocess(sd_args("--num_vectors", "2", "--resume_from_checkpoint", "latest", steps=4))
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "checkpoint-2" in lines[0] and "--num_vectors" in lines[0]


# ----------------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM
# ----------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_sigterm_saves_embedding_and_checkpoint_then_resume_finishes(sd_args, tmp_path, base_vocab):
    out = tmp_path / "out"
    argv = sd_args("--checkpointing_steps", "5", "--checkpoints_total_limit", "2", steps=100000)
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=so, stderr=se, env=subprocess_env())
        try:
            deadline = time.time() + 120
            while not checkpoint_steps(out):  # a checkpoint-N exists: the loop is running
                assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                assert time.time() < deadline, "training did not start within 120 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 128 + signal.SIGTERM == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    steps = checkpoint_steps(out)
    assert 1 <= len(steps) <= 2  # --checkpoints_total_limit 2
    stopped = steps[-1]
    assert 5 <= stopped < 100000
    assert f"Stopped at step {stopped}" in stderr and "Received SIGTERM" in stderr
    tensors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert meta["steps"] == str(stopped)
    np.testing.assert_allclose(row_norms(tensors[PLACEHOLDER]), base_vocab["mean"], rtol=1e-5)
    state = torch.load(out / f"checkpoint-{stopped}" / "training_state.pt", weights_only=True)
    assert state["global_step"] == stopped
    np.testing.assert_allclose(state["params"][0].numpy() * float(meta["norm"]), tensors[PLACEHOLDER].numpy(), rtol=1e-6, atol=1e-7)

    recorder = StepRecorder()
    run_inprocess(sd_args("--checkpointing_steps", "5", "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest", steps=stopped + 2), recorder)
    assert recorder.steps == [stopped + 1, stopped + 2]
    tensors2, meta2 = read_embeds(out / "learned_embeds.safetensors")
    assert meta2["steps"] == str(stopped + 2)
    np.testing.assert_allclose(row_norms(tensors2[PLACEHOLDER]), base_vocab["mean"], rtol=1e-5)
    assert np_angle(tensors[PLACEHOLDER].numpy(), tensors2[PLACEHOLDER].numpy())[0] <= 2 * LR + 1e-5


# ----------------------------------------------------------------------------------------------------
# Data: skipped files, image modes, EXIF
# ----------------------------------------------------------------------------------------------------


def test_other_files_beside_images_are_skipped_with_a_warning(sd_args, tmp_path, example_images, caplog, base_vocab):
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    (data / "notes.txt").write_text("my cat toy")
    (data / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + os.urandom(64))
    (data / "sub").mkdir()
    caplog.set_level(logging.INFO)
    run_inprocess(sd_args(data=data, steps=1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "dti"]
    assert any("notes.txt" in w for w in warnings), warnings
    assert any("Images = 4 x" in r.getMessage() for r in caplog.records)  # the four PNGs, nothing else
    vectors = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(row_norms(vectors), base_vocab["mean"], rtol=1e-5)


def _save(folder, name, image, **kwargs):
    os.makedirs(folder, exist_ok=True)
    image.save(os.path.join(folder, name), **kwargs)


def test_load_training_images_rgba_and_greyscale(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, 4:] = (200, 10, 10, 255)  # left half fully transparent, right half opaque red
    _save(tmp_path, "a_rgba.png", Image.fromarray(rgba, "RGBA"))
    _save(tmp_path, "b_grey.png", Image.fromarray(np.full((8, 8), 100, np.uint8), "L"))
    palette = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    _save(tmp_path, "c_palette.png", palette)
    _save(tmp_path, "d_grey_alpha.png", Image.fromarray(np.dstack([np.full((8, 8), 50, np.uint8), np.full((8, 8), 0, np.uint8)]), "LA"))
    images = dti_cli.load_training_images(str(tmp_path))
    assert [im.image.mode for im in images] == ["RGB"] * 4
    a, b, c, d = (np.asarray(im.image) for im in images)
    assert (a[:, :4] == 255).all()  # transparency composited on white
    assert (a[:, 4:] == (200, 10, 10)).all()
    assert (b == 100).all()
    assert (c == (10, 20, 30)).all()
    assert (d == 255).all()


def test_load_training_images_16_bit_greyscale_is_scaled(tmp_path):
    values = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    _save(tmp_path, "g16.png", Image.fromarray(values))
    image = np.asarray(dti_cli.load_training_images(str(tmp_path))[0].image).astype(np.float64)
    np.testing.assert_allclose(image[..., 0], values / 257.0, atol=1.0)


def test_load_training_images_applies_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    pixels[:4] = (0, 255, 0)  # a green top stripe makes the rotation's sense visible
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; display rotated 90 degrees clockwise
    _save(tmp_path, "rotated.png", Image.fromarray(pixels), exif=exif)
    image = dti_cli.load_training_images(str(tmp_path))[0].image
    assert image.size == (20, 40)  # width, height swapped
    np.testing.assert_array_equal(np.asarray(image), np.rot90(pixels, k=-1))


# ----------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one "error:" line naming the flag or file, nothing written
# ----------------------------------------------------------------------------------------------------


def _bad_data(tmp_path, kind, example_images):
    folder = tmp_path / f"data-{kind}"
    if kind == "missing":
        return folder
    folder.mkdir()
    if kind == "only_txt":
        (folder / "captions.txt").write_text("a toy")
    elif kind == "corrupt":
        shutil.copy(os.path.join(example_images, "example_0.png"), folder / "good.png")
        (folder / "broken.png").write_bytes(b"this is not a png" * 10)
    elif kind == "truncated":
        good = open(os.path.join(example_images, "example_1.png"), "rb").read()
        (folder / "cut.png").write_bytes(good[: len(good) // 2])
    return folder


@pytest.mark.parametrize(
    "case",
    ["placeholder_in_vocab", "placeholder_empty", "initializer_empty", "initializer_blank", "data_missing", "data_empty",
     "data_only_txt", "data_corrupt", "data_truncated", "num_vectors_conflict", "no_pipeline"],
)
def test_bad_input_exits_2_with_one_error_line(case, sd_args, tmp_path, example_images, capsys):
    out = tmp_path / "out"
    extra, data, expect = [], None, []
    if case == "placeholder_in_vocab":
        extra, expect = ["--placeholder_token", "dog"], ["--placeholder_token", "'dog'"]
    elif case == "placeholder_empty":
        extra, expect = ["--placeholder_token", ""], ["--placeholder_token"]
    elif case == "initializer_empty":
        extra, expect = ["--initializer_token", ""], ["--initializer_token"]
    elif case == "initializer_blank":
        extra, expect = ["--initializer_token", " "], ["--initializer_token"]
    elif case.startswith("data_"):
        kind = case[len("data_"):]
        data = _bad_data(tmp_path, kind, example_images)
        name = {"corrupt": "broken.png", "truncated": "cut.png"}.get(kind, str(data))
        expect = [name] + (["--train_data_dir"] if kind in ("missing", "empty", "only_txt") else [])
    elif case == "num_vectors_conflict":
        extra, expect = ["--initializer_token", "red car toy", "--num_vectors", "2"], ["--num_vectors", "--initializer_token"]
    elif case == "no_pipeline":
        extra, expect = ["--pretrained_model_name_or_path", str(tmp_path / "nowhere")], ["--pretrained_model_name_or_path"]
    capsys.readouterr()
    code = run_cli_inprocess(sd_args(*extra, data=data))
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in expect:
        assert word in lines[0], lines[0]
    assert not out.exists() or not os.listdir(out)


@pytest.mark.subprocess
def test_bad_resolution_through_the_entry_point(sd_args, tmp_path):
    rc, _, stderr = run_script(sd_args("--resolution", "33"), timeout=120)
    lines = error_lines(stderr)
    assert rc == 2, stderr[-2000:]
    assert len(lines) == 1 and "--resolution" in lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,word", [(["--resolution", "33"], "--resolution"), (["--token_scale", "huge"], "--token_scale"),
                                        (["--learning_rate", "0"], "--learning_rate")])
def test_check_args_names_the_flag(sd_args, flags, word):
    with pytest.raises(dti_utils.DTIError, match=word):
        train_module().parse_args(sd_args(*flags))


@pytest.mark.parametrize("flags,word", [
    (["--resolution", "0"], "--resolution"), (["--train_batch_size", "0"], "--train_batch_size"), (["--kappa", "-1"], "--kappa"),
    (["--rsgd_beta", "1"], "--rsgd_beta"), (["--lr_scheduler", "typo"], "--lr_scheduler"), (["--report_to", "tensorbord"], "--report_to"),
    (["--learning_rate", "nan"], "--learning_rate"), (["--kappa", "inf"], "--kappa"), (["--flip_p", "1.5"], "--flip_p"),
])
def test_closed_sets_and_ranges_are_argparse_errors(sd_args, flags, word, capsys):
    """argparse itself refuses them (exit 2, `error: argument --flag: ...`), before anything is imported or loaded."""
    with pytest.raises(SystemExit) as exit_info:
        train_module().parse_args(sd_args(*flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {word}" in err, err


# ----------------------------------------------------------------------------------------------------
# Hub upload (network calls replaced)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def licensed_base(tiny_sd, tmp_path):
    """A copy of the tiny pipeline with a model card that declares a license."""
    base = tmp_path / "base"
    shutil.copytree(tiny_sd, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return base


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    import huggingface_hub.repocard
    from huggingface_hub.utils import filter_repo_objects

    calls = SimpleNamespace(create=[], upload=[], uploaded=None, readme=None, fail=None)

    def create_repo(repo_id, exist_ok=False, token=None, private=False, **kwargs):
        calls.create.append(dict(repo_id=repo_id, exist_ok=exist_ok, token=token, private=private, **kwargs))
        return SimpleNamespace(repo_id=f"tester/{repo_id}")

    def upload_folder(*, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kwargs):
        calls.upload.append(dict(repo_id=repo_id, folder_path=folder_path, ignore_patterns=ignore_patterns, **kwargs))
        if calls.fail:
            raise calls.fail
        files = sorted(os.path.relpath(os.path.join(root, f), folder_path).replace(os.sep, "/")
                       for root, _, names in os.walk(folder_path) for f in names)
        calls.uploaded = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        calls.readme = open(os.path.join(folder_path, "README.md")).read()
        return SimpleNamespace(commit_url="https://example.invalid/commit")

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to reach the Hub")

    def no_card(repo_id, filename, **kwargs):  # ModelCard.load of a new repository (or a Hub base model): no README.md
        raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")

    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", no_card)
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    return calls


def test_push_to_hub_uploads_embeddings_images_and_card_only(sd_args, tmp_path, fake_hub, licensed_base, base_vocab):
    import yaml

    out = tmp_path / "out"
    # Leftovers that must not be uploaded: tracker logs and a half-written temporary file.
    (out / "logs" / "directional_textual_inversion").mkdir(parents=True)
    (out / "logs" / "directional_textual_inversion" / "events.out.tfevents.1.host").write_bytes(b"x")
    (out / ".tmp-abc-learned_embeds.safetensors").write_bytes(b"x")
    argv = sd_args("--pretrained_model_name_or_path", str(licensed_base), "--push_to_hub", "--hub_model_id", "my-dti",
                   "--validation_prompt", f"a {PLACEHOLDER} on a street", "--checkpointing_steps", "2")
    run_inprocess(argv)

    assert [c["repo_id"] for c in fake_hub.create] == ["my-dti"]
    assert fake_hub.create[0]["exist_ok"] is True and fake_hub.create[0]["private"] is False
    assert len(fake_hub.upload) == 1
    upload = fake_hub.upload[0]
    assert upload["repo_id"] == "tester/my-dti"
    assert os.path.abspath(upload["folder_path"]) == str(out)
    uploaded = fake_hub.uploaded
    assert {"README.md", "learned_embeds.safetensors", "validation/step-000004-0.png"} <= set(uploaded), uploaded
    # Nothing else than the card, top-level embeddings and pictures; no checkpoints, logs or temporary files.
    for name in uploaded:
        top_level = "/" not in name
        assert (name == "README.md" or (top_level and name.endswith((".safetensors", ".png")))
                or (name.startswith("validation/") and name.endswith(".png"))), name
        assert not name.startswith((".tmp-", "checkpoint-", "logs/")), name
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()  # present locally, not uploaded

    readme = fake_hub.readme
    assert readme.startswith("---\n")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert "base_model" not in front  # a local folder is no Hub id
    assert front["license"] == "mit"
    assert {"textual_inversion", "directional-textual-inversion", "diffusers"} <= set(front["tags"])
    assert "![validation image 0](validation/step-000004-0.png)" in readme
    assert 'pipe.load_textual_inversion("tester/my-dti")' in readme
    assert PLACEHOLDER in readme
    assert f"{base_vocab['mean']:.4f}" in readme  # the fixed norm is reported


def test_failed_upload_exits_2_and_keeps_the_embedding(sd_args, tmp_path, fake_hub, licensed_base, base_vocab, capsys):
    fake_hub.fail = RuntimeError("503 Service Unavailable")
    argv = sd_args("--pretrained_model_name_or_path", str(licensed_base), "--push_to_hub", "--hub_model_id", "my-dti")
    capsys.readouterr()
    code = run_cli_inprocess(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "hf upload" in lines[0] and "tester/my-dti" in lines[0] and "503" in lines[0]
    tensors, meta = read_embeds(tmp_path / "out" / "learned_embeds.safetensors")
    assert meta["steps"] == "4"
    np.testing.assert_allclose(row_norms(tensors[PLACEHOLDER]), base_vocab["mean"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_help_documents_the_dti_flags():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # undo argparse's line wrapping
    for flag in ("--kappa", "--token_scale", "--scale_lr", "--no-scale_lr", "--optimizer", "--rsgd_beta", "--num_vectors"):
        assert flag in text, flag
    # How --scale_lr acts on the step: the multiplier and what it means in radians.
    assert "batch size x gradient accumulation x processes" in text
    assert "rad" in text
