"""Stopping signals: SIGTERM everywhere, and SLURM's pre-timeout signal under submitit; ranks from SLURM's variables.

SIGTERM (`kill`, `scancel`, a preemption, a Kubernetes eviction) saves checkpoints/last.ckpt at the next step
boundary on every rank, then exits with 143 (128 + SIGTERM, what schedulers read as "terminated"); the same command
continues from it. Lightning's own SIGTERM handling would exit 0 without saving, so ours replaces it during training.

submitit asks SLURM for `--signal=USR2@<signal_delay_s>` and, on USR2, requeues the same Hydra job (when
`max_num_timeout` > 0), which resumes from checkpoints/last.ckpt. Lightning's own auto-requeue listens on SIGUSR1
and, finding submitit's handler on USR2 already, would stay silent on it; left as is, the job would requeue without
saving. So under submitit, Lightning's requeue is off (`SLURMEnvironment(auto_requeue=False)`: ranks still come
from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS) and `SubmititRequeue` catches the signal, saves last.ckpt at the next
step boundary on every rank (sharded checkpoints need them all), then hands the signal to submitit.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def under_submitit_slurm() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_NTASKS" in os.environ


def preempt_signal() -> signal.Signals:
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2').upper().removeprefix('SIG')}"]


def cluster_plugins_and_callbacks() -> tuple[list, list]:
    """Trainer plugins and callbacks for the cluster the run is on: SIGTERM saves everywhere; under a submitit SLURM
    job also SLURM's environment and the requeue on its pre-timeout signal."""
    if not under_submitit_slurm():
        return [], [SaveOnSigterm()]
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    env = SLURMEnvironment(auto_requeue=False)
    print(f"[scalegen] SLURM job {os.environ.get('SLURM_JOB_ID')}: rank {env.global_rank()}/{env.world_size()} "
          f"(local {env.local_rank()}, node {env.node_rank()}); on {preempt_signal().name}: save last.ckpt, "
          "then submitit requeues", flush=True)
    return [env], [SubmititRequeue(), SaveOnSigterm()]


class SaveOnSignal(Callback):
    """On `signum`: checkpoint last.ckpt at the next step boundary on every rank (any rank's signal counts), then
    `_finish`. Outside the training loop (setup, final samples) there is no step to wait for: it finishes at once."""

    then = "stopping"

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        self.pending, self.in_loop, self.previous = False, False, None

    def _install(self) -> None:
        if signal.getsignal(self.signum) != self._on_signal:
            self.previous = signal.getsignal(self.signum)
            signal.signal(self.signum, self._on_signal)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._install()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.previous is not None and signal.getsignal(self.signum) == self._on_signal:
            signal.signal(self.signum, self.previous)

    def on_train_start(self, trainer, pl_module) -> None:
        self.in_loop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.in_loop = False

    def _on_signal(self, signum, frame) -> None:
        print(f"[scalegen] received {signal.Signals(signum).name}: saving at the next step, then {self.then}",
              flush=True)
        self.pending = True
        if not self.in_loop:
            self._finish(frame, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(self, "exit_at", None) is not None or not trainer.strategy.reduce_boolean_decision(self.pending, all=False):  # any rank signalled
            return
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            path = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            print(f"[scalegen] saved {path} at step {trainer.global_step}", flush=True)
        self._finish(None, trainer)

    def _finish(self, frame, trainer) -> None:
        raise NotImplementedError


class SaveOnSigterm(SaveOnSignal):
    """SIGTERM: save, print how to continue, exit 143. Installed when training starts, over Lightning's handler
    (which would only stop the loop and exit 0)."""

    then = "exiting"

    def __init__(self):
        super().__init__(signal.SIGTERM)
        self.exit_at: int | None = None  # the step saved on SIGTERM; the run exits at the next hook

    def setup(self, trainer, pl_module, stage: str) -> None:  # before training: the default (die at once)
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()
        super().on_train_start(trainer, pl_module)

    def _finish(self, frame, trainer) -> None:
        if trainer is None:  # outside the loop: nothing to wait for
            raise SystemExit(128 + signal.SIGTERM)
        # exit once this step's metrics are logged (Lightning logs them after on_train_batch_end): at the next hook
        self.exit_at = trainer.global_step
        if trainer.is_global_zero and not under_submitit_slurm():
            print(f"[scalegen] stopped at step {trainer.global_step} by SIGTERM. To continue, run the same command "
                  f"in the same folder:\n  {resume_command(trainer.default_root_dir)}", flush=True)

    def _exit_if_saved(self, *args) -> None:
        if self.exit_at is not None:
            self.in_loop = False
            raise SystemExit(128 + signal.SIGTERM)

    on_train_batch_start = on_validation_start = _exit_if_saved

    def on_train_end(self, trainer, pl_module) -> None:
        self._exit_if_saved()
        super().on_train_end(trainer, pl_module)


def resume_command(run_dir: str) -> str:
    """The command line of this run, with its folder made explicit (a timestamped default would start anew)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "resume="))]
    return shlex.join(["python", os.path.basename(sys.argv[0]) or "train.py", *args, f"hydra.run.dir={run_dir}"])


class SubmititRequeue(SaveOnSignal):
    """On the pre-timeout signal: checkpoint at the next step boundary, then let the previous handler
    (submitit's: requeue from rank 0 and exit) act."""

    then = "requeueing"

    def __init__(self, signum: int | None = None):
        super().__init__(signum if signum is not None else preempt_signal())

    def _finish(self, frame, trainer) -> None:
        self.in_loop = False
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        handler, self.previous = self.previous, None
        signal.signal(self.signum, handler if handler is not None else signal.SIG_DFL)
        if callable(handler):
            handler(self.signum, frame)  # submitit: rank 0 requeues and exits; the others return
        raise SystemExit(0 if rank else -1)  # the checkpoint is saved: nothing more to do in this attempt
