"""Exact resumption: the data order, the sampler position and the RNG states travel in the checkpoint.

After a kill, the same command continues from the last checkpoint and trains on the same batches with the same
random draws as an uninterrupted run:

- `ResumableSampler` gives each epoch a fixed order (from seed and epoch) and can start mid-epoch;
- every index it yields carries a per-(seed, epoch, index) seed, so augmentations (`seeded_rng`) never draw from,
  nor depend on, the global RNG, and prefetching or worker count cannot change them;
- `ResumableData` (a DataModule mixin) puts the epoch and the number of batches trained into the checkpoint;
- `RNGState` (a callback) puts every rank's torch/CUDA/numpy/python RNG state into the checkpoint.
"""
from __future__ import annotations

import contextlib
import random
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DistributedSampler


class SeededIndex(int):
    """A dataset index that also carries the seed of that sample's random augmentation."""

    def __new__(cls, index: int, seed: int):
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self):  # to DataLoader workers
        return SeededIndex, (int(self), self.seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 0x5CA1E) % (2**63 - 1)


@contextlib.contextmanager
def seeded_rng(index) -> Iterator[None]:
    """Random draws inside come from the sample's own seed when the index carries one (and leave the global RNG
    as it was); otherwise from the global RNG, as before."""
    seed = getattr(index, "seed", None)
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """This rank's part of a per-epoch order fixed by (seed, epoch), starting at `start` after a resume.

    A DistributedSampler subclass, so Lightning neither replaces it nor wraps it, and calls `set_epoch`.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 epoch: int = 0, start: int = 0):
        rank, world = _rank_world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.epoch, self.start = epoch, start

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning; the resumed one where it stopped
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[SeededIndex]:
        order = list(super().__iter__())
        start, self.start = self.start, 0  # the next pass over this epoch (if any) is a full one
        for i in order[start:]:
            yield SeededIndex(i, sample_seed(self.seed, self.epoch, i))


class ResumableData:
    """DataModule mixin: `train_sampler()` for the train loader; the checkpoint records where it stopped."""

    _resume_at: tuple[int, int] | None = None

    def train_sampler(self, dataset, seed: int, batch_size: int) -> ResumableSampler:
        """The shuffled train sampler, at the position the loaded checkpoint recorded (if any)."""
        epoch, batches = self._resume_at or (0, 0)
        self._resume_at = None
        return ResumableSampler(dataset, shuffle=True, seed=seed, epoch=epoch, start=batches * batch_size)

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # batches trained in this epoch (the current one included when saved from on_train_batch_end); the loader
        # itself is ahead by its prefetch, so its own count would skip batches on resume
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        state = {"epoch": int(trainer.current_epoch), "batches": int(done)}
        if hasattr(self, "skipped"):  # unreadable images dropped so far, all ranks (rank 0 carries the total on)
            total = torch.tensor(float(self.skipped), device=trainer.strategy.root_device)
            state["skipped"] = int(trainer.strategy.reduce(total, reduce_op="sum").item())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._resume_at = (int(state["epoch"]), int(state["batches"]))
            if "skipped" in state and hasattr(self, "skipped"):
                self.skipped = state["skipped"] if _rank_world()[0] == 0 else 0
            # Lightning looks for state on the loader itself and would warn that this one is not resumable
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as types a `weights_only` load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    """Every rank's RNG states in the checkpoint, restored on resume before any batch is drawn."""

    def state_dict(self) -> dict[str, Any]:
        rank, world = _rank_world()
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())  # all ranks dump the checkpoint, rank 0 writes it
        else:
            states[0] = rng_state()
        return {"ranks": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("ranks") or []
        rank, world = _rank_world()
        if len(states) == world:  # a different world size cannot continue the same random stream
            set_rng_state(states[rank])
