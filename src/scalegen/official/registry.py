"""The official releases as records, and what is done with them, written once: recognise a file, load it (official
layout or its converted safetensors), export back to the official layout, convert files, pair a generator with
its tokenizer.

Each release file (var.py, mvar.py, flexvar.py, flowar.py, kl16.py) keeps its key table and config reader and
registers its `Release`; `scalegen.official` imports them all, so RELEASES is complete once the package is loaded.
"""
from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from safetensors.torch import load_file

from scalegen.io import atomic_write, load_strict, read_checkpoint, read_meta, save_safetensors
from scalegen.official.table import Rule, convert, matches


def _nothing(*_) -> dict:
    return {}


@dataclass(frozen=True)
class Release:
    kind: str  # the converter's KIND and the safetensors metadata `kind`
    title: str  # how messages name it: "VAR", "KL VAE"
    file: str  # a released file name, for messages
    table: Sequence[Rule]  # official <-> scalegen names (scalegen.official.table)
    recognise: Callable[[Mapping[str, torch.Tensor]], bool]  # is this official state dict one of ours?
    config_from_state: Callable[..., dict]  # (state, scales=None, **overrides) -> the build arguments
    build: Callable[[dict], torch.nn.Module]
    scales_key: str | None = None  # the config entry holding the schedule (None: the model has none)
    table_for: Callable[[torch.nn.Module], Sequence[Rule]] | None = None  # when names depend on the model's sizes
    derived: Callable[[torch.nn.Module], dict] = _nothing  # official buffers scalegen rebuilds: added on export
    checked: Sequence[str] = ()  # patterns of derived buffers a loaded file must hold exactly as rebuilt
    reconcile: Callable[[dict, torch.nn.Module, str | None], None] | None = None  # fixes before the strict load
    wrapper: str | None = None  # the official file holds the state dict under this key
    # generators only: the tokenizer release it pairs with, the composition, the sampling defaults
    tokenizer: str | None = None
    compose: Callable[[torch.nn.Module, torch.nn.Module], Any] | None = None
    sampling: Callable[[dict], dict] = _nothing
    token_key: str | None = None  # the official key whose input width is the tokenizer's latent channels

    @property
    def is_tokenizer(self) -> bool:
        return self.tokenizer is None

    def rules(self, model: torch.nn.Module) -> Sequence[Rule]:
        return self.table_for(model) if self.table_for else self.table


RELEASES: dict[str, Release] = {}


def register(rel: Release) -> Release:
    if rel.kind in RELEASES:
        raise ValueError(f"release kind {rel.kind!r} registered twice")
    RELEASES[rel.kind] = rel
    return rel


def release(kind: str) -> Release:
    if kind not in RELEASES:
        raise ValueError(f"unknown release kind {kind!r}: one of {', '.join(RELEASES)}")
    return RELEASES[kind]


# ---- recognising a file ----------------------------------------------------------------------------------------------


def recognise_state(state: Mapping[str, torch.Tensor], kinds: Sequence[str] | None = None) -> str | None:
    """The release whose key layout this official state dict has (None: no release's), among `kinds` (default all)."""
    found = [k for k in (kinds or RELEASES) if RELEASES[k].recognise(state)]
    if len(found) > 1:
        raise ValueError(f"the keys fit several releases ({', '.join(found)}): convert with an explicit KIND")
    return found[0] if found else None


# what torch.load raises on a file that is no checkpoint at all (a text file: KeyError 101, the byte 'e')
UNREADABLE = (KeyError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError)


