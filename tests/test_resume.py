"""Checkpoints and resume of the SD script: a resumed run ends where an uninterrupted one does (optimizer, schedule,
gradient accumulation, a drawn seed, half precision), the new flags govern (each change logged), flags that make the
saved state meaningless are refused, and a damaged or incompatible checkpoint is skipped by `latest` or named.

Resume with captions is tested in test_data.py, the SDXL script's exact resume in test_train_sdxl.py, and a resume
after SIGTERM in test_signals.py.
"""

import glob
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import (
    PLACEHOLDER,
    StepRecorder,
    angle,
    disk_state,
    error_lines,
    one_error,
    read_embeds,
    run_cli_inprocess,
    run_inprocess,
    script_defaults,
    sd_argv,
    training_outputs,
)


# Module fixtures train models: one worker runs this file's tests, so they are made once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_resume")


DEFAULTS = script_defaults()  # the SD script's defaults, read from its parser
LR = DEFAULTS.learning_rate  # batch 1 x 1 process x 1 accumulation keeps it under --scale_lr


# ----------------------------------------------------------------------------------------------------
# Exact resume: the embedding, the optimizer state and the curves of an uninterrupted run
# ----------------------------------------------------------------------------------------------------


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_exact_resume_with_optimizer_and_scheduler_state(sd_args, tmp_path):
    flags = (
        "--rsgd_beta",
        "0.9",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--learning_rate",
        "0.05",
        "--checkpointing_steps",
        "4",
        "--log_steps",
        "4",
    )
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
        np.testing.assert_allclose(
            sb["optimizer"]["state"][0][key].numpy(), sa["optimizer"]["state"][0][key].numpy(), atol=1e-6
        )
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
    run_inprocess(
        sd_args(*flags, "--resume_from_checkpoint", "latest", steps=6, out=b, seed=None), recorder
    )  # a new seed is drawn, the stored one wins
    assert recorder.steps == [4, 5, 6]
    eb = read_embeds(b / "learned_embeds.safetensors")[0][PLACEHOLDER]
    np.testing.assert_allclose(eb.numpy(), ea.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_in_half_precision_ends_within_a_tenth_of_a_step(sd_args, tmp_path, precision):
    """fp16/bf16 resume: the state is restored exactly (loss scale included), but half-precision CPU kernels are not
    bitwise reproducible from one process to the next on every CPU, so the bound is a tenth of one step's turn (here
    the default learning rate x batch 2); a resume that lost any state ends a whole step or more away."""
    flags = ("--mixed_precision", precision, "--train_batch_size", "2", "--checkpointing_steps", "2")
    a, b = tmp_path / "a", tmp_path / "b"
    run_inprocess(sd_args(*flags, steps=4, out=a))
    run_inprocess(sd_args(*flags, steps=2, out=b))
    recorder = StepRecorder()
    run_inprocess(sd_args(*flags, "--resume_from_checkpoint", "latest", steps=4, out=b), recorder)
    assert recorder.steps == [3, 4]
    ea, eb = (read_embeds(out / "learned_embeds.safetensors")[0][PLACEHOLDER].double().numpy() for out in (a, b))
    step_deg = np.degrees(LR * 2)  # the default --learning_rate x batch 2
    assert np.degrees(angle(ea, eb)).max() <= 0.1 * step_deg


# ----------------------------------------------------------------------------------------------------
# The new flags govern; flags that make the saved state meaningless are refused
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_sd, example_images, tmp_path_factory):
    """One 4-step run with checkpoint-2 and checkpoint-4; each test resumes from its own copy."""
    out = tmp_path_factory.mktemp("trained") / "out"
    run_inprocess(sd_argv(tiny_sd, example_images, out, "--checkpointing_steps", "2", steps=4))
    return out


@pytest.fixture
def copied(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out


def test_resume_trains_with_the_new_learning_rate_kappa_and_batch(sd_args, copied, caplog):
    """Before: a resume with --learning_rate 0.001 --kappa 0 trained with the checkpoint's 0.04 and 1e-4."""
    out = copied
    seen = {}

    def callback(step, optimizer, embeddings, **state):
        seen.setdefault("group", dict(optimizer.param_groups[0]))
        seen.setdefault("before", embeddings[0].param.detach().clone())

    caplog.set_level(logging.INFO)
    start = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=True)["params"][0]
    run_inprocess(
        sd_args(
            "--resume_from_checkpoint",
            "latest",
            "--learning_rate",
            "0.001",
            "--kappa",
            "0",
            "--train_batch_size",
            "2",
            "--no-scale_lr",
            steps=5,
            out=out,
        ),
        callback,
    )
    assert seen["group"]["lr"] == pytest.approx(0.001) and seen["group"]["kappa"] == 0
    # beta = 0: the one resumed step turned the direction by exactly the new learning rate
    assert angle(start, seen["before"]).max() == pytest.approx(0.001, rel=1e-3)
    changes = [r.getMessage() for r in caplog.records if "Resume: --" in r.getMessage()]
    # the checkpoint's values: the script's defaults, and sd_argv's batch of 1
    for flag, new, old in (
        ("learning_rate", "0.001", str(DEFAULTS.learning_rate)),
        ("kappa", "0.0", str(DEFAULTS.kappa)),
        ("train_batch_size", "2", "1"),
        ("scale_lr", "False", str(DEFAULTS.scale_lr)),
    ):
        assert any(f"--{flag} is {new}" in m and f"had {old}" in m for m in changes), (flag, changes)


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--initializer_token", "car"], "--initializer_token"),
        (["--optimizer", "adamw"], "--optimizer"),
        (["--num_vectors", "2"], "--num_vectors"),
        (["--placeholder_token", "<other>"], "--placeholder_token"),
    ],
)
def test_resume_refuses_what_makes_the_state_meaningless(sd_args, copied, capsys, flags, flag):
    """Before: another --initializer_token (the prior) was accepted silently."""
    out = copied
    before = {p: os.path.getmtime(p) for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)}
    capsys.readouterr()
    assert run_cli_inprocess(sd_args("--resume_from_checkpoint", "latest", *flags, steps=6, out=out)) == 2
    one_error(capsys, flag, "checkpoint-4", "--output_dir")
    assert {p: os.path.getmtime(p) for p in before} == before


