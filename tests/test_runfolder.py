"""The run folder across attempts, in-process (~10 s): one run per folder (run.lock), leftovers of interrupted
saves, a checkpoint folder that cannot be written, resume settings that must not change, a full disk, one
continuous metrics.csv, the final step always in last.ckpt, and the skipped-image count."""
import csv
import errno
import json
import os
import socket
import subprocess
import warnings

import lightning as L
import pytest
import torch
from conftest import compose_cfg
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf, open_dict

from scalegen.commands import train as train_command
from scalegen.errors import ConfigError
from scalegen.eval.callback import TrainingStats
from scalegen.io import AtomicCheckpointIO, atomic_write
from scalegen.training.runfolder import (
    FinalCheckpoint,
    RunCSVLogger,
    RunFolderBusy,
    RunLock,
    is_launching_rank,
    remove_stale_tmp,
)


def cfg_in(folder, *overrides):
    cfg = compose_cfg("data.batch_size=4", *overrides)
    with open_dict(cfg):
        cfg.output_dir = str(folder)
    return cfg


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": "x"}))


def test_a_second_run_on_the_same_folder_fails_at_start_naming_the_holder(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(RunFolderBusy, match=f"PID {live_pid} on {socket.gethostname()}"):
        train_command.train(cfg_in(tmp_path))
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == live_pid  # the holder's lock stays
    write_lock(tmp_path / "other_host", os.getpid() + 1, host="elsewhere")
    with pytest.raises(RunFolderBusy, match="on elsewhere"):
        RunLock(tmp_path / "other_host").acquire()


def test_a_dead_owners_lock_is_taken_over_and_released_at_exit(tmp_path, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, dead.pid)

    def stop(*a, **k):  # stop right after the start-up checks
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "instantiate", stop)
    with pytest.warns(UserWarning, match=f"taking over the lock of a run that is gone \\(PID {dead.pid}"):
        with pytest.raises(KeyboardInterrupt):
            train_command.train(cfg_in(tmp_path))
    assert not (tmp_path / "run.lock").exists()
    with RunLock(tmp_path), RunLock(tmp_path):  # this process again (a multirun's next job, a second stage)
        assert (tmp_path / "run.lock").exists()


def test_only_the_launching_process_of_a_run_takes_the_lock(monkeypatch):
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert is_launching_rank()
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.setenv(var, "1")
        assert not is_launching_rank(), var
        monkeypatch.setenv(var, "0")
    assert is_launching_rank()


def test_leftover_temporary_files_of_dead_writers_are_removed(tmp_path, live_pid):
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [".last.ckpt.abc123_x.tmp", f".last.ckpt.pid{live_pid}.k2j3.tmp",
             f".tokenizer.safetensors.pid{dead.pid}.zz.tmp", ".notes.txt.abc.tmp", "last.ckpt"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names[0], names[2]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:2] + names[3:])


def test_unwritable_checkpoint_folder_fails_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = cfg_in(tmp_path / "run", f"callbacks.checkpoint.dirpath={blocker / 'ckpts'}")
    with pytest.raises(OSError, match="checkpoint folder .* is not writable"):
        train_command.train(cfg)


