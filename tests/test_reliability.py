"""Never lose a training, never silently train the wrong thing (issue 14), and the redesign's fixes (issue 9).

Each test first sets up the failure the issue describes, then checks the fix: one `error:` line naming the flag or
file and what to do, exit code 2, nothing lost on disk; or the right result where the old code gave a wrong one
with exit code 0. Runs go through the scripts' public seams (argv, main()'s callback and return value, files).
"""

import glob
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import dti_concepts
import dti_cli
import dti_utils
from conftest import (PLACEHOLDER, SCRIPT, StepRecorder, error_lines, read_embeds, run_cli_inprocess, run_inprocess, sd_argv, subprocess_env,
                      train_module)


def one_error(capsys, *words):
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def angle(a, b):
    return float(dti_utils.dist(torch.as_tensor(a).double(), torch.as_tensor(b).double()).max())


# ----------------------------------------------------------------------------------------------------
# 1. Resume: the new flags govern, incompatible ones are refused, broken checkpoints are skipped or named
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
    run_inprocess(sd_args("--resume_from_checkpoint", "latest", "--learning_rate", "0.001", "--kappa", "0", "--train_batch_size", "2",
                          "--no-scale_lr", steps=5, out=out), callback)
    assert seen["group"]["lr"] == pytest.approx(0.001) and seen["group"]["kappa"] == 0
    # beta = 0: the one resumed step turned the direction by exactly the new learning rate
    assert angle(start, seen["before"]) == pytest.approx(0.001, rel=1e-3)
    changes = [r.getMessage() for r in caplog.records if "Resume: --" in r.getMessage()]
    for flag, new, old in (("learning_rate", "0.001", "0.01"), ("kappa", "0.0", "0.0001"), ("train_batch_size", "2", "1"), ("scale_lr", "False", "True")):
        assert any(f"--{flag} is {new}" in m and f"had {old}" in m for m in changes), (flag, changes)


@pytest.mark.parametrize("flags, flag", [(["--initializer_token", "car"], "--initializer_token"), (["--optimizer", "adamw"], "--optimizer"),
                                         (["--num_vectors", "2"], "--num_vectors"), (["--placeholder_token", "<other>"], "--placeholder_token")])
def test_resume_refuses_what_makes_the_state_meaningless(sd_args, copied, capsys, flags, flag):
    """Before: another --initializer_token (the prior) was accepted silently."""
    out = copied
    before = {p: os.path.getmtime(p) for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)}
    capsys.readouterr()
    assert run_cli_inprocess(sd_args("--resume_from_checkpoint", "latest", *flags, steps=6, out=out)) == 2
    one_error(capsys, flag, "checkpoint-4", "--output_dir")
    assert {p: os.path.getmtime(p) for p in before} == before


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
    run_inprocess(sd_args("--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", steps=6, out=out), recorder)
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


# ----------------------------------------------------------------------------------------------------
# 2. Values: non-finite flags refused at parse time, --token_scale bounded, a NaN step never reaches the file
# ----------------------------------------------------------------------------------------------------


def test_token_scale_far_out_of_distribution_is_refused_or_warned(sd_args, tmp_path, capsys, caplog, base_vocab):
    """Before: --token_scale 1e30 wrote an infinite-norm vector."""
    assert run_cli_inprocess(sd_args("--token_scale", "1e30")) == 2
    one_error(capsys, "--token_scale", "100x")
    assert run_cli_inprocess(sd_args("--token_scale", str(200 * base_vocab["max"]))) == 2
    one_error(capsys, "--token_scale")
    caplog.set_level(logging.WARNING)
    run_inprocess(sd_args("--token_scale", str(10 * base_vocab["max"]), steps=1, out=tmp_path / "warned"))
    assert any("--token_scale" in r.getMessage() and "out of distribution" in r.getMessage() for r in caplog.records)


def test_nan_gradients_never_reach_the_file_and_the_last_good_embedding_is_on_disk(sd_args, tmp_path, capsys):
    """Before: --learning_rate nan wrote an all-NaN file, and the 'last good embedding' message pointed at it. Here the
    text encoder starts giving NaN after step 3 (a hook registered from the callback): every later step is skipped on
    the device, the run stops after 20 such steps with exit 2, and the file on disk is the step-3 embedding."""
    out = tmp_path / "out"
    kept = {}

    def callback(step, embeddings, **state):
        if step == 3:
            kept["vectors"] = embeddings[0].vectors().detach().clone()
            embeddings[0].text_encoder.register_forward_hook(lambda module, args, output: (output[0] * float("nan"),) + tuple(output[1:]))

    module = train_module()
    code = dti_cli.run_cli(lambda args: module.main(args, callback), module.parse_args, [str(a) for a in sd_args("--log_steps", "5", steps=100, out=out)])
    assert code == 2
    # steps 4-25 are not finite; the windows of --log_steps 5 see 2, 7, 12, 17 then 22 >= 20 in a row
    one_error(capsys, "not finite for 22 steps in a row (at step 25)", f"the last good embedding is saved in {out}")
    vectors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert torch.isfinite(vectors[PLACEHOLDER]).all()
    assert torch.equal(vectors[PLACEHOLDER], kept["vectors"])  # the embedding of the last good step


