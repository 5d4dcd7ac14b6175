"""The training step never waits on the device: no device->host read and no host->device copy per step.

On a GPU such a sync stalls the host until the queued kernels finish, so the next step's launches cannot
overlap them. The checks run on the CPU through a dispatch mode that sees every aten op: a read of a tensor's
value on the host goes through one of SYNC_OPS, and a copy between devices shows as an op whose tensors sit
on more than one device (provoked here with data on the 'meta' device).
"""

from types import SimpleNamespace

import torch

from dti_data import TrainingData
from dti_graphs import HostSyncRecorder as SyncRecorder
from dti_training import guard_nonfinite_step
from dti_utils import RiemannianSGD, projx


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
    data = _meta_data()  # 9 samples: batch 2 on 1 process gives 5 steps per epoch, the last one wrapped around
    per_epoch = data.steps_per_epoch(2, 1)
    with SyncRecorder() as rec:
        first = data.batch(0, 2, 1, 0)  # the epoch's draws move to the device once, here
    assert rec.cross_device and not rec.syncs
    with SyncRecorder() as rec:
        for step in range(1, per_epoch):
            batch = data.batch(step, 2, 1, 0)
    assert rec.cross_device == [] and rec.syncs == []
    assert first["mean"].device.type == "meta" and batch["time_ids"].device.type == "meta"
    assert batch["mean"].shape[0] == 2  # 9 = 4 * 2 + 1: the last batch wraps around to the epoch's first sample
    with SyncRecorder() as rec:
        data.batch(per_epoch, 2, 1, 0)  # a new epoch: one move again, still no host read
    assert rec.cross_device and not rec.syncs


def test_batches_on_the_device_equal_the_cpu_draws():
    """Indexing the epoch tables on the device picks what the CPU draws say, every rank its share."""
    cpu = TrainingData(
        torch.arange(12.0).view(12, 1, 1, 1),
        torch.ones(12, 1, 1, 1),
        torch.arange(12).reshape(3, 2, 2),
        [torch.arange(5).view(5, 1)],
        repeats=3,
        flip_p=0.5,
        seed=3,
    )
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)  # the documented epoch draw
    order = torch.randperm(9, generator=g)
    wrapped = torch.cat([order, order[:3]])  # 2 steps x 2 ranks x batch 2 = 12 places for 9 samples: the order wraps
    flips = (torch.rand(9, generator=g) < 0.5).long()
    crops = torch.randint(0, 2, (9,), generator=g)
    templates = torch.randint(0, 5, (9,), generator=g)
    expected = cpu.view_index[wrapped % 3, flips[wrapped], crops[wrapped]]
    seen_views, seen_templates = [], []
    for step in range(cpu.steps_per_epoch(2, 2)):
        for rank in range(2):
            b = cpu.batch(step, 2, 2, rank)
            seen_views += b["mean"].flatten().long().tolist()
            seen_templates += b["input_ids"][0].flatten().tolist()
    # ranks interleave within a step: rank 0 takes the even positions of the step's span, rank 1 the odd
    assert sorted(seen_views) == sorted(expected.tolist())
    assert seen_views[:4] == [int(expected[0]), int(expected[2]), int(expected[1]), int(expected[3])]
    assert seen_views[8:] == [
        int(expected[8]),
        int(expected[10]),
        int(expected[9]),
        int(expected[11]),
    ]  # the wrapped last step
    assert seen_templates[:4] == [int(templates[wrapped[i]]) for i in (0, 2, 1, 3)]


def _train_steps_recorded(sd_args, *extra):
    """Run the script's main() and record the dispatched ops of optimizer steps 4 and 5 (from a callback after step 3
    to one after step 5): the steady state, across the epoch boundary of batch 1 x accumulation 2 over 8 samples."""
    from conftest import run_inprocess

    recorder, seen = SyncRecorder(), {}

    def callback(step, loss, finite, embeddings, optimizer):
        if step == 3:
            seen["before"] = [e.param.detach().clone() for e in embeddings]
            recorder.__enter__()
        elif step == 5:
            recorder.__exit__(None, None, None)
            seen.update(finite=finite, moved=[not torch.equal(b, e.param) for b, e in zip(seen["before"], embeddings)])

    run_inprocess(sd_args("--gradient_accumulation_steps", "2", "--log_steps", "100", *extra, steps=6), callback)
    return recorder, seen


