"""CUDA graphs: the UNet's training forward and backward replayed in one launch (the default on CUDA).

A DTI step trains a few vectors through a frozen UNet: thousands of small kernel launches for very little work, so
the GPU waits on the host. `GraphedUNet` captures the UNet's forward and backward once (every micro-batch has one
shape) and replays them; `HostSyncRecorder` finds what would break a capture (a host read or a host copy) before
it is tried, so such a run stays eager with one warning instead of failing.
"""

import contextlib
import time

import torch

from dti_utils import DTIError, logger


__all__ = ["HostSyncRecorder", "GraphedUNet", "unet_for_training"]

_SYNC_OPS = {
    "_local_scalar_dense",
    "item",
    "is_nonzero",
    "equal",
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "allclose",
}


def _first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class HostSyncRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that records every aten op that reads a device value on the host (`syncs`: .item(), nonzero,
    boolean-mask indexing, ...) or mixes devices (`cross_device`: a host<->device copy). On a GPU either one stalls
    the host, and either one breaks a CUDA graph capture."""

    def __init__(self):
        super().__init__()
        self.syncs, self.cross_device = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name.startswith("index") and any(t.dtype == torch.bool for t in tensors[1:]):
            self.syncs.append(f"{name} with a boolean mask")  # the result's size depends on the mask's values
        # A 0-dim CPU tensor in a device op is a wrapped scalar (baked into a graph); a copy of one is a real transfer.
        moved = [t for t in tensors if t.dim() > 0 or t.device.type != "cpu" or name in ("_to_copy", "copy_")]
        devices = {t.device.type for t in moved}
        if kwargs.get("device") is not None:
            devices.add(torch.device(kwargs["device"]).type)
        if len(devices) > 1:
            self.cross_device.append(name)
        return func(*args, **kwargs)


class GraphedUNet:
    """The UNet's training forward and backward replayed from CUDA graphs (the default on CUDA).

    A step launches thousands of small kernels and the GPU waits on the host; a graph replays them in one launch.
    Every micro-batch has one shape, so there is one capture per run. Before it, one eager forward and backward run
    on the capture stream under HostSyncRecorder: it warms up kernels and workspaces for that stream, and a host
    read or copy seen there (which would break the capture) keeps the run eager, with one warning. Separate leaves
    for that run and no warm-up inside make_graphed_callables keep every autograd node on one stream. A capture
    that fails anyway stops the run with one sentence: the process's CUDA state is not trusted after it. The UNet
    is frozen, so the graphs differentiate with respect to the conditioning inputs only."""

    def __init__(self, unet):
        self.unet, self.graphed, self.signature = unet, None, None

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        keys = sorted(added_cond_kwargs or {})
        tensors = (sample, timestep, encoder_hidden_states, *(added_cond_kwargs[k] for k in keys))

        def forward(sample, timestep, encoder_hidden_states, *added):
            added_cond_kwargs = dict(zip(keys, added)) or None
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample

        signature = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        if self.graphed is None:
            self.signature, self.graphed = signature, self._capture(forward, tensors)
        elif signature != self.signature:  # never with TrainingData's equal-sized batches; correct either way
            logger.warning(
                f"The UNet got inputs of another shape than the captured graph's; this call runs eagerly: {signature}"
            )
            return UNet2DConditionOutput(sample=forward(*tensors))
        return UNet2DConditionOutput(sample=self.graphed(*tensors))

    def _capture(self, forward, tensors):
        cuda = tensors[0].is_cuda
        if cuda:
            if torch.cuda.graph.default_capture_stream is None:
                torch.cuda.graph.default_capture_stream = torch.cuda.Stream()
            # the inputs were made on the current stream
            torch.cuda.graph.default_capture_stream.wait_stream(torch.cuda.current_stream())
        # Everything the capture touches is made on the capture stream, so autograd nodes never point at another
        # stream.
        try:
            with torch.cuda.stream(torch.cuda.graph.default_capture_stream) if cuda else contextlib.nullcontext():
                leaves = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
                with HostSyncRecorder() as recorder:
                    out = forward(*leaves)
                    torch.autograd.grad(out.float().sum(), [t for t in leaves if t.requires_grad])
                sample_args = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
            if cuda:
                torch.cuda.synchronize()
            problem = (recorder.syncs + recorder.cross_device)[:3]
        except RuntimeError as e:  # nothing was captured yet: the process is sound and can train eagerly
            problem = _first_line(e)
        if problem:
            logger.warning(
                f"The UNet's training pass cannot be held in a CUDA graph ({problem}: it reads from or copies to the "
                "host, or fails); training eagerly."
            )
            return forward
        start = time.perf_counter()
        try:
            graphed = torch.cuda.make_graphed_callables(forward, sample_args, num_warmup_iters=0)
        except RuntimeError as e:
            raise DTIError(
                f"CUDA graph capture of the UNet failed ({_first_line(e)}); rerun with --cuda_graphs off."
            ) from e
        logger.info(
            f"Captured the UNet's training forward and backward as CUDA graphs in {time.perf_counter() - start:.1f} s "
            f"(inputs {[tuple(t.shape) for t in tensors]})"
        )
        return graphed


def unet_for_training(unet, *, cuda_graphs="auto", compile=False, gradient_checkpointing=False):
    """What the loss calls for the UNet: GraphedUNet (cuda_graphs "auto" on CUDA, or "on"), the UNet under
    torch.compile (compile: CUDA graphs too unless cuda_graphs is "off"), or the UNet itself. Validation always uses
    the eager UNet, so its shapes cost no capture or recompile."""
    on_cuda = torch.device(unet.device).type == "cuda"
    if compile:
        mode = "reduce-overhead" if on_cuda and cuda_graphs != "off" else None
        return torch.compile(unet, mode=mode, dynamic=False)
    if cuda_graphs == "off":
        return unet
    reason = None if on_cuda else f"this run is on {unet.device}"
    reason = reason or ("--gradient_checkpointing is on" if gradient_checkpointing else None)
    if reason is None:
        return GraphedUNet(unet)
    if cuda_graphs == "on":
        raise DTIError(f"--cuda_graphs needs a CUDA GPU and {reason}; drop the flag.")
    logger.info(f"CUDA graphs off: {reason}; the UNet runs eagerly.")
    return unet
