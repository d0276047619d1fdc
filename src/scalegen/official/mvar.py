"""M-VAR's releases (HF `OliverRen/M-VAR`, d16 ... d32): VAR's key names plus one Mamba2 per block.

The Mamba2 keys (`blocks.i.mamba.{in_proj,conv1d,dt_bias,A_log,D,norm,out_proj}`) are mamba_ssm's and ours alike;
`ada_lin.1` has 9 chunks instead of 6, in the same place. Everything is read from the keys and shapes, never from
the file name: `attn_l2_norm` is on exactly when `attn.scale_mul_1H11` is present (the official README asks users
to flip it by hand for d16/d20), the schedule comes from the `attn.patch_nums` buffer (squares of the sides).
"""
from __future__ import annotations

import math

import torch

from scalegen.generators import Generator
from scalegen.generators.mvar import MambaAdaLNTransformer, block_diagonal_bias
from scalegen.heads import CategoricalHead
from scalegen.io import load_strict
from scalegen.official.table import Rule, convert
from scalegen.official.var import VAR_TABLE, var_config_from_state

MVAR_TABLE: list[Rule] = [
    ("blocks.{i}.attn.patch_nums", None),  # token count per scale: derived from the schedule
    *VAR_TABLE,  # the rest, Mamba2 included (blocks.{i}.{rest}), is VAR's table
]


def _scales_from_patch_nums(counts: torch.Tensor) -> tuple[int, ...] | None:
    sides = [math.isqrt(int(n)) for n in counts.tolist()]
    return tuple(sides) if all(n > 0 and s * s == n for s, n in zip(sides, counts.tolist())) else None


def mvar_config_from_state(state: dict, scales=None) -> dict:
    """The architecture of an official M-VAR state dict, from its keys and shapes."""
    if "blocks.0.mamba.A_log" not in state:
        raise ValueError("not an M-VAR checkpoint: no blocks.0.mamba.* keys (a VAR release? use kind `var`)")
    if scales is None and "blocks.0.attn.patch_nums" in state:
        scales = _scales_from_patch_nums(state["blocks.0.attn.patch_nums"])
    config = var_config_from_state(state, scales)
    width = config["width"]
    nheads = state["blocks.0.mamba.A_log"].numel()
    d_inner = state["blocks.0.mamba.norm.weight"].numel()
    rows = state["blocks.0.mamba.in_proj.weight"].shape[0]
    conv_dim, _, d_conv = state["blocks.0.mamba.conv1d.weight"].shape
    d_state = (rows - 2 * d_inner - nheads) // 2
    if d_inner % width or d_inner % nheads or conv_dim != d_inner + 2 * d_state:
        raise ValueError(f"Mamba2 shapes do not fit one group (ngroups=1): in_proj rows {rows}, d_inner {d_inner}, "
                         f"nheads {nheads}, conv channels {conv_dim}")
    config.update(d_state=d_state, d_conv=d_conv, expand=d_inner // width, headdim=d_inner // nheads)
    return config


def build_mvar(config: dict) -> Generator:
    cfg = dict(config)
    vocab = cfg.pop("vocab_size")
    backbone = MambaAdaLNTransformer(**cfg)
    return Generator(backbone, CategoricalHead(backbone.width, backbone.width, vocab, backbone.blocks[0].norm.eps))


def load_mvar(state: dict, config: dict | None = None, scales=None, **overrides) -> Generator:
    """Official M-VAR state dict -> scalegen Generator, strictly (every key accounted for, shapes checked)."""
    config = config or {**mvar_config_from_state(state, scales), **overrides}
    gen = build_mvar(config)
    ours, _ = convert(state, MVAR_TABLE)
    sched = gen.backbone.scales
    if "lvl_1L" in state and not torch.equal(state["lvl_1L"].view(-1).long(), sched.level_ids()):
        raise ValueError(f"lvl_1L in the checkpoint disagrees with scales {sched.sizes}")
    load_strict(gen, ours, "M-VAR checkpoint")
    return gen


def export_mvar(gen: Generator) -> dict:
    """scalegen Generator -> an official-layout M-VAR state dict (derived buffers included, as the release has them)."""
    state, _ = convert(gen.state_dict(), MVAR_TABLE, reverse=True)
    bb = gen.backbone
    L = bb.scales.num_tokens
    state["lvl_1L"] = bb.scales.level_ids().unsqueeze(0)
    state["attn_bias_for_masking"] = block_diagonal_bias(bb.scales).view(1, 1, L, L)  # stored, never used upstream
    counts = torch.tensor(bb.scales.token_counts, dtype=torch.int32)
    for i in range(len(bb.blocks)):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(bb.width)
        state[f"blocks.{i}.attn.patch_nums"] = counts.clone()
    return state
