"""Encode a dataset once with a tokenizer into sharded, memory-mappable latents (format: scalegen.data.latents).

    python -m scalegen.scaleout.cache_latents OUT [config overrides] [--processes N] [--shard-size S] [--batch-size B]
    python -m scalegen.scaleout.cache_latents /cache/in256-kl16 data=imagefolder data.root=/imagenet tokenizer=kl16 \\
        tokenizer_ckpt=kl16.ckpt --processes 8

The overrides compose `configs/train.yaml` as `train.py` does (data, tokenizer, tokenizer_ckpt). Each image is
encoded with its horizontal flip, un-augmented otherwise (ADM centre crop); a tokenizer with a `posterior` (the KL
VAE) is cached as its moments. Shards are written atomically, so a killed or failed run resumes: the same command
skips the finished shards. `--processes` workers split the shards; `--part i/n` lets n separate jobs (e.g. a SLURM
array) share one cache, the last one to finish writes the index.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from scalegen.build import build_tokenizer
from scalegen.data.imagefolder import ImageFiles, collate_skipping
from scalegen.data.latents import FORMAT
from scalegen.io import resolve_path

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


class _TensorPairs(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def source_dataset(data, split: str) -> Dataset:
    """The un-augmented (image, label) pairs of a split of an image DataModule."""
    data.setup("fit")
    if hasattr(data, "real_images"):  # in-memory sets (digits)
        return _TensorPairs(*data.real_images(split))
    if hasattr(data, "train_samples"):  # image folders: centre crop, no flip (the flip is cached separately)
        return ImageFiles(data.train_samples if split == "train" else data.val_samples, data.transform(train=False))
    raise ValueError(f"data: {type(data).__name__} has no un-augmented image source to cache (real_images or "
                     "train_samples)")


@torch.no_grad()
def encode(tokenizer, images: torch.Tensor) -> tuple[str, torch.Tensor]:
    """('moments', mean|logvar) for a tokenizer with a posterior, else ('latent', tokenizer.encode(images))."""
    if tokenizer.stochastic:
        return "moments", tokenizer.posterior(images).moments
    return "latent", tokenizer.encode(images)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def shard_names(k: int) -> tuple[str, str]:
    return f"latents_{k:05d}.npy", f"labels_{k:05d}.npy"


def encode_shards(job: dict[str, Any], shard_ids: list[int], report: Callable[[int], None]) -> None:
    """One worker: encode the given shards of one split (skipping finished ones)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.set_num_threads(job["threads"])
    cfg = OmegaConf.create(job["cfg"])
    tokenizer = build_tokenizer(cfg, job["tokenizer_ckpt"]).to(job["device"]).eval()
    dataset = source_dataset(instantiate(cfg.data), job["split"])
    out, size, dtype = Path(job["out"]), job["shard_size"], np.dtype(job["dtype"])
    for k in shard_ids:
        latents_name, labels_name = shard_names(k)
        if (out / labels_name).is_file():  # labels are written last: the shard is complete
            report(min(size, len(dataset) - k * size))
            continue
        part = Subset(dataset, range(k * size, min((k + 1) * size, len(dataset))))
        loader = DataLoader(part, batch_size=job["batch_size"], num_workers=job["loader_workers"],
                            collate_fn=collate_skipping)
        chunks, labels = [], []
        for images, y, bad in loader:  # unreadable files are dropped from the shard (its labels say which remain)
            if len(y):
                images = images.to(job["device"]).float()
                _, z = encode(tokenizer, torch.cat([images, images.flip(-1)]))
                chunks.append(torch.stack(z.chunk(2), dim=1).cpu().numpy().astype(dtype))
                labels.append(y.numpy())
            report(len(y) + len(bad))
        _save_atomic(out / latents_name, np.concatenate(chunks) if chunks else np.zeros((0,), dtype))
        _save_atomic(out / labels_name, np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))


def _worker(rank, job, shard_ids, queue) -> None:
    if job["device"] == "cuda":  # one GPU per worker, round robin
        job = {**job, "device": f"cuda:{rank % torch.cuda.device_count()}"}
    encode_shards(job, shard_ids, queue.put)
    queue.put(None)


