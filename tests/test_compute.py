"""Compute accounting (scalegen.eval.flops): FLOP counts against analytic ones, linear in the batch, leaving the
module untouched; budgets -> max_steps; and equal-FLOPs / scaling sweeps end to end (subprocesses)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tiny_module

from scalegen.eval.flops import count_flops, parameter_counts, sampling_flops_per_image, training_flops_per_step

pytestmark = pytest.mark.threads(1)


class TinyAttention(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


def test_count_flops_equals_the_analytic_count_of_linear_and_attention():
    b, n, d = 2, 5, 8
    x = torch.randn(b, n, d)
    lin = torch.nn.Linear(d, 3 * d)
    assert count_flops(lin, x) == 2 * b * n * d * 3 * d
    att = TinyAttention(d)
    forward = 2 * b * n * d * 3 * d + 2 * b * n * n * d * 2 + 2 * b * n * d * d  # qkv, q k^T and (.) v, out
    assert count_flops(att, x) == forward
    # backward: gradients of the inputs and of the weights, each a matmul the size of the forward's (x needs none)
    assert count_flops(lambda: att(x).sum().backward()) == forward + 2 * forward - 2 * b * n * d * 3 * d


def snapshot(module):
    return ([p.detach().clone() for p in module.parameters()], [p.grad for p in module.parameters()],
            torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), module.training)


def assert_unchanged(module, before):
    params, grads, torch_rng, py_rng, np_rng, training = before
    assert all(torch.equal(a, p) for a, p in zip(params, module.parameters()))
    assert all(g is p.grad for g, p in zip(grads, module.parameters()))
    assert torch.equal(torch_rng, torch.get_rng_state()) and random.getstate() == py_rng
    assert np.array_equal(np_rng, np.random.get_state()[1]) and module.training == training


@pytest.mark.parametrize("model", ["var", "flexvar"])
def test_training_flops_are_linear_in_the_batch_and_leave_the_module_untouched(model):
    torch.manual_seed(0)
    module = tiny_module(f"model={model}", "backbone.depth=1")
    batch = (torch.randn(4, 3, 32, 32), torch.arange(4))
    before = snapshot(module)
    one = training_flops_per_step(module, batch)  # counted on one sample, scaled to 4
    assert_unchanged(module, before)
    assert one > 0
    if model == "var":  # a fixed schedule: the full batch counts the same (FLOPs are linear in the batch)
        assert training_flops_per_step(module, batch, samples=None) == one
        assert training_flops_per_step(module, (batch[0][:2], batch[1][:2])) * 2 == one
    else:  # FlexVAR's random schedule: the mean of its draws, the same draws every time from the same RNG state
        assert training_flops_per_step(module, batch) == one
    assert_unchanged(module, before)


def test_cached_latents_leave_the_tokenizer_out():
    module = tiny_module("backbone.depth=1")
    images = torch.randn(2, 3, 32, 32)
    with_encode = training_flops_per_step(module, (images, torch.arange(2)))
    latent = module.tokenizer.encode(images)  # what the latent cache stores for a deterministic tokenizer
    without = training_flops_per_step(module, {"latents": latent, "labels": torch.arange(2)})
    encode = count_flops(module.tokenizer.encode, images)
    assert encode > 0 and with_encode - without == encode


def test_sampling_flops_per_image_and_parameter_counts():
    module = tiny_module("backbone.depth=1")
    before = snapshot(module)
    cfg = sampling_flops_per_image(module)
    assert_unchanged(module, before)
    assert sampling_flops_per_image(module, images=3) == cfg
    decode = count_flops(module.composition.decode, module.tokenizer.encode(torch.randn(1, 3, 32, 32)))
    assert cfg > decode > 0  # the tokenizer's decode of the image is in, with the generator's steps on top
    counts = parameter_counts(module)
    assert counts["params_generator"] == sum(p.numel() for p in module.generator.parameters()) > 0
    assert counts["params_tokenizer"] == sum(p.numel() for p in module.tokenizer.parameters()) > 0
