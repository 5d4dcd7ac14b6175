"""The SD script's flags: values refused at parse time (argparse's own errors, and the checks after it), bad input
that stops a run before the models load (exit code 2, one `error:` line naming the flag or file, nothing written),
--token_scale bounds, a one-word initializer split into pieces, the base model's path checked at once, the defaults
that take effect (--num_train_epochs, --lr_warmup_steps, a drawn seed), and --help.
"""

import logging
import os
import shutil
import time

import pytest
import torch

import dti_utils

from conftest import (
    PLACEHOLDER,
    StepRecorder,
    error_lines,
    one_error,
    read_embeds,
    run_cli_inprocess,
    run_inprocess,
    run_script,
    script_defaults,
    train_module,
)


# ----------------------------------------------------------------------------------------------------
# Parse time: closed sets, ranges and non-finite values are refused before anything loads
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,word",
    [
        (["--resolution", "0"], "--resolution"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--kappa", "-1"], "--kappa"),
        (["--rsgd_beta", "1"], "--rsgd_beta"),
        (["--lr_scheduler", "typo"], "--lr_scheduler"),
        (["--report_to", "tensorbord"], "--report_to"),
        (["--learning_rate", "nan"], "--learning_rate"),
        (["--kappa", "inf"], "--kappa"),
        (["--flip_p", "1.5"], "--flip_p"),
        (["--seed", "-5"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--resolution", "100000"], "--resolution"),
        (["--dataloader_num_workers", "-3"], "--dataloader_num_workers"),
    ],
)
def test_closed_sets_and_ranges_are_argparse_errors(sd_args, flags, word, capsys):
    """argparse itself refuses them (exit 2, `error: argument --flag: ...`), before anything is imported or loaded."""
    with pytest.raises(SystemExit) as exit_info:
        train_module().parse_args(sd_args(*flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {word}" in err, err


def test_lr_scheduler_typo_fails_before_any_model_loads(sd_args, tmp_path, capsys):
    """Before: any string was accepted and failed inside the trainer after the models had loaded. Now argparse refuses
    it: main() never starts, so no folder is made and nothing is loaded."""
    assert run_cli_inprocess(sd_args("--lr_scheduler", "cosine_typo", out=tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "argument --lr_scheduler: invalid choice: 'cosine_typo'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,word",
    [
        (["--resolution", "33"], "--resolution"),
        (["--token_scale", "huge"], "--token_scale"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--optimizer", "adamw", "--learning_rate", "1e38"], "--learning_rate 1e\\+38 is far beyond"),
        (["--report_to", "comet_ml"], "--report_to comet_ml needs the comet_ml package: pip install comet-ml"),
    ],
)
def test_check_args_names_the_flag(sd_args, flags, word):
    with pytest.raises(dti_utils.DTIError, match=word):
        train_module().parse_args(sd_args(*flags))


@pytest.mark.subprocess
def test_bad_resolution_through_the_entry_point(sd_args, tmp_path):
    rc, _, stderr = run_script(sd_args("--resolution", "33"), timeout=120)
    lines = error_lines(stderr)
    assert rc == 2, stderr[-2000:]
    assert len(lines) == 1 and "--resolution" in lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


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
    [
        "placeholder_in_vocab",
        "placeholder_empty",
        "initializer_empty",
        "initializer_blank",
        "data_missing",
        "data_empty",
        "data_only_txt",
        "data_corrupt",
        "data_truncated",
        "num_vectors_conflict",
        "no_pipeline",
    ],
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
        kind = case[len("data_") :]
        data = _bad_data(tmp_path, kind, example_images)
        name = {"corrupt": "broken.png", "truncated": "cut.png"}.get(kind, str(data))
        expect = [name] + (["--train_data_dir"] if kind in ("missing", "empty", "only_txt") else [])
    elif case == "num_vectors_conflict":
        extra, expect = (
            ["--initializer_token", "red car toy", "--num_vectors", "2"],
            ["--num_vectors", "--initializer_token"],
        )
    elif case == "no_pipeline":
        extra, expect = (
            ["--pretrained_model_name_or_path", str(tmp_path / "nowhere")],
            ["--pretrained_model_name_or_path"],
        )
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


# ----------------------------------------------------------------------------------------------------
# --token_scale: far out of the vocabulary's distribution is refused, out of it warned
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


# ----------------------------------------------------------------------------------------------------
# --initializer_token: a one-word initializer that the tokenizer splits is refused with the pieces shown
# ----------------------------------------------------------------------------------------------------


def test_a_misspelt_one_word_initializer_is_refused_unless_asked_for(sd_args, tmp_path, capsys, tokenizer):
    """Before: --initializer_token toyy trained 3 vectors ('to', 'y', 'y') with only an INFO line."""
    pieces = [
        tokenizer.convert_ids_to_tokens(i).replace("</w>", "")
        for i in tokenizer.encode("toyy", add_special_tokens=False)
    ]
    assert len(pieces) > 1
    assert run_cli_inprocess(sd_args("--initializer_token", "toyy")) == 2
    one_error(capsys, "--initializer_token 'toyy'", str(pieces), "--allow_multi_token_initializer")
    run_inprocess(
        sd_args("--initializer_token", "toyy", "--allow_multi_token_initializer", steps=1, out=tmp_path / "asked")
    )
    assert read_embeds(tmp_path / "asked" / "learned_embeds.safetensors")[0][PLACEHOLDER].shape[0] == len(pieces)


# ----------------------------------------------------------------------------------------------------
# --pretrained_model_name_or_path: checked before anything heavy, the model family named
# ----------------------------------------------------------------------------------------------------


def test_model_path_errors_are_one_sentence_at_once(sd_args, tmp_path, capsys, tiny_sdxl, tiny_sd):
    """Before: a missing Hub id spent minutes retrying then raised an OSError about scheduler_config.json; the SD
    script on an SDXL model crashed in the UNet; the SDXL script on an SD model blamed the initializer."""
    import train_directional_textual_inversion_sdxl as sdxl

    start = time.perf_counter()
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", "someone/not-a-cached-model")) == 2
    one_error(
        capsys, "--pretrained_model_name_or_path someone/not-a-cached-model", "HF_HUB_OFFLINE is set", "hf download"
    )
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", str(tmp_path / "missing"))) == 2
    one_error(capsys, "--pretrained_model_name_or_path", "is not a folder")
    (tmp_path / "empty").mkdir()
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", str(tmp_path / "empty"))) == 2
    one_error(capsys, "model_index.json")
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", tiny_sdxl)) == 2
    one_error(capsys, "is an SDXL model", "train_directional_textual_inversion_sdxl.py")
    assert run_cli_inprocess(sd_args("--pretrained_model_name_or_path", tiny_sd), module=sdxl) == 2
    one_error(capsys, "Stable Diffusion 1.x/2.x model", "train_directional_textual_inversion.py")
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Defaults that take effect: --num_train_epochs alone, --lr_warmup_steps 0, a seed drawn when not given
# ----------------------------------------------------------------------------------------------------


def test_num_train_epochs_alone_trains_whole_epochs(sd_args, tmp_path):
    """Before: --max_train_steps defaulted to 400, so --num_train_epochs never took effect."""
    argv = [str(a) for a in sd_args("--num_train_epochs", "2", "--train_batch_size", "2", out=tmp_path / "out")]
    del argv[argv.index("--max_train_steps") : argv.index("--max_train_steps") + 2]
    recorder = StepRecorder()
    assert run_inprocess(argv, recorder).global_step == 8
    assert recorder.steps == list(range(1, 9))  # 4 images x 2 repeats = 8 samples, batch 2: 4 steps an epoch, 2 epochs
    argv[argv.index("--num_train_epochs") + 1] = "1"
    assert run_inprocess(argv + ["--overwrite_output_dir"]).global_step == 4


def test_lr_warmup_steps_default_is_zero():
    import train_directional_textual_inversion_sdxl as sdxl

    for module in (train_module(), sdxl):  # both scripts' parsers
        assert script_defaults(module).lr_warmup_steps == 0


def test_a_drawn_seed_is_logged_and_stored_in_the_file_and_checkpoint(sd_args, tmp_path, caplog):
    """Before: a run without --seed recorded no seed anywhere."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    run_inprocess(sd_args("--checkpointing_steps", "1", steps=1, out=out, seed=None))
    seed = torch.load(out / "checkpoint-1" / "training_state.pt", weights_only=True)["seed"]
    assert read_embeds(out / "learned_embeds.safetensors")[1]["seed"] == str(seed)
    assert any(f"No --seed given: using {seed}" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_help_documents_the_dti_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_module().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag in (
        "--kappa",
        "--token_scale",
        "--scale_lr",
        "--no-scale_lr",
        "--optimizer",
        "--rsgd_beta",
        "--num_vectors",
    ):
        assert flag in text, flag
    # How --scale_lr acts on the step: the multiplier and what it means in radians.
    assert "batch size x gradient accumulation x processes" in text
    assert "rad" in text
    assert "adamw: default 0.005, the authors' TI baseline" in text  # the paper's TI rate, before batch scaling


@pytest.mark.parametrize("debug", ["", "1"])
def test_dti_debug_shows_the_cause_of_an_error(sd_args, tmp_path, capsys, monkeypatch, debug):
    """An error is one line; with DTI_DEBUG=1 the traceback of the error and of its cause (the damaged checkpoint's
    unpickling error) comes first, and the one line still ends the output."""
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.pt").write_bytes(b"not a checkpoint")
    monkeypatch.setenv("DTI_DEBUG", debug)
    assert run_cli_inprocess(sd_args("--resume_from_checkpoint", checkpoint)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: Checkpoint ") and "cannot be read" in err[-1]
    tracebacks = [line for line in err if line.startswith("Traceback")]
    if debug:
        assert len(tracebacks) == 2 and "The above exception was the direct cause of the following exception:" in err
        assert any(line.startswith("dti_utils.DTIError: Checkpoint ") for line in err)
    else:
        assert not tracebacks and len([line for line in err if line.startswith("error:")]) == 1


def test_a_resolution_beyond_this_machines_memory_is_refused(sd_args, monkeypatch):
    """Before: --resolution 100000 ran into a MemoryError traceback. Here the machine reports 2 GiB."""
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2 * 2**30 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    with pytest.raises(dti_utils.DTIError, match="--resolution 8192 needs about 4 GiB .* has 2 GiB; use at most 5792"):
        train_module().parse_args(sd_args("--resolution", "8192"))
    assert train_module().parse_args(sd_args("--resolution", "4096")).resolution == 4096  # 1 GiB fits


def test_a_tokenizer_or_variant_that_is_not_there_is_one_sentence(sd_args, tmp_path, tiny_sd, capsys):
    """Before: tracebacks from transformers and diffusers after the models began to load."""
    cases = [
        (["--tokenizer_name", str(tmp_path / "nowhere")], ["--tokenizer_name", "does not exist"]),
        (["--tokenizer_name", "someone/no-such-tokenizer"], ["not in the local Hugging Face cache", "HF_HUB_OFFLINE"]),
        (["--tokenizer_name", str(tiny_sd)], ["--tokenizer_name", "holds no tokenizer files"]),
        (["--variant", "fp16"], ["--variant fp16", "unet has no fp16 weight files", "drop --variant"]),
    ]
    for flags, words in cases:
        assert run_cli_inprocess(sd_args(*flags, out=tmp_path / "out")) == 2
        one_error(capsys, *words)
        assert not (tmp_path / "out").exists()


def test_validation_epochs_is_turned_into_steps(sd_args, tmp_path, caplog):
    """diffusers' deprecated --validation_epochs was refused; now one epoch (4 images x 1 repeat, batch 1: 4 steps)
    validates at step 4, and the final validation comes at step 6."""
    caplog.set_level(logging.WARNING)
    out = tmp_path / "out"
    flags = ("--validation_epochs", "1", "--repeats", "1", "--validation_prompt", f"a photo of {PLACEHOLDER}")
    run_inprocess(sd_args(*flags, steps=6, out=out))
    assert sorted(os.listdir(out / "validation")) == ["step-000004-0.png", "step-000006-0.png"]
    assert any("validating every 4 steps" in r.getMessage() for r in caplog.records)


def test_a_capitalised_placeholder_is_trained_as_the_tokenizer_reads_it(sd_args, tmp_path, tiny_sd, caplog):
    """Before: '<Cat-Toy>' with 2 vectors: CLIP's tokenizer lowercases prompts while the added tokens kept their case,
    so diffusers' load_textual_inversion (and the validation images) used 1 of the 2 vectors."""
    from diffusers import StableDiffusionPipeline

    caplog.set_level(logging.WARNING)
    out = tmp_path / "out"
    flags = ("--placeholder_token", "<Cat-Toy>", "--num_vectors", "2", "--validation_prompt", "a <Cat-Toy> toy")
    result = run_inprocess(sd_args(*flags, steps=1, out=out))
    assert result.embeddings[0].tokens == ["<cat-toy>", "<cat-toy>_1"]
    assert any("'<Cat-Toy>' is trained as '<cat-toy>'" in r.getMessage() for r in caplog.records)
    tensors, _ = read_embeds(out / "learned_embeds.safetensors")
    assert list(tensors) == ["<cat-toy>"] and tensors["<cat-toy>"].shape[0] == 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(out))
    assert pipe.maybe_convert_prompt("a <cat-toy> toy", pipe.tokenizer) == "a <cat-toy> <cat-toy>_1 toy"
