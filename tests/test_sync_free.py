"""The training step never waits on the device: no device->host read and no host->device copy per step.

On a GPU such a sync stalls the host until the queued kernels finish, so the next step's launches cannot
overlap them. The checks run on the CPU through a dispatch mode that sees every aten op: a read of a tensor's
value on the host goes through one of SYNC_OPS, and a copy between devices shows as an op whose tensors sit
on more than one device (provoked here with data on the 'meta' device).
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dti_utils import RiemannianSGD, TrainingData, retract

# Ops that return data-dependent host values or shapes: each one is a device->host sync on a GPU.
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2", "allclose"}


class SyncRecorder(TorchDispatchMode):
    """Records host reads of device values and ops that mix devices."""

    def __init__(self):
        super().__init__()
        self.syncs, self.cross_device = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name.startswith("index") and any(t.dtype == torch.bool for t in tensors[1:]):
            self.syncs.append(f"{name} with a boolean mask")  # the result's size depends on the mask's values
        devices = {t.device.type for t in tensors}
        target = kwargs.get("device")
        if target is not None:
            devices.add(torch.device(target).type)
        if len(devices) > 1:
            self.cross_device.append(name)
        return func(*args, **kwargs)


def test_recorder_sees_the_syncs_it_is_meant_to_catch():
    x = torch.ones(3)
    with SyncRecorder() as rec:
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 0]
        torch.zeros(2).to("meta")
    assert rec.syncs == ["_local_scalar_dense", "_local_scalar_dense", "index with a boolean mask"]
    assert rec.cross_device


def _meta_data(num_images=3, flips=2, crops=2, repeats=3, templates=5):
    means = torch.empty(num_images * flips * crops, 4, 8, 8, device="meta")
    view_index = torch.arange(num_images * flips * crops).reshape(num_images, flips, crops)
    prompt_ids = [torch.empty(templates, 77, dtype=torch.long, device="meta")]
    extra = {"time_ids": torch.empty(len(means), 6, device="meta")}
    return TrainingData(means, means.clone(), view_index, prompt_ids, repeats=repeats, flip_p=0.5, seed=3, extra=extra)


def test_batches_index_device_tensors_only_within_an_epoch():
    data = _meta_data()  # 9 samples: batch 2 on 1 process gives 5 steps per epoch, the last one short
    per_epoch = data.steps_per_epoch(2, 1)
    with SyncRecorder() as rec:
        first = data.batch(0, 2, 1, 0)  # the epoch's draws move to the device once, here
    assert rec.cross_device and not rec.syncs
    with SyncRecorder() as rec:
        for step in range(1, per_epoch):
            batch = data.batch(step, 2, 1, 0)
    assert rec.cross_device == [] and rec.syncs == []
    assert first["mean"].device.type == "meta" and batch["time_ids"].device.type == "meta"
    assert batch["mean"].shape[0] == 1  # 9 = 4 * 2 + 1
    with SyncRecorder() as rec:
        data.batch(per_epoch, 2, 1, 0)  # a new epoch: one move again, still no host read
    assert rec.cross_device and not rec.syncs


def test_batches_on_the_device_equal_the_cpu_draws():
    """Indexing the epoch tables on the device picks what the CPU draws say, every rank its share."""
    cpu = TrainingData(torch.arange(12.0).view(12, 1, 1, 1), torch.ones(12, 1, 1, 1), torch.arange(12).reshape(3, 2, 2),
                       [torch.arange(5).view(5, 1)], repeats=3, flip_p=0.5, seed=3)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)  # the documented epoch draw
    order = torch.randperm(9, generator=g)
    flips = (torch.rand(9, generator=g) < 0.5).long()
    crops = torch.randint(0, 2, (9,), generator=g)
    templates = torch.randint(0, 5, (9,), generator=g)
    expected = cpu.view_index[order % 3, flips[order], crops[order]]
    seen_views, seen_templates = [], []
    for step in range(cpu.steps_per_epoch(2, 2)):
        for rank in range(2):
            b = cpu.batch(step, 2, 2, rank)
            seen_views += b["mean"].flatten().long().tolist()
            seen_templates += b["input_ids"][0].flatten().tolist()
    # ranks interleave within a step: rank 0 takes the even positions of the step's span, rank 1 the odd
    assert sorted(seen_views) == sorted(expected.tolist() + expected[:1].tolist())  # 9 samples, 2 ranks: the last rank pads with the first
    assert seen_views[:4] == [int(expected[0]), int(expected[2]), int(expected[1]), int(expected[3])]
    assert seen_templates[:4] == [int(templates[order[i]]) for i in (0, 2, 1, 3)]


def _train_steps_recorded(sd_args, monkeypatch, *extra, steps=6):
    """Run the script's main() with fit() replaced by `steps` train_step calls under the recorder."""
    import dti_utils
    from conftest import run_inprocess

    recorded = {}

    def recorded_fit(trainer):
        before = [c.param.detach().clone() for c in trainer.concepts]
        trainer.train_step()  # the first step creates optimizer state: not part of the steady state
        trainer.global_step += 1
        with SyncRecorder() as rec:
            for _ in range(steps):
                loss, finite = trainer.train_step()
                trainer.global_step += 1
        recorded.update(rec=rec, loss=loss, finite=finite, moved=[not torch.equal(b, c.param) for b, c in zip(before, trainer.concepts)])
        return trainer.global_step

    monkeypatch.setattr(dti_utils.DTITrainer, "fit", recorded_fit)
    run_inprocess(sd_args(*extra, steps=steps + 1))
    return recorded


