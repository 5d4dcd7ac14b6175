"""CUDA graphs (the default on CUDA): GraphedUNet gives the UNet's output and the conditioning's gradients unchanged.

There is no GPU here, so torch.cuda.make_graphed_callables is replaced by an emulation with its contract: it is
called once with sample inputs, and returns a function whose output is one static buffer, overwritten by every
call, and whose backward gives gradients for the inputs that require them.
What the capture itself does on a GPU is measured by benchmarks/gpu_benchmarks.sh. On the way, the full-size
SD1.5 and SDXL UNets run forward and backward on the 'meta' device to show that nothing in them reads a
value back to the host or copies from the host: either would break a CUDA graph capture.
"""

import os

import pytest
import torch

from dti_graphs import GraphedUNet
from dti_utils import DTIError


def emulated_make_graphed_callables(captures):
    def make(fn, sample_args, num_warmup_iters=3):
        assert (
            num_warmup_iters == 0
        )  # GraphedUNet warms up itself, on the capture stream (no AccumulateGrad stream mismatch)
        captures.append([tuple(a.shape) for a in sample_args])
        static_output = fn(*sample_args).detach().clone()  # the real one warms up and captures from sample_args

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                with torch.enable_grad():
                    leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
                    out = fn(*leaves)
                ctx.leaves, ctx.out = leaves, out
                static_output.copy_(out.detach())
                return static_output.detach()

            @staticmethod
            def backward(ctx, grad):
                needs = [x for x in ctx.leaves if x.requires_grad]
                grads = iter(torch.autograd.grad(ctx.out, needs, grad))
                return tuple(next(grads) if x.requires_grad else None for x in ctx.leaves)

        return lambda *inputs: Graphed.apply(*inputs)

    return make


def _tiny_unet(sdxl):
    """The tiny pipelines' UNets (tools/make_tiny_pipeline.py): SDXL's with 96-dim context and 64-dim pooled text."""
    from diffusers import UNet2DConditionModel

    from make_tiny_pipeline import TINY_UNET

    torch.manual_seed(0)
    config = dict(TINY_UNET, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4)
    if sdxl:
        config.update(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 64,
            cross_attention_dim=96,
        )
    return UNet2DConditionModel(**config).requires_grad_(False).eval()


def _inputs(batch, sdxl, seed):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    hidden = torch.randn(batch, 77, 96 if sdxl else 32, generator=g, requires_grad=True)
    added = (
        {
            "text_embeds": torch.randn(batch, 64, generator=g, requires_grad=True),
            "time_ids": torch.rand(batch, 6, generator=g) * 512,
        }
        if sdxl
        else None
    )
    return sample, timestep, hidden, added


def _loss_and_grads(unet_call, sample, timestep, hidden, added):
    pred = unet_call(sample, timestep, hidden, added_cond_kwargs=added).sample
    loss = (pred.float() ** 2).mean()
    wrt = [hidden] + ([added["text_embeds"]] if added else [])
    return pred.detach().clone(), torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_graphed_unet_equals_the_eager_unet_and_captures_once(sdxl, monkeypatch):
    captures = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", emulated_make_graphed_callables(captures))
    unet = _tiny_unet(sdxl)
    graphed = GraphedUNet(unet)
    for step in range(3):  # TrainingData gives every micro-batch the same size: one capture serves the whole run
        inputs = _inputs(2, sdxl, seed=step)
        want_pred, want_grads = _loss_and_grads(unet, *inputs)
        got_pred, got_grads = _loss_and_grads(graphed, *inputs)
        torch.testing.assert_close(got_pred, want_pred, rtol=0, atol=0)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    hidden_dim = 96 if sdxl else 32
    expected = [(2, 4, 8, 8), (2,), (2, 77, hidden_dim)] + (
        [(2, 64), (2, 6)] if sdxl else []
    )  # added conditioning in sorted key order
    assert captures == [expected]