def not_a_checkpoint(path, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return (f"{path}: this file is not a checkpoint (torch cannot read it: {type(error).__name__}: {reason}); give a "
            "scalegen training checkpoint (.ckpt), an official release (.pth) or its conversion (.safetensors)")


def _read(path: str) -> dict:
    try:
        return read_checkpoint(path, mmap=True)
    except UNREADABLE as e:
        raise ValueError(not_a_checkpoint(path, e)) from None


def recognise(path) -> str:
    """The release kind of an official file (by its keys; the file is memory-mapped, so only its index is read) or of
    a converted safetensors (by its metadata)."""
    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind = read_meta(path).get("kind") if path.endswith(".safetensors") else recognise_state(_read(path))
    if kind not in RELEASES:
        what = f"metadata kind {kind!r}" if path.endswith(".safetensors") else "no release's key table fits its keys"
        raise ValueError(f"{path}: neither a scalegen training checkpoint (.ckpt) nor an official release of "
                         f"{', '.join(RELEASES)} or its conversion ({what}); convert official files with "
                         "python -m scalegen.official.convert KIND FILE -o OUT.safetensors")
    return kind


# ---- load and export --------------------------------------------------------------------------------------------------


def _ready(rel: Release, model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False) if rel.is_tokenizer else model


def _to_ours(rel: Release, state: Mapping, model: torch.nn.Module, converting: str | None = None) -> dict:
    """Rename by the table; derived buffers of the file are checked against the rebuilt ones, then dropped."""
    ours, dropped = convert(state, rel.rules(model))
    checked = [k for k in dropped if any(matches(k, p) for p in rel.checked)]
    rebuilt = rel.derived(model) if checked else {}
    for key in checked:
        mine, theirs = rebuilt.get(key), state[key]
        if mine is None or mine.shape != theirs.shape or not torch.equal(mine, theirs.to(mine.dtype)):
            raise ValueError(f"buffer {key!r} of the {rel.title} checkpoint differs from the one rebuilt for scales "
                             f"{model.backbone.scales.sizes}: another schedule (pass scales=) or another layout")
    if rel.reconcile is not None:
        rel.reconcile(ours, model, converting)
    return ours


def _load(rel: Release, source, config: dict | None = None, scales=None, converting: str | None = None,
          **overrides) -> tuple[torch.nn.Module, dict]:
    """(model, its config) from an official state dict, an official file or a converted safetensors."""
    if isinstance(source, Mapping):
        state, where = source, f"{rel.title} checkpoint"
    else:
        path = str(source)
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        where = f"{rel.title} checkpoint {path}"
        if path.endswith(".safetensors"):  # written by to_scalegen: scalegen names, the config in the metadata
            meta = read_meta(path)
            # a tokenizer that train.py saved carries no metadata: scalegen names, the default architecture
            if meta.get("kind") != rel.kind and not (rel.is_tokenizer and not meta):
                raise ValueError(f"{path} holds metadata kind {meta.get('kind')!r}, not {rel.kind!r}")
            schedule = {rel.scales_key: scales} if scales and rel.scales_key else {}
            config = {**meta.get("config", {}), **schedule, **overrides}
            model = rel.build(config)
            load_strict(model, load_file(path), where)
            return _ready(rel, model), config
        state = _read(path)
    config = config or rel.config_from_state(state, scales, **overrides)
    model = rel.build(config)
    load_strict(model, _to_ours(rel, state, model, converting), where)
    return _ready(rel, model), config


def load(kind: str, source, config: dict | None = None, scales=None, **overrides) -> torch.nn.Module:
    """An official state dict, or the path of an official file or of its conversion -> the scalegen model, loaded
    strictly (every key accounted for, shapes checked; tokenizers frozen in eval mode).

    `config` skips reading the architecture from the keys; `scales` is the schedule where the keys cannot say it;
    `overrides` replace entries of the inferred config (what the file does not hold, e.g. drop_path_rate).
    """
    return _load(release(kind), source, config, scales, **overrides)[0]


def export(kind: str, model: torch.nn.Module) -> dict:
    """A scalegen model -> its official-layout state dict, with the buffers the release carries."""
    rel = release(kind)
    state, _ = convert(model.state_dict(), rel.rules(model), reverse=True)
    state.update(rel.derived(model))
    return state


def load_tokenizer_weights(tokenizer: torch.nn.Module, path) -> None:
    """Tokenizer weights from a scalegen export (.safetensors), a scalegen training checkpoint or an official release
    (recognised by its keys and renamed by its table)."""
    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if path.endswith(".ckpt") else None
    if ckpt is not None and "state_dict" in ckpt:  # a scalegen training checkpoint (MAR's kl16.ckpt is {"model": ...})
        prefix = "tokenizer."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    else:
        state = read_checkpoint(path)
    kind = recognise_state(state, [k for k, r in RELEASES.items() if r.is_tokenizer])
    if kind is not None:
        state = _to_ours(RELEASES[kind], state, tokenizer)
    keep_own_statistics(tokenizer, state, path)
    load_strict(tokenizer, state, f"tokenizer checkpoint {path}")
    tokenizer.eval().requires_grad_(False)


def keep_own_statistics(tokenizer: torch.nn.Module, state: dict, path: str) -> None:
    """Statistics of another scale list (a VQVAE's per-scale usage) do not change the weights: the tokenizer keeps
    its own, reset, with a note, so a trained tokenizer loads under any schedule its weights allow."""
    own = tokenizer.state_dict()
    for key in type(tokenizer).statistics:
        if key in state and key in own and state[key].shape != own[key].shape:
            warnings.warn(f"tokenizer checkpoint {path}: {key} holds statistics of shape {tuple(state[key].shape)}, "
                          f"this tokenizer's scales give {tuple(own[key].shape)}: reset (statistics only; the weights "
                          "load)", stacklevel=2)
            state[key] = torch.zeros_like(own[key])


# ---- a generator release with its tokenizer ----------------------------------------------------------------------------


class Pretrained(NamedTuple):
    tokenizer: torch.nn.Module
    generator: torch.nn.Module
    composition: Any
    sample: dict  # the release's sampling defaults


def load_pretrained(path, vae_path=None) -> Pretrained:
    """An official generator release (or its conversion), found by `recognise`, with its tokenizer release."""
    path = str(path)
    rel = RELEASES[recognise(path)]
    if rel.is_tokenizer:
        raise ValueError(f"{path} is a tokenizer release ({rel.title}): give a generator as the checkpoint and this "
                         "file as vae_ckpt=")
    tok = RELEASES[rel.tokenizer]
    if vae_path is None:
        raise ValueError(f"{path} is an official {rel.title} release (or its conversion): also give the tokenizer, "
                         f"e.g. vae_ckpt=/path/to/{tok.file}")
    if not Path(vae_path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {vae_path}")
    other = None if str(vae_path).endswith(".safetensors") else recognise_state(_read(str(vae_path)))
    if other not in (None, tok.kind):  # (a converted file's kind is checked by its metadata)
        raise ValueError(f"vae_ckpt={vae_path} is a {RELEASES[other].title} release, but {path} ({rel.title}) pairs "
                         f"with a {tok.title}, e.g. {tok.file}")
    generator, config = _load(rel, path)
    tokenizer = load(tok.kind, vae_path, scales=generator.backbone.scales.sizes)
    composition = rel.compose(tokenizer, generator)
    if composition.token_dim != config["token_dim"]:
        raise ValueError(f"vae_ckpt: the {tok.title}'s latent has {composition.token_dim} channels, but {path} reads "
                         f"{config['token_dim']} ({rel.token_key}): give the tokenizer the model was trained with")
    return Pretrained(tokenizer, generator, composition, fit_vocabulary(rel.sampling(config), composition, rel, path))


def fit_vocabulary(sample: dict, composition, rel: Release, path) -> dict:
    """The release's default top-k is for its own codebook: above a smaller file's vocabulary it is clamped, with a
    note (a top_k the user gives is still refused there, naming the limit)."""
    top_k, vocab = sample.get("top_k"), composition.vocab_size
    if isinstance(top_k, int) and isinstance(vocab, int) and top_k > vocab:
        warnings.warn(f"{path}: the {rel.title} release's default top_k={top_k} is above this model's vocabulary of "
                      f"{vocab} codes: sampling with top_k={vocab} (give top_k= to choose)", stacklevel=2)
        sample = {**sample, "top_k": vocab}
    return sample


# ---- files: official <-> converted safetensors ------------------------------------------------------------------------


def to_scalegen(kind: str, src, dst, scales=None) -> None:
    """An official file -> safetensors with scalegen names and the architecture in the metadata."""
    rel = release(kind)
    model, config = _load(rel, read_checkpoint(src), scales=scales, converting=str(src))
    save_safetensors(model.state_dict(), dst, metadata={"kind": kind, "config": json.dumps(config)})
    print(f"{src}: {sum(p.numel() for p in model.parameters()):,} parameters -> {dst}")


def to_official(kind: str, src, dst) -> None:
    """A converted safetensors -> the official layout, as the release's loader reads it."""
    if not str(src).endswith(".safetensors"):
        raise ValueError(f"{src}: --to-official reads a .safetensors written by this converter")
    state = export(kind, load(kind, src))
    out = {RELEASES[kind].wrapper: state} if RELEASES[kind].wrapper else state
    atomic_write(dst, lambda tmp: torch.save(out, tmp))
    print(f"{src} -> {dst} ({len(state)} official keys)")