def test_train_step_reads_nothing_back_dti(sd_args, monkeypatch):
    # batch 1 x 2 accumulation over 8 samples: the 7 steps cross an epoch boundary
    out = _train_steps_recorded(sd_args, monkeypatch, "--gradient_accumulation_steps", "2")
    assert out["rec"].syncs == []
    assert bool(out["finite"]) and out["moved"] == [True]


def test_train_step_reads_nothing_back_classic_adamw(sd_args, monkeypatch):
    out = _train_steps_recorded(sd_args, monkeypatch, "--optimizer", "adamw", "--learning_rate", "0.05")
    assert out["rec"].syncs == []
    assert bool(out["finite"]) and out["moved"] == [True]


def _nan_after(compute_loss, nan_steps):
    calls = {"n": 0}

    def patched(batch, generator):
        calls["n"] += 1
        loss = compute_loss(batch, generator)
        return loss * float("nan") if calls["n"] in nan_steps else loss

    return patched


def test_nonfinite_step_is_skipped_on_the_device_by_both_optimizers(sd_args, monkeypatch, tmp_path):
    """A NaN loss leaves the vectors and the optimizer state as they were, decided without a host read."""
    import dti_utils
    from conftest import run_inprocess

    seen = {}

    def fit(trainer):
        trainer.train_step()
        trainer.compute_loss = _nan_after(trainer.compute_loss, {1})
        params = [c.param.detach().clone() for c in trainer.concepts]
        state = {k: v.clone() for c in trainer.concepts for k, v in trainer.optimizer.optimizer.state[c.param].items()}
        with SyncRecorder() as rec:
            loss, finite = trainer.train_step()
        seen[trainer.args.optimizer] = (rec.syncs, bool(finite), params, state, trainer)
        return 1

    monkeypatch.setattr(dti_utils.DTITrainer, "fit", fit)
    monkeypatch.setattr(dti_utils.DTITrainer, "finish", lambda self: None)
    monkeypatch.setattr(dti_utils.DTITrainer, "publish", lambda self, *a, **k: None)
    for optimizer in ("rsgd", "adamw"):
        run_inprocess(sd_args("--optimizer", optimizer, steps=2, out=tmp_path / optimizer))
    for optimizer, (syncs, finite, params, state, trainer) in seen.items():
        assert syncs == [] and not finite, optimizer
        c = trainer.concepts[0]
        assert torch.equal(c.param.detach(), params[0]), optimizer
        for key, value in trainer.optimizer.optimizer.state[c.param].items():
            assert torch.equal(value, state[key]), (optimizer, key)


