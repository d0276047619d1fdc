"""M-VAR's releases (HF `OliverRen/M-VAR`, d16 ... d32): VAR's key names plus one Mamba2 per block.

The Mamba2 keys (`blocks.i.mamba.{in_proj,conv1d,dt_bias,A_log,D,norm,out_proj}`) are mamba_ssm's and ours alike;
`ada_lin.1` has 9 chunks instead of 6, in the same place. Everything is read from the keys and shapes, never from
the file name: `attn_l2_norm` is on exactly when `attn.scale_mul_1H11` is present (the official README asks users
to flip it by hand for d16/d20), the schedule comes from the `attn.patch_nums` buffer (squares of the sides).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from scalegen.generators.mvar import MambaAdaLNTransformer
from scalegen.official.registry import register
from scalegen.official.table import Rule
from scalegen.official.var import VAR, VAR_TABLE, build_with, var_buffers, var_config_from_state
from scalegen.schedule.scales import ScaleSchedule

MVAR_TABLE: list[Rule] = [
    ("blocks.{i}.attn.patch_nums", None),  # token count per scale: derived from the schedule
    *VAR_TABLE,  # the rest, Mamba2 included (blocks.{i}.{rest}), is VAR's table
]


def _scales_from_patch_nums(counts: torch.Tensor) -> tuple[int, ...] | None:
    sides = [math.isqrt(int(n)) for n in counts.tolist()]
    return tuple(sides) if all(n > 0 and s * s == n for s, n in zip(sides, counts.tolist())) else None


def mvar_config_from_state(state: dict, scales=None, **overrides) -> dict:
    """The architecture of an official M-VAR state dict: VAR's, plus the Mamba2 sizes from its shapes."""
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
    return {**config, **overrides}


build_mvar = build_with(MambaAdaLNTransformer)


def mvar_buffers(gen) -> dict[str, torch.Tensor]:
    """VAR's buffers with M-VAR's block-diagonal mask (stored, never used upstream) and the per-block token counts."""
    counts = torch.tensor(gen.backbone.scales.token_counts, dtype=torch.int32)
    out = var_buffers(gen, ScaleSchedule.block_diagonal_bias)
    out.update((f"blocks.{i}.attn.patch_nums", counts.clone()) for i in range(len(gen.backbone.blocks)))
    return out


def _is_mvar(state) -> bool:
    return "pos_1LC" in state and state["pos_1LC"].ndim == 3 and "blocks.0.mamba.A_log" in state


# VAR's record otherwise: the same checked buffer, tokenizer, composition and (no) sampling defaults
MVAR = register(replace(
    VAR, kind="mvar", title="M-VAR", file="d16.pth", table=MVAR_TABLE, recognise=_is_mvar,
    config_from_state=mvar_config_from_state, build=build_mvar, derived=mvar_buffers))
