"""Official checkpoints in and out: one key table per release, strict loads, safetensors out."""
from .table import CheckpointMismatch, convert, load_strict, read_checkpoint

__all__ = ["CheckpointMismatch", "convert", "load_strict", "read_checkpoint"]
