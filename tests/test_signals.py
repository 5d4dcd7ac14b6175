"""Ctrl-C and SIGTERM: the SD script saves the embedding and a checkpoint, then exits 130/143; a resume finishes the
run; Ctrl-C during a validation stops it at the next denoising step; a second Ctrl-C still saves the embedding.

SIGTERM under torchrun (both ranks stop at one step, each message printed once) is tested in test_multiprocess.py.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dti_cli

from conftest import (
    PLACEHOLDER,
    SCRIPT,
    StepRecorder,
    angle,
    read_embeds,
    row_norms,
    run_inprocess,
    script_defaults,
    subprocess_env,
    train_module,
)


LR = script_defaults().learning_rate  # the SD script's default, read from its parser


# ----------------------------------------------------------------------------------------------------
# SIGTERM: the embedding and a checkpoint saved, exit 143, and a resume finishes the run
# ----------------------------------------------------------------------------------------------------


def checkpoint_steps(out):
    """Sorted N of the complete checkpoint-N folders in out."""
    found = glob.glob(os.path.join(str(out), "checkpoint-*", "training_state.pt"))
    return sorted(int(os.path.basename(os.path.dirname(p)).split("-")[1]) for p in found)


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
    np.testing.assert_allclose(
        state["params"][0].numpy() * float(meta["norm"]), tensors[PLACEHOLDER].numpy(), rtol=1e-6, atol=1e-7
    )

    recorder = StepRecorder()
    run_inprocess(
        sd_args(
            "--checkpointing_steps",
            "5",
            "--checkpoints_total_limit",
            "2",
            "--resume_from_checkpoint",
            "latest",
            steps=stopped + 2,
        ),
        recorder,
    )
    assert recorder.steps == [stopped + 1, stopped + 2]
    tensors2, meta2 = read_embeds(out / "learned_embeds.safetensors")
    assert meta2["steps"] == str(stopped + 2)
    np.testing.assert_allclose(row_norms(tensors2[PLACEHOLDER]), base_vocab["mean"], rtol=1e-5)
    assert angle(tensors[PLACEHOLDER], tensors2[PLACEHOLDER])[0] <= 2 * LR + 1e-5


# ----------------------------------------------------------------------------------------------------
# Ctrl-C: during a validation it stops at the next denoising step; a second one still saves
# ----------------------------------------------------------------------------------------------------


def _start_and_wait(tmp_path, argv, marker, timeout=120):
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err, env=subprocess_env()
        )
    deadline = time.time() + timeout
    while marker not in err_path.read_text():
        assert proc.poll() is None, err_path.read_text()[-3000:]
        assert time.time() < deadline, f"{marker!r} not seen in {timeout} s"
        time.sleep(0.05)
    return proc, err_path


# A validation long enough to be caught in the middle: 3 x 400 denoising steps of the tiny UNet.
_SLOW_VALIDATION = (
    "--validation_prompt",
    f"a {PLACEHOLDER}",
    "--validation_steps",
    "2",
    "--num_validation_images",
    "3",
    "--num_validation_inference_steps",
    "400",
)


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
    assert (
        dti_cli.run_cli(
            lambda args: module.main(args, callback), module.parse_args, [str(a) for a in sd_args(steps=10, out=out)]
        )
        == 130
    )
    assert signal.getsignal(signal.SIGINT) is previous  # the run's handlers are gone
    err = capsys.readouterr().err
    assert "Received SIGINT" in err and "The embedding so far is saved" in err and "Traceback" not in err
    vectors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert meta["steps"] == "3" and torch.isfinite(vectors[PLACEHOLDER]).all()
