"""Compute accounting (scalegen.eval.flops): FLOP counts against analytic ones, linear in the batch, leaving the
module untouched; budgets -> max_steps; and equal-FLOPs / scaling sweeps end to end (subprocesses)."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, compose_cfg, tiny_module

from scalegen.checks import check_generator_config, check_run_config
from scalegen.commands.train import derive_max_steps
from scalegen.data.digits import DigitsDataModule
from scalegen.errors import ConfigError
from scalegen.eval.callback import TrainingStats
from scalegen.eval.fits import power_law_fit
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


@pytest.mark.parametrize("groups", [1, 4, 12])
def test_a_grouped_convolution_backward_costs_two_forwards_whatever_its_groups(groups):
    # torch's own formula counts a grouped conv's weight gradient as dense over all channels (x groups for depthwise
    # ones: Mamba2's conv1d); each gradient of a convolution is one convolution the size of the forward
    conv = torch.nn.Conv1d(12, 12, 4, groups=groups, padding=3)
    x = torch.randn(2, 12, 10, requires_grad=True)
    forward = 2 * 2 * 13 * 4 * 12 * (12 // groups)  # batch x output length x taps x out channels x in per group
    assert count_flops(conv, x) == forward
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward
    x.requires_grad_(False)  # no input gradient: the weight's alone
    assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward


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


# ---- budgets -------------------------------------------------------------------------------------------------------


def test_budget_to_max_steps():
    kw = dict(max_steps=500, flops_per_step=3_000, images_per_step=64)
    assert derive_max_steps("steps", None, **kw) == 500 and derive_max_steps("steps", 20, **kw) == 20
    assert derive_max_steps("flops", 9_000, **kw) == 3 and derive_max_steps("flops", 11_999.0, **kw) == 3  # never more
    assert derive_max_steps("images", 640, **kw) == 10 and derive_max_steps("images", 700, **kw) == 10
    assert derive_max_steps("time", 60, **kw) == 500  # trainer.max_time stops it; max_steps stays the LR horizon
    with pytest.raises(ConfigError, match="budget.value: 2999 flops is less than one training step"):
        derive_max_steps("flops", 2_999, **kw)


@pytest.mark.parametrize("overrides, match", [
    (["budget.kind=flop"], r"budget.kind: 'flop' is not one of \['steps', 'images', 'flops', 'time'\]"),
    (["budget.kind=flops"], r"budget.value: budget.kind=flops needs a value"),
    (["budget.kind=flops", "budget.value=-1e9"], r"budget.value: -1000000000.0 must be a number > 0"),
    (["budget.kind=images", "budget.value=0"], r"budget.value: 0 must be a number > 0"),
    (["budget.kind=steps", "budget.value=2.5"], r"budget.value: 2.5 must be an integer >= 1"),
    (["+budget.tokens=1"], r"budget.tokens: unknown key"),
    (["task=tokenizer", "budget.kind=time", "budget.value=60"], r"budget.kind=time .*task=tokenizer trains for "
                                                               r"tokenizer_training.max_steps"),
])
def test_bad_budgets_fail_at_the_config_check(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_run_config(compose_cfg(*overrides))


def test_compare_defaults_to_an_flops_budget_and_scaling_to_equal_steps():
    compare = compose_cfg("experiment=compare")
    assert compare.budget.kind == "flops" and compare.budget.value > 0
    check_generator_config(compare)
    scaling = compose_cfg("experiment=scaling", hydra_config=True)
    assert scaling.budget.kind == "steps" and scaling.budget.value >= 1
    assert set(scaling.hydra.sweeper.params) == {"model", "backbone.depth"}
    for model in scaling.hydra.sweeper.params.model.split(","):
        for depth in scaling.hydra.sweeper.params["backbone.depth"].split(","):
            check_generator_config(compose_cfg("experiment=scaling", f"model={model}", f"backbone.depth={depth}"))


def test_training_stats_sync_the_device_only_at_logging_intervals(tmp_path, monkeypatch):
    syncs = []
    monkeypatch.setattr(TrainingStats, "_sync", staticmethod(lambda trainer: syncs.append(trainer.global_step)))
    module, stats = tiny_module("backbone.depth=1"), TrainingStats()
    stats.set_compute(1000, {"train_flops_per_step": 8000})
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=3, callbacks=[stats], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    assert syncs == [0, 3, 3, 6, 6, 6]  # train start; close and open at steps 3 and 6; the end of fit
    run_stats = json.loads((tmp_path / "run_stats.json").read_text())
    assert run_stats["images_seen"] == 48 and run_stats["train_flops"] == 48_000
    assert run_stats["train_flops_per_step"] == 8000 and 0 < run_stats["train_step_s"] <= run_stats["train_wall_s"]


# ---- end to end: an equal-FLOPs comparison and a scaling sweep (subprocesses) --------------------------------------

TINY = ["backbone.width=32", "backbone.num_heads=2", "tokenizer_training.max_steps=2", "data.batch_size=8",
        "trainer.log_every_n_steps=1", "sample.per_class=1", "callbacks.eval=null"]


def multirun(root, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "train.py", "-m", *overrides, *TINY, f"hydra.sweep.dir={root}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"multirun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    runs = sorted(p for p in root.iterdir() if (p / "run_stats.json").is_file())
    return proc.stdout, runs, [json.loads((p / "run_stats.json").read_text()) for p in runs]


def last_logged(run, key):
    with open(run / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)][-1]


@pytest.mark.slow
def test_compare_at_equal_flops_end_to_end(tmp_path):
    budget = 4e9  # 3 or 4 steps of these tiny models
    out, runs, stats = multirun(tmp_path / "compare", "experiment=compare", "model=var,flexvar", "backbone.depth=1",
                                f"budget.value={budget}")
    assert [p.name for p in runs] == ["0_var", "1_flexvar"]
    assert out.count("[scalegen] budget 4e+09 training FLOPs: max_steps=") == 2
    for run, s in zip(runs, stats):
        per_step = s["train_flops_per_step"]
        assert s["budget"] == {"kind": "flops", "value": budget, "max_steps": s["steps"]} and s["steps"] >= 1
        assert s["images_seen"] == 8 * s["steps"] and s["train_flops"] == s["steps"] * per_step
        assert s["train_flops"] <= budget < s["train_flops"] + per_step  # all the budget whole steps can spend
        assert s["params_generator"] > 0 and s["params_tokenizer"] > 0 and s["sample_flops_per_image"] > 0
        assert last_logged(run, "perf/train_flops") == pytest.approx(s["train_flops"], rel=1e-6)
        assert last_logged(run, "perf/images_seen") == s["images_seen"]
    assert abs(stats[0]["train_flops"] - stats[1]["train_flops"]) < max(s["train_flops_per_step"] for s in stats)


@pytest.mark.slow
def test_scaling_sweep_end_to_end_then_a_power_law_over_its_runs(tmp_path):
    _, runs, stats = multirun(tmp_path / "scaling", "experiment=scaling", "model=var", "backbone.depth=1,2",
                              "budget.value=2")
    assert [p.name for p in runs] == ["0_var_d1", "1_var_d2"]
    assert [s["steps"] for s in stats] == [2, 2]  # equal data: each size spends its own compute
    params = [s["params_generator"] for s in stats]
    flops = [s["train_flops"] for s in stats]
    assert params[1] > params[0] and flops[1] > flops[0]
    loss = [last_logged(run, "train/loss") for run in runs]
    for x in (params, flops):
        fit = power_law_fit(x, loss)
        assert all(fit(a) == pytest.approx(b, rel=1e-9) for a, b in zip(x, loss))  # two points: the line through them
