"""SLURM through Hydra's submitit launcher, end to end against the stand-in sbatch/srun/sacct/scontrol of
tests/fakeslurm: a 2-job multirun (a job array); job 0 gets the pre-timeout signal, saves, is requeued and resumes.
Plus the signal agreement itself in-process, and the launcher configs (~40 s)."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_cfg

from scalegen.build import build_tokenizer
from scalegen.io import save_safetensors

FAKESLURM = REPO / "tests" / "fakeslurm"


def test_launcher_configs_compose():
    cfg = compose_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
                      "hydra.launcher.tasks_per_node=8", "hydra.launcher.setup=['module load cuda']",
                      hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # submitit requeues on its signal
    keys = {"nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "setup"}
    assert keys <= set(launcher)
    local = compose_cfg("hydra/launcher=submitit_local", hydra_config=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher")


@pytest.mark.slow
def test_two_job_multirun_on_fake_slurm_with_requeue(tmp_path):
    tok = tmp_path / "tok.safetensors"
    torch.manual_seed(0)
    save_safetensors(build_tokenizer(compose_cfg()).state_dict(), tok)
    sweep, state = tmp_path / "sweep", tmp_path / "slurm_state"
    env = {**os.environ, "PATH": f"{FAKESLURM}:{os.environ['PATH']}", "FAKESLURM_STATE": str(state),
           "FAKESLURM_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # job 0 is "about to hit its time limit" once its first checkpoint exists
           "FAKESLURM_SIGNAL_WHEN": f"{sweep}/{{array_task}}/checkpoints/last.ckpt", "FAKESLURM_SIGNAL_TASKS": "0"}
    steps = 12
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
         "hydra.sweep.subdir=${hydra.job.num}",
         "hydra.launcher.partition=fakepart", "hydra.launcher.timeout_min=30", "hydra.launcher.signal_delay_s=60",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4", "hydra.launcher.setup=['export FROM_SETUP=1']",
         f"tokenizer_ckpt={tok}", f"trainer.max_steps={steps}", "callbacks.checkpoint.every_n_train_steps=3",
         "trainer.val_check_interval=100000", "trainer.log_every_n_steps=1", "data.batch_size=8",
         "backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", "sample.per_class=1",
         "callbacks.progress=null", "model.ema_decay=0.99,0.999"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    logs = "\n".join(p.read_text()[-2500:] for p in sweep.glob(".submitit/*/*log.*"))
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}\n{logs}"

    script = next(state.glob("sbatch_*.sh")).read_text()  # one job array with the launcher's keys
    for line in ("--array=0-1", "--partition=fakepart", "--signal=USR2@60", "--time=30", "--ntasks-per-node=1",
                 "--cpus-per-task=1", "--mem=4GB", "export FROM_SETUP=1"):
        assert line in script
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:  # both finished their steps, each in its own folder, with its own EMA setting
        last = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == steps
    assert {torch.load(j / "checkpoints" / "last.ckpt", weights_only=True)["scalegen_config"]["model"]["ema_decay"]
            for j in jobs} == {0.99, 0.999}

    out0 = "\n".join(p.read_text() for p in sweep.glob(".submitit/*_0/*_0_log.out"))
    out1 = "\n".join(p.read_text() for p in sweep.glob(".submitit/*_1/*_1_log.out"))
    assert "[scalegen] SLURM job" in out0 and "rank 0/1" in out0  # Lightning's SLURMEnvironment, from srun's variables
    assert "received SIGUSR2" in out0 and "then requeueing" in out0
    assert "resuming from" in out0 and "resuming from" not in out1
    assert len(list(state.glob("*_0.attempts"))) == 1 and (next(state.glob("*_0.attempts")).read_text() == "2")
    assert not list(state.glob("*_1.attempts"))  # job 1 was never signalled: one attempt


def test_signal_saves_then_hands_over_to_submitit(tmp_path):
    """In-process: USR2 during fit -> last.ckpt written at the next step boundary, then the previous handler."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from scalegen.scaleout.slurm import SubmititRequeue

    calls = []

    def submitit_handler(signum, frame):  # what submitit installs: requeue (rank 0) and exit
        calls.append((signum, (tmp_path / "last.ckpt").exists()))
        raise SystemExit(-1)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SignalAtStep2(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)
        trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[SubmititRequeue(signal.SIGUSR2), SignalAtStep2(),
                            ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=100)])
        with pytest.raises(SystemExit):
            trainer.fit(Tiny(), data)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [(signal.SIGUSR2, True)]  # submitit acted once, after the checkpoint was on disk
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3  # the step the signal fell in


def test_loggers_csv_by_default_wandb_offline_and_lazily_imported_tensorboard(tmp_path, monkeypatch):
    import sys

    from hydra.utils import instantiate
    from omegaconf import open_dict

    def loggers(name):
        cfg = compose_cfg(f"logger={name}")
        with open_dict(cfg):
            for node in cfg.logger.values():
                node.save_dir = str(tmp_path / name)
        return {k: instantiate(v) for k, v in cfg.logger.items()}

    default = compose_cfg()
    assert list(default.logger) == ["csv"]
    csv_only = loggers("csv")
    csv_only["csv"].log_metrics({"train/loss": 1.0}, step=0)
    csv_only["csv"].save()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    lazy = subprocess.run([sys.executable, "-c", (  # a fresh process: other tests may have imported wandb here
        "import sys; from hydra import compose, initialize_config_dir; from hydra.utils import instantiate; "
        "import scalegen.commands.train\n"
        f"with initialize_config_dir(config_dir={str(REPO / 'configs')!r}, version_base='1.3'):\n"
        f"    cfg = compose('train', overrides=['logger.csv.save_dir={tmp_path}'])\n"
        "instantiate(cfg.logger.csv); print('wandb' in sys.modules)")], capture_output=True, text=True, timeout=120)
    assert lazy.stdout.strip() == "False", lazy.stderr[-2000:]  # the default loggers never import wandb

    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_OFFLINE", "true")
    built = loggers("wandb")
    assert set(built) == {"csv", "wandb"}
    built["wandb"].log_metrics({"train/loss": 1.0}, step=0)
    built["wandb"].finalize("success")
    import wandb
    wandb.finish()
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))

    board = loggers("tensorboard")["tensorboard"]
    board.log_metrics({"train/loss": 1.0}, step=0)
    board.finalize("success")
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
