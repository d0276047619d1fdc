"""Evaluation during training (`EvalCallback`) and the run statistics the comparison report reads (`TrainingStats`).

Every `every_n_steps` optimizer steps (and at the end), `EvalCallback` draws `per_class` images of every class with
the EMA weights and fixed seeds, chunk by chunk exactly as `sample.py` does (so the images do not depend on the number
of processes): each rank draws its share of the chunks and turns them into features at once, rank 0 gathers the
features and logs `eval/<metric>`. Everything that can be wrong (weights file, reference, sizes, counts) fails in
`setup`, before the first training step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from scalegen.eval import classifier as digits
from scalegen.eval.metrics import Evaluator, reference_from_images, reference_from_path, to_uint8
from scalegen.generation.chunks import chunks, generate_chunk
from scalegen.io import resolve_path
from scalegen.scaleout.distributed import generation_context


class EvalCallback(L.Callback):
    def __init__(self, every_n_steps: int = 500, per_class: int = 16,
                 metrics: Sequence[str] = ("fid", "kid", "prc", "class_acc"), feature_extractor: str = "digits",
                 reference: str = "data", reference_split: str = "train", real_split: str | None = "val",
                 inception_weights: str | None = None, classifier: str | None = None, cache_dir: str | None = None,
                 kid_subset_size: int = 100, kid_subsets: int = 100, prc_neighborhood: int = 3, isc_splits: int = 10,
                 batch_size: int = 64, seed: int = 0, use_ema: bool = True, at_end: bool = True,
                 sample: dict | None = None, bootstrap: int = 0):
        """reference: `data` (the datamodule's `real_images(reference_split)`), an image folder or an `.npz`
        (ADM reference batch). real_split: with `reference=data`, the split scored as if it were generated, once:
        the values a perfect generator would reach. sample: generation options (cfg, top_k, ...) over the run's.
        bootstrap: resamples of the generated set for the metrics' intervals (eval/fid_low, ...; the replicates of
        the last evaluation in eval_bootstrap.json, which the report's comparisons read); 0 = off."""
        if feature_extractor not in ("digits", "inception"):
            raise ValueError(f"callbacks.eval.feature_extractor: {feature_extractor!r} is not one of ['digits', 'inception']")
        self.every_n_steps, self.per_class, self.metrics = every_n_steps, per_class, list(metrics)
        self.feature_extractor, self.reference, self.reference_split = feature_extractor, reference, reference_split
        self.real_split, self.inception_weights, self.classifier = real_split, inception_weights, classifier
        self.cache_dir, self.batch_size, self.seed, self.use_ema = cache_dir, batch_size, seed, use_ema
        self.at_end, self.sample = at_end, {k: v for k, v in (sample or {}).items() if v is not None}
        self.opts = dict(kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, prc_neighborhood=prc_neighborhood,
                         isc_splits=isc_splits, bootstrap=bootstrap)
        self.evaluator: Evaluator | None = None
        self.last_step = -1
        self.seconds = 0.0  # time spent evaluating; TrainingStats leaves it out of the training throughput

    # -- before training: every check ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.evaluator is not None or not hasattr(pl_module, "generate"):
            return  # generators only: the tokenizer stage of a run shares the run's callbacks
        weights = self.inception_weights
        if self.feature_extractor == "digits":
            if trainer.is_global_zero:  # trained once, on one rank; the others wait for the file
                path, info = digits.ensure_classifier(self.classifier)
                print(f"[scalegen] eval: digits classifier {path} (test accuracy {info.get('test_accuracy', 0):.4f})")
            trainer.strategy.barrier("scalegen_eval_classifier")
            weights = self.classifier or digits.default_path()
        data = trainer.datamodule
        if self.reference == "data":
            if not hasattr(data, "real_images"):
                raise ValueError(f"callbacks.eval.reference=data needs a datamodule with real_images() "
                                 f"({type(data).__name__} has none): give an image folder or an .npz of statistics")
            images, _ = data.real_images(self.reference_split)
            ref = reference_from_images(to_uint8(images.add(1).mul(0.5)), f"{type(data).__name__}-{self.reference_split}",
                                        f"real {self.reference_split} split ({len(images)} images)")
        else:
            ref = reference_from_path(resolve_path(self.reference))
        self.evaluator = Evaluator(ref, self.metrics, self.feature_extractor, weights=weights, cache_dir=self.cache_dir,
                                   device=trainer.strategy.root_device, batch_size=self.batch_size, seed=self.seed,
                                   **self.opts)
        num_classes = pl_module.num_classes
        self.evaluator.check(num_classes * self.per_class, getattr(data, "image_size", None))
        if trainer.is_global_zero:
            # computed and cached now: a bad reference file fails before training
            if any(m in self.metrics for m in ("kid", "prc")):
                self.evaluator.reference_features()
            if "fid" in self.metrics:
                self.evaluator.reference_fid_stats()
            if self.reference == "data" and self.real_split:
                self._score_real(trainer, data, num_classes)

    def _score_real(self, trainer, data, num_classes: int) -> None:
        """The real `real_split` images, `per_class` of each class where there are so many, scored like samples."""
        images, labels = data.real_images(self.real_split)
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:self.per_class] for c in range(num_classes)])
        images, labels = to_uint8(images[keep].add(1).mul(0.5)), labels[keep]
        try:
            self.evaluator.check(len(labels))
        except ValueError as e:  # a small split: the run goes on without its reference point
            print(f"[scalegen] eval: no reference point from the real {self.real_split} split: {e}")
            return
        metrics = self.evaluator.score(self.evaluator.features(images), labels)
        record = {"split": self.real_split, "images": len(labels), "reference": self.evaluator.reference.description,
                  "feature_extractor": self.feature_extractor, "metrics": metrics}
        if self.feature_extractor == "digits":
            record["classifier_test_accuracy"] = digits.load_classifier(self.evaluator.weights)[1].get("test_accuracy")
        Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        (Path(trainer.default_root_dir) / "eval_reference.json").write_text(json.dumps(record, indent=1))
        self._log(trainer, {f"eval_real/{k}": v for k, v in metrics.items()}, step=0)
        print(f"[scalegen] eval: real {self.real_split} images (the values a perfect generator reaches): {_fmt(metrics)}")

    # -- during training ----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.evaluator is None:
            return
        step = trainer.global_step  # the EMA is updated in optimizer_step, so it already holds this step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.evaluator is not None and self.at_end and trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float] | None:
        start = time.perf_counter()
        share = self.draw_share(pl_module, trainer.global_rank, trainer.world_size)
        shares = [share]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, share)  # features only: a few KB per image
        metrics = None
        if trainer.is_global_zero:
            metrics = self.score_shares(shares, pl_module.num_classes)
            self._log(trainer, {f"eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            if self.evaluator.replicates:
                record = {"step": trainer.global_step, "seed": self.seed,
                          "replicates": {k: v.tolist() for k, v in self.evaluator.replicates.items()}}
                (Path(trainer.default_root_dir) / "eval_bootstrap.json").write_text(json.dumps(record))
            print(f"[scalegen] eval at step {trainer.global_step} ({pl_module.num_classes * self.per_class} images): "
                  f"{_fmt(metrics)}")
        self.last_step = trainer.global_step
        self.seconds += time.perf_counter() - start
        return metrics

    def labels(self, num_classes: int) -> torch.Tensor:
        return torch.arange(num_classes).repeat_interleave(self.per_class)

    def draw_share(self, pl_module, rank: int, world: int) -> tuple[dict, torch.Tensor, float]:
        """Rank `rank`'s chunks (as sample.py cuts them) -> (their features, their image indices, generation seconds)."""
        labels = self.labels(pl_module.num_classes)
        mine = chunks(len(labels), self.batch_size, rank, world)
        rounds = len(chunks(len(labels), self.batch_size, 0, world))  # rank 0 has the most chunks
        feats, index, seconds = [], [], 0.0
        with generation_context(pl_module):
            for j in range(rounds):
                # a rank with fewer chunks draws its last one again, unused: sharded weights need every rank in step
                a, b = mine[min(j, len(mine) - 1)] if mine else (0, min(self.batch_size, len(labels)))
                t = time.perf_counter()
                images = generate_chunk(pl_module, labels[a:b].tolist(), a, self.seed, self.use_ema, **self.sample)
                seconds += time.perf_counter() - t
                if j < len(mine):
                    feats.append(self.evaluator.features(to_uint8(images)))
                    index.append(torch.arange(a, b))
        feats = {k: torch.cat([f[k] for f in feats]) for k in feats[0]} if feats else {}
        return feats, torch.cat(index) if index else torch.zeros(0, dtype=torch.long), seconds

    def score_shares(self, shares: list, num_classes: int) -> dict[str, float]:
        """Every rank's share, back in index order -> the metrics, and images/s of the slowest rank's drawing."""
        order = torch.cat([s[1] for s in shares]).argsort()
        feats = {k: torch.cat([s[0][k] for s in shares if s[0]])[order] for k in next(s[0] for s in shares if s[0])}
        metrics = self.evaluator.score(feats, self.labels(num_classes))
        metrics["images_per_s"] = len(order) / max(max(s[2] for s in shares), 1e-9)
        return metrics

    @staticmethod
    def _log(trainer, metrics: dict, step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = state_dict.get("last_step", -1)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class TrainingStats(L.Callback):
    """Training wall time, throughput (images/s of training, evaluation and validation left out), parameters and
    compute: written to `<run>/run_stats.json` at the end of fit, `perf/train_flops` and `perf/images_seen` logged
    every `log_every_n_steps` steps, with the count of unreadable images skipped (`data/skipped_images`). Totals
    carry over a resume (they are in the checkpoint; the skipped count in the data module's state).

    Time is taken with perf_counter over logging intervals, the device synchronised only at their ends (and around
    validation), so no training step waits for the host. The run's compute record (FLOPs per step and per sampled
    image, parameter counts, budget) is given by `set_compute` before training (scalegen.commands.train)."""

    def __init__(self, filename: str = "run_stats.json"):
        self.filename = filename
        self.wall_s = self.step_s = 0.0
        self.images = 0
        self.flops_per_image = 0  # training FLOPs of one image (forward + backward; linear in the batch)
        self.compute: dict = {}
        self._fit_start = self._mark = self._val_start = self._trainer = None
        self._val_s, self._last_boundary = 0.0, -1

    def set_compute(self, flops_per_image: int, record: dict) -> None:
        """The run's compute: training FLOPs per image, and what run_stats.json records of it (params_generator,
        params_tokenizer, train_flops_per_step, sample_flops_per_image, budget)."""
        self.flops_per_image, self.compute = flops_per_image, dict(record)

    @staticmethod
    def _eval_seconds(trainer) -> float:
        return sum(cb.seconds for cb in trainer.callbacks if isinstance(cb, EvalCallback))

    @staticmethod
    def _sync(trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def _open(self, trainer) -> None:
        self._sync(trainer)
        self._mark = (time.perf_counter(), self._eval_seconds(trainer), self._val_s)

    def _elapsed(self, trainer) -> float:
        """Training seconds since the last boundary: its wall time less the evaluation and validation inside it."""
        if self._mark is None:
            return 0.0
        start, eval_s, val_s = self._mark
        return time.perf_counter() - start - (self._eval_seconds(trainer) - eval_s) - (self._val_s - val_s)

    def _close(self, trainer) -> None:
        self._sync(trainer)
        self.step_s += self._elapsed(trainer)
        self._mark = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start, self._trainer = time.perf_counter(), trainer  # the trainer: for state_dict's open interval

    def on_train_start(self, trainer, pl_module) -> None:
        self._open(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._sync(trainer)
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_start is not None:
            self._sync(trainer)
            self._val_s += time.perf_counter() - self._val_start
            self._val_start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightning.pytorch.utilities.data import extract_batch_size
        self.images += extract_batch_size(batch) * trainer.world_size
        step = trainer.global_step
        if step % max(trainer.log_every_n_steps, 1) or step == self._last_boundary:
            return
        self._last_boundary = step  # the same step on every rank (the skipped count is a reduce)
        self._close(trainer)
        self._open(trainer)
        pl_module.log("perf/images_seen", float(self.images), on_step=True, on_epoch=False)
        if self.flops_per_image:
            pl_module.log("perf/train_flops", float(self.train_flops), on_step=True, on_epoch=False)
        skipped = self._skipped(trainer)
        if skipped is not None:
            pl_module.log("data/skipped_images", float(skipped), on_step=True, on_epoch=False)

    @property
    def train_flops(self) -> int:
        """Training FLOPs so far, all devices (each image seen costs the same: FLOPs are linear in the batch)."""
        return self.images * self.flops_per_image

    @staticmethod
    def _skipped(trainer) -> int | None:
        """Unreadable images dropped by the data module so far, summed over ranks (None: it does not count)."""
        local = getattr(trainer.datamodule, "skipped", None)
        if local is None:
            return None
        total = torch.tensor(float(local), device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(total, reduce_op="sum").item())

    def _totals(self, trainer=None) -> dict:
        """The totals so far; the open interval without a device sync (a checkpoint save syncs anyway)."""
        wall = self.wall_s + (time.perf_counter() - self._fit_start if self._fit_start else 0.0)
        step_s = self.step_s + (self._elapsed(trainer) if trainer is not None else 0.0)
        return {"train_wall_s": wall, "train_step_s": step_s, "train_images": self.images}

    def on_fit_end(self, trainer, pl_module) -> None:
        """After every callback's on_train_end: the final evaluation is in eval_s and the wall time."""
        self._close(trainer)
        totals = self._totals()
        stats = {"params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
                 "params_frozen": sum(p.numel() for n, p in pl_module.named_parameters()
                                      if not p.requires_grad and not n.startswith("ema.")),
                 "steps": trainer.global_step, **totals,
                 "train_images_per_s": totals["train_images"] / max(totals["train_step_s"], 1e-9),
                 "eval_s": self._eval_seconds(trainer), "validation_s": self._val_s, "world_size": trainer.world_size,
                 "skipped_images": self._skipped(trainer),
                 "device": str(trainer.strategy.root_device), "precision": str(trainer.precision),
                 "images_seen": self.images}
        if self.compute:
            stats.update(self.compute, train_flops=self.train_flops)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"perf/train_images_per_s": stats["train_images_per_s"],
                                    "perf/train_wall_s": stats["train_wall_s"]}, step=trainer.global_step)
            (Path(trainer.default_root_dir) / self.filename).write_text(json.dumps(stats, indent=1))

    def state_dict(self) -> dict:
        totals = self._totals(self._trainer)
        return {"wall_s": totals["train_wall_s"], "step_s": totals["train_step_s"], "images": self.images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.wall_s, self.step_s, self.images = state_dict["wall_s"], state_dict["step_s"], state_dict["images"]
