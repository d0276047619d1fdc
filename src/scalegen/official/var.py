"""VAR's releases: `vae_ch160v4096z32.pth` (multi-scale VQVAE) and `var_d{16,20,24,30,36}.pth` (the transformer)."""
from __future__ import annotations

import math

import torch

from scalegen.generators import AdaLNTransformer, Generator
from scalegen.heads import CategoricalHead
from scalegen.official.registry import Release, register
from scalegen.official.table import Rule
from scalegen.schedule.residual import ResidualComposition
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


# ---- the transformer (M-VAR and FlexVAR build on it) -------------------------------------------------------------------


def _scales_from_levels(levels: torch.Tensor) -> tuple[int, ...] | None:
    counts = torch.bincount(levels.reshape(-1).long()).tolist()
    sides = [math.isqrt(n) for n in counts]
    return tuple(sides) if all(n > 0 and s * s == n for s, n in zip(sides, counts)) else None


def var_config_from_state(state: dict, scales=None, **overrides) -> dict:
    """Infer the architecture of an official VAR state dict from its keys and shapes (never from the file name).

    Without attn_l2_norm the head count leaves no trace in the shapes: it is taken as depth (VAR's rule) unless
    `num_heads=` is given.
    """
    L, width = state["pos_1LC"].shape[1:]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    if scales is None and L not in _PRESET_BY_L:  # not a preset: the level-id buffer of the file gives the schedule
        scales = _scales_from_levels(state["lvl_1L"]) if "lvl_1L" in state else None
        if scales is None:
            raise ValueError(f"pos_1LC has {L} positions, which matches no VAR preset {sorted(_PRESET_BY_L)}: pass scales=")
    scales = ScaleSchedule.of(scales or _PRESET_BY_L[L])
    if scales.num_tokens != L:
        raise ValueError(f"scales {scales.sizes} give {scales.num_tokens} tokens but pos_1LC has {L}")
    l2 = "blocks.0.attn.scale_mul_1H11" in state
    cfg = dict(num_classes=state["class_emb.weight"].shape[0] - 1, token_dim=state["word_embed.weight"].shape[1],
               scales=scales.sizes, depth=depth, width=width,
               num_heads=state["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else depth,
               shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm=l2, vocab_size=state["head.weight"].shape[0])
    return {**cfg, **overrides}


def build_with(backbone: type):
    """The builder of `backbone` + VAR's categorical head from a config (`vocab_size` is the head's)."""

    def build(config: dict) -> Generator:
        cfg = dict(config)
        vocab = cfg.pop("vocab_size")
        bb = backbone(**cfg)
        return Generator(bb, CategoricalHead(bb.width, bb.width, vocab, bb.blocks[0].norm.eps))

    return build


build_var = build_with(AdaLNTransformer)


def adaln_buffers(gen: Generator, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The buffers every VAR-family release carries and scalegen rebuilds: the attention mask, the zero key biases."""
    bb = gen.backbone
    out = {"attn_bias_for_masking": mask.view(1, 1, bb.scales.num_tokens, -1)}
    out.update((f"blocks.{i}.attn.zero_k_bias", torch.zeros(bb.width)) for i in range(len(bb.blocks)))
    return out


def var_buffers(gen: Generator, mask=ScaleSchedule.block_causal_bias) -> dict[str, torch.Tensor]:
    """adaln_buffers + the level id of every token (`lvl_1L`); `mask(schedule)` gives the attention mask."""
    sched = gen.backbone.scales
    return {"lvl_1L": sched.level_ids().unsqueeze(0), **adaln_buffers(gen, mask(sched))}


def _is_var(state) -> bool:
    """A position table with one row per token (FlexVAR's is a 2-D grid) and no Mamba2 (M-VAR's)."""
    return "pos_1LC" in state and state["pos_1LC"].ndim == 3 and "blocks.0.mamba.A_log" not in state


VAR = register(Release(
    kind="var", title="VAR", file="var_d16.pth", table=VAR_TABLE, recognise=_is_var,
    config_from_state=var_config_from_state, build=build_var, scales_key="scales",
    derived=var_buffers, checked=("lvl_1L",),
    tokenizer="vae", compose=lambda vae, gen: ResidualComposition(vae), token_key="word_embed.weight"))


# ---- the VQVAE ----------------------------------------------------------------------------------------------------------


def vae_config_from_state(state: dict, scales=None, **overrides) -> dict:
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
    if scales:
        cfg["v_patch_nums"] = tuple(scales)
    return {**cfg, **overrides}


def vae_table(vae: MultiScaleVQVAE) -> list[Rule]:
    """VAE_TABLE with the rule of the model's phi sharing mode first: that naming wins on export."""
    mode = VAE_TABLE[1 + [2, 1, 0].index(min(vae.quantize.share_quant_resi, 2))]
    return [mode] + [r for r in VAE_TABLE if r != mode]


def keep_own_usage(ours: dict, vae: MultiScaleVQVAE, converting: str | None) -> None:
    """Usage statistics of another schedule: the model keeps its own; the converter, which stores the model alone,
    asks for the schedule instead."""
    usage, stats = getattr(getattr(vae, "quantize", None), "usage_ema", None), ours.get("quantize.usage_ema")
    if usage is None or stats is None or stats.shape == usage.shape:
        return
    if converting and stats.shape[0] != usage.shape[0]:
        raise ValueError(f"{converting}: quantize.ema_vocab_hit_SV holds statistics of {stats.shape[0]} scales: give the "
                         "tokenizer's schedule with --scales (e.g. --scales 1,2,3,4)")
    ours["quantize.usage_ema"] = usage


def _is_vae(state) -> bool:
    """VAR's release layout: the phi convolutions are `quant_resi`, the usage statistics `ema_vocab_hit_SV`."""
    return any(k.startswith("quantize.quant_resi") or k == "quantize.ema_vocab_hit_SV" for k in state)


VAE = register(Release(
    kind="vae", title="VQVAE", file="vae_ch160v4096z32.pth", table=VAE_TABLE, recognise=_is_vae,
    config_from_state=vae_config_from_state, build=lambda config: MultiScaleVQVAE(**config), scales_key="v_patch_nums",
    table_for=vae_table, reconcile=keep_own_usage))
