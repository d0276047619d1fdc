"""Scale-out figures on this machine: VAR-d16 training step with/without activation checkpointing and under FSDP2
(2 processes, gloo), latent caching throughput, and data loading from cached latents vs on-the-fly encoding.

    python bench/bench_scaleout.py [--repeats 2] [--only step,fsdp,cache,load]

CPU, fp32, random weights, batch 1 per process for the d16 step (AdamW included); one warm-up, then the median.
"Saved for backward" counts the bytes autograd keeps outside checkpointed regions (activation memory).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import config, timed  # bench/ is on sys.path when run as a script


def d16(with_tokenizer: bool = False):
    from scalegen.build import build_generator, build_tokenizer

    cfg = config("experiment=var_d16", "data.root=/unused")
    torch.manual_seed(0)
    with torch.device("meta"):
        tokenizer = build_tokenizer(cfg)  # only its composition tables are needed for the step
    generator, composition = build_generator(cfg, tokenizer, 1000)
    return generator, composition


def fake_batch(composition, batch: int):
    sizes = composition.scales.sizes
    targets = [torch.randint(0, composition.vocab_size, (batch, h * w)) for h, w in sizes]
    inputs = torch.randn(batch, composition.scales.num_tokens - sizes[0][0] * sizes[0][1], composition.token_dim)
    return torch.randint(0, 1000, (batch,)), targets, inputs


def train_step(generator, composition, batch, optimizer, count_saved: bool = False) -> int:
    labels, targets, inputs = batch
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else _null()
    with ctx:
        hidden, cond = generator.backbone(labels, inputs)
        loss, _ = generator.head.training_loss(hidden, cond, targets, composition.scales)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return saved[0]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def bench_step(repeats: int) -> list[tuple[str, str, str]]:
    from scalegen.scaleout.distributed import checkpoint_blocks

    rows = []
    for ac in (False, True):
        generator, composition = d16()
        if ac:
            checkpoint_blocks(generator.backbone)
        generator.train()
        opt = torch.optim.AdamW(generator.parameters(), lr=1e-4)
        batch = fake_batch(composition, 1)
        saved = train_step(generator, composition, batch, opt, count_saved=True)
        seconds = statistics.median(timed(lambda: train_step(generator, composition, batch, opt), repeats))
        rows.append((f"d16 step, 1 process, batch 1, activation ckpt {'on' if ac else 'off'}", f"{seconds:.2f} s",
                     f"saved for backward {saved / 2**20:.0f} MiB"))
        del generator, opt
    return rows


def _fsdp_rank(rank: int, port: int, repeats: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from scalegen.scaleout.distributed import shard_generator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    generator, composition = d16()
    shard_generator(generator, init_device_mesh("cpu", (2,)))
    generator.train()
    opt = torch.optim.AdamW(generator.parameters(), lr=1e-4)
    torch.manual_seed(rank)
    batch = fake_batch(composition, 1)
    seconds = statistics.median(timed(lambda: train_step(generator, composition, batch, opt), repeats))
    local = sum(p.to_local().numel() for p in generator.parameters())
    if rank == 0:
        queue.put((seconds, local, sum(p.numel() for p in generator.parameters())))
    dist.destroy_process_group()


def bench_fsdp(repeats: int) -> list[tuple[str, str, str]]:
    ctx = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_rank, args=(r, port, repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    seconds, local, total = queue.get()
    for p in procs:
        p.join()
    return [("d16 step, FSDP2 2 processes (gloo, 1 thread each), batch 1 each, fp32", f"{seconds:.2f} s",
             f"{local / 1e6:.0f}M of {total / 1e6:.0f}M parameters per rank")]


def bench_cache_and_load(tmp: Path) -> list[tuple[str, str, str]]:
    from scalegen.build import build_tokenizer
    from scalegen.data import DigitsDataModule
    from scalegen.data.latents import LatentsDataModule
    from scalegen.io import save_safetensors
    from scalegen.scaleout.cache_latents import parse_args, run

    rows = []
    cfg = config()
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg).eval()
    save_safetensors(tokenizer.state_dict(), tmp / "tok.safetensors")
    for processes in (1, 2):
        start = time.perf_counter()
        run(parse_args([str(tmp / f"cache{processes}"), f"tokenizer_ckpt={tmp / 'tok.safetensors'}", "--splits",
                        "train", "--processes", str(processes), "--shard-size", "512", "--batch-size", "128",
                        "--quiet"]))
        seconds = time.perf_counter() - start
        n = json.loads((tmp / f"cache{processes}" / "train" / "index.json").read_text())["num_samples"]
        rows.append((f"caching digits 32 px (msvq_digits, x2 flips), {processes} process(es)",
                     f"{n / seconds:.0f} images/s", "whole command" + (", incl. worker start-up" if processes > 1 else "")))

    def epoch_rate(loader, fn) -> float:
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += fn(batch)
        return count / (time.perf_counter() - start)

    latents = LatentsDataModule(str(tmp / "cache1"), batch_size=64, num_workers=0)
    latents.setup()
    rate_cached = epoch_rate(latents.train_dataloader(), lambda b: len(b["labels"]))
    digits = DigitsDataModule(batch_size=64, hflip=True)
    digits.setup()

    def encode(batch):
        with torch.no_grad():
            tokenizer.encode(batch[0])
        return len(batch[1])

    rate_fly = epoch_rate(digits.train_dataloader(), encode)
    rows.append(("load 32 px digits: cached latents (mmap shards)", f"{rate_cached:.0f} samples/s", ""))
    rows.append(("load 32 px digits: images + on-the-fly msvq_digits encode", f"{rate_fly:.0f} samples/s", ""))

    # 256 px: VAR's tokenizer on the fly vs reading 16x16x32 latents from a cache of the same layout
    var = config("experiment=var_d16", "data.root=/unused")
    vae = build_tokenizer(var).eval()
    images = torch.rand(4, 3, 256, 256) * 2 - 1

    def vae_encode():
        with torch.no_grad():
            vae.encode(images)
    per_batch = statistics.median(timed(vae_encode, 1))
    rows.append(("256 px: msvq_var (VAR's VQVAE) encode on the fly, batch 4", f"{4 / per_batch:.1f} samples/s", ""))
    _fake_cache(tmp / "cache256", 4096, (32, 16, 16))
    big = LatentsDataModule(str(tmp / "cache256"), batch_size=64, num_workers=0)
    big.setup()
    rows.append(("256 px: cached 32x16x16 latents (mmap shards)",
                 f"{epoch_rate(big.train_dataloader(), lambda b: len(b['labels'])):.0f} samples/s", ""))
    return rows


def _fake_cache(root: Path, n: int, shape) -> None:
    """A cache in the on-disk format with random latents (reading speed does not depend on the values)."""
    import numpy as np

    from scalegen.data.latents import FORMAT

    folder = root / "train"
    folder.mkdir(parents=True)
    shards, size = [], 1024
    for k in range(0, n, size):
        count = min(size, n - k)
        np.save(folder / f"latents_{k // size:05d}.npy", np.random.randn(count, 2, *shape).astype(np.float32))
        np.save(folder / f"labels_{k // size:05d}.npy", np.zeros(count, np.int64))
        shards.append({"latents": f"latents_{k // size:05d}.npy", "labels": f"labels_{k // size:05d}.npy",
                       "count": count})
    (folder / "index.json").write_text(json.dumps({"format": FORMAT, "kind": "latent", "num_classes": 1,
                                                   "shards": shards, "tokenizer": {}, "tokenizer_ckpt": None}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="step,fsdp,cache")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.only.split(",")
    rows = []
    if "step" in parts:
        rows += bench_step(args.repeats)
    if "fsdp" in parts:
        rows += bench_fsdp(args.repeats)
    if "cache" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_cache_and_load(Path(tmp))
    print(f"\nscalegen scale-out bench (CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          "no GPU lent to this run)")
    print("| measurement | value | note |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
