"""SLURM through submitit (hydra/launcher=slurm): ranks from SLURM's variables, and one agreed pre-timeout signal.

submitit asks SLURM for `--signal=USR2@<signal_delay_s>` and, on USR2, requeues the same Hydra job (when
`max_num_timeout` > 0), which resumes from checkpoints/last.ckpt. Lightning's own auto-requeue listens on SIGUSR1
and, finding submitit's handler on USR2 already, would stay silent on it; left as is, the job would requeue without
saving. So under submitit, Lightning's requeue is off (`SLURMEnvironment(auto_requeue=False)`: ranks still come
from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS) and `SubmititRequeue` catches the signal, saves last.ckpt at the next
step boundary on every rank (sharded checkpoints need them all), then hands the signal to submitit.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def under_submitit_slurm() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_NTASKS" in os.environ


def preempt_signal() -> signal.Signals:
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2').upper().removeprefix('SIG')}"]


def cluster_plugins_and_callbacks() -> tuple[list, list]:
    """Trainer plugins and callbacks for the cluster the run is on: none outside a submitit SLURM job."""
    if not under_submitit_slurm():
        return [], []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    env = SLURMEnvironment(auto_requeue=False)
    print(f"[scalegen] SLURM job {os.environ.get('SLURM_JOB_ID')}: rank {env.global_rank()}/{env.world_size()} "
          f"(local {env.local_rank()}, node {env.node_rank()}); on {preempt_signal().name}: save last.ckpt, "
          "then submitit requeues", flush=True)
    return [env], [SubmititRequeue()]


class SubmititRequeue(Callback):
    """On the pre-timeout signal: checkpoint at the next step boundary, then let the previous handler
    (submitit's: requeue from rank 0 and exit) act."""

    def __init__(self, signum: int | None = None):
        self.signum = signal.Signals(signum) if signum is not None else preempt_signal()
        self.pending, self.in_loop, self.previous = False, False, None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.previous is not None and signal.getsignal(self.signum) == self._on_signal:
            signal.signal(self.signum, self.previous)

    def on_train_start(self, trainer, pl_module) -> None:
        self.in_loop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.in_loop = False

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        print(f"[scalegen] received {name}: saving at the next step, then requeueing", flush=True)
        self.pending = True
        if not self.in_loop:  # no step boundary to wait for (setup, final samples): hand over at once
            self._hand_over(frame)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.pending, all=False):  # any rank signalled
            return
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            print(f"[scalegen] saved {path} at step {trainer.global_step}", flush=True)
        self._hand_over(None)

    def _hand_over(self, frame) -> None:
        self.in_loop = False
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        handler, self.previous = self.previous, None
        signal.signal(self.signum, handler if handler is not None else signal.SIG_DFL)
        if callable(handler):
            handler(self.signum, frame)  # submitit: rank 0 requeues and exits; the others return
        raise SystemExit(0 if rank else -1)  # the checkpoint is saved: nothing more to do in this attempt
