"""The training step without host syncs: with a fused optimizer (the CUDA default; fused AdamW runs on the CPU too)
a skipped step stays on the device (found_inf, a zero EMA weight) and changes nothing, and between two logged rows
scalegen's code reads no tensor on the host; the optimizer each device gets by default."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_cfg
from lightning.pytorch.loggers import CSVLogger
from test_guards import TINY, run, same

from scalegen.build import build_module
from scalegen.data import DigitsDataModule
from scalegen.training.optim import build_optimizer, param_groups, skips_on_device

FUSED = "+model.optimizer.fused=true"
SRC = str(Path(__file__).resolve().parents[1] / "src" / "scalegen")
# every way a tensor's value reaches the host
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_fused_optimizer_skips_a_nonfinite_step_on_the_device(tmp_path, capsys):
    module, starts, rows = run(tmp_path, FUSED, poison=lambda step: step == 3)
    assert skips_on_device(module.trainer.optimizers[0])
    assert module.nonfinite_total == 1 and "non-finite gradient norm (nan" in capsys.readouterr().out
    assert same(starts[3], starts[4])  # weights, EMA and Adam state (its step count too) untouched
    assert not same(starts[2], starts[3]) and not same(starts[4], starts[5])
    assert rows[3]["train/loss"] == "" and rows[3]["train/nonfinite_steps"] == "1.0" and rows[4]["train/loss"] != ""


def test_fused_optimizer_skips_a_spike_and_stops_at_the_limit(tmp_path):
    module, starts, _ = run(tmp_path, FUSED, "guard.window=3", "guard.grad_factor=null",
                            scale_loss=lambda step: 100.0 if step == 5 else None)
    assert module.guard.outliers_total == 1 and same(starts[5], starts[6]) and not same(starts[6], starts[7])
    with pytest.raises(FloatingPointError, match="stopping after guard.max_in_row=2 in a row"):
        run(tmp_path, FUSED, "guard.window=3", "guard.max_in_row=2", scale_loss=lambda step: 100.0 if step >= 4 else None)


def test_no_host_read_between_logged_rows(tmp_path, monkeypatch):
    """Steps 0..7 with a row every 4th: scalegen's code reads tensors on the host only at the rows (steps 3, 7), at
    the end of training, and in the first step (the guard's counters move to the device once)."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = build_module(compose_cfg(*TINY, FUSED, "guard.window=2"), 10)
    reads: list[tuple[int, str, str]] = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(SRC) and module._trainer is not None:
                reads.append((module.global_step, _name, f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=CSVLogger(str(tmp_path), name="", version=""),
                        log_every_n_steps=4, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False, gradient_clip_val=2.0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=4))
    monkeypatch.undo()
    between = [r for r in reads if r[0] not in (3, 7, 8)]  # 8: on_train_end
    assert not between, f"host reads inside steps that write no row: {between}"
    assert any(r[0] == 3 for r in reads)  # the row's read (the spy does see them)


def test_default_optimizer_is_foreach_on_cpu_and_keeps_a_configured_choice():
    from functools import partial
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    opt = build_optimizer(partial(torch.optim.AdamW, weight_decay=0.1), param_groups(torch.nn.Linear(3, 3)), lr=1e-3)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"] and not skips_on_device(opt)
    opt = build_optimizer(partial(torch.optim.AdamW, fused=True), [dict(params=params)], lr=1e-3)
    assert opt.defaults["fused"] is True and skips_on_device(opt)
    opt = build_optimizer(partial(torch.optim.AdamW, foreach=False), [dict(params=params)], lr=1e-3)
    assert opt.defaults["foreach"] is False
