"""The training mechanics every training script calls around its loop, each written once.

The loop itself (micro-batches, backward, `optimizer.step()`, schedule, logging, checkpoints, validation) is written
out in each script; this module holds the pieces it calls: the run's session (accelerator, trackers, stop signals,
start-up timing), the sync-free loss window and the guard that skips a non-finite step on the device, the number of
steps and the learning rate, checkpoints (kilobytes, exact resume), and the run's files, upload and summary lines
(`RunFiles`, `log_run_start`). Validation lives in dti_validation.py.
"""

import contextlib
import glob
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid

import torch

from dti_cli import FAMILY_NAMES, SCRIPTS
from dti_files import save_training_embeddings, write_failure_types
from dti_files import why as write_failure
from dti_hub import push_output_to_hub
from dti_utils import DTIError, logger


__all__ = [
    # the session
    "quiet_library_notices",
    "output_dir_lock",
    "training_session",
    "StopSignals",
    "StartupTimer",
    "process_start_time",
    # steps, learning rate and models
    "steps_per_epoch",
    "scaled_learning_rate",
    "vae_dtype",
    "text_encoder_dtype",
    "freeze_models",
    # the step
    "LossWindow",
    "guard_nonfinite_step",
    "average_gradients",
    # checkpoints
    "CHECKPOINT_FILE",
    "list_checkpoints",
    "load_checkpoint",
    "find_checkpoint",
    "check_resume",
    "training_state",
    "restore_training_state",
    "save_checkpoint",
    # the run's files and summary
    "RunFiles",
    "log_run_start",
]


# ----------------------------------------------------------------------------------------------------
# The session: accelerator, trackers, stop signals, start-up timing
# ----------------------------------------------------------------------------------------------------


def _no_torchvision_notice(record):
    return "requires torchvision" not in record.getMessage()


def quiet_library_notices():
    """Silence notices that are noise for this program: transformers announcing, at every start, that its image
    processors fall back to PIL where torchvision is missing (the scripts use none). One filter however often
    called."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_no_torchvision_notice)


class StopSignals:
    """SIGINT/SIGTERM ask the run to stop: the loop saves and exits at the next step boundary (a validation stops at
    its next denoising step). A second signal raises KeyboardInterrupt at once; the session still saves the
    embedding (kilobytes, milliseconds) on the way out."""

    def __init__(self, is_main_process=True):
        self.signum, self.is_main_process, self.save_on_abort, self._previous = None, is_main_process, None, {}

    @property
    def requested(self):
        return self.signum is not None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.is_main_process:  # every process of a torchrun job gets the signal; one line is enough
            print(
                f"\nReceived {signal.Signals(signum).name}: saving the embedding and a checkpoint, then stopping "
                "(again to stop at once).",
                file=sys.stderr,
                flush=True,
            )

    def check(self, accelerator, synced):
        """Whether to stop now: at once in one process; with several, where they all meet (`synced`), through
        accelerate's trigger, so that every process stops at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        if not synced:
            return False
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def output_dir_lock(output_dir):
    """An exclusive lock on the output folder (flock on the folder itself: no file is written) while the run lives:
    a second run into the same folder stops with one sentence instead of mixing its files with this run's. The OS
    releases it when the process ends, however it ends. A folder made here and left empty is removed again. Where the
    folder cannot be made (prepare_output_dir names why) or the OS has no flock, nothing is locked."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    made, fd = not os.path.exists(output_dir), None
    if fcntl is not None and not (os.path.exists(output_dir) and not os.path.isdir(output_dir)):
        try:
            os.makedirs(output_dir, exist_ok=True)
            fd = os.open(output_dir, os.O_RDONLY)
        except OSError:
            fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise DTIError(
                f"Another run is writing to --output_dir {output_dir}; wait for it to finish, or choose another "
                "--output_dir."
            ) from e
    try:
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if made and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)


@contextlib.contextmanager
def training_session(*, output_dir, logging_dir, mixed_precision, report_to):
    """One run's accelerator, logging, stop signals and the lock on its output folder (main process), torn down on
    every exit path: on an error or a second Ctrl-C the embedding is saved first (StopSignals.save_on_abort), then
    the trackers are closed and the lock released. Yields (accelerator, stop)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.contrib.logging import logging_redirect_tqdm

    quiet_library_notices()
    # Under torchrun/accelerate launch on a machine without a GPU, accelerate forms a gloo group only with cpu=True.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=launched and not has_accelerator,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, logging_dir)),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    stop = StopSignals(accelerator.is_main_process)
    lock = output_dir_lock(output_dir) if accelerator.is_main_process else contextlib.nullcontext()
    try:
        with lock, logging_redirect_tqdm(), stop:  # log lines never glue to the progress bar
            try:
                yield accelerator, stop
            except BaseException:
                if stop.save_on_abort is not None and accelerator.is_main_process:
                    with contextlib.suppress(DTIError, OSError):
                        print(f"The embedding so far is saved: {', '.join(stop.save_on_abort())}", file=sys.stderr)
                raise
    finally:
        accelerator.end_training()  # closes the trackers


