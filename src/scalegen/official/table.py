"""Key tables: official checkpoint names <-> scalegen names, readable in one place per release.

A rule is a pair of name patterns in which `{i}` stands for a number and `{rest}` for any dotted tail, e.g.
`("blocks.{i}.ffn.{rest}", "backbone.blocks.{i}.mlp.{rest}")`. The first rule that matches a key wins, in either
direction. A rule whose target is None marks an official key that scalegen rebuilds instead of loading.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

import torch

Rule = tuple[str, Optional[str]]


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(f"^{out}$")


def _rename(key: str, rules: Sequence[Rule], reverse: bool) -> tuple[bool, Optional[str]]:
    for official, ours in rules:
        src, dst = (ours, official) if reverse else (official, ours)
        if src is None:
            continue
        m = _regex(src).match(key)
        if m:
            return True, None if dst is None else dst.format(**m.groupdict())
    return False, None


def convert(state: Mapping[str, torch.Tensor], rules: Sequence[Rule], reverse: bool = False) -> tuple[dict, list[str]]:
    """Rename every key by the table. Returns (renamed state, official keys dropped as derived)."""
    out, dropped = {}, []
    for key, value in state.items():
        matched, new = _rename(key, rules, reverse)
        if not matched:
            raise KeyError(f"no rule in the key table for {key!r}: is this the right checkpoint kind?")
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


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


def read_checkpoint(path, wrapper_keys: Sequence[str] = ("state_dict", "model", "module")) -> dict:
    """Load a .pth/.pt (weights_only=True, never executing pickled code) or .safetensors file to a flat state dict.

    Self-trained VAR checkpoints nest the weights (`trainer.var_wo_ddp`); official releases are bare or under one
    of `wrapper_keys`. Both are accepted.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "trainer" in obj and isinstance(obj["trainer"], dict) and "var_wo_ddp" in obj["trainer"]:
        obj = obj["trainer"]["var_wo_ddp"]
    for key in wrapper_keys:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (bare or under one of {list(wrapper_keys)})")
    return dict(obj)
