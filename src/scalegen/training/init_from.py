"""Fine-tuning: `init_from=` starts a run's generator (or, with task=tokenizer, its tokenizer) from a scalegen
training checkpoint or an official release, instead of from the model's init.

The run's config must describe the same architecture (e.g. `experiment=var_d16` for VAR's d16 release): every
weight is loaded strictly, so a mismatch lists the keys. Only the class count may differ: the data's classes
decide it, and the class embedding is resized (the first classes keep their rows, new rows keep the model's init,
the null class stays the last row) and the run says so.
"""
from __future__ import annotations

from pathlib import Path

import torch

from scalegen.errors import ConfigError
from scalegen.io import load_lightning_checkpoint, load_strict
from scalegen.official import RELEASES, load, load_tokenizer_weights, recognise

CLASS_TABLES = ("backbone.class_emb.weight",)  # rows: num_classes + 1, the null class (CFG) last


def _exists(source: str) -> str:
    if not Path(source).exists():
        raise ConfigError(f"init_from: {source} does not exist (a scalegen .ckpt or an official release file)")
    return str(source)


def generator_state(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The generator weights of `source` in scalegen names, and what they are (for the log)."""
    source = _exists(source)
    if source.endswith(".ckpt"):
        state = load_lightning_checkpoint(source)["state_dict"]
        prefix = "ema." if any(k.startswith("ema.") for k in state) else "generator."  # the EMA copy samples best
        what = f"the {'EMA' if prefix == 'ema.' else ''} weights of scalegen checkpoint {source}".replace("  ", " ")
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, what
    kind = recognise(source)
    if RELEASES[kind].is_tokenizer:
        raise ConfigError(f"init_from: {source} is a tokenizer release ({RELEASES[kind].title}); give it as "
                          "tokenizer_ckpt= and a generator release (or a scalegen .ckpt) as init_from=, or train the "
                          "tokenizer from it with task=tokenizer")
    return load(kind, source).state_dict(), f"official {RELEASES[kind].title} release {source}"


def resize_classes(state: dict[str, torch.Tensor], target: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """`state` with its class tables fitted to `target`'s class count: shared classes keep their rows, new classes
    keep `target`'s (freshly initialised) rows, the null-class row stays last."""
    own = target.state_dict()
    out = dict(state)
    for key in CLASS_TABLES:
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        old, new = state[key], own[key].clone()
        if old.shape[1:] != new.shape[1:]:
            continue  # a width mismatch: load_strict names it
        n_old, n_new = old.shape[0] - 1, new.shape[0] - 1
        keep = min(n_old, n_new)
        new[:keep] = old[:keep]
        new[-1] = old[-1]
        out[key] = new
        print(f"[scalegen] init_from: {source} has {n_old} classes, the data {n_new}: the class embedding is resized "
              f"({key}: classes 0..{keep - 1} keep their rows, {max(n_new - keep, 0)} new rows from the model's init, "
              f"{max(n_old - keep, 0)} dropped; the null class stays last)")
    return out


def init_generator(module: torch.nn.Module, source: str) -> None:
    """Start `module.generator` (and its EMA copy) from `source`."""
    state, what = generator_state(source)
    state = resize_classes(state, module.generator, source)
    load_strict(module.generator, state, f"init_from={source} (the config must build the same architecture)")
    if getattr(module, "ema", None) is not None:
        module.ema.load_state_dict(module.generator.state_dict())
    print(f"[scalegen] generator starts from {what}")


def tokenizer_source(source: str) -> str:
    """The tokenizer weights a generator run starting from `source` uses when tokenizer_ckpt is not given: a scalegen
    checkpoint carries its tokenizer; an official generator release does not."""
    source = _exists(source)
    if source.endswith(".ckpt"):
        print(f"[scalegen] tokenizer from {source} (tokenizer_ckpt is null; init_from carries one)")
        return source
    kind = recognise(source)
    tok = RELEASES[RELEASES[kind].tokenizer] if not RELEASES[kind].is_tokenizer else RELEASES[kind]
    raise ConfigError(f"init_from={source} is an official release without its tokenizer: also give "
                      f"tokenizer_ckpt= (the {tok.title}, e.g. {tok.file})")


def init_tokenizer(tokenizer: torch.nn.Module, source: str) -> torch.nn.Module:
    """Start a tokenizer to be trained from `source` (a scalegen .ckpt/.safetensors or an official tokenizer)."""
    load_tokenizer_weights(tokenizer, _exists(source))
    print(f"[scalegen] tokenizer starts from {source}")
    return tokenizer.train().requires_grad_(True)  # the loader freezes it for use; here it is trained
