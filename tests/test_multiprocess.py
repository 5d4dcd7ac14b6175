"""Two processes on CPU (torchrun, gloo): one set of files, and the same embedding on every rank."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import (
    PLACEHOLDER,
    REPO_ROOT,
    SCRIPT,
    angle,
    read_embeds,
    script_defaults,
    sd_argv,
    subprocess_env,
    training_outputs,
)


# Runs the script's main() as the entry point does, and has every rank dump what main() returns to a rank file.
WRAPPER = textwrap.dedent(
    """
    import os, sys
    import torch

    sys.path.insert(0, os.path.dirname(os.environ["DTI_TEST_SCRIPT"]))
    import train_directional_textual_inversion as m

    seen = {}

    def callback(step, optimizer, **state):  # during the run: the process group and the optimizer as they are then
        dist = torch.distributed
        seen.update(lr=optimizer.param_groups[0]["lr"], world=dist.get_world_size() if dist.is_initialized() else 1,
                    backend=dist.get_backend() if dist.is_initialized() else "")

    result = m.main(m.parse_args(), callback=callback)
    torch.save(
        {
            "rank": int(os.environ["RANK"]),
            "world": seen["world"],
            "backend": seen["backend"],
            "step": result.global_step,
            "params": [e.param.detach().float().cpu().clone() for e in result.embeddings],
            "vectors": [e.vectors().detach().float().cpu().clone() for e in result.embeddings],
            "effective_lr": seen["lr"],
            "files": result.files,
        },
        os.path.join(os.environ["DTI_TEST_DUMP_DIR"], f"rank{os.environ['RANK']}.pt"),
    )
    """
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.subprocess
def test_torchrun_two_cpu_processes(tiny_sd, example_images, tmp_path, base_vocab, tokenizer):
    out, dumps = tmp_path / "out", tmp_path / "dumps"
    dumps.mkdir()
    wrapper = tmp_path / "run_dti.py"
    wrapper.write_text(WRAPPER)
    argv = sd_argv(tiny_sd, example_images, out, "--save_steps", "2", "--checkpointing_steps", "2", steps=4)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(wrapper),
        *argv,
    ]
    # Plain torchrun as users type it: no `accelerate launch --cpu` (ACCELERATE_USE_CPU); the script must pick gloo
    # itself.
    env = subprocess_env(OMP_NUM_THREADS="1", DTI_TEST_DUMP_DIR=str(dumps), DTI_TEST_SCRIPT=SCRIPT)
    env.pop("ACCELERATE_USE_CPU", None)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr

    # One set of files, written once (rank 0), nothing half-written or duplicated.
    assert training_outputs(out) == [
        "checkpoint-2",
        "checkpoint-4",
        "learned_embeds-steps-2.safetensors",
        "learned_embeds-steps-4.safetensors",
        "learned_embeds.safetensors",
    ]
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert os.listdir(out / ckpt) == ["training_state.pt"]

    # Every rank ran with two processes and ends with the same vectors, equal to the saved file.
    ranks = [torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(os.listdir(dumps)) == ["rank0.pt", "rank1.pt"]
    assert [d["rank"] for d in ranks] == [0, 1]
    # Both processes joined one gloo group (otherwise each trains alone as rank 0 of 1 and both write the files).
    assert all(d["world"] == 2 and d["step"] == 4 for d in ranks), [(d["rank"], d["world"]) for d in ranks]
    assert all(d["backend"] == "gloo" for d in ranks)
    assert ranks[0]["files"] and ranks[1]["files"] == []  # only the main process writes
    assert torch.equal(ranks[0]["params"][0], ranks[1]["params"][0])
    assert torch.equal(ranks[0]["vectors"][0], ranks[1]["vectors"][0])
    tensors, meta = read_embeds(out / "learned_embeds.safetensors")
    assert torch.equal(tensors[PLACEHOLDER], ranks[0]["vectors"][0])
    assert meta["steps"] == "4"
    np.testing.assert_allclose(
        np.linalg.norm(tensors[PLACEHOLDER].double().numpy(), axis=-1), base_vocab["mean"], rtol=1e-5
    )

    # --scale_lr counts the processes: the default learning rate x batch 1 x accumulation 1 x 2 processes.
    effective_lr = 2 * script_defaults().learning_rate
    assert ranks[0]["effective_lr"] == pytest.approx(effective_lr)
    init = base_vocab["weight"][tokenizer.get_vocab()["toy</w>"]]
    turned = angle(init, tensors[PLACEHOLDER][0])
    assert 1e-3 < turned <= 4 * effective_lr + 1e-4

    # The checkpoint records the two-process layout and the same vectors.
    state = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert (
        state["flags"]["num_processes"],
        state["flags"]["train_batch_size"],
        state["flags"]["gradient_accumulation_steps"],
    ) == (2, 1, 1)
    assert torch.equal(state["params"][0], ranks[0]["params"][0])


@pytest.mark.subprocess
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_and_says_so_once(tiny_sd, example_images, tmp_path):
    """torchrun forwards SIGTERM to every rank: they stop together (accelerate's trigger, at the next loss read-back),
    the main process saves, and each message is printed once, not once per process."""
    import signal
    import time

    out = tmp_path / "out"
    argv = sd_argv(tiny_sd, example_images, out, "--checkpointing_steps", "3", "--log_steps", "2", steps=100000)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        SCRIPT,
        *argv,
    ]
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint-3").is_dir():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert stderr.count("Received SIGTERM") == 1, stderr[-3000:]
    assert stderr.count("Stopped at step") == 1
    stopped = int(stderr.split("Stopped at step ")[1].split(":")[0])
    assert stopped % 2 == 0  # both ranks stopped where they meet, at a read-back of --log_steps 2
    state = torch.load(out / f"checkpoint-{stopped}" / "training_state.pt", weights_only=True)
    assert state["global_step"] == stopped
    assert read_embeds(out / "learned_embeds.safetensors")[1]["steps"] == str(stopped)