def plan_split(cfg, split: str, out: Path, args, num_images: int, num_classes: int) -> dict[str, Any]:
    """The split's plan (plan.json): written once; a later run with other settings is refused."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    kind = "moments" if get_class(cfg.tokenizer._target_).stochastic else "latent"
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in ("batch_size", "num_workers")}  # loader settings do not change what is cached
    plan = {"format": FORMAT, "kind": kind, "copies": ["image", "hflip"], "split": split, "num_images": num_images,
            "num_classes": num_classes, "shard_size": args.shard_size, "dtype": args.dtype,
            "num_shards": -(-num_images // args.shard_size),
            "data": data,
            "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True), "tokenizer_ckpt": cfg.tokenizer_ckpt}
    path = out / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in plan if old.get(k) != json.loads(json.dumps(plan[k])))
        if diff:
            raise SystemExit(f"{out} holds a cache made with other settings ({diff}): choose another folder or "
                             "delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan, indent=1))
    return plan


def finish_split(out: Path, plan: dict[str, Any]) -> bool:
    """Write index.json once every shard is complete; False if some are still missing."""
    shards = []
    for k in range(plan["num_shards"]):
        latents_name, labels_name = shard_names(k)
        if not (out / labels_name).is_file():
            return False
        count = int(np.load(out / labels_name, mmap_mode="r").shape[0])
        shards.append({"latents": latents_name, "labels": labels_name, "count": count})
    first = np.load(out / shards[0]["latents"], mmap_mode="r") if shards else None
    index = {**plan, "shards": shards, "num_samples": sum(s["count"] for s in shards),
             "shape": list(first.shape[2:]) if first is not None and first.ndim > 2 else None}
    tmp = out / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    return True


def encode_in_processes(job: dict, shards: list[int], processes: int, report) -> None:
    """Encode `shards` here (one process) or in `processes` spawned workers, reporting each finished batch."""
    if processes <= 1:
        encode_shards(job, shards, report)
        return
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(r, job, shards[r::processes], queue)) for r in range(processes)]
    for w in workers:
        w.start()
    running = len(workers)
    while running:  # each worker sends its progress, then None when it is done
        item = queue.get()
        if item is None:
            running -= 1
        else:
            report(item)
    for w in workers:
        w.join()
        if w.exitcode:
            raise SystemExit(f"a caching worker failed (exit code {w.exitcode}); rerun the same command "
                             "to finish the missing shards")


def run(args) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    if not cfg.tokenizer_ckpt:
        raise SystemExit("tokenizer_ckpt=<weights> is required: the cache is only as good as the tokenizer it encodes")
    cfg.tokenizer_ckpt = resolve_path(cfg.tokenizer_ckpt)
    root = Path(args.out).expanduser().resolve()
    index, count = (int(p) for p in args.part.split("/"))
    data = instantiate(cfg.data)
    for split in args.splits:
        out = root / split
        dataset = source_dataset(data, split)
        if len(dataset) == 0:
            continue
        plan = plan_split(cfg, split, out, args, len(dataset), data.num_classes)
        mine = [k for k in range(plan["num_shards"]) if k % count == index]
        needed = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "tokenizer")}
        job = {"cfg": needed, "tokenizer_ckpt": cfg.tokenizer_ckpt, "split": split,
               "out": str(out), "shard_size": args.shard_size, "dtype": args.dtype, "batch_size": args.batch_size,
               "device": args.device, "loader_workers": args.loader_workers,
               "threads": max(1, (os.cpu_count() or 1) // args.processes)}
        todo = sum(min(args.shard_size, len(dataset) - k * args.shard_size) for k in mine)
        columns = (TextColumn("[bold]caching {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} images/s"), TimeRemainingColumn())
        start = time.perf_counter()
        with Progress(*columns, disable=args.quiet) as progress:
            task = progress.add_task(split, total=todo, rate="-")

            def report(n: int) -> None:
                progress.advance(task, n)
                done = progress.tasks[0].completed
                progress.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")

            encode_in_processes(job, mine, args.processes, report)
        seconds = time.perf_counter() - start
        if finish_split(out, plan):
            print(f"[scalegen] {split}: {plan['num_images']} images (x2 with flips) -> {out}  "
                  f"({todo / max(seconds, 1e-9):.1f} images/s)")
        else:
            print(f"[scalegen] {split}: this part is done; index.json is written when the other parts finish")
    return root


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scalegen.scaleout.cache_latents", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="cache folder (train/ and val/ are made inside)")
    p.add_argument("overrides", nargs="*", help="config overrides, as for train.py (data=..., tokenizer=..., "
                                                 "tokenizer_ckpt=...)")
    p.add_argument("--processes", type=int, default=1, help="worker processes (each takes every N-th shard)")
    p.add_argument("--part", default="0/1", help="i/n: this job encodes shards k with k %% n == i")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loader-workers", type=int, default=0, help="image decoding processes per worker")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
