"""Key tables: official checkpoint names <-> scalegen names, readable in one place per release.

A rule is a pair of name patterns in which `{i}` stands for a number and `{rest}` for any dotted tail, e.g.
`("blocks.{i}.ffn.{rest}", "backbone.blocks.{i}.mlp.{rest}")`. The first rule that matches a key wins, in either
direction. A rule whose target is None marks an official key that scalegen rebuilds instead of loading.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import torch

Rule = tuple[str, Optional[str]]


@lru_cache(maxsize=None)
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


def matches(key: str, pattern: str) -> bool:
    return _regex(pattern).match(key) is not None


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