def test_resume_with_other_tokens_is_refused(sd_args, tmp_path, capsys):
    run_inprocess(sd_args("--checkpointing_steps", "2", steps=2))
    code = run_cli_inprocess(sd_args("--num_vectors", "2", "--resume_from_checkpoint", "latest", steps=4))
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "checkpoint-2" in lines[0] and "--num_vectors" in lines[0]


def test_resume_at_or_past_max_train_steps_is_refused_and_leaves_the_outputs(sd_args, copied, capsys):
    """Before: it ran 0 steps, rewrote the files and left stale curves."""
    out = copied
    files = sorted(p for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p))
    stamps = [os.path.getmtime(p) for p in files]
    capsys.readouterr()
    assert run_cli_inprocess(sd_args("--resume_from_checkpoint", "checkpoint-4", steps=3, out=out)) == 2
    one_error(capsys, "step 4", "--max_train_steps is 3")
    assert sorted(p for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)) == files
    assert [os.path.getmtime(p) for p in files] == stamps


# ----------------------------------------------------------------------------------------------------
# Damaged or incompatible checkpoints: skipped by `latest`, named when given
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_checkpoint_is_skipped_by_latest_and_named_when_given(sd_args, copied, capsys, caplog, damage):
    """Before: a raw traceback (the garbage case advising weights_only=False); no fallback for latest."""
    out = copied
    state_file = out / "checkpoint-4" / "training_state.pt"
    data = state_file.read_bytes()
    state_file.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(256)}[damage])
    capsys.readouterr()
    assert run_cli_inprocess(sd_args("--resume_from_checkpoint", str(out / "checkpoint-4"), steps=6, out=out)) == 2
    line = one_error(capsys, "checkpoint-4", "cannot be read")
    assert "weights_only" not in line
    caplog.set_level(logging.WARNING)
    recorder = StepRecorder()
    run_inprocess(
        sd_args("--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", steps=6, out=out), recorder
    )
    assert recorder.steps == [3, 4, 5, 6]  # from checkpoint-2, the newest good one
    assert any("Skipping" in r.getMessage() and "checkpoint-4" in r.getMessage() for r in caplog.records)


def test_checkpoint_with_other_vector_width_is_refused(sd_args, copied, capsys):
    out = copied
    path = out / "checkpoint-4" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    state["params"] = [torch.nn.functional.normalize(torch.randn(1, 48), dim=-1)]  # trained on a wider encoder
    torch.save(state, path)
    capsys.readouterr()
    assert run_cli_inprocess(sd_args("--resume_from_checkpoint", "latest", steps=6, out=out)) == 2
    one_error(capsys, "checkpoint-4", "(1, 48)", "base model")


def test_the_same_flags_written_differently_resume(sd_args, copied, capsys):
    """Before: an explicit --num_vectors 1 (what the run had resolved) was refused as 'None vs 1', and the initializer
    'Toy' as another than 'toy', though CLIP's tokenizer reads both as one token."""
    recorder = StepRecorder()
    argv = sd_args("--resume_from_checkpoint", "latest", "--num_vectors", "1", "--initializer_token", "Toy", steps=6)
    result = run_inprocess(argv + ["--output_dir", copied], recorder)
    assert recorder.steps == [5, 6] and result.global_step == 6


def test_a_checkpoint_of_the_other_script_is_refused_before_the_models_load(
    sd_args, copied, tiny_sd, tiny_sdxl, example_images, tmp_path, capsys
):
    """Before: an SD checkpoint given to the SDXL script (and the reverse) failed after the models had loaded, naming
    only the vectors' shapes. Now one sentence names the script that made it; nothing changes on disk."""
    import train_directional_textual_inversion_sdxl as sdxl

    before = disk_state(copied)
    argv = sd_argv(tiny_sdxl, example_images, copied, "--resume_from_checkpoint", "latest", steps=6)
    assert run_cli_inprocess(argv, module=sdxl) == 2
    one_error(capsys, "was made by train_directional_textual_inversion.py", "resume it with that script")
    assert disk_state(copied) == before

    xl = tmp_path / "xl"
    run_inprocess(sd_argv(tiny_sdxl, example_images, xl, "--checkpointing_steps", "1", steps=1), module=sdxl)
    before = disk_state(xl)
    assert run_cli_inprocess(sd_args("--resume_from_checkpoint", "latest", steps=2, out=xl)) == 2
    one_error(capsys, "was made by train_directional_textual_inversion_sdxl.py", "resume it with that script")
    assert disk_state(xl) == before
