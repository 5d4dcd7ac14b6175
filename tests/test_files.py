"""What a run of the SD script leaves on disk when things go wrong: the output folder checked at the start with a real
file, stale temporary files of a killed run removed, a final save or a checkpoint that cannot be written (the
embedding rescued, the previous checkpoint kept), and runs that fail (non-finite steps, an error in the loop) with
the work so far saved and the trackers closed.
"""

import glob
import logging
import os
import shutil
import tempfile

import torch

import dti_cli
import dti_training
import dti_utils

from conftest import PLACEHOLDER, disk_state, one_error, read_embeds, run_cli_inprocess, run_inprocess, train_module


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


def test_stale_temporary_files_are_removed_and_an_earlier_run_is_refused_unless_replaced(sd_args, tmp_path, capsys):
    """Before: a fresh run into a folder with an earlier run's files only warned, then replaced its embedding and
    pruned or resumed its checkpoints. Now it is refused with what to do, nothing changed; --overwrite_output_dir
    replaces the earlier run (and removes what a killed run left); a resume continues it."""
    out = tmp_path / "out"
    run_inprocess(sd_args("--checkpointing_steps", "1", steps=1, out=out))
    (out / ".tmp-checkpoint-abc123").mkdir()  # what a killed run leaves behind
    (out / ".tmp-checkpoint-abc123" / "training_state.pt").write_bytes(b"half")
    (out / ".tmp-xyzlearned_embeds.safetensors").write_bytes(b"half")
    before = {
        p: (os.path.getmtime(p), open(p, "rb").read())
        for p in glob.glob(str(out / "**"), recursive=True)
        if os.path.isfile(p)
    }
    capsys.readouterr()
    assert run_cli_inprocess(sd_args(steps=1, out=out)) == 2
    one_error(
        capsys,
        "holds an earlier run's outputs",
        "checkpoint-1",
        "learned_embeds.safetensors",
        "--resume_from_checkpoint latest",
        "--overwrite_output_dir",
    )
    files_now = {p for p in glob.glob(str(out / "**"), recursive=True) if os.path.isfile(p)}
    assert files_now == set(before) and {p: (os.path.getmtime(p), open(p, "rb").read()) for p in before} == before
    earlier = torch.load(out / "checkpoint-1" / "training_state.pt", weights_only=True)["run_id"]
    run_inprocess(sd_args("--overwrite_output_dir", "--checkpointing_steps", "1", steps=1, out=out, seed=1))
    assert not glob.glob(str(out / ".tmp-*"))
    replaced = torch.load(out / "checkpoint-1" / "training_state.pt", weights_only=True)["run_id"]
    assert replaced != earlier and len(replaced) == 12  # checkpoint-1 is this run's now
    assert read_embeds(out / "learned_embeds.safetensors")[1]["seed"] == "1"
    run_inprocess(sd_args("--checkpointing_steps", "1", "--resume_from_checkpoint", "latest", steps=2, out=out))


# ----------------------------------------------------------------------------------------------------
# Saves that fail: the final embedding rescued to a temporary folder, the previous checkpoint kept
# ----------------------------------------------------------------------------------------------------


def test_a_failed_final_save_is_rescued_to_a_temporary_folder(sd_args, tmp_path, capsys, monkeypatch):
    """The output folder disappears under the run (a file takes its place) before the final save. One rescue folder
    (the save on the way out does not make a second one), under the system's temporary folder (here tmp_path)."""
    out = tmp_path / "out"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

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
    assert glob.glob(str(tmp_path / "dti-rescue-*")) == [rescue]


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


# ----------------------------------------------------------------------------------------------------
# A full disk: every write failure is one sentence, the previous good file is kept, the embedding rescued or named
# ----------------------------------------------------------------------------------------------------

