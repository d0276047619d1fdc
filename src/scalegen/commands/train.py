"""What `train.py` does: check the config, train the tokenizer if none is given, then the generator."""
from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scalegen.data.imagefolder import SkippingDataLoader
from scalegen.errors import ConfigError
from scalegen.hub import resolve as resolve_weights
from scalegen.io import AtomicCheckpointIO, save_safetensors
from scalegen.scaleout.slurm import cluster_plugins_and_callbacks
from scalegen.training.runfolder import (
    FinalCheckpoint,
    RunLock,
    changed_resume_settings,
    check_writable,
    is_launching_rank,
    remove_stale_tmp,
)


def output_dir(cfg: DictConfig) -> Path:
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests): use the configured folder
        out = Path(cfg.get("output_dir", "outputs/run"))
    return check_writable(out, "output folder")


def checkpoint_dir(cfg: DictConfig, out: Path) -> Path | None:
    """Where the step checkpoints go (callbacks.checkpoint.dirpath; <run folder>/checkpoints outside Hydra)."""
    node = (cfg.get("callbacks") or {}).get("checkpoint")
    if node is None:
        return None
    try:
        dirpath = node.get("dirpath")
    except (ValueError, OmegaConfBaseException):  # ${hydra:...} outside a Hydra run (tests)
        dirpath = None
    return Path(dirpath) if dirpath else out / "checkpoints"


def check_resume_settings(cfg: DictConfig, last: Path) -> None:
    """A resume continues the same data order and LR: refuse a change to what sets them, unless asked for."""
    if not last.is_file():  # a sharded (folder) checkpoint: its config is not read here
        return
    old = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("scalegen_config")
    changed = changed_resume_settings(old or {}, cfg)
    if not changed:
        return
    what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
    if not cfg.get("resume_changes", False):
        raise ConfigError(
            f"resuming {last} with changed settings ({what}): they change the data order or the learning rate, "
            "so the run would not continue as it started. Restore them, set resume_changes=true to continue on "
            "purpose, or start a new run (another hydra.run.dir, or resume=false)")
    warnings.warn(f"resume_changes=true: resuming {last} with changed settings ({what})", stacklevel=2)


def make_trainer(cfg_trainer: DictConfig, out: Path, cfg: DictConfig, **overrides) -> L.Trainer:
    if "logger" not in overrides:
        overrides["logger"] = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None] or False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    plugins, more_callbacks = cluster_plugins_and_callbacks()
    return instantiate(cfg_trainer, default_root_dir=str(out),
                       callbacks=callbacks + more_callbacks + [FinalCheckpoint()],
                       plugins=[AtomicCheckpointIO(), *plugins], **overrides)


def train_tokenizer(cfg: DictConfig, data, out: Path) -> Path:
    """Train the configured tokenizer on the run's data; returns its weights file (reused when already there)."""
    from scalegen.build import build_tokenizer  # model code: see train()
    from scalegen.tokenizers.train import TokenizerModule
    from scalegen.training.init_from import init_tokenizer  # model code, as above

    target = out / "tokenizer.safetensors"
    if target.exists() and cfg.resume:
        print(f"[scalegen] reusing the tokenizer trained earlier in this run: {target}")
        return target
    opts = OmegaConf.to_container(cfg.tokenizer_training, resolve=True)
    steps = opts.pop("max_steps")
    tokenizer = build_tokenizer(cfg)
    if cfg.task == "tokenizer" and cfg.get("init_from"):
        init_tokenizer(tokenizer, resolve_weights(cfg.init_from, "init_from"))
    module = TokenizerModule(tokenizer, **opts)
    tok_out = out / "tokenizer"
    # its own CSV log and no step checkpoints: the stage is short and its product is the weights file
    stage_cfg = OmegaConf.merge(cfg, {"callbacks": {"checkpoint": None}})
    trainer = make_trainer(cfg.trainer, tok_out, stage_cfg, max_steps=steps, val_check_interval=None,
                           check_val_every_n_epoch=None, limit_val_batches=1, enable_checkpointing=False,
                           logger=CSVLogger(str(tok_out), name="", version=""))
    trainer.fit(module, datamodule=data)
    save_safetensors(module.tokenizer.state_dict(), target)
    print(f"[scalegen] tokenizer written to {target}")
    if trainer.is_global_zero:
        evaluate_tokenizer_stage(cfg, module.tokenizer, data, tok_out)
    return target


