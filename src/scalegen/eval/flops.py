"""Compute accounting: FLOPs of one training step and of sampling one image, counted by PyTorch's own
`torch.utils.flop_counter.FlopCounterMode` on the run's real shapes (matmuls, convolutions and attention: 2 per
multiply-add; elementwise ops are not counted, as in the papers' FLOP figures).

The counts run the real code on real tensors (a meta-device copy takes other kernels for some ops and cannot run
data-dependent code such as quantisation), so they leave the module exactly as they found it: the RNG states (torch,
CUDA, numpy, python, a random training schedule's own), the gradients, the train/eval mode. FLOPs are linear in the
batch for every part here (no op mixes samples; tests/test_compute.py checks it), so a step is counted on one sample
and scaled to the batch: the count costs one sample's forward and backward, even for the paper sizes.
"""
from __future__ import annotations

import contextlib
import copy
import random
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from scalegen.data.resume import rng_state, set_rng_state
from scalegen.training.module import GeneratorModule

SCHEDULE_DRAWS = 8  # a random training schedule (FlexVAR's): the step's FLOPs are the mean over this many draws


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: the input gradient and the weight gradient each cost what the forward costs.

    torch's own formula counts the weight gradient as a dense convolution over all channels whatever `groups` is,
    so a depthwise conv (Mamba2's conv1d, 2,176 channels) was counted 2,176 times too high: a third of M-VAR's
    training FLOPs were that conv's weight gradient, and an equal-FLOPs budget gave M-VAR too few steps."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of one call `fn(*args, **kwargs)` (nothing printed)."""
    formulas = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def batch_size(batch) -> int:
    """Samples in a training batch: (images, labels) or a dict of cached latents (scalegen.data.latents)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


def take(batch, n: int):
    """The first `n` samples of a batch, in the same form."""
    if isinstance(batch, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(v[:n] if isinstance(v, torch.Tensor) else v for v in batch)


@contextlib.contextmanager
def unchanged(module: torch.nn.Module) -> Iterator[None]:
    """Run code on `module` and leave no trace: RNG states, gradients, train/eval mode and a random training schedule
    (module.train_scales, whose own generator a draw advances) are restored on exit."""
    states = rng_state()
    grads = {p: p.grad for p in module.parameters()}
    schedule = module.train_scales if isinstance(module, GeneratorModule) else None
    # the python `random` module itself (the schedule's default generator) is shared, not copied: its state is above
    saved_schedule = copy.deepcopy(schedule, {id(random): random}) if schedule is not None else None
    mode = module.training
    try:
        for p in grads:
            p.grad = None
        yield
    finally:
        module.train(mode)
        for p, g in grads.items():
            p.grad = g
        if schedule is not None:
            module.train_scales = saved_schedule
        set_rng_state(states)


def _step_flops(module, batch) -> int:
    def step():
        loss = module.training_step(batch, 0)
        loss.backward()
    return count_flops(step)


def training_flops_per_step(module, batch, samples: int | None = 1) -> int:
    """FLOPs of the module's forward and backward on `batch` (one device, one micro-batch): the tokenizer's encode
    included when the batch holds images, left out with cached latents (the batch is then a dict of latents and
    nothing encodes). Counted on its first `samples` samples (None: all) and scaled to the batch; with a random
    training schedule, the mean over SCHEDULE_DRAWS of its draws. Weights, gradients and RNG states are unchanged."""
    size = batch_size(batch)
    n = size if samples is None else max(1, min(samples, size))
    part = take(batch, n)
    draws = SCHEDULE_DRAWS if module.train_scales is not None else 1
    with unchanged(module):
        module.train()
        total = sum(_step_flops(module, part) for _ in range(draws))
    return round(total * size / (n * draws))


def sampling_flops_per_image(module, options=None, images: int = 1, **overrides: Any) -> int:
    """FLOPs of one `module.generate` call for `images` images (class 0, 1, ...) with the run's sampling settings
    (`options`, or `overrides` of them; guidance doubles the batch inside), the tokenizer's decode included, per
    image. Nothing of the module or the RNG states changes."""
    labels = [i % module.num_classes for i in range(images)]
    with unchanged(module):
        flops = count_flops(module.generate, labels, options=options, **overrides)
    return round(flops / images)


def parameter_counts(module) -> dict[str, int]:
    """params_generator (the trained network, its EMA copy left out) and params_tokenizer (frozen)."""
    return {"params_generator": sum(p.numel() for p in module.generator.parameters()),
            "params_tokenizer": sum(p.numel() for p in module.tokenizer.parameters())}
