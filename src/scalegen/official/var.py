"""VAR's releases: `vae_ch160v4096z32.pth` (multi-scale VQVAE) and `var_d{16,20,24,30,36}.pth` (the transformer)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from scalegen.generators import AdaLNTransformer, Generator
from scalegen.heads import CategoricalHead
from scalegen.io import load_strict, read_checkpoint
from scalegen.official.table import Rule, convert
from scalegen.schedule.scales import VAR_256, VAR_512, VAR_1024, ScaleSchedule
from scalegen.tokenizers import MultiScaleVQVAE

VAE_TABLE: list[Rule] = [
    ("quantize.ema_vocab_hit_SV", "quantize.usage_ema"),
    ("quantize.quant_resi.qresi_ls.{i}.{rest}", "quantize.phi.{i}.{rest}"),  # share_quant_resi >= 2
    ("quantize.quant_resi.qresi.{rest}", "quantize.phi.0.{rest}"),  # share_quant_resi = 1
    ("quantize.quant_resi.{i}.{rest}", "quantize.phi.{i}.{rest}"),  # share_quant_resi = 0
    ("{rest}", "{rest}"),  # encoder, decoder, quant_conv, post_quant_conv, embedding: same names
]

VAR_TABLE: list[Rule] = [
    ("lvl_1L", None),  # derived from the scale schedule
    ("attn_bias_for_masking", None),  # the block-causal mask, rebuilt
    ("blocks.{i}.attn.zero_k_bias", None),
    ("pos_1LC", "backbone.pos_embed"),
    ("pos_start", "backbone.pos_start"),
    ("class_emb.{rest}", "backbone.class_emb.{rest}"),
    ("lvl_embed.{rest}", "backbone.lvl_embed.{rest}"),
    ("word_embed.{rest}", "backbone.word_embed.{rest}"),
    ("shared_ada_lin.{rest}", "backbone.shared_ada_lin.{rest}"),
    ("blocks.{i}.attn.mat_qkv.weight", "backbone.blocks.{i}.attn.qkv.weight"),
    ("blocks.{i}.attn.scale_mul_1H11", "backbone.blocks.{i}.attn.scale_mul"),  # log of the per-head temperature
    ("blocks.{i}.ffn.{rest}", "backbone.blocks.{i}.mlp.{rest}"),
    ("blocks.{i}.{rest}", "backbone.blocks.{i}.{rest}"),  # attn.q_bias/v_bias/proj, ada_lin.1, ada_gss
    ("head_nm.{rest}", "head.norm.{rest}"),
    ("head.{rest}", "head.proj.{rest}"),
]

_PRESET_BY_L = {ScaleSchedule.of(p).num_tokens: p for p in (VAR_256, VAR_512, VAR_1024)}


def _scales_from_levels(levels: torch.Tensor) -> tuple[int, ...] | None:
    counts = torch.bincount(levels.reshape(-1).long()).tolist()
    sides = [math.isqrt(n) for n in counts]
    return tuple(sides) if all(n > 0 and s * s == n for s, n in zip(sides, counts)) else None


def var_config_from_state(state: dict, scales=None) -> dict:
    """Infer the architecture of an official VAR state dict from its keys and shapes (never from the file name)."""
    L, width = state["pos_1LC"].shape[1:]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if scales is None and L not in _PRESET_BY_L:  # not a preset: the level-id buffer of the file gives the schedule
        scales = _scales_from_levels(state["lvl_1L"]) if "lvl_1L" in state else None
        if scales is None:
            raise ValueError(f"pos_1LC has {L} positions, which matches no VAR preset {sorted(_PRESET_BY_L)}: pass scales=")
    scales = ScaleSchedule.of(scales or _PRESET_BY_L[L])
    if scales.num_tokens != L:
        raise ValueError(f"scales {scales.sizes} give {scales.num_tokens} tokens but pos_1LC has {L}")
    return dict(
        num_classes=state["class_emb.weight"].shape[0] - 1, token_dim=state["word_embed.weight"].shape[1],
        scales=scales.sizes, depth=depth, width=width, num_heads=state["blocks.0.attn.scale_mul_1H11"].shape[1]
        if "blocks.0.attn.scale_mul_1H11" in state else depth,
        shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm="blocks.0.attn.scale_mul_1H11" in state,
        vocab_size=state["head.weight"].shape[0],
    )


def build_var(config: dict) -> Generator:
    cfg = dict(config)
    vocab = cfg.pop("vocab_size")
    backbone = AdaLNTransformer(**cfg)
    return Generator(backbone, CategoricalHead(backbone.width, backbone.width, vocab, backbone.blocks[0].norm.eps))


def load_var(state: dict, config: dict | None = None, scales=None, **overrides) -> Generator:
    """Official VAR state dict -> scalegen Generator, strictly (every key accounted for, shapes checked).

    Without attn_l2_norm the head count leaves no trace in the shapes: it is taken as depth (VAR's rule) unless
    `num_heads=` is given.
    """
    config = config or {**var_config_from_state(state, scales), **overrides}
    gen = build_var(config)
    ours, _ = convert(state, VAR_TABLE)
    sched = gen.backbone.scales
    if "lvl_1L" in state and not torch.equal(state["lvl_1L"].view(-1).long(), sched.level_ids()):
        raise ValueError(f"lvl_1L in the checkpoint disagrees with scales {sched.sizes}")
    load_strict(gen, ours, "VAR checkpoint")
    return gen


def export_var(gen: Generator) -> dict:
    """scalegen Generator -> an official-layout VAR state dict (derived buffers included, as the release has them)."""
    state, _ = convert(gen.state_dict(), VAR_TABLE, reverse=True)
    bb = gen.backbone
    state["lvl_1L"] = bb.scales.level_ids().unsqueeze(0)
    state["attn_bias_for_masking"] = bb.scales.block_causal_bias().view(1, 1, bb.scales.num_tokens, -1)
    for i, block in enumerate(bb.blocks):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(bb.width)
    return state


def vae_config_from_state(state: dict, **overrides) -> dict:
    """The VQVAE's sizes from its keys; the schedule and resampling settings are not in the file (defaults: release)."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    qsr = 4
    if any(".qresi_ls." in k for k in state):
        qsr = 1 + max(int(k.split(".")[3]) for k in state if ".qresi_ls." in k)
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in state):
        qsr = 1
    elif any(k.startswith("quantize.quant_resi.") for k in state):
        qsr = 0
    cfg = dict(vocab_size=state["quantize.embedding.weight"].shape[0], z_channels=state["quantize.embedding.weight"].shape[1],
               ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, share_quant_resi=qsr,
               quant_conv_ks=state["quant_conv.weight"].shape[-1],
               using_sa=f"encoder.down.{levels - 1}.attn.0.qkv.weight" in state, using_mid_sa="encoder.mid.attn_1.qkv.weight" in state)
    cfg.update(overrides)
    return cfg