def evaluate_tokenizer_stage(cfg: DictConfig, tokenizer, data, folder: Path) -> None:
    """Reconstruction quality on the validation split (tokenizer_stats.json, a row of the report), rFID in the feature
    space of callbacks.eval where the run has one, LPIPS with tokenizer_training.perceptual_weights where given."""
    from scalegen.eval import classifier as digits
    from scalegen.eval.tokenizer_eval import evaluate_run_tokenizer
    ev = (cfg.get("callbacks") or {}).get("eval")
    extractor = weights = cache = None
    if ev is not None:
        extractor, cache = ev.feature_extractor, ev.get("cache_dir")
        weights = str(digits.ensure_classifier(ev.classifier)[0]) if extractor == "digits" else ev.inception_weights
    evaluate_run_tokenizer(tokenizer, data, folder, feature_extractor=extractor, weights=weights, cache_dir=cache,
                           perceptual_weights=cfg.tokenizer_training.get("perceptual_weights"))


def train(cfg: DictConfig) -> None:
    # Model code loads when a run starts, not when this module is imported: it pulls in timm, and timm imports wandb
    # whenever wandb is installed, which the csv-only default must not do.
    from scalegen.checks import check_generator_config, check_node, check_run_config
    if cfg.task not in ("generator", "tokenizer"):
        raise ConfigError(f"task: {cfg.task!r} is not one of ['generator', 'tokenizer']")
    check_node(cfg.data, "data")
    if cfg.task == "generator":
        check_generator_config(cfg)  # every key and pairing, before any compute
    else:
        check_run_config(cfg)  # a tokenizer run reads the same top level, trainer and tokenizer_training
    out = output_dir(cfg)
    # one run per folder; DDP ranks and other nodes of this run leave it to the launching process
    lock = RunLock(out).acquire() if is_launching_rank() else None
    try:
        _train(cfg, out)
    finally:
        if lock is not None:
            lock.release()


