"""CUDA: every part on the device, sampling for each method, bf16 training with the fused optimizer and no host
sync between logged rows, compile=true, and FSDP2 on one GPU with a sharded save and a resume.

Marked `cuda` and skipped without a CUDA device: on a CPU-only machine (CI, `pytest tests`) every test here is
reported as skipped, by design. bench/gpu_check.py runs them on the GPU machine (`pytest -m cuda tests/test_cuda.py`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, compose_cfg

from scalegen.build import build_module, build_tokenizer
from scalegen.data import DigitsDataModule
from scalegen.io import save_safetensors
from scalegen.training.optim import skips_on_device

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (bench/gpu_check.py runs it there)")]

TINY = ("backbone.depth=2", "backbone.width=64", "backbone.num_heads=2", "data.batch_size=8")
METHODS = ["model=var", "model=flexvar", "model=mvar", "model=flowar"]
SRC = str(REPO / "src" / "scalegen")


def fit(module, steps: int = 3, **kw) -> L.Trainer:
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=steps, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=2.0, **kw)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    return trainer


@pytest.mark.parametrize("method", METHODS)
def test_every_part_on_the_device_and_sampling(method):
    L.seed_everything(0)
    module = build_module(compose_cfg(method, *TINY), 10)
    trainer = fit(module)
    assert trainer.global_step == 3 and module.nonfinite_total == 0
    for part in (module.tokenizer, module.generator, module.ema):
        where = {t.device.type for t in [*part.parameters(), *part.buffers()]}
        assert where == {"cuda"}, (type(part).__name__, where)
    assert skips_on_device(trainer.optimizers[0])  # fused AdamW: skipped steps stay on the device
    assert all(v.dtype == torch.float32 for v in module.generator.parameters())  # fp32 masters under bf16-mixed
    images = module.generate(list(range(4)), cfg_scale=1.5)
    assert images.device.type == "cuda" and images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()


def test_training_steps_make_no_host_sync_between_logged_rows():
    """torch.cuda's sync debug mode reports every synchronising call; none may come from scalegen's code in a step
    that writes no row (log_every_n_steps=4: rows at steps 3 and 7; step 0 moves the counters to the device once)."""
    L.seed_everything(0)
    module = build_module(compose_cfg(*TINY, "guard.window=2"), 10)
    by_step: dict[int, list[str]] = {}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class Watch(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.start = len(caught)
                torch.cuda.set_sync_debug_mode("warn")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                torch.cuda.set_sync_debug_mode("default")
                by_step[trainer.global_step - 1] = [f"{Path(w.filename).name}:{w.lineno}" for w in caught[self.start:]
                                                    if "synchroniz" in str(w.message) and w.filename.startswith(SRC)]
        fit(module, steps=8, callbacks=[Watch()], log_every_n_steps=4)
    assert sorted(by_step) == list(range(8))
    assert by_step[3], "the spy sees the row's read"
    assert {step: seen for step, seen in by_step.items() if seen and step not in (0, 3, 7)} == {}


def test_compile_on_cuda_trains_like_eager():
    losses = {}
    for compile in (False, True):
        L.seed_everything(0)
        module = build_module(compose_cfg(*TINY, f"compile={str(compile).lower()}"), 10)
        got = losses[compile] = []
        module.log = lambda name, value, *a, _got=got, **k: _got.append(float(value)) if name == "train/loss" else None
        fit(module, steps=3, log_every_n_steps=1)
    assert len(losses[True]) == 3 and all(abs(a - b) < 2e-2 for a, b in zip(losses[False], losses[True])), losses


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_fsdp2_one_gpu_sharded_save_and_resume(tmp_path, compile):
    out = tmp_path / "fsdp"
    out.mkdir()
    torch.manual_seed(0)
    save_safetensors(build_tokenizer(compose_cfg()).state_dict(), out / "tok.safetensors")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "WORLD_SIZE": "1", "NODE_RANK": "0",
           "LOCAL_RANK": "0", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "dist_job.py"), str(out), str(out / "tok.safetensors"),
                           "trainer=fsdp", "trainer.accelerator=gpu", "trainer.devices=1", f"compile={str(compile).lower()}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = out / "checkpoints" / "step2.ckpt"
    assert folder.is_dir() and [p.name for p in folder.glob("*.distcp")] == ["__0_0.distcp"]
    first = json.loads((out / "losses_fit1_rank0.json").read_text())
    again = json.loads((out / "losses_fit2_rank0.json").read_text())
    assert again == {"3": first["3"]}  # the resumed step 3 is the uninterrupted step 3