def process_start_time():
    """When this process started, on time.time()'s clock, from the OS (Linux: /proc); None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")


class StartupTimer:
    """Where the time goes before the first step: `mark(phase)` closes a phase, `report()` logs them on one line.
    The first phase, "imports", runs from the process's start (read from the OS) to the timer's creation at the top
    of main(); where the OS does not tell, it is left out."""

    def __init__(self):
        now, started = time.time(), process_start_time()
        self.started = started if started is not None and started <= now else now
        self.last = now
        self.phases = {"imports": now - self.started} if started is not None else {}

    def mark(self, phase):
        now = time.time()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def report(self):
        now = time.time()
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        logger.info(f"Start-up: {phases}; {now - self.started:.1f} s to the first step")
        return dict(self.phases, total=now - self.started, at=time.perf_counter())  # at: for timing the first step


# ----------------------------------------------------------------------------------------------------
# Steps, learning rate and models
# ----------------------------------------------------------------------------------------------------


def steps_per_epoch(*, num_images, repeats, batch_size, num_processes, accumulation):
    """Optimizer steps in one epoch: the images x repeats, in micro-batches of batch_size per process, accumulated."""
    micro_steps = math.ceil(num_images * repeats / (batch_size * num_processes))
    return math.ceil(micro_steps / accumulation)


def scaled_learning_rate(learning_rate, *, scale_lr, batch_size, accumulation, num_processes):
    """The learning rate, times batch x accumulation x processes with --scale_lr (for rsgd: the step's angle in
    radians)."""
    return learning_rate * accumulation * batch_size * num_processes if scale_lr else learning_rate


def vae_dtype(vae_config, weight_dtype):
    """The VAE's dtype: float32 where its config asks for it under fp16 (the SDXL VAE overflows in fp16)."""
    return (
        torch.float32 if weight_dtype == torch.float16 and getattr(vae_config, "force_upcast", False) else weight_dtype
    )


