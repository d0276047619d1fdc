"""The step guard: a non-finite gradient norm with a finite loss, and a loss spike against the rolling window, skip
the step (weights, EMA and the optimizer state bit-unchanged), are counted, leave the CSV row's loss empty, and the
run goes on; K outliers in a row stop it."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from conftest import compose_cfg
from lightning.pytorch.loggers import CSVLogger

from scalegen.build import build_module
from scalegen.checks import check_generator_config
from scalegen.data import DigitsDataModule
from scalegen.errors import ConfigError

TINY = ("backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", "data.batch_size=4")


def snapshot(module) -> dict:
    opt = module.trainer.optimizers[0]
    state = {f"opt{i}.{k}": v.detach().clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}
    return {**{f"gen.{k}": v.detach().clone() for k, v in module.generator.state_dict().items()},
            **{f"ema.{k}": v.detach().clone() for k, v in module.ema.state_dict().items()}, **state}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(tmp_path, *overrides, steps=8, poison=None, scale_loss=None):
    """Train `steps` steps; poison(step) NaNs a gradient after backward, scale_loss(step) multiplies the loss.
    Returns (module, {step: state at its start}, CSV rows)."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = build_module(compose_cfg(*TINY, *overrides), 10)
    real_loss, starts = module._loss, {}

    def loss(batch, drop_labels, scales=None):
        out, per_scale = real_loss(batch, drop_labels, scales)
        factor = scale_loss(module.global_step) if scale_loss else None
        return (out * factor if factor else out), per_scale

    def on_train_batch_start(batch, batch_idx, _real=module.on_train_batch_start):
        _real(batch, batch_idx)
        if module.global_step > 0:
            starts[module.global_step] = snapshot(module)

    def on_after_backward():
        if poison and poison(module.global_step):
            module.generator.backbone.word_embed.weight.grad[0, 0] = float("nan")

    module._loss, module.on_train_batch_start, module.on_after_backward = loss, on_train_batch_start, on_after_backward
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=CSVLogger(str(tmp_path), name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False, gradient_clip_val=2.0)
    try:
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=4))
    finally:
        with open(tmp_path / "metrics.csv", newline="") as f:
            rows = {int(r["step"]): r for r in csv.DictReader(f)}
        module.rows = rows
    starts[steps] = snapshot(module)
    return module, starts, rows


def test_nonfinite_gradient_with_finite_loss_skips_the_step(tmp_path, capsys):
    module, starts, rows = run(tmp_path, poison=lambda step: step == 3)
    assert module.nonfinite_total == 1 and module.trainer.global_step == 8
    assert "non-finite gradient norm (nan" in capsys.readouterr().out
    assert same(starts[3], starts[4])  # step 3: weights, EMA and Adam state (exp_avg, exp_avg_sq, step) untouched
    assert not same(starts[2], starts[3]) and not same(starts[4], starts[5])  # the steps around it did move them
    assert all(torch.isfinite(v).all() for v in starts[8].values())
    assert rows[3]["train/loss"] == "" and rows[3]["lr"] == "" and rows[3]["train/nonfinite_steps"] == "1.0"
    assert rows[2]["train/loss"] != "" and rows[4]["train/loss"] != ""


def test_loss_spike_is_skipped_and_the_run_goes_on(tmp_path, capsys):
    module, starts, rows = run(tmp_path, "guard.window=3", "guard.loss_factor=3", "guard.grad_factor=null",
                               scale_loss=lambda step: 100.0 if step == 5 else None)
    assert module.guard.outliers_total == 1 and module.nonfinite_total == 0 and module.trainer.global_step == 8
    assert "outlier step 5" in capsys.readouterr().out
    assert same(starts[5], starts[6]) and not same(starts[4], starts[5]) and not same(starts[6], starts[7])
    assert rows[5]["train/loss"] == "" and rows[5]["train/outlier_steps"] == "1.0" and rows[6]["train/loss"] != ""


def test_grad_norm_spike_is_skipped(tmp_path):
    # a loss x100 under an unchanged window is a spike of the gradient norm too; only that check is on here
    module, starts, _ = run(tmp_path, "guard.window=3", "guard.loss_factor=null", "guard.grad_factor=5",
                            scale_loss=lambda step: 100.0 if step == 4 else None)
    assert module.guard.outliers_total == 1 and same(starts[4], starts[5])


def test_outliers_in_a_row_stop_the_run(tmp_path):
    with pytest.raises(FloatingPointError, match="stopping after guard.max_in_row=2 in a row"):
        run(tmp_path, "guard.window=3", "guard.max_in_row=2", scale_loss=lambda step: 100.0 if step >= 4 else None)


def test_guard_off_lets_a_spike_through(tmp_path):
    module, starts, _ = run(tmp_path, "guard=null", steps=6, scale_loss=lambda step: 100.0 if step == 4 else None)
    assert module.guard.outliers_total == 0 and not same(starts[4], starts[5])


@pytest.mark.parametrize("override, key", [("+guard.foo=1", "guard.foo"), ("guard.loss_factor=0.5", "guard.loss_factor"),
                                           ("guard.window=-1", "guard.window"), ("guard.max_in_row=0", "guard.max_in_row")])
def test_guard_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_generator_config(compose_cfg(override))


def test_flexvar_scale_columns_stay_empty_for_scales_a_step_did_not_draw(tmp_path):
    from test_flexvar import tiny_gen, tiny_vae
    from torch.utils.data import DataLoader, TensorDataset

    from scalegen.schedule.direct_vq import DirectVQComposition
    from scalegen.training.module import GeneratorModule

    torch.manual_seed(0)
    vae, gen, drawn = tiny_vae(), tiny_gen(), []
    schedule = lambda: drawn.append([1, 2, 3, 5, 8] if len(drawn) % 2 else [1, 2, 6]) or drawn[-1]  # noqa: E731
    module = GeneratorModule(vae, gen, DirectVQComposition(vae, (1, 2, 4, 8)), ema_decay=None, batch_size=4,
                             train_scales=schedule)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(str(tmp_path), name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    images = torch.rand(16, 3, 16, 16) * 2 - 1  # one epoch: Lightning forgets step values between epochs
    trainer.fit(module, DataLoader(TensorDataset(images, torch.randint(0, 4, (16,))), batch_size=4))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert rows[1]["train_scale/loss_s4"] != ""  # five scales drawn
    assert rows[2]["train_scale/loss_s2"] != "" and rows[2]["train_scale/loss_s3"] == "" \
        and rows[2]["train_scale/loss_s4"] == ""  # three scales drawn: s3 and s4 are not this step's
