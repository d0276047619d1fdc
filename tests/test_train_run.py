"""End to end through Hydra: `train.py` (tokenizer then generator), resuming, and `sample.py` (subprocesses, ~25 s)."""

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# one intra-op thread: tiny models, and a busy machine makes extra OpenMP threads many times slower
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SMALL = ["tokenizer_training.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
         "sample.per_class=1", "data.batch_size=8"]


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *overrides], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def train(run_dir: Path, max_steps: int) -> subprocess.CompletedProcess:
    return run("train.py", f"trainer.max_steps={max_steps}", *SMALL, f"hydra.run.dir={run_dir}")


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run: (its folder, a copy of it taken at once for the read-only tests, the finished process)."""
    root = tmp_path_factory.mktemp("train")
    proc = train(root / "run", 2)
    shutil.copytree(root / "run", root / "snapshot")
    return root / "run", root / "snapshot", proc


def test_train_two_steps_writes_everything(trained):
    _, run_dir, proc = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and global_step(ckpt) == 2
    assert "scalegen_config" in torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (run_dir / "config.yaml").is_file()

    # the tokenizer stage: weights file and its own metrics
    assert (run_dir / "tokenizer.safetensors").is_file()
    tok_rows = csv_rows(run_dir / "tokenizer" / "metrics.csv")
    assert any(r.get("train/loss") for r in tok_rows)

    # the generator's metrics: training loss every step (finite), and the validation at step 2
    rows = csv_rows(run_dir / "metrics.csv")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses)
    assert any(r.get("val/loss") for r in rows)

    # one row per class (10 digits), one 32x32 image each, 1 px padding around every image
    grid = Image.open(run_dir / "samples" / "final.png")
    assert grid.format == "PNG" and grid.size == (1 * 33 + 1, 10 * 33 + 1)
    assert (run_dir / "samples" / "step000002.png").is_file()
    assert "[scalegen] tokenizer written to" in proc.stdout
    assert "resuming" not in proc.stdout


def test_train_resumes_from_last_checkpoint(trained):
    run_dir = trained[0]  # the same command in the same folder, now to 4 steps
    proc = train(run_dir, 4)
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in proc.stdout
    assert "reusing the tokenizer" in proc.stdout
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 4
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]  # overwritten, not versioned
    steps = {int(r["step"]) for r in csv_rows(run_dir / "metrics.csv") if r.get("train/loss") and r["attempt"] == "1"}
    assert steps and min(steps) >= 2  # the resumed run trains steps 3 and 4 only


def test_sample_py_writes_pngs_grid_and_npz(trained, tmp_path):
    out = tmp_path / "samples"
    run("sample.py", f"ckpt={trained[1] / 'checkpoints' / 'last.ckpt'}", "per_class=1", "batch_size=5",
        f"hydra.run.dir={out}")
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 10
    assert [p.name for p in pngs] == [f"{i:06d}_class{i}.png" for i in range(10)]
    assert Image.open(pngs[0]).size == (32, 32)
    assert Image.open(out / "grid.png").size == (34, 331)
    with np.load(out / "samples.npz") as data:
        arr = data["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (10, 32, 32, 3)
        assert data["labels"].tolist() == list(range(10))
    # the PNGs are the arrays of the npz
    assert np.array_equal(np.asarray(Image.open(pngs[3]).convert("RGB")), arr[3])