NO_SPACE = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _full_disk_for(monkeypatch, folder):
    """safetensors' writer fails under `folder` as on a full disk (it raises SafetensorError, not OSError)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if os.path.realpath(filename).startswith(os.path.realpath(str(folder))):
            raise SafetensorError(NO_SPACE)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_a_full_disk_at_the_final_save_rescues_the_embedding(sd_args, tmp_path, capsys, monkeypatch):
    """Before: safetensors' SafetensorError was not caught: a traceback and no embedding anywhere."""
    out, rescue_root = tmp_path / "out", tmp_path / "tmp"
    rescue_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_root))  # the rescue goes here, not to /tmp

    def callback(step, **state):
        if step == 2:
            _full_disk_for(monkeypatch, out)

    module = train_module()
    argv = [str(a) for a in sd_args(steps=2, out=out)]
    assert dti_cli.run_cli(lambda args: module.main(args, callback), module.parse_args, argv) == 2
    line = one_error(capsys, f"Could not write the embedding to {out}", "No space left on device", "saved to")
    rescued = glob.glob(str(rescue_root / "dti-rescue-*" / "learned_embeds.safetensors"))
    assert len(rescued) == 1 and os.path.dirname(rescued[0]) in line  # one rescue, named in the line
    vectors, meta = read_embeds(rescued[0])
    assert meta["steps"] == "2" and torch.isfinite(vectors[PLACEHOLDER]).all()
    assert not (out / "learned_embeds.safetensors").exists() and not glob.glob(str(out / ".tmp-*"))


def test_a_full_disk_everywhere_says_the_embedding_is_lost_and_why(sd_args, tmp_path, capsys, monkeypatch):
    rescue_root = tmp_path / "tmp"
    rescue_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_root))
    monkeypatch.chdir(tmp_path)

    def callback(step, **state):
        if step == 2:
            _full_disk_for(monkeypatch, tmp_path)  # the output folder, the temporary folder and the current one

    module = train_module()
    argv = [str(a) for a in sd_args(steps=2, out=tmp_path / "out")]
    assert dti_cli.run_cli(lambda args: module.main(args, callback), module.parse_args, argv) == 2
    one_error(capsys, "No space left on device", "the embedding of step 2 is lost", "--resume_from_checkpoint")


def test_a_full_disk_at_a_checkpoint_is_one_sentence_and_keeps_the_work(sd_args, tmp_path, capsys, monkeypatch):
    """torch.save's zip writer raises RuntimeError on a full disk (before: a traceback)."""
    out = tmp_path / "out"
    real = torch.save

    def full(obj, f, *args, **kwargs):
        if "checkpoint" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    assert run_cli_inprocess(sd_args("--checkpointing_steps", "2", steps=4, out=out)) == 2
    one_error(capsys, "Could not write checkpoint-2", "PytorchStreamWriter failed", "no checkpoint was written")
    assert read_embeds(out / "learned_embeds.safetensors")[1]["steps"] == "2"  # saved on the way out
    assert not glob.glob(str(out / "checkpoint-*")) and not glob.glob(str(out / ".tmp-*"))


def test_the_training_curves_never_cost_the_embedding(sd_args, tmp_path, caplog, monkeypatch):
    from matplotlib.figure import Figure

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    caplog.set_level(logging.WARNING)
    result = run_inprocess(sd_args(steps=2, out=tmp_path / "out"))
    assert result.exit_code == 0 and (tmp_path / "out" / "learned_embeds.safetensors").exists()
    warnings = [r.getMessage() for r in caplog.records if "Training curves not saved" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not (tmp_path / "out" / "training_curves.png").exists()


# ----------------------------------------------------------------------------------------------------
# An output folder belongs to one run: a lock while it lives, its identity in its checkpoints
# ----------------------------------------------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_one_sentence(sd_args, tmp_path, capsys):
    """Before: two runs into one --output_dir both printed Done; one's results were gone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = disk_state(out)
    with dti_training.output_dir_lock(str(out)):  # what a running run holds
        assert run_cli_inprocess(sd_args(steps=1, out=out)) == 2
    one_error(capsys, f"Another run is writing to --output_dir {out}", "wait for it")
    assert disk_state(out) == before
    assert run_cli_inprocess(sd_args(steps=1, out=out)) == 0  # released: the folder can be used again


def test_pruning_leaves_another_runs_checkpoints(tmp_path):
    state = {"format": "dti-checkpoint-2", "global_step": 1, "run_id": "other"}
    dti_training.save_checkpoint(str(tmp_path), 1, state)
    for step in (2, 3):
        dti_training.save_checkpoint(str(tmp_path), step, {**state, "global_step": step, "run_id": "mine"}, 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3"]  # mine pruned to one, the other kept


def test_the_output_folder_may_not_be_or_lie_inside_the_data_folder(sd_args, tmp_path, example_images, capsys):
    """Before: the run's training_curves.png and validation images became training images the next time."""
    data = tmp_path / "data"
    shutil.copytree(example_images, data)
    before = disk_state(data)
    for out in (data, data / "run"):
        assert run_cli_inprocess(sd_args(data=data, out=out)) == 2
        one_error(capsys, f"--output_dir {out} is", "--train_data_dir", "outside it")
    assert disk_state(data) == before
