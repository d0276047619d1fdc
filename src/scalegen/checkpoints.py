"""Writing and reading weights safely: atomic saves, weights_only loads, safetensors for exported weights."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .official.table import load_strict, read_checkpoint


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) then rename over `path`: a kill mid-save leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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


def load_tokenizer_weights(tokenizer: torch.nn.Module, path) -> None:
    """Tokenizer weights from a scalegen export (.safetensors), a scalegen training checkpoint or an official release."""
    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if path.endswith(".ckpt") else None
    if ckpt is not None and "state_dict" in ckpt:  # a scalegen training checkpoint (MAR's kl16.ckpt is {"model": ...})
        prefix = "tokenizer."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    else:
        state = read_checkpoint(path)
    if any(k.startswith("quantize.quant_resi") or k == "quantize.ema_vocab_hit_SV" for k in state):  # VAR's release layout
        from .official.table import convert
        from .official.var import VAE_TABLE
        state, _ = convert(state, VAE_TABLE)
        usage = getattr(getattr(tokenizer, "quantize", None), "usage_ema", None)
        if usage is not None and state.get("quantize.usage_ema", usage).shape != usage.shape:
            state["quantize.usage_ema"] = usage
    load_strict(tokenizer, state, f"tokenizer checkpoint {path}")
    tokenizer.eval().requires_grad_(False)
