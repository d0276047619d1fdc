"""Official checkpoints in and out: one record per release (key table, config reader, builder, pairing), registered
by its own file, and the operations on them written once in `registry`."""
from scalegen.io import (  # re-exported: the strict loads every table uses
    CheckpointMismatch,
    load_strict,
    read_checkpoint,
)

# each release file registers its records on import: all of them, so RELEASES is complete once this package is loaded
from scalegen.official import flexvar, flowar, kl16, mvar, var  # noqa: F401
from scalegen.official.registry import (
    RELEASES,
    Pretrained,
    Release,
    export,
    load,
    load_pretrained,
    load_tokenizer_weights,
    recognise,
    to_official,
    to_scalegen,
)
from scalegen.official.table import convert as convert_keys

__all__ = ["RELEASES", "CheckpointMismatch", "Pretrained", "Release", "convert_keys", "export", "load",
           "load_pretrained", "load_strict", "load_tokenizer_weights", "read_checkpoint", "recognise", "to_official",
           "to_scalegen"]
