"""M-VAR through the configs: `model=mvar` trains on the digits and samples (train.py / sample.py, subprocesses),
and the Mamba backbone mixes with other parts by override: the flow head (`model=flowar backbone=mvar`) and other
scale lists (doubling, any list) with the categorical head."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_cfg

from scalegen.build import build_module
from scalegen.generators import MambaAdaLNTransformer

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SMALL = ["trainer.max_steps=2", "tokenizer_training.max_steps=2", "trainer.val_check_interval=2",
         "trainer.log_every_n_steps=1", "sample.per_class=1", "data.batch_size=8"]


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *overrides], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_model_mvar_trains_two_steps_and_samples(tmp_path):
    run_dir = tmp_path / "mvar"
    run("train.py", "model=mvar", *SMALL, f"hydra.run.dir={run_dir}")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["scalegen_config"]["backbone"]["_target_"].endswith("MambaAdaLNTransformer")
    assert any(k.endswith("blocks.0.mamba.A_log") for k in ckpt["state_dict"])
    losses = train_losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (run_dir / "samples" / "final.png").is_file()

    out = tmp_path / "samples"
    run("sample.py", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "per_class=1", "batch_size=5", f"hydra.run.dir={out}")
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (10, 32, 32, 3) and data["labels"].tolist() == list(range(10))


def test_mamba_backbone_with_the_flow_head_trains(tmp_path):
    run_dir = tmp_path / "flow_mamba"
    run("train.py", "model=flowar", "backbone=mvar", *SMALL, f"hydra.run.dir={run_dir}")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = ckpt["scalegen_config"]
    assert cfg["backbone"]["_target_"].endswith("MambaAdaLNTransformer") and cfg["head"]["_target_"].endswith("FlowHead")
    assert ckpt["global_step"] == 2 and all(math.isfinite(v) for v in train_losses(run_dir))
    assert (run_dir / "samples" / "final.png").is_file()


@pytest.mark.parametrize("scales", ["[1,2,4,8]", "[1,3,5,8]"], ids=["doubling", "any"])
def test_categorical_mamba_on_other_scale_lists(scales):
    """The residual tokens follow `scales` (the tokenizer's v_patch_nums interpolates it): loss, backward, generation."""
    torch.manual_seed(0)
    cfg = compose_cfg("model=mvar", f"scales={scales}", "backbone.depth=2", "backbone.width=64", "backbone.num_heads=2",
                      "backbone.headdim=32", "backbone.d_state=16")
    module = build_module(cfg, num_classes=10)
    assert isinstance(module.generator.backbone, MambaAdaLNTransformer)
    images, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 3, 5, 9])
    loss, per_scale = module._loss((images, labels), drop_labels=True)
    loss.backward()
    assert math.isfinite(loss.item()) and len(per_scale) == 4
    assert module.generator.backbone.blocks[0].mamba.in_proj.weight.grad.abs().sum() > 0
    out = module.generate([1, 2], seed=0, cfg_scale=1.5, top_k=5)
    assert out.shape == (2, 3, 32, 32) and out.isfinite().all()


def flexvar_module(*overrides: str):
    torch.manual_seed(0)
    cfg = compose_cfg("model=flexvar", "backbone.depth=2", "backbone.width=64", "backbone.num_heads=2", *overrides)
    return build_module(cfg, num_classes=10)


def one_step(module) -> float:
    images, labels = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([0, 3, 5, 9])
    loss, _ = module._loss((images, labels), drop_labels=True)
    loss.backward()
    assert module.generator.backbone.blocks[0].mamba.in_proj.weight.grad.abs().sum() > 0
    return loss.item()


def test_mamba_backbone_with_flexvar_non_residual_scales():
    """FlexVAR's per-scale (non-residual) tokens on a fixed list: the M-VAR backbone as it is."""
    module = flexvar_module("backbone=mvar", "model.train_scales=null", "backbone.headdim=32", "backbone.d_state=16")
    assert type(module.generator.backbone).__name__ == "MambaAdaLNTransformer"
    assert math.isfinite(one_step(module))
    assert module.generate([1, 2], seed=0, cfg_scale=1.5, top_k=5).shape == (2, 3, 32, 32)


def test_scale_free_mamba_backbone_trains_on_random_schedules_and_samples_any_list():
    """backbone=mvar_flex: M-VAR's blocks with FlexVAR's positions, so FlexVAR's random schedules and any list at
    generation work."""
    module = flexvar_module("backbone=mvar_flex", "backbone.headdim=32", "backbone.d_state=16")
    assert isinstance(module.generator.backbone, MambaAdaLNTransformer)
    drawn = []
    draw = module.train_scales
    module.train_scales = lambda: drawn.append(draw()) or drawn[-1]
    for _ in range(3):
        assert math.isfinite(one_step(module))
    assert all(sides[-1] == 8 for sides in drawn) and module.generator.backbone.scales.sizes[-1] == (8, 8)
    images = module.generate([1, 2], seed=0, cfg_scale=1.5, top_k=5, scales=[1, 2, 4, 6, 8])
    assert images.shape == (2, 3, 32, 32) and images.isfinite().all()