def test_a_host_read_in_the_unet_keeps_the_run_eager_with_one_warning(monkeypatch, caplog):
    """The dry run before the capture sees a host read (here a forward hook calling .item(), as a model with
    data-dependent control flow would) and never captures: the run trains eagerly, with one warning."""
    captures = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", emulated_make_graphed_callables(captures))
    unet = _tiny_unet(False)
    unet.conv_in.register_forward_hook(lambda module, args, out: out * (1.0 if out.abs().max().item() >= 0 else 0.0))
    graphed = GraphedUNet(unet)
    inputs = _inputs(2, False, seed=5)
    want_pred, want_grads = _loss_and_grads(unet, *inputs)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            got_pred, got_grads = _loss_and_grads(graphed, *inputs)
    torch.testing.assert_close(got_pred, want_pred, rtol=0, atol=0)
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=0, atol=0)
    assert captures == []
    warnings = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(warnings) == 1 and "training eagerly" in warnings[0] and "_local_scalar_dense" in warnings[0]


def test_a_capture_that_fails_stops_the_run_with_one_sentence(monkeypatch):
    def failing(fn, sample_args, num_warmup_iters=3):
        raise RuntimeError(
            "operation not permitted when stream is capturing\nCUDA kernel errors might be reported later"
        )

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", failing)
    graphed = GraphedUNet(_tiny_unet(False))
    with pytest.raises(DTIError) as error:
        _loss_and_grads(graphed, *_inputs(2, False, seed=6))
    message = str(error.value)
    assert (
        "\n" not in message
        and "operation not permitted when stream is capturing" in message
        and "--cuda_graphs off" in message
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cuda_graphs"], "error: --cuda_graphs needs a CUDA GPU and this run is on cpu; drop the flag."),
        (["--cuda_graphs", "--compile"], "error: --cuda_graphs does not go with --compile"),
        (
            ["--cuda_graphs", "on", "--gradient_checkpointing"],
            "error: --cuda_graphs does not go with --gradient_checkpointing",
        ),
    ],
)
def test_explicit_cuda_graphs_with_what_cannot_have_them_is_one_clear_sentence(
    flags, message, sd_args, tmp_path, capsys
):
    from conftest import error_lines, run_cli_inprocess

    out = tmp_path / "out"
    code = run_cli_inprocess(sd_args(*flags, out=out))
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not out.exists() or not any(name.startswith("learned_embeds") for name in os.listdir(out))


def test_graphs_by_default_fall_back_to_eager_with_one_info_line(sd_args, tmp_path, caplog):
    """The default (auto) on a machine without CUDA, and --cuda_graphs off: eager, the same vectors."""
    from conftest import read_embeds, run_inprocess

    with caplog.at_level("INFO"):
        run_inprocess(sd_args("--gradient_checkpointing", steps=2, out=tmp_path / "auto"))
    lines = [r.getMessage() for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert len(lines) == 1 and "this run is on cpu" in lines[0]
    run_inprocess(sd_args("--no-cuda_graphs", steps=2, out=tmp_path / "off"))
    auto = read_embeds(tmp_path / "auto" / "learned_embeds.safetensors")[0]
    off = read_embeds(tmp_path / "off" / "learned_embeds.safetensors")[0]
    torch.testing.assert_close(auto, off, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_full_size_unet_training_pass_reads_nothing_back_and_copies_nothing_from_the_host(model):
    """What a CUDA graph capture needs of the UNet: no host reads, no host->device copies (checked on 'meta')."""
    from diffusers import UNet2DConditionModel

    from dti_graphs import HostSyncRecorder as SyncRecorder

    from benchmark_training import SD15_UNET, SDXL_UNET

    sdxl = model == "sdxl"
    with torch.device("meta"):
        unet = (
            UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)).to(torch.bfloat16).requires_grad_(False).eval()
        )
        batch, size, width = (1, 128, 2048) if sdxl else (4, 64, 768)
        sample = torch.randn(batch, 4, size, size, dtype=torch.bfloat16)
        timestep = torch.randint(0, 1000, (batch,))
        hidden = torch.randn(batch, 77, width, dtype=torch.bfloat16, requires_grad=True)
        added = (
            {
                "text_embeds": torch.randn(batch, 1280, dtype=torch.bfloat16, requires_grad=True),
                "time_ids": torch.randn(batch, 6, dtype=torch.bfloat16),
            }
            if sdxl
            else None
        )
    with SyncRecorder() as rec:
        pred = unet(sample, timestep, hidden, added_cond_kwargs=added).sample
        grads = torch.autograd.grad(pred, [hidden] + ([added["text_embeds"]] if sdxl else []), torch.ones_like(pred))
    assert rec.syncs == [] and rec.cross_device == []
    assert grads[0].shape == hidden.shape