def derive_max_steps(kind: str, value, max_steps: int, flops_per_step: int, images_per_step: int) -> int:
    """The optimizer steps a budget buys: all of it that whole steps can spend (never more). steps: value (null:
    trainer.max_steps); flops: value / training FLOPs per step; images: value / images per step (batch x devices x
    accumulation); time: trainer.max_steps, the LR schedule's horizon (trainer.max_time stops the run)."""
    if kind in ("steps", "time"):
        return max_steps if value is None or kind == "time" else int(value)
    per = flops_per_step if kind == "flops" else images_per_step
    steps = int(value // per)
    if steps < 1:
        raise ConfigError(f"budget.value: {value:g} {kind} is less than one training step ({per:g} {kind} per step); "
                          f"raise it to at least {per:g}, or lower data.batch_size")
    return steps


def first_sample(data):
    """One training sample of the run's data, as a batch of one (read through the loader's own sampler, dataset and
    collation: no worker starts and no random state moves)."""
    loader = data.train_dataloader()
    for index in loader.sampler:
        if not isinstance(loader, SkippingDataLoader):
            return loader.collate_fn([loader.dataset[index]])
        batch = loader.batch_of([index])  # its collation also hands on the unreadable files, which iteration drops
        if len(batch[1]):
            return batch
    raise ValueError("the training split has no readable sample")


def account(cfg: DictConfig, module, data, trainer: L.Trainer, kind: str, value) -> None:
    """Count the run's compute on its real shapes before training (one sample's forward and backward, one image
    drawn with the run's sampling settings; scalegen.eval.flops), turn the budget into trainer max_steps, print
    both in one line and hand them to TrainingStats (run_stats.json, perf/train_flops, perf/images_seen)."""
    from scalegen.eval.callback import TrainingStats
    from scalegen.eval.flops import parameter_counts, sampling_flops_per_image, training_flops_per_step
    with torch.random.fork_rng(devices=[]):  # a sampler without its own generator would draw from the global one
        sample = first_sample(data)
    per_image = training_flops_per_step(module, sample)
    batch, world, accumulate = cfg.data.batch_size, trainer.world_size, trainer.accumulate_grad_batches
    per_step = per_image * batch * world * accumulate
    steps = derive_max_steps(kind, value, trainer.max_steps, per_step, batch * world * accumulate)
    trainer.fit_loop.epoch_loop.max_steps = steps  # what Trainer(max_steps=) sets; the LR schedule reads it at fit
    record = {**parameter_counts(module), "train_flops_per_step": per_step,
              "sample_flops_per_image": sampling_flops_per_image(module),
              "budget": {"kind": kind, "value": value, "max_steps": steps}}
    for callback in trainer.callbacks:
        if isinstance(callback, TrainingStats):
            callback.set_compute(per_image, record)
    unit = {"steps": "steps", "images": "images", "flops": "training FLOPs", "time": "s (trainer.max_time)"}[kind]
    limit = f"{value:g} {unit}" if value is not None else f"trainer.max_steps={trainer.max_steps}"
    print(f"[scalegen] budget {limit}: max_steps={steps}; {per_step:.4g} training FLOPs per step "
          f"({batch} x {world} device(s) x {accumulate} accumulated, tokenizer encode "
          f"{'included' if isinstance(sample, (list, tuple)) else 'cached'}), {record['sample_flops_per_image']:.4g} "
          f"FLOPs per sampled image; generator {record['params_generator']:,} parameters, tokenizer "
          f"{record['params_tokenizer']:,}")


def metrics_line(out: Path, trainer: DictConfig) -> str:
    """Where the metrics are, or why there are none: Lightning logs every `log_every_n_steps` steps only."""
    path = out / "metrics.csv"
    if path.is_file():
        return f"metrics: {path}"
    every = trainer.get("log_every_n_steps", 50)
    return (f"metrics: none written (no metrics.csv): the run logged no step; Lightning logs every "
            f"trainer.log_every_n_steps={every} steps, so set it to at most trainer.max_steps for a short run")


def _train(cfg: DictConfig, out: Path) -> None:
    from scalegen.build import build_module
    from scalegen.scaleout.distributed import generation_context, is_sharded, recover
    from scalegen.tokenizers.latent_stats import resolve_scale_factor
    from scalegen.training.init_from import init_generator, tokenizer_source  # loads the official releases: model code
    ckpt_dir = checkpoint_dir(cfg, out) if cfg.task == "generator" else None
    if ckpt_dir is not None:
        check_writable(ckpt_dir, "checkpoint folder")
    if is_launching_rank():  # the lock is ours: no other writer of these files is alive
        remove_stale_tmp(out, *([ckpt_dir] if ckpt_dir is not None else []))
    last = recover((ckpt_dir or out / "checkpoints") / "last.ckpt")  # a kill between the renames of a sharded save
    resume_from = str(last) if cfg.resume and cfg.task == "generator" and last.exists() else None
    if resume_from:
        check_resume_settings(cfg, last)
    # the frozen tokenizer is in eval mode on purpose
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    # a run resumes in its own folder by design: its checkpoints being there is the point, not a hazard
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")  # surfaces a bad data path before any training
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)

    tok_ckpt = resolve_weights(cfg.tokenizer_ckpt, "tokenizer_ckpt")
    if hasattr(data, "tokenizer_for_run"):  # cached latents: the tokenizer (config and weights) they were made with
        tok_ckpt = data.tokenizer_for_run(OmegaConf.to_container(cfg.tokenizer, resolve=True), tok_ckpt)
    init_from = resolve_weights(cfg.get("init_from"), "init_from")
    if cfg.task == "generator" and tok_ckpt is None and init_from and not resume_from:
        tok_ckpt = tokenizer_source(str(init_from))
    if cfg.task == "tokenizer" or tok_ckpt is None:
        tok_ckpt = str(train_tokenizer(cfg, data, out))
    if cfg.task == "tokenizer":
        return

    resolve_scale_factor(cfg, data, tok_ckpt, out)  # tokenizer.scale_factor: null -> 1/std measured on the training data
    module = build_module(cfg, data.num_classes, tok_ckpt)
    if init_from and not resume_from:  # a resumed run continues from its own checkpoint
        init_generator(module, str(init_from))
    budget = (cfg.get("budget") or {}).get("kind", "steps"), (cfg.get("budget") or {}).get("value")
    extra = {"max_time": timedelta(seconds=budget[1])} if budget[0] == "time" else {}
    trainer = make_trainer(cfg.trainer, out, cfg, **extra)
    account(cfg, module, data, trainer, *budget)
    if resume_from:
        print(f"[scalegen] resuming from {resume_from}")
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    (out / "samples").mkdir(exist_ok=True)  # a run shorter than val_check_interval has not made it yet
    if trainer.is_global_zero or is_sharded(module):  # sharded weights: every rank generates, rank 0 writes
        with generation_context(module):
            grid = module.save_class_grid(out / "samples" / "final.png" if trainer.is_global_zero else None)
    if trainer.is_global_zero:
        print(f"[scalegen] samples: {grid}\n[scalegen] checkpoints: {out / 'checkpoints'}\n"
              f"[scalegen] {metrics_line(out, cfg.trainer)}")