def text_encoder_dtype(weight_dtype, float32=False):
    """SANA's and Wan's text encoder: bf16 under bf16 mixed precision (as the authors run Gemma-2 and UMT5; the learned
    directions stay float32 in the DirectionalEmbedding), float32 otherwise and with `float32`: Gemma-2 and T5
    overflow in fp16."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 and not float32 else torch.float32


def freeze_models(unet, vae, text_encoders, *, device, xformers=False, gradient_checkpointing=False):
    """Freeze the models and move them to the device. The scripts load each in the dtype it runs in: the text
    encoders float32 (the learned rows' gradient passes through them), the UNet in the mixed-precision dtype, the
    VAE too unless its config asks for float32 (force_upcast)."""
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False).eval().to(device)
    if xformers:
        unet.enable_xformers_memory_efficient_attention()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()


# ----------------------------------------------------------------------------------------------------
# The step: the sync-free loss window, non-finite steps skipped on the device, gradients across processes
# ----------------------------------------------------------------------------------------------------

NONFINITE_PATIENCE = 20  # consecutive non-finite steps before the run stops


class LossWindow:
    """The step losses summed on the device and read back every `every` steps (or at `last`), one sync per read,
    averaged over processes with each embedding's norm and angle from its initializer. Non-finite steps are counted
    on the device; `patience` of them in a row stop the run with a DTIError."""

    def __init__(self, every, device, patience=NONFINITE_PATIENCE):
        self.every, self.patience, self.zero = every, patience, torch.zeros((), device=device)
        self.consecutive_bad = 0
        self._reset()

    def _reset(self):
        self.loss_sum, self.nonfinite, self.size = self.zero.clone(), self.zero.clone(), 0

    def add(self, loss, finite):
        self.loss_sum = self.loss_sum + torch.where(finite, loss, self.zero)
        self.nonfinite = self.nonfinite + (~finite).float()
        self.size += 1

    def due(self, last=False):
        return self.size >= self.every or (last and self.size > 0)

    def report(self, step, accelerator, embeddings, *, output_dir, lr, history, progress):
        """read() at a read-back step, then the figures everywhere they go: the run's history (step, loss, then norm
        and angle per encoder), the progress bar, the trackers."""
        logs = self.read(step, accelerator, embeddings, output_dir)
        logs["lr"] = lr
        suffixes = _log_suffixes(len(embeddings))
        history.append((step, logs["loss"], *(logs[f"{k}{s}"] for s in suffixes for k in ("norm", "angle_deg"))))
        progress.set_postfix(
            loss=f"{logs['loss']:.4f}",
            norm="/".join(f"{logs['norm' + s]:.4f}" for s in suffixes),
            angle="/".join(f"{logs['angle_deg' + s]:.2f}" for s in suffixes) + "deg",
        )
        accelerator.log(logs, step=step)
        return logs

    def read(self, step, accelerator, embeddings, output_dir):
        """{loss, norm, angle_deg (and norm_2, angle_deg_2 for a second encoder)}: the window's figures."""
        figures = torch.stack([self.loss_sum, self.nonfinite, *(x for e in embeddings for x in e.stats())])
        if accelerator.num_processes > 1:
            figures = accelerator.reduce(figures, reduction="mean")
        values = figures.tolist()
        bad, size = round(values[1]), self.size
        self._reset()
        self.consecutive_bad = self.consecutive_bad + bad if bad == size else bad
        if bad:
            logger.warning(f"Skipped {bad} of the last {size} steps: the loss or a gradient was not finite.")
        if self.consecutive_bad >= self.patience:
            raise DTIError(
                f"The loss was not finite for {self.consecutive_bad} steps in a row (at step {step}); the last good "
                f"embedding is saved in {output_dir}. Try --mixed_precision bf16 or no, or a lower --learning_rate."
            )
        logs = {"loss": values[0] / (size - bad) if bad < size else float("nan")}
        for i, suffix in enumerate(_log_suffixes(len(embeddings))):
            logs[f"norm{suffix}"], logs[f"angle_deg{suffix}"] = values[2 + 2 * i], math.degrees(values[3 + 2 * i])
        return logs


def _log_suffixes(num_encoders):
    """The log keys' suffix of each encoder's figures: "" for the first, "_2" for the second (norm, norm_2)."""
    return [""] + [f"_{i + 1}" for i in range(1, num_encoders)]


def guard_nonfinite_step(optimizer, loss, params):
    """Make the coming optimizer.step() skip itself when the loss or a gradient is not finite, decided on the device:
    RiemannianSGD and fused AdamW read `found_inf` (the contract of torch's fused optimizers). Under fp16 loss
    scaling the GradScaler sets found_inf itself (an overflow calibrates the scale and is not a bad step).
    Returns the device flag `finite`."""
    if getattr(optimizer, "scaler", None) is not None:
        return torch.isfinite(loss)
    grads = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    finite = torch.stack([torch.isfinite(loss), *grads]).all()
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = (~finite).float()
    elif not finite.item():  # an optimizer without that contract: skip on the host
        for p in params:
            p.grad = None
    return finite


def average_gradients(accelerator, params):
    """Average the trainable vectors' gradients (a few KB) across processes: every rank then takes the same step."""
    if accelerator.num_processes > 1:
        for p in params:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


# ----------------------------------------------------------------------------------------------------
# Checkpoints: kilobytes (directions, optimizer state, step, seed, flags, history), written atomically
# ----------------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "training_state.pt"
CHECKPOINT_FORMAT = "dti-checkpoint-2"
FIXED_FLAGS = ("placeholder_token", "num_vectors", "initializer_token", "optimizer")  # the state means nothing else
REPORTED_FLAGS = (
    "learning_rate",
    "scale_lr",
    "kappa",
    "rsgd_beta",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "train_batch_size",
    "gradient_accumulation_steps",
    "num_processes",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "token_scale",
    "max_train_steps",
    "mixed_precision",
    "pretrained_model_name_or_path",
)


