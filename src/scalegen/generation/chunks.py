"""Sampling at scale: which image is drawn with which seed, by which process.

The images are cut, in index order, into chunks of `batch_size`; chunk k is seeded from (seed, its first index), so
image i is the same whatever the number of processes; process r of n takes chunks r, r+n, ...
"""
from __future__ import annotations

import os
from typing import Sequence

import torch


def chunk_seed(seed: int, start: int) -> int:
    """The seed of the chunk that begins at image `start`."""
    return seed * 1_000_003 + start


def chunks(n: int, batch_size: int, shard: int = 0, num_shards: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of the chunks process `shard` of `num_shards` draws, round robin over the index order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1} (num_shards={num_shards})")
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)][shard::num_shards]


def shard_from_env(shard: int | None = None, num_shards: int | None = None) -> tuple[int, int]:
    """The config's shard/num_shards, else torchrun's RANK/WORLD_SIZE, else SLURM's PROCID/NTASKS, else (0, 1)."""
    if num_shards is None:
        for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if os.environ.get(world):
                shard, num_shards = int(os.environ.get(rank, 0)) if shard is None else shard, int(os.environ[world])
                break
        else:
            num_shards = 1
    shard = 0 if shard is None else shard
    chunks(0, 1, shard, num_shards)  # validates
    return shard, num_shards


def generate_chunk(module, labels: Sequence[int], start: int, seed: int, use_ema: bool = True, **options) -> torch.Tensor:
    """The images (B,3,H,W) in [0,1] of the chunk beginning at image `start`."""
    return module.generate(list(labels), seed=chunk_seed(seed, start), use_ema=use_ema, **options)