def test_train_step_reads_nothing_back_dti(sd_args):
    recorder, seen = _train_steps_recorded(sd_args)
    assert recorder.syncs == []
    assert bool(seen["finite"]) and seen["moved"] == [True]


def test_train_step_reads_nothing_back_classic_adamw(sd_args):
    recorder, seen = _train_steps_recorded(sd_args, "--optimizer", "adamw", "--learning_rate", "0.05")
    assert recorder.syncs == []
    assert bool(seen["finite"]) and seen["moved"] == [True]


def _make_optimizer(kind, param):
    if kind == "rsgd":
        return RiemannianSGD([param], lr=0.05, kappa=0.3, beta=0.9)
    return torch.optim.AdamW([param], lr=0.05, fused=True)


def test_nonfinite_step_is_skipped_on_the_device_by_both_optimizers():
    """The loop's step: guard_nonfinite_step then optimizer.step(). A NaN loss leaves the vectors and the optimizer
    state as they were, decided without a host read; the next finite step goes on normally."""
    for kind in ("rsgd", "adamw"):
        p = torch.nn.Parameter(_rows(0))
        opt = _make_optimizer(kind, p)
        target = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
        loss = ((p - target) ** 2).sum()
        loss.backward()
        guard_nonfinite_step(opt, loss.detach(), [p])
        opt.step()
        opt.zero_grad(set_to_none=True)
        params, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
        with SyncRecorder() as rec:
            loss = ((p - target) ** 2).sum() * float("nan")
            loss.backward()
            finite = guard_nonfinite_step(opt, loss.detach(), [p])
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert rec.syncs == [] and not bool(finite), kind
        assert torch.equal(p.detach(), params), kind
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[key]), (kind, key)
        loss = ((p - target) ** 2).sum()
        loss.backward()
        assert bool(guard_nonfinite_step(opt, loss.detach(), [p]))
        opt.step()
        assert not torch.equal(p.detach(), params), kind


# -- fp16 loss scaling: RiemannianSGD follows torch's GradScaler contract for fused optimizers ----------------


def _rows(seed, n=3, dim=16):
    return projx(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


def test_grad_scaler_step_equals_the_unscaled_step_without_a_host_read():
    kwargs = {"lr": 0.05, "kappa": 0.3, "beta": 0.9}  # kappa makes the unscaling matter even for the normalised step
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


def test_loop_step_with_fp16_loss_scaling_equals_unscaled_steps_without_a_host_read():
    """The loop's fp16 step as accelerate runs it with a GradScaler: backward of the scaled loss, guard_nonfinite_step
    (which leaves found_inf to the scaler), then the scaler's step and update, as AcceleratedOptimizer.step does.
    Scaling by a power of two is exact, so four such steps equal four unscaled ones, with no host read."""
    for kind in ("rsgd", "adamw"):
        target = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
        plain, scaled = torch.nn.Parameter(_rows(3)), torch.nn.Parameter(_rows(3))
        opt_plain, opt_scaled = _make_optimizer(kind, plain), _make_optimizer(kind, scaled)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        accelerated = SimpleNamespace(
            optimizer=opt_scaled, scaler=scaler
        )  # what guard_nonfinite_step sees of AcceleratedOptimizer
        with SyncRecorder() as rec:
            for _ in range(4):
                loss = ((plain - target) ** 2).sum()
                loss.backward()
                guard_nonfinite_step(opt_plain, loss.detach(), [plain])
                opt_plain.step()
                opt_plain.zero_grad(set_to_none=True)

                loss = ((scaled - target) ** 2).sum()
                scaler.scale(loss).backward()
                assert guard_nonfinite_step(accelerated, loss.detach(), [scaled]) is not None
                scaler.step(opt_scaled)
                scaler.update()
                opt_scaled.zero_grad(set_to_none=True)
        assert rec.syncs == [], kind
        assert scaler.get_scale() == 2.0**12  # no overflow, no growth within 4 steps
        torch.testing.assert_close(scaled.detach(), plain.detach(), rtol=0, atol=1e-6)
