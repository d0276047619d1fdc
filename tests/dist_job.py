"""One rank of the 2-process job of tests/test_distributed.py (started by the test with LOCAL_RANK etc. set).

    python tests/dist_job.py OUT TOKENIZER_CKPT [config overrides...]

Fit 1: 3 steps, the step checkpoint at step 2; at step 2 rank 0 also writes the full (gathered) state dict to
OUT/full_step2.pt and each rank the numel of its parameter shards (OUT/numel_rank{r}.json). Fit 2: a fresh module
resumes from checkpoints/step2.ckpt and trains step 3 again.
Both fits write their per-step losses to OUT/losses_fit{1,2}_rank{r}.json; a validation at step 2 draws the class
grid (every rank generates when the weights are sharded, rank 0 writes samples/step000002.png).
"""
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from scalegen.build import build_module
from scalegen.commands.train import make_trainer

REPO = Path(__file__).resolve().parents[1]


class Record(Callback):
    def __init__(self, out: Path, fit: int):
        self.out, self.fit, self.losses = out, fit, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.fit == 1 and trainer.global_step == 2:  # the weights the step-2 checkpoint holds, gathered
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if trainer.is_global_zero:
                torch.save(full, self.out / "full_step2.pt")
            local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.generator.parameters())
            total = sum(p.numel() for p in module.generator.parameters())  # a DTensor's numel is the global one
            (self.out / f"numel_rank{trainer.global_rank}.json").write_text(json.dumps([local, total]))

    def on_train_end(self, trainer, module):
        (self.out / f"losses_fit{self.fit}_rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))


def main(out: str, tokenizer_ckpt: str, *overrides: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"tokenizer_ckpt={tokenizer_ckpt}", f"callbacks.checkpoint.dirpath={out}/checkpoints",
            "callbacks.checkpoint.every_n_train_steps=2", "+callbacks.checkpoint.filename=step2",
            "callbacks.progress=null", f"logger.csv.save_dir={out}",
            "trainer.max_steps=3", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
            "trainer.devices=2", "data.batch_size=4", "backbone.depth=2", "backbone.width=64", "backbone.num_heads=2",
            "sample.per_class=1", *overrides])
    for fit in (1, 2):
        torch.manual_seed(cfg.seed)
        data = instantiate(cfg.data)
        module = build_module(cfg, data.num_classes, tokenizer_ckpt)
        trainer = make_trainer(cfg.trainer, out, cfg)
        trainer.callbacks.insert(0, Record(out, fit))
        step2 = out / "checkpoints" / "step2.ckpt"  # (last.ckpt is rewritten when fit 1 ends, at step 3)
        trainer.fit(module, datamodule=data, ckpt_path=str(step2) if fit == 2 else None)


if __name__ == "__main__":
    main(*sys.argv[1:])