# ----------------------------------------------------------------------------------------------------
# 3. Initializer: a one-word initializer that the tokenizer splits is refused with the pieces shown
# ----------------------------------------------------------------------------------------------------


def test_a_misspelt_one_word_initializer_is_refused_unless_asked_for(sd_args, tmp_path, capsys, tokenizer):
    """Before: --initializer_token toyy trained 3 vectors ('to', 'y', 'y') with only an INFO line."""
    pieces = [tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in tokenizer.encode("toyy", add_special_tokens=False)]
    assert len(pieces) > 1
    assert run_cli_inprocess(sd_args("--initializer_token", "toyy")) == 2
    one_error(capsys, "--initializer_token 'toyy'", str(pieces), "--allow_multi_token_initializer")
    run_inprocess(sd_args("--initializer_token", "toyy", "--allow_multi_token_initializer", steps=1, out=tmp_path / "asked"))
    assert read_embeds(tmp_path / "asked" / "learned_embeds.safetensors")[0][PLACEHOLDER].shape[0] == len(pieces)


# ----------------------------------------------------------------------------------------------------
# 4. The model path: checked before anything heavy, the family named
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from make_tiny_pipeline import make_tiny_sdxl

    return make_tiny_sdxl(str(tmp_path_factory.mktemp("fam") / "sdxl"))


def test_model_path_errors_are_one_sentence_at_once(sd_args, tmp_path, capsys, tiny_sdxl_dir, tiny_sd):
    """Before: a missing Hub id spent minutes retrying then raised an OSError about scheduler_config.json; the SD
    script on an SDXL model crashed in the UNet; the SDXL script on an SD model blamed the initializer."""
    import train_directional_textual_inversion_sdxl as sdxl

    start = time.perf_counter()
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", "someone/not-a-cached-model")) == 2
    one_error(capsys, "--pretrained_model_name_or_path someone/not-a-cached-model", "HF_HUB_OFFLINE is set", "hf download")
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", str(tmp_path / "missing"))) == 2
    one_error(capsys, "--pretrained_model_name_or_path", "is not a folder")
    (tmp_path / "empty").mkdir()
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", str(tmp_path / "empty"))) == 2
    one_error(capsys, "model_index.json")
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", tiny_sdxl_dir)) == 2
    one_error(capsys, "is an SDXL model", "train_directional_textual_inversion_sdxl.py")
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", tiny_sd), module=sdxl) == 2
    one_error(capsys, "Stable Diffusion 1.x/2.x model", "train_directional_textual_inversion.py")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# 5. Output: checked at start with a real file, stale temporary files removed, the final save rescued
