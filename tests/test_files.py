"""What a run of the SD script leaves on disk when things go wrong: the output folder checked at the start with a real
file, stale temporary files of a killed run removed, a final save or a checkpoint that cannot be written (the
embedding rescued, the previous checkpoint kept), and runs that fail (non-finite steps, an error in the loop) with
the work so far saved and the trackers closed.
"""

import glob
import logging
import os
import shutil

import torch

import dti_cli
import dti_utils

from conftest import PLACEHOLDER, one_error, read_embeds, run_cli_inprocess, run_inprocess, train_module


# ----------------------------------------------------------------------------------------------------
# The output folder: checked at the start with a real file; stale temporary files removed
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


def test_stale_temporary_files_are_removed_and_a_previous_embedding_is_named(sd_args, tmp_path, caplog):
    out = tmp_path / "out"
    run_inprocess(sd_args(steps=1, out=out))
    (out / ".tmp-checkpoint-abc123").mkdir()  # what a killed run leaves behind
    (out / ".tmp-checkpoint-abc123" / "training_state.pt").write_bytes(b"half")
    (out / ".tmp-xyzlearned_embeds.safetensors").write_bytes(b"half")
    caplog.set_level(logging.WARNING)
    run_inprocess(sd_args(steps=1, out=out))
    assert not glob.glob(str(out / ".tmp-*"))
    warnings = [
        r.getMessage() for r in caplog.records if "already holds a learned_embeds.safetensors" in r.getMessage()
    ]
    assert len(warnings) == 1 and str(out) in warnings[0]
    run_inprocess(sd_args("--checkpointing_steps", "1", steps=1, out=out))
    caplog.clear()
    run_inprocess(sd_args("--resume_from_checkpoint", "latest", steps=2, out=out))  # expected there: no warning
    assert not [r for r in caplog.records if "already holds" in r.getMessage()]


# ----------------------------------------------------------------------------------------------------
# Saves that fail: the final embedding rescued to a temporary folder, the previous checkpoint kept
# ----------------------------------------------------------------------------------------------------


def test_a_failed_final_save_is_rescued_to_a_temporary_folder(sd_args, tmp_path, capsys):
    """The output folder disappears under the run (a file takes its place) before the final save."""
    out = tmp_path / "out"

    def callback(step, **state):
        if step == 2:
            shutil.rmtree(out)
            out.write_text("in the way")

    module = train_module()
    assert (
        dti_cli.run_cli(
            lambda args: module.main(args, callback), module.parse_args, [str(a) for a in sd_args(steps=2, out=out)]
        )
        == 2
    )
    line = one_error(capsys, f"Could not write the embedding to {out}", "saved to")
    rescue = line.split("saved to ")[1].split(" instead")[0]
    vectors, meta = read_embeds(os.path.join(rescue, "learned_embeds.safetensors"))
    assert meta["steps"] == "2" and torch.isfinite(vectors[PLACEHOLDER]).all()
    shutil.rmtree(rescue)


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
    assert (
        read_embeds(out / "learned_embeds.safetensors")[1]["steps"] == "4"
    )  # the work so far was saved on the way out
    assert not glob.glob(str(out / ".tmp-*"))


# ----------------------------------------------------------------------------------------------------
# Runs that fail: the last good embedding on disk, the trackers closed
# ----------------------------------------------------------------------------------------------------


def test_nan_gradients_never_reach_the_file_and_the_last_good_embedding_is_on_disk(sd_args, tmp_path, capsys):
    """Before: --learning_rate nan wrote an all-NaN file, and the 'last good embedding' message pointed at it. Here the
    text encoder starts giving NaN after step 3 (a hook registered from the callback): every later step is skipped on
    the device, the run stops after 20 such steps with exit 2, and the file on disk is the step-3 embedding."""
    out = tmp_path / "out"
    kept = {}

    def callback(step, embeddings, **state):
        if step == 3:
            kept["vectors"] = embeddings[0].vectors().detach().clone()
            # the directional embedding is the text encoder's input module: NaN from there on
            embeddings[0].register_forward_hook(lambda module, args, output: output * float("nan"))

    module = train_module()
    code = dti_cli.run_cli(
        lambda args: module.main(args, callback),
        module.parse_args,
        [str(a) for a in sd_args("--log_steps", "5", steps=100, out=out)],
    )
    assert code == 2
    # steps 4-25 are not finite; the windows of --log_steps 5 see 2, 7, 12, 17 then 22 >= 20 in a row
    one_error(capsys, "not finite for 22 steps in a row (at step 25)", f"the last good embedding is saved in {out}")
    vectors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert torch.isfinite(vectors[PLACEHOLDER]).all()
    assert torch.equal(vectors[PLACEHOLDER], kept["vectors"])  # the embedding of the last good step


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