def test_resume_with_another_batch_size_refuses_unless_asked(tmp_path, monkeypatch):
    old = cfg_in(tmp_path, "data.batch_size=8", "seed=1")
    (tmp_path / "checkpoints").mkdir()
    torch.save({"scalegen_config": OmegaConf.to_container(old, resolve=False) | {"logger": None, "callbacks": None},
                "global_step": 3}, tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"data.batch_size: 8 -> 4, seed: 1 -> 0.*resume_changes=true"):
        train_command.train(cfg_in(tmp_path))
    monkeypatch.setattr(train_command, "instantiate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.warns(UserWarning, match="resume_changes=true: resuming .*data.batch_size: 8 -> 4"):
        with pytest.raises(KeyboardInterrupt):
            train_command.train(cfg_in(tmp_path, "resume_changes=true"))
    with pytest.raises(KeyboardInterrupt):  # the same settings: no question
        train_command.train(cfg_in(tmp_path, "data.batch_size=8", "seed=1"))


def test_a_full_disk_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_text("previous")

    def full(tmp):
        with open(tmp, "w") as f:
            f.write("part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=f"no space left on {tmp_path} while writing last.ckpt"):
        atomic_write(target, full)
    # torch.save's own words for it, and a disk that is full
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255)))
    with pytest.raises(OSError, match="no space left on"):
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("basic_ios::clear: iostream error")))
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(folder, max_steps, every, callbacks=(), ckpt_path=None, data=None):
    torch.manual_seed(0)
    data = data or torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(256, 2)), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False,
                        logger=RunCSVLogger(str(folder), name="", version=""), log_every_n_steps=1,
                        plugins=[AtomicCheckpointIO()], callbacks=[
                            *callbacks, FinalCheckpoint(),
                            ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True, every_n_train_steps=every)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), data, ckpt_path=ckpt_path)
    return trainer


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_step(folder):
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def test_the_end_of_training_always_writes_last_ckpt(tmp_path):
    fit(tmp_path, max_steps=6, every=4)
    assert last_step(tmp_path) == 6


def test_metrics_csv_is_one_file_across_three_resumes(tmp_path):
    """Attempt 0 logs steps 0-5 and is "killed" with its checkpoint at step 4; attempts 1-3 resume: every step once,
    with its attempt; the rows attempt 1 redoes (4, 5) replace attempt 0's."""
    fit(tmp_path, max_steps=6, every=4)  # attempt 0: steps 0-5
    fit(tmp_path / "step4", max_steps=4, every=4)  # the same run's checkpoint at step 4
    last = tmp_path / "step4" / "checkpoints" / "last.ckpt"
    fit(tmp_path, max_steps=9, every=100, ckpt_path=last)  # attempt 1: redoes 4, 5; then 6-8
    fit(tmp_path, max_steps=12, every=100, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")  # attempt 2: 9-11
    fit(tmp_path, max_steps=14, every=100, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")  # attempt 3: 12-13
    rows = [r for r in read_csv(tmp_path / "metrics.csv") if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == list(range(14))
    assert [int(r["attempt"]) for r in rows] == [0] * 4 + [1] * 5 + [2] * 3 + [3] * 2
    assert len(list(tmp_path.glob("metrics*.csv"))) == 1


def test_a_failed_save_keeps_the_previous_checkpoint_and_records_the_rows(tmp_path, monkeypatch):
    save, calls = torch.save, []

    def second_save_fails(obj, f, *a, **k):
        calls.append(f)
        if len([c for c in calls if ".last.ckpt." in str(c)]) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", second_save_fails)
    with pytest.raises(OSError, match="no space left on .*checkpoints while writing last.ckpt"):
        fit(tmp_path, max_steps=10, every=3)
    monkeypatch.setattr(torch, "save", save)
    assert last_step(tmp_path) == 3
    steps = [int(r["step"]) for r in read_csv(tmp_path / "metrics.csv") if r.get("train/loss")]
    assert steps == list(range(5))  # every step logged before the one whose save failed (it is redone)


def test_skipped_images_are_logged_and_in_run_stats(tmp_path):
    from PIL import Image

    from scalegen.data.imagefolder import ImageFolderDataModule
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / "train" / cls / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "broken.png").write_bytes(b"not a png")

    class ImageTiny(Tiny):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch[0].flatten(1)[:, :2],), batch_idx)

    data = ImageFolderDataModule(tmp_path / "data", image_size=8, batch_size=3, num_workers=0, val_fraction=0.0)
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path,
                        logger=RunCSVLogger(str(tmp_path), name="", version=""), log_every_n_steps=1,
                        enable_checkpointing=False, callbacks=[TrainingStats()], limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ImageTiny(), datamodule=data)
    assert json.loads((tmp_path / "run_stats.json").read_text())["skipped_images"] == 1  # one epoch: 9 files
    logged = [float(r["data/skipped_images"]) for r in read_csv(tmp_path / "metrics.csv")
              if r.get("data/skipped_images")]
    assert logged and logged[-1] == 1.0