# ----------------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_a_file_fails_before_the_models_load(sd_args, tmp_path, capsys):
    """Before: found only at the final save, with a traceback and the trained embedding gone."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_cli_inprocess(sd_args(out=blocker)) == 2
    one_error(capsys, f"--output_dir {blocker} is a file")
    assert run_cli_inprocess(sd_args(out=blocker / "sub")) == 2
    one_error(capsys, f"--output_dir {blocker / 'sub'} cannot be written")
    assert blocker.read_text() == "not a folder"


def test_a_failed_final_save_is_rescued_to_a_temporary_folder(sd_args, tmp_path, capsys):
    """The output folder disappears under the run (a file takes its place) before the final save."""
    out = tmp_path / "out"

    def callback(step, **state):
        if step == 2:
            shutil.rmtree(out)
            out.write_text("in the way")

    module = train_module()
    assert dti_cli.run_cli(lambda args: module.main(args, callback), module.parse_args, [str(a) for a in sd_args(steps=2, out=out)]) == 2
    line = one_error(capsys, f"Could not write the embedding to {out}", "saved to")
    rescue = line.split("saved to ")[1].split(" instead")[0]
    vectors, meta = read_embeds(os.path.join(rescue, "learned_embeds.safetensors"))
    assert meta["steps"] == "2" and torch.isfinite(vectors[PLACEHOLDER]).all()
    shutil.rmtree(rescue)


def test_stale_temporary_files_are_removed_and_a_previous_embedding_is_named(sd_args, tmp_path, caplog):
    out = tmp_path / "out"
    run_inprocess(sd_args(steps=1, out=out))
    (out / ".tmp-checkpoint-abc123").mkdir()  # what a killed run leaves behind
    (out / ".tmp-checkpoint-abc123" / "training_state.pt").write_bytes(b"half")
    (out / ".tmp-xyzlearned_embeds.safetensors").write_bytes(b"half")
    caplog.set_level(logging.WARNING)
    run_inprocess(sd_args(steps=1, out=out))
    assert not glob.glob(str(out / ".tmp-*"))
    warnings = [r.getMessage() for r in caplog.records if "already holds a learned_embeds.safetensors" in r.getMessage()]
    assert len(warnings) == 1 and str(out) in warnings[0]
    run_inprocess(sd_args("--checkpointing_steps", "1", steps=1, out=out))
    caplog.clear()
    run_inprocess(sd_args("--resume_from_checkpoint", "latest", steps=2, out=out))  # expected there: no warning
    assert not [r for r in caplog.records if "already holds" in r.getMessage()]


def test_a_failed_checkpoint_save_keeps_the_previous_checkpoint(sd_args, tmp_path, capsys):
    """--checkpoints_total_limit 1: the old order pruned checkpoint-2 before writing checkpoint-4, so a failure in
    between left no checkpoint. Here writing checkpoint-4 fails (a file stands where it goes)."""
    out = tmp_path / "out"

    def callback(step, **state):
        if step == 3:
            (out / "checkpoint-4").write_text("in the way")

    module = train_module()
    argv = [str(a) for a in sd_args("--checkpointing_steps", "2", "--checkpoints_total_limit", "1", steps=6, out=out)]
    assert dti_cli.run_cli(lambda args: module.main(args, callback), module.parse_args, argv) == 2
    one_error(capsys, "Could not write checkpoint-4", "checkpoint-2 is the newest")
    assert torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=True)["global_step"] == 2
    assert read_embeds(out / "learned_embeds.safetensors")[1]["steps"] == "4"  # the work so far was saved on the way out
    assert not glob.glob(str(out / ".tmp-*"))


# ----------------------------------------------------------------------------------------------------
# 6. Signals: Ctrl-C during validation stops it at the next denoising step; a second one still saves
# ----------------------------------------------------------------------------------------------------


def _start_and_wait(tmp_path, argv, marker, timeout=120):
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env())
    deadline = time.time() + timeout
    while marker not in err_path.read_text():
        assert proc.poll() is None, err_path.read_text()[-3000:]
        assert time.time() < deadline, f"{marker!r} not seen in {timeout} s"
        time.sleep(0.05)
    return proc, err_path


# A validation long enough to be caught in the middle: 3 x 400 denoising steps of the tiny UNet.
_SLOW_VALIDATION = ("--validation_prompt", f"a {PLACEHOLDER}", "--validation_steps", "2", "--num_validation_images", "3",
                    "--num_validation_inference_steps", "400")


@pytest.mark.subprocess
def test_ctrl_c_during_validation_stops_it_saves_and_exits(sd_args, tmp_path):
    """Before: the first Ctrl-C waited silently for the whole validation."""
    out = tmp_path / "out"
    proc, err_path = _start_and_wait(tmp_path, sd_args(*_SLOW_VALIDATION, steps=1000, out=out), "Validation at step 2")
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    stderr = err_path.read_text()
    assert rc == 130, stderr[-3000:]
    assert time.time() - sent < 10  # stopped at the next denoising step, not after 1200 of them
    assert "Traceback" not in stderr and "Received SIGINT: saving" in stderr
    assert "Stopped at step 2" in stderr
    assert read_embeds(out / "learned_embeds.safetensors")[1]["steps"] == "2"
    assert torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=True)["global_step"] == 2
    assert not glob.glob(str(out / "validation" / "*.png"))  # an interrupted validation leaves no half-denoised images


def test_a_second_ctrl_c_still_saves_the_embedding(sd_args, tmp_path, capsys):
    """Before: the second Ctrl-C ended with a KeyboardInterrupt traceback and an empty output folder. Here two SIGINTs
    arrive at step 3 (sent from the callback to this very process): the first asks for a stop, the second
    interrupts at once; the embedding of step 3 is still written, and the exit code is 130."""
    out = tmp_path / "out"

    def callback(step, **state):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    module = train_module()
    previous = signal.getsignal(signal.SIGINT)
    assert dti_cli.run_cli(lambda args: module.main(args, callback), module.parse_args, [str(a) for a in sd_args(steps=10, out=out)]) == 130
    assert signal.getsignal(signal.SIGINT) is previous  # the run's handlers are gone
    err = capsys.readouterr().err
    assert "Received SIGINT" in err and "The embedding so far is saved" in err and "Traceback" not in err
    vectors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert meta["steps"] == "3" and torch.isfinite(vectors[PLACEHOLDER]).all()


# ----------------------------------------------------------------------------------------------------
# 7. Seed: drawn, logged and stored when not given
# ----------------------------------------------------------------------------------------------------


def test_a_drawn_seed_is_logged_and_stored_in_the_file_and_checkpoint(sd_args, tmp_path, caplog):
    """Before: a run without --seed recorded no seed anywhere."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    run_inprocess(sd_args("--checkpointing_steps", "1", steps=1, out=out, seed=None))
    seed = torch.load(out / "checkpoint-1" / "training_state.pt", weights_only=True)["seed"]
    assert read_embeds(out / "learned_embeds.safetensors")[1]["seed"] == str(seed)
    assert any(f"No --seed given: using {seed}" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------------
# 8. Images: huge, float, tiny
# ----------------------------------------------------------------------------------------------------


def _png_header_only(path, width, height):
    """A PNG whose header announces width x height (Pillow refuses or decodes lazily; nothing this big is allocated)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_huge_float_and_tiny_images(sd_args, tmp_path, capsys, caplog, example_images):
    """Before: a decompression-bomb traceback; a float TIFF became near-black silently; a 1x1 image was upscaled silently."""
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    _png_header_only(data / "huge.png", 30000, 30000)
    assert run_cli_inprocess(sd_args(data=data)) == 2
    one_error(capsys, "huge.png", "resize it")
    os.remove(data / "huge.png")

    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values, "F").save(data / "float.tif")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(data / "dot.png")
    images = {os.path.basename(im.name): im.image for im in dti_cli.load_training_images(str(data))}
    np.testing.assert_allclose(np.asarray(images["float.tif"])[..., 0], np.round(values * 255), atol=0.5)  # scaled, not near-black
    caplog.set_level(logging.WARNING)
    run_inprocess(sd_args(data=data, steps=1, out=tmp_path / "ok"))
    small = [r.getMessage() for r in caplog.records if "far smaller than --resolution" in r.getMessage()]
    assert len(small) == 1 and "dot.png (1x1)" in small[0] and "float.tif" not in small[0]  # 8 px: a quarter of 32, kept

    Image.fromarray(values * 4 - 1, "F").save(data / "float.tif")  # outside [0, 1]: no meaning to assume
    assert run_cli_inprocess(sd_args(data=data)) == 2
    one_error(capsys, "float.tif", "outside [0, 1]")


# ----------------------------------------------------------------------------------------------------
# 9. Output hygiene
# ----------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_log_lines_never_glue_to_the_progress_bar_and_no_alarming_notices(sd_args, tmp_path):
    """Before: '...norm=0.1124]21:46:08 - INFO ...'; transformers' torchvision notice on every command; diffusers'
    float32-modules notice on the README's own bf16 command."""
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, sd_args("--mixed_precision", "bf16", "--log_steps", "1", "--checkpointing_steps", "2",
                                                                     "--validation_prompt", "a photo", steps=4, out=tmp_path / "out"))],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "Saved" in err and "INFO" in err
    for line in err.replace("\r", "\n").splitlines():
        assert line.find(" - INFO - ") in (-1, 8), line  # a log line starts its own line: "HH:MM:SS - INFO - ..."
    assert "requires torchvision" not in err
    assert "should be kept in float32" not in err
    warning = [line for line in err.splitlines() if "does not contain" in line]
    assert len(warning) == 1 and "--validation_prompt 'a photo'" in warning[0]  # 10: the prompt lacks the token


