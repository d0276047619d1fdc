"""MAR's `kl16.ckpt` (the KL-16 VAE FlowAR uses): the file holds a state dict of 312 tensors under "model".

scalegen's `AutoencoderKL` keeps the official module names, so the table is the identity; the sizes (channels,
levels, where attention sits) are read from the keys. Reference: MAR's models/vae.py (FlowAR's copy is identical).
"""
from __future__ import annotations

from scalegen.io import load_strict
from scalegen.official.table import Rule, convert
from scalegen.tokenizers.kl import AutoencoderKL

KL16_TABLE: list[Rule] = [
    ("{rest}", "{rest}"),  # encoder.*, decoder.*, quant_conv, post_quant_conv: the LDM names, unchanged
]


def is_kl_state(state: dict) -> bool:
    return "quant_conv.weight" in state and "encoder.mid.attn_1.q.weight" in state


def kl_config_from_state(state: dict, resolution: int = 256, **overrides) -> dict:
    """AutoencoderKL arguments from the keys; attention placement is stored as resolutions of a `resolution` image."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    enc_attn = tuple(resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
    dec_attn = tuple(resolution // 2**i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state)
    cfg = dict(embed_dim=state["post_quant_conv.weight"].shape[0], ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
               resolution=resolution, enc_attn_resolutions=enc_attn, dec_attn_resolutions=dec_attn)
    cfg.update(overrides)
    return cfg


def load_kl(state: dict, config: dict | None = None, **overrides) -> AutoencoderKL:
    """Official KL VAE state dict -> scalegen AutoencoderKL (strict; frozen, eval mode)."""
    config = config or kl_config_from_state(state, **overrides)
    vae = AutoencoderKL(**config)
    ours, _ = convert(state, KL16_TABLE)
    load_strict(vae, ours, "KL VAE checkpoint")
    return vae.eval().requires_grad_(False)


def export_kl(vae: AutoencoderKL) -> dict:
    """scalegen AutoencoderKL -> the official layout (wrap as {"model": state} for MAR's loader)."""
    state, _ = convert(vae.state_dict(), KL16_TABLE, reverse=True)
    return state
