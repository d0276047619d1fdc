"""compile=true: torch.compile per backbone block and on the head gives eager's losses (tiny VAR on the digits, CPU
Inductor), keeps the state-dict keys so a compiled run saves and resumes, and a compiler that cannot run fails
before any data or training, naming `compile` and the fallback."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import compose_cfg
from lightning.pytorch.callbacks import ModelCheckpoint

from scalegen.build import build_module
from scalegen.checks import check_generator_config
from scalegen.data import DigitsDataModule
from scalegen.data.resume import RNGState
from scalegen.errors import ConfigError
from scalegen.scaleout.distributed import compiler_problem

TINY = ("backbone.depth=2", "backbone.width=32", "backbone.num_heads=2", "data.batch_size=4")


def fit(compile: bool, max_steps: int = 4, ckpt_path=None, save_to=None):
    """(module, {step: loss}) of a run of `max_steps` (continuing `ckpt_path`; saving every 2 steps to `save_to`)."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = build_module(compose_cfg(*TINY, f"compile={str(compile).lower()}"), 10)
    losses = {}
    module.log = lambda name, value, *a, **k: losses.setdefault(module.global_step, float(value)) \
        if name == "train/loss" else None
    saving = [ModelCheckpoint(dirpath=save_to, every_n_train_steps=2, save_top_k=-1)] if save_to else []
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=bool(save_to),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=2.0, callbacks=[RNGState(), *saving])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=4), ckpt_path=ckpt_path)
    return module, losses


@pytest.mark.slow  # Inductor compiles the blocks' forward and backward on the CPU: about a minute on 2 cores
def test_compiled_training_matches_eager_saves_and_resumes(tmp_path):
    eager_module, eager = fit(False)
    module, compiled = fit(True, save_to=tmp_path)
    blocks = module.generator.backbone.blocks
    assert all(b._compiled_call_impl is not None for b in blocks) and module.generator.head._compiled_call_impl
    assert eager_module.generator.backbone.blocks[0]._compiled_call_impl is None
    assert sorted(compiled) == sorted(eager) == [0, 1, 2, 3]
    for step, loss in compiled.items():
        assert abs(loss - eager[step]) <= 1e-5, (step, loss, eager[step])
    assert module.state_dict().keys() == eager_module.state_dict().keys()  # compiled in place: no `_orig_mod.`
    resumed, more = fit(True, ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert sorted(more) == [2, 3], more
    for step, loss in more.items():
        assert abs(loss - eager[step]) <= 1e-5, (step, loss, eager[step])
    images = resumed.generate([1, 2])  # sampling runs the compiled blocks eagerly
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_a_compiler_that_cannot_run_fails_before_training(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "force_disable_caches", True)  # else a compiled kernel from an earlier run is reused
    compiler_problem.cache_clear()
    torch._dynamo.reset()
    try:
        with pytest.raises(ConfigError, match=r"^compile=true: torch.compile cannot run on cpu here \(.+\); use "
                                              r"compile=false"):
            check_generator_config(compose_cfg(*TINY, "compile=true", "trainer.accelerator=cpu"))
    finally:
        compiler_problem.cache_clear()
        torch._dynamo.reset()


def test_compile_takes_a_boolean():
    with pytest.raises(ConfigError, match=r"^compile: 'yes' must be true or false"):
        check_generator_config(compose_cfg("compile=yes"))