def test_readme_uses_dtype_not_the_deprecated_torch_dtype():
    readme = open(os.path.join(os.path.dirname(SCRIPT), "README.md")).read()
    assert "torch_dtype" not in readme
    assert "dtype=torch.float16" in readme


# ----------------------------------------------------------------------------------------------------
# 10. Tools: convert never overwrites silently, refuses unknown extensions; inspect shouts non-finite vectors
# ----------------------------------------------------------------------------------------------------


def test_convert_refuses_to_overwrite_and_unknown_extensions(tmp_path, capsys):
    source = tmp_path / "emb.safetensors"
    dti_utils.save_embedding_file(str(source), {"<x>": torch.randn(1, 32)})
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"precious")
    assert dti_concepts.main(["convert", str(source), "--to", "comfyui", "--output", str(target)]) == 2
    one_error(capsys, str(target), "--overwrite")
    assert target.read_bytes() == b"precious"
    assert dti_concepts.main(["convert", str(source), "--to", "comfyui", "--output", str(target), "--overwrite"]) == 0
    assert read_embeds(target)[0]
    assert dti_concepts.main(["convert", str(source), "--to", "a1111", "--output", str(tmp_path / "x.ckpt")]) == 2
    one_error(capsys, ".ckpt", ".safetensors")
    assert not (tmp_path / "x.ckpt").exists()


