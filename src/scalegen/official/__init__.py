"""Official checkpoints in and out: one key table per release, strict loads, safetensors out."""
from .table import CheckpointMismatch, load_strict, read_checkpoint
from .table import convert as convert_keys

__all__ = ["CheckpointMismatch", "convert_keys", "load_strict", "read_checkpoint"]
