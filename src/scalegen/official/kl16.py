"""MAR's `kl16.ckpt` (the KL-16 VAE FlowAR uses): the file holds a state dict of 312 tensors under "model".

scalegen's `AutoencoderKL` keeps the official module names, so the table is the identity; the sizes (channels,
levels, where attention sits) are read from the keys. Reference: MAR's models/vae.py (FlowAR's copy is identical).
"""
from __future__ import annotations

from scalegen.official.registry import Release, register
from scalegen.official.table import Rule
from scalegen.tokenizers.kl import AutoencoderKL

KL16_TABLE: list[Rule] = [
    ("{rest}", "{rest}"),  # encoder.*, decoder.*, quant_conv, post_quant_conv: the LDM names, unchanged
]


def kl_config_from_state(state: dict, scales=None, resolution: int = 256, **overrides) -> dict:
    """AutoencoderKL arguments from the keys; attention placement is stored as resolutions of a `resolution` image
    (the VAE has no schedule: `scales` is ignored)."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    enc_attn = tuple(resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
    dec_attn = tuple(resolution // 2**i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state)
    cfg = dict(embed_dim=state["post_quant_conv.weight"].shape[0], ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
               resolution=resolution, enc_attn_resolutions=enc_attn, dec_attn_resolutions=dec_attn)
    return {**cfg, **overrides}


def _is_kl(state) -> bool:
    return "quant_conv.weight" in state and "encoder.mid.attn_1.q.weight" in state


# MAR's loader reads the state dict under "model"
KL16 = register(Release(
    kind="kl16", title="KL VAE", file="kl16.ckpt", table=KL16_TABLE, recognise=_is_kl,
    config_from_state=kl_config_from_state, build=lambda config: AutoencoderKL(**config), wrapper="model"))