def test_inspect_flags_non_finite_vectors(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    dti_utils.save_embedding_file(str(path), {"<x>": torch.tensor([[float("nan")] * 4, [1.0, 0, 0, 0]])})
    assert dti_concepts.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip().startswith("[")]
    assert "NOT FINITE" in lines[0] and "NOT FINITE" not in lines[1]
    assert dti_concepts.main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [v["finite"] for v in report["encoders"]["text_encoder"]["vectors"]] == [False, True]


# ----------------------------------------------------------------------------------------------------
# Issue 9: flags checked before the models load, epochs that take effect, the Hub repo made at the start
# ----------------------------------------------------------------------------------------------------


def test_lr_scheduler_typo_fails_before_any_model_loads(sd_args, tmp_path, capsys):
    """Before: any string was accepted and failed inside the trainer after the models had loaded. Now argparse refuses
    it: main() never starts, so no folder is made and nothing is loaded."""
    assert run_cli_inprocess(sd_args("--lr_scheduler", "cosine_typo", out=tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "argument --lr_scheduler: invalid choice: 'cosine_typo'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_num_train_epochs_alone_trains_whole_epochs(sd_args, tmp_path):
    """Before: --max_train_steps defaulted to 400, so --num_train_epochs never took effect."""
    argv = [str(a) for a in sd_args("--num_train_epochs", "2", "--train_batch_size", "2", out=tmp_path / "out")]
    del argv[argv.index("--max_train_steps"): argv.index("--max_train_steps") + 2]
    recorder = StepRecorder()
    assert run_inprocess(argv, recorder).global_step == 8
    assert recorder.steps == list(range(1, 9))  # 4 images x 2 repeats = 8 samples, batch 2: 4 steps an epoch, 2 epochs
    argv[argv.index("--num_train_epochs") + 1] = "1"
    assert run_inprocess(argv).global_step == 4


def test_lr_warmup_steps_default_is_zero():
    parser = __import__("argparse").ArgumentParser()
    dti_cli.add_training_args(parser, "m", 512, 0.5)
    assert parser.parse_args(["--placeholder_token", "<x>", "--initializer_token", "toy"]).lr_warmup_steps == 0


def test_a_bad_hub_token_fails_before_training(sd_args, tmp_path, capsys, monkeypatch):
    """The repository is created at the start: a bad token costs seconds, not a training."""
    import huggingface_hub

    def create_repo(*args, **kwargs):
        raise PermissionError("401 Unauthorized: invalid token")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    recorder = StepRecorder()
    module = train_module()
    argv = [str(a) for a in sd_args("--push_to_hub", "--hub_model_id", "me/dti", out=tmp_path / "out")]
    assert dti_cli.run_cli(lambda args: module.main(args, recorder), module.parse_args, argv) == 2
    one_error(capsys, "me/dti", "401", "hf auth login")
    assert recorder.steps == [] and not glob.glob(str(tmp_path / "out" / "learned_embeds*"))


def test_trackers_are_closed_when_a_run_fails(sd_args, tmp_path, capsys):
    """An error inside the run still ends the trackers: the tensorboard event file is flushed and closed."""
    out = tmp_path / "out"

    def callback(step, **state):
        if step == 2:
            raise dti_utils.DTIError("stop here")

    module = train_module()
    argv = [str(a) for a in sd_args("--report_to", "tensorboard", "--log_steps", "1", steps=4, out=out)]
    assert dti_cli.run_cli(lambda args: module.main(args, callback), module.parse_args, argv) == 2
    one_error(capsys, "stop here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(out / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1]  # flushed on the way out, not lost in a buffer
    assert read_embeds(out / "learned_embeds.safetensors")[1]["steps"] == "2"  # and the work so far is on disk
