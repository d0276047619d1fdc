"""Checkpoint I/O in one place: atomic saves, weights_only loads, safetensors with metadata, strict loads that list
every key that does not fit."""
from __future__ import annotations

import errno
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from hydra.utils import to_absolute_path
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) then rename over `path`: a kill mid-save leaves the previous file intact.

    The temporary file is `.<name>.pid<PID>.<random>.tmp`, so a later start can tell a dead writer's leftover
    (scalegen.training.runfolder.remove_stale_tmp). A full disk is reported as such, naming the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:
            if _disk_full(e, path.parent):  # torch.save says only "basic_ios::clear: iostream error"
                raise OSError(errno.ENOSPC, f"no space left on {path.parent} while writing {path.name} "
                                            f"({e}); the previous {path.name}, if any, is kept") from e
            raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _disk_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:  # measured before the partial file is removed: a failed write that left the disk (nearly) full
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def save_safetensors(state: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_lightning_checkpoint(path) -> dict[str, Any]:
    """A scalegen Lightning checkpoint: the state dict and the run config it was trained with."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "scalegen_config" not in ckpt:
        raise ValueError(f"{path}: not a scalegen training checkpoint (no 'scalegen_config'); for official weights use "
                         "the converter (python -m scalegen.official.convert)")
    return ckpt



class CheckpointMismatch(RuntimeError):
    pass


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """load_state_dict(strict=True) with one error listing every missing, unexpected and mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{what} does not fit the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"  {title} ({len(keys)}): " + ", ".join(_short(keys)))
        raise CheckpointMismatch("\n".join(parts))
    module.load_state_dict(state, strict=True)


def _short(keys: Iterable[str], n: int = 12) -> list[str]:
    keys = list(keys)
    return keys[:n] + ([f"... {len(keys) - n} more"] if len(keys) > n else [])


def read_checkpoint(path, wrapper_keys: Sequence[str] = ("state_dict", "model", "module"), mmap: bool = False) -> dict:
    """Load a .pth/.pt (weights_only=True, never executing pickled code) or .safetensors file to a flat state dict.

    Self-trained VAR checkpoints nest the weights (`trainer.var_wo_ddp`); official releases are bare or under one
    of `wrapper_keys`. Both are accepted. `mmap`: tensors stay in the file until used (keys and shapes cost nothing).
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    # only the zip format can be memory-mapped; older files are read whole
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    if isinstance(obj, dict) and "trainer" in obj and isinstance(obj["trainer"], dict) and "var_wo_ddp" in obj["trainer"]:
        obj = obj["trainer"]["var_wo_ddp"]
    for key in wrapper_keys:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (bare or under one of {list(wrapper_keys)})")
    return dict(obj)

def read_meta(path: str) -> dict:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return {"kind": meta.get("kind"), "config": json.loads(meta["config"])} if "config" in meta else {}


def resolve_path(path: str | None) -> str | None:
    """User paths are relative to where the command was started, not to Hydra's run folder."""
    if not path:
        return None
    try:
        return to_absolute_path(path)
    except ValueError:  # not inside a Hydra run (tests, notebooks)
        return str(Path(path).expanduser().resolve())
