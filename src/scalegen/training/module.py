"""The generator LightningModule: frozen tokenizer, teacher-forced training, EMA, and `generate`.

It only orchestrates: the tokenizer makes targets, the composition makes inputs, the backbone and head make the
loss; `scalegen.generation.loop.generate` is the one sampling loop.
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
import torchvision.utils as vutils
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.tensor import DTensor

from scalegen.data.latents import batch_latent
from scalegen.generation.loop import generate, random_labels
from scalegen.generation.options import GenerateOptions
from scalegen.scaleout.distributed import configure_generator, generation_context, is_sharded
from scalegen.schedule.anyscale import for_schedule
from scalegen.training.guard import IN_ROW, TOTAL, StepGuard
from scalegen.training.optim import DEFAULT_OPTIMIZER, LRSchedule, build_optimizer, param_groups, skips_on_device
from scalegen.training.steps import (
    BAD_IN_ROW,
    BAD_KIND,
    BAD_LOSS,
    BAD_NORM,
    BAD_STEP,
    NONFINITE,
    NONFINITE_IN_ROW,
    NONFINITE_TOTAL,
    OK,
    StepLedger,
)


class GeneratorModule(L.LightningModule):
    def __init__(self, tokenizer: torch.nn.Module, generator: torch.nn.Module, composition, *,
                 optimizer: Callable[..., torch.optim.Optimizer] = DEFAULT_OPTIMIZER,
                 lr_schedule: LRSchedule = LRSchedule(), batch_size: int = 256, ema_decay: float | None = 0.9999,
                 cond_drop_rate: float = 0.1, max_nonfinite: int = 5, sample: dict | None = None,
                 config: dict | None = None, activation_checkpointing: bool = False, train_scales=None,
                 guard: StepGuard | None = None, compile: bool = False):
        super().__init__()
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.generator, self.composition = generator, composition
        self.ema = copy.deepcopy(generator).requires_grad_(False).eval() if ema_decay else None
        self.make_optimizer = optimizer  # (param groups, lr=peak LR) -> Optimizer, e.g. a partial AdamW
        self.lr_schedule, self.batch_size = lr_schedule, batch_size  # batch_size: per device, for the peak LR
        self.ema_decay, self.cond_drop_rate, self.max_nonfinite = ema_decay, cond_drop_rate, max_nonfinite
        sample = dict(sample or {})
        if "cfg" in sample:  # a checkpoint written before the key became cfg_scale
            sample.setdefault("cfg_scale", sample.pop("cfg"))
        self.sample_cfg = dict(cfg_scale=1.5, cfg_schedule="linear", per_class=4, seed=0)
        self.sample_cfg.update(sample)
        self.config = config  # the resolved run config, stored in every checkpoint so sample.py can rebuild the model
        self.guard = guard if guard is not None else StepGuard(window=0)  # None: non-finite checks only
        self.ledger = StepLedger()  # the steps' verdicts and logged sums, on the device
        self._step_out, self._ok = None, None  # this step's (loss, per-scale logs); its verdict (device bool)
        self.activation_checkpointing = activation_checkpointing  # applied in configure_model (scalegen.scaleout.distributed)
        self.compile_blocks = compile  # torch.compile per block and the head, applied in configure_model too
        self.train_scales = train_scales  # None, or a callable giving each training step's schedule (FlexVAR's)

    @property
    def nonfinite_total(self) -> int:
        return self.ledger.totals()[1]

    @property
    def nonfinite_in_row(self) -> int:
        return self.ledger.totals()[0]

    @property
    def num_classes(self) -> int:
        return self.generator.backbone.num_classes

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # frozen: no dropout or norm-statistics updates, whatever Lightning asks
        if self.ema is not None:
            self.ema.eval()  # only ever averaged into and sampled from: never in train mode (nor shown so)
        return self

    # -- data -> targets -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Activation checkpointing, torch.compile per block (compile=true), and FSDP2 sharding per transformer block
        under trainer=fsdp."""
        configure_generator(self)

    @torch.no_grad()
    def prepare(self, images: torch.Tensor | None, latent: torch.Tensor | None = None, composition=None):
        """(per-scale targets, teacher inputs) of a batch under `composition` (None: the run's own)."""
        composition = self.composition if composition is None else composition
        with torch.autocast(self.device.type, enabled=False):  # the tokenizer stays in fp32, as in the official code
            latent = self.tokenizer.encode(images.float()) if latent is None else latent
            targets = composition.targets(latent.float())
            inputs = composition.teacher_inputs(targets)
        return targets, inputs

    def _loss(self, batch, drop_labels: bool, scales=None):
        """(loss, per-scale logs) of a batch on `scales` (None: the run's schedule; else FlexVAR's per-step draw)."""
        composition, scales = for_schedule(scales, self.composition, self.generator.backbone, key="model.train_scales")
        if isinstance(batch, dict):  # cached latents (scalegen.data.latents): no image, no tokenizer.encode
            labels = batch["labels"]
            targets, inputs = self.prepare(None, batch_latent(self.tokenizer, batch), composition)
        else:
            images, labels = batch
            targets, inputs = self.prepare(images, composition=composition)
        if drop_labels and self.cond_drop_rate > 0:  # classifier-free guidance: some labels become the null class
            drop = torch.rand(labels.shape[0], device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.generator(labels, inputs, targets, scales)

    def training_step(self, batch, batch_idx):
        scales = self.train_scales() if self.train_scales else None  # FlexVAR: a fresh schedule per step
        loss, per_scale = self._loss(batch, drop_labels=True, scales=scales)
        self._step_out = (loss.detach(), per_scale)  # judged with the gradient norm in configure_gradient_clipping
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as Lightning would, then judge the step on its loss and the global gradient norm clipping computed:
        a non-finite one or an outlier against the guard's window is skipped (no weight, no Adam state change, and
        `optimizer_step` leaves the EMA alone). The verdict stays on the device: a fused optimizer skips through its
        `found_inf` (as under torch.amp.GradScaler); any other drops every gradient after one host read of it."""
        norm = self._clip(optimizer, gradient_clip_val, gradient_clip_algorithm)
        loss, per_scale = self._step_out
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        finite, calm = self.guard.verdict(loss, norm)
        norm_finite = torch.isfinite(norm)
        if scaled:  # fp16: an inf gradient is the scaler's to skip (and lower its scale), not counted as an error
            calm = calm & norm_finite
            finite = finite | (torch.isfinite(loss) & ~norm_finite)
        ok, finite, norm_finite = self._on_every_rank(finite & calm, finite, norm_finite)
        scaler_skip = finite & ~norm_finite if scaled else torch.zeros_like(ok)
        outlier = ~ok & finite & ~scaler_skip
        self.guard.record(ok, outlier, loss, norm)
        self.ledger.record(ok, ~finite, outlier, loss, norm, self.global_step, self.guard.counts[IN_ROW])
        self._ok = ok
        raw = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper forwards reads, not writes
        if skips_on_device(raw) and not scaled:
            raw.found_inf = (~ok).float()  # read by the fused kernel: a skipped step changes no weight nor state
        elif not bool(ok):  # the optimizer skips a parameter without a gradient (host read: unfused optimizers)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self.ledger.accumulate(ok, scale_values("train", per_scale))
        if self._logging_step():
            self._report(optimizer, loss, norm)
        else:  # the progress bar's live value; written to no row (Lightning writes rows at logging steps only)
            self.log("train/loss", loss, prog_bar=True)

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's row (its own rule, log_every_n_steps): when the host reads the ledger."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _report(self, optimizer=None, loss=None, norm=None) -> None:
        """The host's read of the steps since the last row (one transfer): log this step's values if it was
        accepted and the per-scale means over the accepted steps; warn about skipped steps; stop a run whose
        non-finite steps (max_nonfinite) or outliers (guard.max_in_row) in a row reached their limit."""
        values, counts, means = self.ledger.read(self.guard.counts)
        if optimizer is not None and values[OK]:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/grad_norm", norm)
            self.log("lr", torch.tensor(optimizer.param_groups[0]["lr"]))  # a CPU value: no copy to the device
        for name, mean in means.items() if optimizer is not None else ():  # accepted steps only: none if none
            self.log(name, mean)
        nonfinite, outliers = int(values[NONFINITE_TOTAL]), counts[TOTAL]
        new_nonfinite, new_outliers = nonfinite - self.ledger.reported[0], outliers - self.ledger.reported[1]
        if not (new_nonfinite or new_outliers):
            return
        self.ledger.reported = (nonfinite, outliers)
        if optimizer is not None and new_nonfinite:
            self.log("train/nonfinite_steps", float(nonfinite))
        if optimizer is not None and new_outliers:
            self.log("train/outlier_steps", float(outliers))
        step, loss, norm, in_row = int(values[BAD_STEP]), values[BAD_LOSS], values[BAD_NORM], int(values[BAD_IN_ROW])
        if values[BAD_KIND] == NONFINITE:
            what = (f"non-finite loss ({loss})" if not math.isfinite(loss) else
                    f"non-finite gradient norm ({norm}, loss {loss:.4g})")
            msg = f"{what} at step {step}: step skipped ({in_row} in a row)"
        else:
            msg = self.guard.outlier_message(loss, norm, step, in_row)
        if new_nonfinite + new_outliers > 1:
            msg += f"; {new_nonfinite} non-finite and {new_outliers} outlier steps skipped since the last logged row"
        if values[NONFINITE_IN_ROW] >= self.max_nonfinite:
            raise FloatingPointError(f"{msg}; stopping after {self.max_nonfinite} in a row (max_nonfinite="
                                     f"{self.max_nonfinite}; lower the LR or use fp32)")
        self.guard.check_in_row(msg, counts[IN_ROW])
        print(f"warning: {msg}")

    def _on_every_rank(self, *flags: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Whether each flag holds on every rank, as device tensors: one all-reduce, no host sync, so every rank
        decides together (one rank's NaN must not leave the others waiting in the next collective)."""
        held = torch.stack([f.float() for f in flags])
        world = self.trainer.world_size
        if world > 1 and torch.distributed.is_initialized():  # not strategy.reduce: Lightning's adds a barrier
            torch.distributed.all_reduce(held)
        return tuple((held == world).unbind())

    def _clip(self, optimizer, clip_val, algorithm) -> torch.Tensor:
        """Lightning's clipping (the same call, so the same floats); returns the global gradient norm before it."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):  # FSDP1: only the root module knows the global norm
            by_norm = bool(clip_val) and (algorithm or "norm") == "norm"
            if clip_val and not by_norm:
                self.clip_gradients(optimizer, clip_val, algorithm)
            return strategy.model.clip_grad_norm_(clip_val if by_norm else float("inf"))
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if clip_val and (algorithm or "norm") == "norm":  # fp16: Lightning has unscaled the gradients before this hook
            norm = torch.nn.utils.clip_grad_norm_(params, clip_val)  # Precision.clip_grad_by_norm
        else:
            self.clip_gradients(optimizer, clip_val, algorithm)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def validation_step(self, batch, batch_idx):
        loss, per_scale = self._loss(batch, drop_labels=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        for name, value in scale_values("val", per_scale).items():
            self.log(name, value, sync_dist=True)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or not (self.trainer.is_global_zero or is_sharded(self)):
            return  # sharded weights: every rank takes part in generating, rank 0 writes
        out = Path(self.trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        with generation_context(self):
            self.save_class_grid(out / f"step{self.global_step:06d}.png" if self.trainer.is_global_zero else None)

    # -- optimisation ------------------------------------------------------------------------------------------------
    @property
    def peak_lr(self) -> float:
        """base_lr x global batch / 256 (VAR's rule)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return self.lr_schedule.base_lr * self.batch_size * world * accumulate / 256

    def configure_optimizers(self):
        return build_optimizer(self.make_optimizer, param_groups(self.generator), lr=self.peak_lr)

    def _total_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else 10**9

    def on_train_batch_start(self, batch, batch_idx):
        self.lr_schedule.apply(self.optimizers(), self.global_step, self._total_steps(), self.peak_lr)
        forget_step_values(self.trainer)

    def on_train_end(self) -> None:
        self._report()  # skipped steps after the last logged row still warn (and stop a run at its limit)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)  # the closure runs in it: training_step, backward, the guard's verdict
        # here, not in on_train_batch_end: the step's checkpoint holds it; a skipped step moves nothing, the EMA included
        self._update_ema(self.global_step + 1, self._ok)

    def _update_ema(self, step: int, ok: torch.Tensor | None = None) -> None:
        if self.ema is None:
            return
        decay = min(self.ema_decay, (1 + step) / (10 + step))  # short warm-up so early EMA is not the random init
        weight = 1 - decay if ok is None else torch.where(ok, 1 - decay, 0.0)  # on the device: no host read of `ok`
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.generator.parameters()):
                if isinstance(e, DTensor):  # matching shards: a local lerp (a plain 0-d weight meets no DTensor)
                    e, p = e.to_local(), p.to_local()
                e.lerp_(p.detach(), weight)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scalegen_config"] = self.config
        checkpoint["nonfinite_in_row"], checkpoint["nonfinite_total"] = self.ledger.totals()
        checkpoint["step_guard"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.ledger.load(checkpoint.get("nonfinite_in_row", 0), checkpoint.get("nonfinite_total", 0))
        self.guard.load_state_dict(checkpoint.get("step_guard", {}))
        self.ledger.reported = (checkpoint.get("nonfinite_total", 0), self.guard.outliers_total)

    # -- generation --------------------------------------------------------------------------------------------------
    def sampling_options(self, **overrides) -> GenerateOptions:
        """The run's `sample` defaults with `overrides` on top (None leaves the default), checked for this head."""
        stored = {k: v for k, v in self.sample_cfg.items() if k not in ("per_class", "seed")}
        given = {k: v for k, v in overrides.items() if v is not None}
        return GenerateOptions.of(self.generator.head, {**stored, **given})

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | Sequence[int] | None = None, batch: int | None = None, *,
                 seed: int | None = None, use_ema: bool = True, options: GenerateOptions | None = None,
                 constrain=None, **overrides) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W). labels=None draws `batch` labels uniformly (seeded).

        `options` (from `sampling_options`), or `overrides` of the run's `sample` defaults by key: cfg_scale,
        cfg_schedule, scales, the head's own (top_k, top_p, more_smooth; num_steps, guidance, ...); None leaves the
        default. `constrain` is the image-to-image hook (scalegen.generation.editing).
        """
        if options is None:
            options = self.sampling_options(**overrides)
        elif overrides:
            raise TypeError(f"generate: give `options` or keyword overrides ({sorted(overrides)}), not both")
        seed = self.sample_cfg["seed"] if seed is None else seed
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if labels is None:
            labels = random_labels(batch or 1, self.num_classes, generator, self.device)
        elif isinstance(labels, int):  # one class for the batch; < 0: the null class (FlexVAR's int label_B, fixed)
            labels = [self.num_classes if labels < 0 else labels] * (batch or 1)
        labels = torch.as_tensor(labels, device=self.device).long()
        model = self.ema if (use_ema and self.ema is not None) else self.generator
        was_training = model.training
        model.eval()  # no drop path while sampling, whatever mode the caller is in
        eager = torch.compiler.set_stance("force_eager") if self.compile_blocks else contextlib.nullcontext()
        try:  # compiled blocks run eager here: a KV cache growing per scale would recompile them at every scale
            with eager:
                latent = generate(model.backbone, model.head, self.composition, labels, options, generator=generator,
                                  constrain=constrain)
        finally:
            model.train(was_training)
        return self.composition.decode(latent).add(1).mul(0.5)

    def save_class_grid(self, path: Path | None, per_class: int | None = None) -> Path | None:
        """One row per class, `per_class` samples each, fixed seed: the picture validation logs (path None: generate
        only, as the non-zero ranks of a sharded model do)."""
        n = per_class or self.sample_cfg["per_class"]
        labels = torch.arange(self.num_classes).repeat_interleave(n)
        images = self.generate(labels)
        if path is not None:
            vutils.save_image(images, path, nrow=n, padding=1, pad_value=1.0)
        return path


def scale_values(split: str, per_scale: dict) -> dict[str, torch.Tensor]:
    """The logged names of the head's per-scale values (loss, accuracy, ...) and of their mean over scales."""
    names = next(iter(per_scale.values())).keys()
    out = {}
    for name in names:
        if name != "loss":
            out[f"{split}/{name}"] = torch.stack([v[name] for v in per_scale.values()]).mean()
        for si, v in per_scale.items():
            out[f"{split}_scale/{name}_s{si}"] = v[name]
    return out


def forget_step_values(trainer) -> None:
    """Lightning writes every step-only value it ever got into each later row; mark them stale so that a row holds
    only this step's (a skipped step's loss and LR, a scale missing from FlexVAR's schedule: empty, not repeated)."""
    results = trainer._results  # Lightning's private result collection: no public way to drop a step value
    for metric in (results.values() if results is not None else ()):
        if metric.meta.on_step and not metric.meta.on_epoch:
            metric.has_reset = True