# -- fp16 loss scaling: RiemannianSGD follows torch's GradScaler contract for fused optimizers ----------------


def _rows(seed, n=3, dim=16):
    return retract(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


def test_grad_scaler_step_equals_the_unscaled_step_without_a_host_read():
    kwargs = dict(lr=0.05, kappa=0.3, beta=0.9)  # kappa makes the unscaling matter even for the normalised step
    grad = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    plain = torch.nn.Parameter(_rows(0))
    opt = RiemannianSGD([plain], **kwargs)
    plain.grad = grad.clone()
    opt.step()

    scaled = torch.nn.Parameter(_rows(0))
    opt2 = RiemannianSGD([scaled], **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with SyncRecorder() as rec:
        scaler.scale((scaled * grad).sum()).backward()  # scaled.grad = 1024 * grad
        scaler.step(opt2)
        scaler.update()
    assert rec.syncs == []
    torch.testing.assert_close(scaled.detach(), plain.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt2.state[scaled]["exp_avg_sq"], opt.state[plain]["exp_avg_sq"], rtol=1e-5, atol=0)
    assert not hasattr(opt2, "grad_scale") and not hasattr(opt2, "found_inf")  # the scaler removes what it set


def test_grad_scaler_overflow_skips_the_step_and_backs_off():
    p = torch.nn.Parameter(_rows(2))
    opt = RiemannianSGD([p], lr=0.05, kappa=0.1, beta=0.5)
    start, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    grad = torch.randn(3, 16)
    grad[0, 0] = float("inf")  # what an fp16 overflow of the scaled gradient looks like
    with SyncRecorder() as rec:
        scaler.scale((p * grad).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert rec.syncs == []
    assert torch.equal(p.detach(), start)
    for key, value in state.items():
        assert torch.equal(opt.state[p][key], value), key
    assert scaler.get_scale() == 2.0**15


def test_trainer_with_fp16_loss_scaling_equals_unscaled_training_without_a_host_read(sd_args, monkeypatch, tmp_path):
    """The fp16 path of train_step (accelerate's GradScaler) on the CPU, where accelerate makes no scaler: one is
    put in as accelerate would. Scaling by a power of two is exact, so the vectors equal an unscaled run's."""
    import dti_utils
    from accelerate.optimizer import AcceleratedOptimizer
    from conftest import run_inprocess

    runs = {}

    def fit(trainer, scaled):
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            trainer.accelerator.scaler = scaler  # accelerator.backward scales the loss
            trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
        before = trainer.concepts[0].param.detach().clone()
        with SyncRecorder() as rec:
            for _ in range(4):
                trainer.train_step()
                trainer.global_step += 1
        after = trainer.concepts[0].param.detach().clone()
        runs[scaled] = (rec.syncs, not torch.equal(before, after), after, trainer.accelerator.scaler)
        return trainer.global_step

    monkeypatch.setattr(dti_utils.DTITrainer, "finish", lambda self: None)
    monkeypatch.setattr(dti_utils.DTITrainer, "publish", lambda self, *a, **k: None)
    for scaled in (False, True):
        monkeypatch.setattr(dti_utils.DTITrainer, "fit", lambda self, s=scaled: fit(self, s))
        run_inprocess(sd_args("--rsgd_beta", "0.9", "--kappa", "0.5", steps=4, out=tmp_path / str(scaled)))
    (plain_syncs, plain_moved, plain, _), (scaled_syncs, scaled_moved, scaled, scaler) = runs[False], runs[True]
    assert plain_syncs == [] and scaled_syncs == []
    assert plain_moved and scaled_moved
    assert scaler.get_scale() == 2.0**12  # no overflow, no growth within 4 steps
    torch.testing.assert_close(scaled, plain, rtol=0, atol=1e-6)