def load_vae(state: dict, config: dict | None = None, **overrides) -> MultiScaleVQVAE:
    config = config or vae_config_from_state(state, **overrides)
    vae = MultiScaleVQVAE(**config)
    ours, _ = convert(state, VAE_TABLE)
    usage = vae.quantize.usage_ema
    if ours.get("quantize.usage_ema", usage).shape != usage.shape:  # statistics of another schedule: keep ours (official)
        ours["quantize.usage_ema"] = usage
    load_strict(vae, ours, "VQVAE checkpoint")
    return vae.eval().requires_grad_(False)


def export_vae(vae: MultiScaleVQVAE) -> dict:
    mode = min(vae.quantize.share_quant_resi, 2)  # the phi naming differs by sharing mode: keep that mode's rule
    table = [VAE_TABLE[0], VAE_TABLE[1 + [2, 1, 0].index(mode)], VAE_TABLE[-1]]
    state, _ = convert(vae.state_dict(), table, reverse=True)
    return state


def load_tokenizer_weights(tokenizer: torch.nn.Module, path) -> None:
    """Tokenizer weights from a scalegen export (.safetensors), a scalegen training checkpoint or an official release."""
    path = str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True) if path.endswith(".ckpt") else None
    if ckpt is not None and "state_dict" in ckpt:  # a scalegen training checkpoint (MAR's kl16.ckpt is {"model": ...})
        prefix = "tokenizer."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    else:
        state = read_checkpoint(path)
    if any(k.startswith("quantize.quant_resi") or k == "quantize.ema_vocab_hit_SV" for k in state):  # VAR's release layout
        state, _ = convert(state, VAE_TABLE)
        usage = getattr(getattr(tokenizer, "quantize", None), "usage_ema", None)
        if usage is not None and state.get("quantize.usage_ema", usage).shape != usage.shape:
            state["quantize.usage_ema"] = usage
    load_strict(tokenizer, state, f"tokenizer checkpoint {path}")
    tokenizer.eval().requires_grad_(False)
