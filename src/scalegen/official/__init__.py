"""Official checkpoints in and out: one key table per release, strict loads, safetensors out."""
from scalegen.io import (  # re-exported: the strict loads every table uses
    CheckpointMismatch,
    load_strict,
    read_checkpoint,
)
from scalegen.official.table import convert as convert_keys

__all__ = ["CheckpointMismatch", "convert_keys", "load_strict", "read_checkpoint"]