def list_checkpoints(output_dir):
    """checkpoint-N folders under output_dir that hold a state file, oldest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*")):
        suffix = os.path.basename(path).split("-", 1)[1]
        if suffix.isdigit() and os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def load_checkpoint(path):
    """The state dict of checkpoint folder `path`, read weights-only; a DTIError naming it when it cannot be used."""
    try:
        state = torch.load(os.path.join(path, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged bytes make the unpickler raise almost anything (IndexError, KeyError, ...)
        raise DTIError(
            f"Checkpoint {path} cannot be read ({type(e).__name__}): the file is damaged or not a DTI checkpoint; "
            "resume from another checkpoint-N or start a new --output_dir."
        ) from e
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("dti-checkpoint-"):
        raise DTIError(
            f"Checkpoint {path} is not a DTI checkpoint; resume from another checkpoint-N or start a new --output_dir."
        )
    return state


def find_checkpoint(output_dir, resume_from_checkpoint):
    """(path, state) of the checkpoint to resume from, or (None, None). 'latest' skips checkpoints that do not load
    (with a warning naming each) and takes the newest good one; a path that does not load is an error."""
    if resume_from_checkpoint is None:
        return None, None
    if resume_from_checkpoint == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            try:
                return path, load_checkpoint(path)
            except DTIError as e:
                logger.warning(f"Skipping {path}: {e}")
        logger.warning(
            f"--resume_from_checkpoint latest: no usable checkpoint in {output_dir}; starting a new training run."
        )
        return None, None
    path = resume_from_checkpoint
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(output_dir, path)
    if not os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        raise DTIError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no {CHECKPOINT_FILE} there; pass a checkpoint-N "
            "folder or 'latest'."
        )
    return path, load_checkpoint(path)


def check_resume(path, state, *, flags, family, tokens, init_ids, num_processes):
    """Before any model loads: refuse a resume by another script's family or under flags that make the state
    meaningless, refuse one with nothing left to train, and report each flag that differs from the checkpoint's (the
    new value governs). `flags` are this run's ({name: value}, as parsed); `tokens` and `init_ids` (one list per text
    encoder) what they resolve to, compared as the tokenizer reads them ('Toy' and 'toy' are one initializer for a
    lowercasing tokenizer; an explicit --num_vectors equal to the count it gave is the same). Returns the seed to
    train with: the checkpoint's, so that data order and noise continue."""
    recorded_family = state.get("family") or ("sdxl" if len(state["params"]) == 2 else "sd")
    if recorded_family != family:
        raise DTIError(
            f"Checkpoint {path} was made by {SCRIPTS[recorded_family]} ({FAMILY_NAMES[recorded_family]}); resume it "
            "with that script, or start this one in a new --output_dir."
        )
    recorded_flags = state.get("flags", {})
    recorded = {**recorded_flags, "placeholder_token": state["tokens"][0], "num_vectors": len(state["tokens"])}
    recorded["optimizer"] = state.get("mode")
    now = {**flags, "placeholder_token": tokens[0], "num_vectors": len(tokens), "num_processes": num_processes}
    if "init_ids" in state:  # the initializer as the tokenizer read it, not as it was typed
        recorded["initializer_token"], now["initializer_token"] = state["init_ids"], [list(i) for i in init_ids]
    for flag in FIXED_FLAGS:
        if flag in recorded and recorded[flag] != now[flag]:
            was, this = (
                (recorded_flags.get(flag), flags.get(flag))
                if flag == "initializer_token"
                else (recorded[flag], now[flag])
            )
            raise DTIError(
                f"Checkpoint {path} was made with --{flag} {was!r} and this run has {this!r}; the saved state means "
                f"nothing under another {flag.replace('_', ' ')}: use the same flag or a new --output_dir."
            )
    if flags["max_train_steps"] <= state["global_step"]:
        raise DTIError(
            f"Checkpoint {path} is at step {state['global_step']} and --max_train_steps is "
            f"{flags['max_train_steps']}: nothing to train; raise --max_train_steps to continue (the outputs in "
            f"{flags['output_dir']} are left as they are)."
        )
    for flag in REPORTED_FLAGS:
        if flag in recorded_flags and recorded_flags[flag] != now.get(flag):
            logger.info(
                f"Resume: --{flag} is {now.get(flag)!r} (the checkpoint had {recorded_flags[flag]!r}); the new value "
                "governs."
            )
    if flags["seed"] != state["seed"]:
        logger.info(
            f"Resume: the checkpoint's seed {state['seed']} is kept (not {flags['seed']}) so that data order and "
            "noise continue."
        )
    return int(state["seed"])


