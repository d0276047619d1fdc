"""DDP and FSDP2 on 2 CPU processes (gloo), as subprocesses: 2 steps, save, resume, consolidate (~20 s each).

The ranks are started here with LOCAL_RANK/WORLD_SIZE set (as torchrun or SLURM would), so Lightning launches
nothing itself; each runs tests/dist_job.py (two fits: 3 steps saving at step 2, then a resume from step 2).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg

from scalegen.build import build_tokenizer
from scalegen.io import save_safetensors
from scalegen.scaleout.consolidate import consolidate

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(out: Path, *overrides: str) -> None:
    out.mkdir(parents=True)
    cfg = compose_cfg()
    torch.manual_seed(0)
    save_safetensors(build_tokenizer(cfg).state_dict(), out / "tok.safetensors")
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "NODE_RANK": "0", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "dist_job.py"), str(out),
                                       str(out / "tok.safetensors"), *overrides], cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=240) for p in procs]
    logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], f"ranks exited with {codes}:\n{logs}"


def losses(out: Path, fit: int, rank: int) -> dict:
    return json.loads((out / f"losses_fit{fit}_rank{rank}.json").read_text())


def check_resume_and_ranks(out: Path) -> None:
    assert (out / "samples" / "step000002.png").is_file()  # the validation grid, drawn by every rank if sharded
    for rank in range(2):  # the resumed step 3 is the uninterrupted step 3, on every rank
        assert losses(out, 2, rank) == {"3": losses(out, 1, rank)["3"]}
    assert losses(out, 1, 0)["1"] != losses(out, 1, 1)["1"]  # the ranks trained on different samples


def test_ddp_two_processes_save_resume(tmp_path):
    out = tmp_path / "ddp"
    run_two_ranks(out, "trainer=ddp", "trainer.precision=32")
    ckpt = out / "checkpoints" / "step2.ckpt"
    assert ckpt.is_file()  # DDP: one full file, written by rank 0
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and "scalegen_config" in state
    full = torch.load(out / "full_step2.pt", weights_only=True)
    assert state["state_dict"].keys() == full.keys()
    assert all(torch.equal(state["state_dict"][k], full[k]) for k in full)
    for rank in range(2):  # replicated: every rank holds all the parameters
        local, total = json.loads((out / f"numel_rank{rank}.json").read_text())
        assert local == total
    check_resume_and_ranks(out)


def test_fsdp2_two_processes_sharded_save_resume_consolidate(tmp_path):
    out = tmp_path / "fsdp"
    run_two_ranks(out, "trainer=fsdp")  # the preset as is: bf16 all-gathers and autocast
    folder = out / "checkpoints" / "step2.ckpt"
    assert folder.is_dir() and sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(folder.parent.glob(".*partial*"))  # the atomic save left no temporary folder
    for rank in range(2):  # really sharded: each rank holds about half the generator
        local, total = json.loads((out / f"numel_rank{rank}.json").read_text())
        assert local < 0.6 * total

    merged = consolidate(folder, out / "step2.full.ckpt")
    ckpt = torch.load(merged, map_location="cpu", weights_only=True)
    full = torch.load(out / "full_step2.pt", weights_only=True)
    assert ckpt["global_step"] == 2 and "scalegen_config" in ckpt
    assert ckpt["state_dict"].keys() == full.keys()
    assert all(torch.equal(ckpt["state_dict"][k], full[k]) for k in full)  # consolidated == gathered, bit for bit
    assert all(v.dtype == torch.float32 for k, v in full.items() if k.startswith("generator."))  # fp32 masters
    ema = {k: v for k, v in full.items() if k.startswith("ema.")}
    assert ema and any(not torch.equal(v, full[k.replace("ema.", "generator.", 1)]) for k, v in ema.items())
    check_resume_and_ranks(out)

    from scalegen.pretrained import load_generator  # the consolidated file is what sample.py reads
    torch.manual_seed(0)
    images = load_generator(str(merged)).generate([3], use_ema=True)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp", "fsdp", "fsdp1"])
def test_trainer_presets_compose_and_build_their_strategy(preset):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from scalegen.generators import AdaLNBlock
    from scalegen.scaleout.distributed import FSDP1Strategy, FSDP2Strategy

    cfg = compose_cfg(f"trainer={preset}")
    strategy = instantiate(cfg.trainer.strategy) if not isinstance(cfg.trainer.strategy, str) else cfg.trainer.strategy
    expected = {"cpu": "auto", "gpu": "auto", "ddp": "ddp"}
    if preset in expected:
        assert strategy == expected[preset]
    elif preset == "fsdp":
        assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
        assert strategy.param_dtype == torch.bfloat16 and strategy.reduce_dtype == torch.float32
        assert cfg.trainer.precision == "bf16-mixed"
    else:
        assert isinstance(strategy, FSDP1Strategy) and isinstance(strategy, FSDPStrategy)
        assert strategy.kwargs["use_orig_params"] and AdaLNBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
