"""Sharded (torch distributed checkpoint) folders are read only after their pickled `.metadata` passes a restricted
unpickler: torch reads that file with plain `pickle`, so a crafted folder would otherwise run code when loaded.

The allowed globals are what torch writes there (torch/distributed/checkpoint/metadata.py, filesystem.py): the
metadata dataclasses and enum, `_StorageInfo`, dtypes, `torch.Size`, the layout helper and path classes.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata

SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
}


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A sharded checkpoint whose metadata asks for something a checkpoint never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles only the classes torch's checkpoint metadata is made of."""

    def find_class(self, module: str, name: str):
        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)  # Metadata, TensorStorageMetadata, ..., _MEM_FORMAT_ENCODING
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{module}.{name}")


def read_metadata(path: str | os.PathLike):
    """The metadata object of one `.metadata` file, refusing anything but checkpoint metadata."""
    path = Path(path)
    try:
        return MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{path}: refused to load: it asks for {e} when unpickled, which checkpoint metadata "
                               "never does (a crafted or foreign file; only load checkpoints you trust)") from None
    except Exception as e:  # truncated or not a pickle at all
        raise UnsafeCheckpoint(f"{path}: not a torch distributed checkpoint's metadata ({type(e).__name__}: {e})") from None


def check_sharded_folder(folder: str | os.PathLike) -> None:
    """Vet every metadata file of a sharded checkpoint folder before torch unpickles it; a file is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(p for p in folder.iterdir() if p.name.endswith(".metadata")):  # `.metadata`, `__0.metadata`
        read_metadata(path)