def training_state(step, *, run_id, family, seed, mode, flags, init_ids, embeddings, optimizer, scaler, history):
    """The checkpoint's content: everything an exact resume needs, in kilobytes, and the run's identity (run_id: a
    resumed run keeps its checkpoint's; family: the script that made it). `flags` ({name: value}) are kept so that a
    resume can say what changed; `init_ids` (one list per text encoder) are the initializer as the tokenizer read
    it."""
    kept = {k: flags[k] for k in FIXED_FLAGS + REPORTED_FLAGS if k in flags}
    return {
        "format": CHECKPOINT_FORMAT,
        "run_id": run_id,
        "family": family,
        "init_ids": [list(i) for i in init_ids],
        "global_step": step,
        "seed": seed,
        "tokens": embeddings[0].tokens,
        "mode": mode,
        "params": [e.param.detach().float().cpu() for e in embeddings],
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "flags": kept,
        "history": list(history),
    }


def restore_training_state(path, state, embeddings, optimizer, scaler=None):
    """Load the directions, the optimizer's per-parameter state (prior, step, running average) and the loss scaler.
    The optimizer's hyperparameters stay those of this run's flags, and each group's `initial_lr` is set, so that
    `get_scheduler(..., last_epoch=step - 1)` puts the schedule at the checkpoint's step. Returns (step, history)."""
    shapes = [tuple(p.shape) for p in state["params"]]
    if shapes != [tuple(e.param.shape) for e in embeddings]:
        raise DTIError(
            f"Checkpoint {path} holds vectors of shapes {shapes}, but this model's are "
            f"{[tuple(e.param.shape) for e in embeddings]}; resume with the base model it was trained on."
        )
    with torch.no_grad():
        for e, p in zip(embeddings, state["params"]):
            e.param.copy_(p.to(e.param.device))
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, flags in zip(optimizer.param_groups, hyperparameters):
        group.update(flags)
        group["initial_lr"] = flags["lr"]
    if state["scaler"] and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    step = int(state["global_step"])
    logger.info(f"Resumed from {path} at step {step}")
    return step, [tuple(h) for h in state.get("history", [])]


def _run_of(path):
    try:
        return load_checkpoint(path).get("run_id")
    except DTIError:
        return None


