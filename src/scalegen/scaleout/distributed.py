"""Scale-out: FSDP2 sharding per transformer block, activation checkpointing, torch.compile per block, atomic
sharded checkpoints, FSDP1.

FSDP2 runs through Lightning's `ModelParallelStrategy` (here `FSDP2Strategy`, which adds bf16 all-gathers and an
atomic sharded save); the module's `configure_model` hook calls `configure_generator`, which wraps the blocks for
activation checkpointing and `fully_shard`s every block, then the backbone and the head of the generator and of its
EMA. The backbone and head are called through methods (`start`, `step`, `training_loss`, `sample`, ...), not only
`forward`, so those methods are registered as FSDP forward methods: each all-gathers its parameters when called.
The EMA is sharded exactly like the generator, so its update is a local lerp between matching shards.
With `compile`, each block (after its checkpoint wrapper, before sharding, as torchtitan orders them) and the head
are compiled in place (`nn.Module.compile`: the state-dict keys stay the same), so FSDP2's hooks stay outside the
compiled graphs; the EMA, used only for sampling, stays eager.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from scalegen.scaleout.dcp_metadata import check_sharded_folder

# the methods through which the module and `sampling.generate` call a backbone and a head (see TEAM seams)
FORWARD_METHODS = {"backbone": ("start", "embed_scale", "step"), "head": ("training_loss", "sample")}
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: allowed values are {sorted(DTYPES)} or null")
    return DTYPES[name]


# -- activation checkpointing ---------------------------------------------------------------------------------------
def blocks_of(backbone: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks of a backbone (its `blocks` ModuleList), or None when it has none."""
    blocks = getattr(backbone, "blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def checkpoint_blocks(backbone: nn.Module) -> int:
    """Recompute each block's activations in backward instead of storing them; returns how many were wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    blocks = blocks_of(backbone)
    if blocks is None:
        raise ValueError(f"activation_checkpointing: {type(backbone).__name__} has no `blocks` ModuleList to wrap")
    for i, block in enumerate(blocks):
        if not isinstance(block, CheckpointWrapper):  # idempotent: configure_model may run once per fit
            blocks[i] = checkpoint_wrapper(block)  # non-reentrant; the state dict keys stay the same
    return len(blocks)


# -- torch.compile ---------------------------------------------------------------------------------------------------
def compile_generator(generator: nn.Module, **options) -> int:
    """Compile each backbone block and the head in place (`options`: torch.compile's, e.g. backend); returns how many
    modules were compiled. A head whose work is not its `forward` (the flow head calls its network) has its children
    compiled instead."""
    targets = list(blocks_of(generator.backbone) or ())
    head = generator.head
    targets += [head] if type(head).forward is not nn.Module.forward else list(head.children())
    for module in targets:
        module.compile(**options)
    return len(targets)


@functools.cache
def compiler_problem(device: str) -> str | None:
    """Why torch.compile cannot run on `device` ("cpu" needs a C++ compiler, "cuda" Triton), found by compiling a
    tiny function with its backward once; None when it works."""
    try:
        x = torch.linspace(-2, 2, 8, device=device, requires_grad=True)  # no draw: the run's seeded RNG stays as it was
        y = torch.compile(lambda t: torch.sin(t) * 2 + 1)(x)
        y.sum().backward()
        if not torch.allclose(y, torch.sin(x) * 2 + 1) or not torch.allclose(x.grad, 2 * torch.cos(x)):
            return "the compiled function gave a wrong result"
    except Exception as e:  # a missing compiler, Triton or a broken install: Inductor's own message
        lines = [line for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
    return None


# -- FSDP2 ----------------------------------------------------------------------------------------------------------
def shard_generator(generator: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> None:
    """fully_shard every block, then the backbone and the head, and register their forward methods."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in blocks_of(generator.backbone) or ():
        fully_shard(block, **kw)
    for name in ("backbone", "head"):
        part = getattr(generator, name)
        fully_shard(part, **kw)
        for method in FORWARD_METHODS[name]:
            if hasattr(part, method):
                register_fsdp_forward_method(part, method)


def is_sharded(module: nn.Module) -> bool:
    """True when parameters are DTensor shards (FSDP2) or flat-parameter shards (FSDP1): generation needs every rank."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        return True
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


@contextlib.contextmanager
def generation_context(module: nn.Module) -> Iterator[None]:
    """Around `generate` under sharding (every rank must enter): FSDP1 gathers the full parameters (FSDP2's
    registered forward methods gather per call); with low-precision sharded compute, autocast as in training,
    because fp32 buffers and inputs would otherwise meet bf16 weights outside the training step's autocast."""
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    with contextlib.ExitStack() as stack:
        dtype = None
        if isinstance(strategy, FSDPStrategy):
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            stack.enter_context(FSDP.summon_full_params(strategy.model, writeback=False, recurse=True))
            precision = str(trainer.precision)
            dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else None
        elif isinstance(strategy, FSDP2Strategy) and strategy.param_dtype not in (None, torch.float32):
            dtype = strategy.param_dtype
        if dtype is not None:
            stack.enter_context(torch.autocast(module.device.type, dtype=dtype))
        yield


def configure_generator(module) -> None:
    """The `configure_model` hook of GeneratorModule: activation checkpointing, compilation, then FSDP2 sharding when the
    strategy gives a device mesh (ModelParallelStrategy). Runs once, whatever the number of `fit` calls."""
    if getattr(module, "_scale_out_configured", False):
        return
    module._scale_out_configured = True
    if getattr(module, "activation_checkpointing", False):
        checkpoint_blocks(module.generator.backbone)
    if getattr(module, "compile_blocks", False):  # after the checkpoint wrappers, before sharding
        compile_generator(module.generator)
    mesh = module.device_mesh
    if mesh is None:
        return
    if mesh.size(mesh.mesh_dim_names.index("tensor_parallel")) > 1:
        raise ValueError("trainer.strategy.tensor_parallel_size > 1: scalegen shards with FSDP2 only; set it to 1")
    strategy = module.trainer.strategy
    policy = strategy.mp_policy() if isinstance(strategy, FSDP2Strategy) else None
    reshard = getattr(strategy, "reshard_after_forward", True)
    for generator in (module.generator, module.ema):
        if generator is not None:  # the EMA is sharded like the generator: its update is a lerp of matching shards
            shard_generator(generator, mesh["data_parallel"], policy, reshard)


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy (FSDP2, data parallel only) with bf16 all-gathers and an atomic sharded save.

    param_dtype: the dtype parameters are all-gathered and computed in (bf16 halves the traffic; the sharded
    master weights and the optimizer stay fp32); reduce_dtype: the gradients' reduce-scatter dtype.
    """

    def __init__(self, data_parallel_size: int | str = "auto", save_distributed_checkpoint: bool = True,
                 param_dtype: str | None = "bfloat16", reduce_dtype: str | None = "float32",
                 reshard_after_forward: bool = True, process_group_backend: str | None = None,
                 timeout_min: float = 30.0):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timedelta(minutes=timeout_min))
        self.param_dtype, self.reduce_dtype = _dtype(param_dtype), _dtype(reduce_dtype)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # data parallel only: every process is one data-parallel rank
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        check_sharded_folder(checkpoint_path)  # torch unpickles a sharded folder's `.metadata` with plain pickle
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)  # left by a kill during an earlier save
        self.barrier("scalegen_save_begin")
        super().save_checkpoint(checkpoint, partial, storage_options)  # every rank writes its shard, rank 0 meta.pt
        self.barrier("scalegen_save_written")
        if self.is_global_zero:
            swap_in(partial, path)
        self.barrier("scalegen_save_end")


def _previous(path: Path) -> Path:
    return path.with_name(f".{path.name}.previous")


def swap_in(new: Path, path: Path) -> None:
    """Replace `path` (file or folder) by the finished `new` with renames: a kill at any moment leaves either the
    previous checkpoint or the new one (in the instant between the two renames: `.previous`, see `recover`)."""
    old = _previous(path)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def recover(path: str | os.PathLike) -> Path:
    """The checkpoint at `path`, put back from `.previous` if a kill fell between the two renames of `swap_in`."""
    path = Path(path)
    old = _previous(path)
    if not path.exists() and old.exists():
        os.replace(old, path)
    return path


class FSDP1Strategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1, GPU only) wrapping each transformer block; `use_orig_params` because the
    frozen tokenizer shares the root unit with trainable parameters. The EMA is not supported here (its root
    parameters would be sharded differently from the generator's): use the FSDP2 preset or `model.ema_decay=null`."""

    def __init__(self, block_classes: Sequence[str] = ("scalegen.generators.AdaLNBlock",), **kwargs):
        from hydra.utils import get_class

        classes = {get_class(name) for name in block_classes}
        kwargs.setdefault("use_orig_params", True)
        super().__init__(auto_wrap_policy=classes, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        check_sharded_folder(checkpoint_path)  # torch unpickles a sharded folder's `.metadata` with plain pickle
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def setup(self, trainer) -> None:
        if getattr(trainer.lightning_module, "ema", None) is not None:
            raise ValueError("trainer=fsdp1 keeps no EMA: set model.ema_decay=null, or use trainer=fsdp (FSDP2), "
                             "whose EMA is sharded like the generator")
        super().setup(trainer)
