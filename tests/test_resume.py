"""Runs that survive a kill: SIGKILL at any moment, or during a save, and the same command continues with the
same losses as an uninterrupted run; non-finite losses are skipped, counted and stop the run; an unwritable output
folder fails at start. train.py runs as subprocesses (~45 s in all)."""
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg
from omegaconf import open_dict

from scalegen.build import build_module, build_tokenizer
from scalegen.io import save_safetensors

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
STEPS, EVERY = 24, 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.safetensors"
    torch.manual_seed(0)
    save_safetensors(build_tokenizer(compose_cfg()).state_dict(), path)
    return path


def command(run_dir: Path, tokenizer: Path, script: str = "train.py") -> list[str]:
    return [sys.executable, str(REPO / "tests" / script) if script != "train.py" else str(REPO / script),
            f"hydra.run.dir={run_dir}", f"tokenizer_ckpt={tokenizer}", f"trainer.max_steps={STEPS}",
            f"callbacks.checkpoint.every_n_train_steps={EVERY}", "trainer.val_check_interval=100000",
            "trainer.log_every_n_steps=1", "data.batch_size=8", "backbone.depth=2", "backbone.width=64",
            "backbone.num_heads=2", "sample.per_class=1", "callbacks.progress=null", "+data.hflip=true",
            "+data.augment_shift=1"]


def step_losses(run_dir: Path, attempt: str = "last") -> dict[int, str]:
    """step -> loss of one attempt of metrics.csv (continuous across resumes): the last, or "all" of them."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    if attempt == "last":
        rows = [r for r in rows if r["attempt"] == max((r["attempt"] for r in rows), key=int)]
    return {int(r["step"]): r["train/loss"] for r in rows}


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer) -> dict[int, str]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.run(command(run_dir, tokenizer), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = step_losses(run_dir)
    assert len(losses) == STEPS
    return losses


def test_sigkill_at_any_moment_then_same_command_continues_identically(tmp_path, tokenizer, uninterrupted):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(command(run_dir, tokenizer), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill at some moment after the second checkpoint
        if last.exists() and ckpt_step(last) >= 2 * EVERY:
            time.sleep(random.uniform(0, 0.3))
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = ckpt_step(last)
    assert EVERY <= resumed_from < STEPS

    done = subprocess.run(command(run_dir, tokenizer), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resuming from {last}" in done.stdout
    after = step_losses(run_dir)  # this attempt's log: the steps after the checkpoint
    assert sorted(after) == list(range(resumed_from, STEPS))  # (the log's step is 0-based)
    assert after == {s: uninterrupted[s] for s in after}  # data order, sampler position and RNG were restored


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, tokenizer, uninterrupted):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    proc = subprocess.run(command(run_dir, tokenizer, "kill_during_save.py"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert list(ckpts.glob(".last.ckpt.*.tmp")), "the kill did not fall inside the save of last.ckpt"
    assert ckpt_step(ckpts / "last.ckpt") == EVERY  # the previous one, whole

    done = subprocess.run(command(run_dir, tokenizer), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    after = step_losses(run_dir)
    assert sorted(after) == list(range(EVERY, STEPS))
    assert after == {s: uninterrupted[s] for s in after}
    assert not list(ckpts.glob(".*.tmp")), "the next start removes the dead writer's temporary file"


def test_sigterm_saves_at_the_next_step_exits_143_and_continues_identically(tmp_path, tokenizer, uninterrupted):
    """SIGTERM (scancel, preemption): last.ckpt at or after the signal's step, exit 143, how to continue; the same
    command continues with the uninterrupted losses, and metrics.csv holds every step once across both attempts."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(command(run_dir, tokenizer), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline, signalled_at = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and ckpt_step(last) >= EVERY:
            signalled_at = ckpt_step(last)
            time.sleep(random.uniform(0, 0.3))
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    saved = ckpt_step(last)
    assert signalled_at <= saved < STEPS and f"saved {last} at step {saved}" in out
    assert "To continue, run the same command" in out and f"hydra.run.dir={run_dir}" in out
    assert not (run_dir / "run.lock").exists()

    done = subprocess.run(command(run_dir, tokenizer), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(step_losses(run_dir)) == list(range(saved, STEPS))
    assert step_losses(run_dir, "all") == uninterrupted  # every step once, the redone ones replaced


def test_nonfinite_losses_skip_count_and_stop(tmp_path):
    """Steps with a NaN loss change no weight and are counted; K in a row (max_nonfinite, from the config) stop."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from scalegen.data import DigitsDataModule

    torch.set_num_threads(1)
    cfg = compose_cfg("max_nonfinite=3", "backbone.depth=1", "backbone.width=32", "backbone.num_heads=2",
                      "data.batch_size=4")
    data = DigitsDataModule(batch_size=4)
    module = build_module(cfg, data.num_classes)
    assert module.max_nonfinite == 3
    real_loss, nan_steps, snapshots = module._loss, {2, 3, 5, 6, 7}, {}

    def loss(batch, drop_labels, scales=None):
        out, per_scale = real_loss(batch, drop_labels, scales)
        step = module.global_step + 1
        snapshots[step] = module.generator.backbone.word_embed.weight.detach().clone()
        return (out * float("nan"), per_scale) if step in nan_steps else (out, per_scale)

    module._loss = loss
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=CSVLogger(str(tmp_path), name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    with pytest.raises(FloatingPointError, match="stopping after 3 in a row"):
        trainer.fit(module, datamodule=data)
    assert module.nonfinite_total == 5
    # snapshots[s] = the weights step s starts from: steps 2 and 3 (NaN) changed nothing, steps 1 and 4 did
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])
    assert not torch.equal(snapshots[1], snapshots[2]) and not torch.equal(snapshots[4], snapshots[5])
    with open(tmp_path / "metrics.csv", newline="") as f:
        counts = [float(r["train/nonfinite_steps"]) for r in csv.DictReader(f) if r.get("train/nonfinite_steps")]
    assert set(counts) == {1.0, 2.0, 3.0, 4.0}  # logged at each skip (the 5th raised before its log was written)


def test_unwritable_output_folder_fails_at_start(tmp_path):
    from scalegen.commands.train import train
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = compose_cfg("data.batch_size=4")
    with open_dict(cfg):
        cfg.output_dir = str(blocker / "run")
    started = time.perf_counter()
    with pytest.raises(OSError, match="is not writable"):
        train(cfg)
    assert time.perf_counter() - started < 5  # before any data, tokenizer or training