def save_checkpoint(output_dir, step, state, total_limit=None):
    """Write checkpoint-N (a temporary folder renamed when complete), then prune this run's oldest beyond
    total_limit (checkpoints of another run, by state["run_id"], are never pruned): a crash at any point leaves the
    previous checkpoints intact."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = None
    try:
        tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-checkpoint-")
        torch.save(state, os.path.join(tmp, CHECKPOINT_FILE))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except write_failure_types() as e:  # torch.save's zip writer raises RuntimeError on a full disk
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        intact = (
            f"the previous checkpoints are intact ({os.path.basename(kept[-1])} is the newest)"
            if kept
            else "no checkpoint was written"
        )
        raise DTIError(
            f"Could not write checkpoint-{step} in {output_dir} ({write_failure(e)}); {intact}. Free some space or "
            "fix the folder, then resume with --resume_from_checkpoint latest."
        ) from e
    if total_limit is not None:
        older = [p for p in list_checkpoints(output_dir) if p != final and _run_of(p) == state.get("run_id")]
        for old in older[: max(len(older) + 1 - total_limit, 0)]:
            logger.info(f"Removing old checkpoint {old} (--checkpoints_total_limit {total_limit})")
            shutil.rmtree(old)
    return final


# ----------------------------------------------------------------------------------------------------
# The run's files, upload and summary lines
# ----------------------------------------------------------------------------------------------------


class RunFiles:
    """What every training script writes, written the same way by the main process: `save(step, suffix)` the
    embedding files, with metadata saying how they were made (method, family, base model, initializer, norm, kappa,
    seed, steps); `checkpoint(step)` a checkpoint-N folder (kilobytes: directions, optimizer state, step, seed,
    flags, history, the run's identity); `stopped(step)` the checkpoint and the line a stopped run ends with;
    `push(...)` the upload with its model card; `done(paths)` the last lines. Made after the optimizer and a resume
    (which gives `history`); `resumed` is the checkpoint the run continues (None for a fresh run), whose run identity
    it keeps: only this run's checkpoints are ever pruned. `flags` are the run's ({name: value}), kept in checkpoints
    so that a resume can say what changed; `init_ids` (one list per encoder) the initializer as the tokenizers read
    it."""

    def __init__(
        self,
        output_dir,
        embeddings,
        *,
        family,
        token,
        base_model,
        initializer_token,
        token_scale,
        kappa,
        seed,
        optimizer,
        scaler,
        history,
        flags,
        resumed,
        init_ids,
        safe_serialization=True,
        checkpoints_total_limit=None,
    ):
        self.output_dir, self.embeddings, self.family, self.token = output_dir, embeddings, family, token
        self.base_model, self.initializer_token, self.kappa, self.seed = base_model, initializer_token, kappa, seed
        self.optimizer, self.scaler, self.history, self.flags = optimizer, scaler, history, dict(flags)
        # a checkpoint written before run identities existed has none: the resumed run takes a new one
        self.run_id = (resumed or {}).get("run_id") or uuid.uuid4().hex[:12]
        self.init_ids = [list(ids) for ids in init_ids]
        self.ext = ".safetensors" if safe_serialization else ".bin"
        self.total_limit = checkpoints_total_limit
        self.dti = embeddings[0].norm is not None
        self.run_info = {
            "family": family,
            "base_model": base_model,
            "initializer_token": initializer_token,
            "token_scale": token_scale,
            "kappa": repr(kappa) if self.dti else "none",
            "seed": seed,
            "run_id": self.run_id,
        }

    def save(self, step, suffix=""):
        """learned_embeds[_2]{suffix} (and SDXL's single file); returns the paths."""
        return save_training_embeddings(
            self.output_dir,
            self.embeddings,
            token=self.token,
            run_info=self.run_info,
            step=step,
            suffix=suffix,
            ext=self.ext,
        )

    def checkpoint(self, step):
        state = training_state(
            step,
            run_id=self.run_id,
            family=self.family,
            seed=self.seed,
            mode="rsgd" if self.dti else "adamw",
            flags=self.flags,
            init_ids=self.init_ids,
            embeddings=self.embeddings,
            optimizer=self.optimizer,
            scaler=self.scaler,
            history=self.history,
        )
        logger.info(f"Saved {save_checkpoint(self.output_dir, step, state, self.total_limit)}")

    def stopped(self, step):
        """A run stopped by a signal: the checkpoint (the embedding is saved already) and where to continue."""
        self.checkpoint(step)
        what = "embeddings" if len(self.embeddings) > 1 else "embedding"
        logger.info(
            f"Stopped at step {step}: {what} and checkpoint-{step} saved in {self.output_dir}; continue with "
            "--resume_from_checkpoint latest."
        )

    def push(self, repo_id, *, hub_token, push_checkpoints, image_paths, steps, validation_prompt, details=None):
        """The model card and the upload (dti_hub.push_output_to_hub); `details` the card's training details."""
        push_output_to_hub(
            self.output_dir,
            repo_id,
            hub_token=hub_token,
            push_checkpoints=push_checkpoints,
            base_model=self.base_model,
            token=self.token,
            initializer_token=self.initializer_token,
            embeddings=self.embeddings,
            image_paths=image_paths,
            steps=steps,
            validation_prompt=validation_prompt,
            kappa=self.kappa,
            ext=self.ext,
            family=self.family,
            details=details,
        )

    def done(self, paths):
        """The last lines: each encoder's vectors, their norm and file."""
        for e, path in zip(self.embeddings, paths):
            norm = e.vectors().norm(dim=-1).mean().item()
            name = f"{e.name}: " if len(self.embeddings) > 1 else ""
            logger.info(f"Done: {name}{len(e.tokens)} vector(s) of norm {norm:.6f} in {path}")


def log_run_start(data, embeddings, *, batch_size, num_processes, accumulation, optimizer, learning_rate, steps, seed):
    """The summary every script logs before its first step: data, batch layout, optimizer, each encoder's tokens and
    norm m."""
    views = data.latent_means.shape[0]
    logger.info("***** Running training *****")
    logger.info(
        f"  Images = {data.num_images} x {data.length // data.num_images} repeats ({views} cached views), batch "
        f"{batch_size} per device x {num_processes} processes x {accumulation} accumulation"
    )
    logger.info(
        f"  Optimizer = {optimizer}, effective learning rate = {learning_rate:g}, steps = {steps}, seed = {seed}"
    )
    for e in embeddings:
        norm = "free (classic TI)" if e.norm is None else f"{e.norm:.6f}"
        head = f"  Tokens {e.tokens}" if len(embeddings) == 1 else f"  {e.name}: tokens {e.tokens}"
        logger.info(f"{head}, norm {norm}")
