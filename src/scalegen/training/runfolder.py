"""One run per folder, and what the folder keeps across attempts: the lock, leftover temporary files, the
continuous metrics.csv, the final checkpoint, and the settings a resume must not change."""
from __future__ import annotations

import csv
import json
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

LOCK_NAME = "run.lock"
# scalegen.io.atomic_write's temporary files: .<name>.pid<PID>.<random>.tmp (older ones without the pid)
TMP_PATTERN = re.compile(r"^\.(?P<name>.+\.(?:ckpt|safetensors))\.(?:pid(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp$")
# settings that change the sampler's order or the peak LR (base_lr x batch x world x accumulate / 256)
RESUME_SETTINGS = ("data.batch_size", "trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches",
                   "seed", "data.split_seed", "data.val_fraction")


class RunFolderBusy(RuntimeError):
    pass


def is_launching_rank() -> bool:
    """The process that owns the run folder: rank 0 of torchrun, SLURM tasks and Lightning's own launcher (its
    children get LOCAL_RANK; other nodes NODE_RANK)."""
    return all(int(os.environ.get(v) or 0) == 0 for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """`<folder>/run.lock` (host, PID, start time), created exclusively; a lock left by a dead process of this host
    is taken over with a warning. Released by `release()` (also a context manager)."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    self.held = True  # this process already holds it (a multirun job or a second stage)
                    return self
                if holder is not None and (holder.get("host") != me["host"] or pid_alive(int(holder["pid"]))):
                    raise RunFolderBusy(
                        f"{self.path.parent} is in use by another run: PID {holder['pid']} on {holder['host']} "
                        f"(since {holder.get('started', '?')}). Give this run its own folder (hydra.run.dir=...), "
                        f"or, if that run is gone (a crashed host), delete {self.path}")
                who = f"PID {holder['pid']} on {holder['host']}" if holder else "an unreadable lock"
                warnings.warn(f"{self.path}: taking over the lock of a run that is gone ({who})", stacklevel=2)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunFolderBusy(f"{self.path}: could not take the lock (another run keeps taking it)")

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_tmp(*folders: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted atomic saves (ours only, by name) whose writer is gone."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            m = TMP_PATTERN.match(path.name)
            if not m or not path.is_file():
                continue
            pid = int(m["pid"]) if m["pid"] else None
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        print(f"[scalegen] removed {len(removed)} temporary file(s) of interrupted saves: "
              f"{', '.join(p.name for p in removed)}", flush=True)
    return removed


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Fail now, not after an hour of training, if `folder` cannot be written."""
    folder = Path(folder)
    probe = folder / f".write_test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{what} {folder} is not writable: {e}") from None
    return folder


def _get(tree, dotted: str):
    for key in dotted.split("."):
        if not hasattr(tree, "get") or key not in tree:
            return None
        tree = tree[key]
    return tree


def changed_resume_settings(old, new) -> list[tuple[str, Any, Any]]:
    """(key, old, new) of the settings in RESUME_SETTINGS that differ between two run configs (dicts or DictConfigs; absent
    `trainer.accumulate_grad_batches` = 1)."""
    defaults = {"trainer.accumulate_grad_batches": 1}
    out = []
    for key in RESUME_SETTINGS:
        a, b = _get(old, key), _get(new, key)
        a, b = defaults.get(key, a) if a is None else a, defaults.get(key, b) if b is None else b
        if a != b:
            out.append((key, a, b))
    return out


class FinalCheckpoint(Callback):
    """`last.ckpt` always holds the final step: saved at the last training step when the periodic checkpoint does
    not fall on it (with every_n_train_steps=4 and max_steps=6, step 6 would otherwise be lost)."""

    def _pending(self, trainer) -> bool:
        ckpt = trainer.checkpoint_callback
        return (ckpt is not None and bool(getattr(ckpt, "save_last", False)) and ckpt.dirpath is not None
                and getattr(ckpt, "_last_global_step_saved", None) != trainer.global_step)

    def _save(self, trainer) -> None:
        ckpt = trainer.checkpoint_callback
        path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        ckpt._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the same hook as ModelCheckpoint's periodic save (so a resume restores the loops the same way); it runs
        # after this one and saves itself on its own steps
        every = getattr(trainer.checkpoint_callback, "_every_n_train_steps", 0) or 0
        if (0 < trainer.max_steps <= trainer.global_step and self._pending(trainer)
                and not (every and trainer.global_step % every == 0)):
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._pending(trainer):  # ended otherwise (max_epochs, a stop request)
            self._save(trainer)


class ContinuousWriter(ExperimentWriter):
    """metrics.csv kept across attempts: appended, each row with its `attempt`; the rows of earlier attempts from
    the first step this attempt logs on (steps redone after a kill) are replaced by this attempt's."""

    def __init__(self, log_dir: str) -> None:
        self.metrics: list[dict] = []
        self.hparams: dict = {}
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._fs = get_filesystem(log_dir)
        os.makedirs(log_dir, exist_ok=True)
        self.earlier, self.metrics_keys = _read_csv(self.metrics_file_path)
        self.attempt = 1 + max((int(r.get("attempt") or 0) for r in self.earlier), default=-1)
        self._trimmed = False

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        self.metrics[-1]["attempt"] = self.attempt

    def save(self) -> None:
        if not self.metrics:
            return
        if not self._trimmed:  # the first save of this attempt: drop what it redoes, keep the rest
            first = min(int(m["step"]) for m in self.metrics)
            kept = [r for r in self.earlier if r.get("step") in (None, "") or int(r["step"]) < first]
            if len(kept) < len(self.earlier):
                print(f"[scalegen] metrics.csv: {len(self.earlier) - len(kept)} row(s) of earlier attempts from "
                      f"step {first} on are replaced by attempt {self.attempt}'s", flush=True)
            self._record_new_keys()
            if "attempt" not in self.metrics_keys:
                self.metrics_keys = sorted({*self.metrics_keys, "attempt"})
            for r in kept:
                r["attempt"] = r.get("attempt") or 0  # rows written before the column existed: the first attempt
            _write_csv(self.metrics_file_path, self.metrics_keys, kept)
            self.earlier, self._trimmed = [], True
        super().save()


def _read_csv(path: str) -> tuple[list[dict], list[str]]:
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def _write_csv(path: str, keys: list[str], rows: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing one continuous metrics.csv across resumes (see ContinuousWriter)."""

    @property
    def experiment(self) -> ContinuousWriter:
        if self._experiment is None:
            if rank_zero_only.rank > 0:  # Lightning's rank_zero_experiment: other ranks get a stand-in
                return super().experiment
            self._experiment = ContinuousWriter(self.log_dir)
        return self._experiment
