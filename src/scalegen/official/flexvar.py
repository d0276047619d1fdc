"""FlexVAR's releases: `FlexVAE.pth` (the tokenizer, under 'model') and `FlexVARd{16,20,24}-epo*.pth` (bare, or the
trainer's `{'trainer': {'var_wo_ddp': ...}}`; both are read by `read_checkpoint`).

FlexVAE's names are LlamaGen's, which `scalegen.tokenizers.FlexVAE` keeps: its table is the identity. The
transformer's names are VAR's without the level embedding (the released FlexVARd*-epo*.pth); the stored
`attn_bias_for_masking` holds whatever schedule the trainer ran last, so it is rebuilt, never loaded.
"""
from __future__ import annotations

from scalegen.generators.flexvar import ScaleFreeTransformer
from scalegen.official.registry import Release, register
from scalegen.official.table import Rule
from scalegen.official.var import VAR_TABLE, adaln_buffers, build_with
from scalegen.schedule.direct_vq import DirectVQComposition
from scalegen.schedule.scales import VAR_256, ScaleSchedule
from scalegen.tokenizers.flexvq import FlexVAE

FLEXVAE_TABLE: list[Rule] = [("{rest}", "{rest}")]  # LlamaGen VQ-16 names on both sides

# VAR's table minus `lvl_1L` and `lvl_embed` (FlexVAR has no level embedding); `pos_1LC` is the (1, C, 32, 32) table
FLEXVAR_TABLE: list[Rule] = [r for r in VAR_TABLE if r[0] not in ("lvl_1L", "lvl_embed.{rest}")]

# sides the official sampler treats as trained; others (and sides > max_pn) are sampled greedily (flexvar.py:230)
OFFICIAL_SIDES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)
# eval_c2i.py's settings (cfg 2.5 at 256 px, top-k 900, top-p 0.95, maxpn 16) and the official CFG ramp
OFFICIAL_SAMPLE = dict(cfg_scale=2.5, cfg_schedule="linear", top_k=900, top_p=0.95, more_smooth=False, cfg_mix="var",
                       ratio_steps=9, max_side=16, trained_sides=list(OFFICIAL_SIDES))


# ---- FlexVAE ---------------------------------------------------------------------------------------------------------


def flexvae_config_from_state(state: dict, scales=None, **overrides) -> dict:
    """The tokenizer's sizes from its keys and shapes (it has no schedule: `scales` is ignored)."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.conv_blocks."))
    ch_mult = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.conv_blocks.0.res."))
    vocab, dim = state["quantize.embedding.weight"].shape
    cfg = dict(vocab_size=vocab, codebook_dim=dim, z_channels=state["quant_conv.weight"].shape[1], ch=ch, ch_mult=ch_mult,
               num_res_blocks=blocks, usage_window=state["quantize.codebook_used"].numel()
               if "quantize.codebook_used" in state else 65536)
    return {**cfg, **overrides}


def _is_flexvae(state) -> bool:
    return "quantize.embedding.weight" in state and "encoder.conv_blocks.0.res.0.conv1.weight" in state


FLEXVAE = register(Release(
    kind="flexvae", title="FlexVAE", file="FlexVAE.pth", table=FLEXVAE_TABLE, recognise=_is_flexvae,
    config_from_state=flexvae_config_from_state, build=lambda config: FlexVAE(**config)))


# ---- the FlexVAR transformer -----------------------------------------------------------------------------------------


def flexvar_config_from_state(state: dict, scales=None, **overrides) -> dict:
    """The architecture from the keys and shapes; `scales` is the schedule it starts with (default: training's)."""
    _, width, grid, _ = state["pos_1LC"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    l2 = "blocks.0.attn.scale_mul_1H11" in state
    cfg = dict(num_classes=state["class_emb.weight"].shape[0] - 1, token_dim=state["word_embed.weight"].shape[1],
               scales=ScaleSchedule.of(scales or VAR_256).sizes, depth=depth, width=width, pos_grid=grid,
               num_heads=state["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else depth,
               shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm=l2, vocab_size=state["head.weight"].shape[0])
    return {**cfg, **overrides}


def _is_flexvar(state) -> bool:
    """FlexVAR's position table is 2-D (1, C, grid, grid); VAR's is one row per token (1, L, C)."""
    return "pos_1LC" in state and state["pos_1LC"].ndim == 4


build_flexvar = build_with(ScaleFreeTransformer)

# the stored `attn_bias_for_masking` holds the trainer's last schedule: never checked, exported for the model's own
FLEXVAR = register(Release(
    kind="flexvar", title="FlexVAR", file="FlexVARd16-epo179.pth", table=FLEXVAR_TABLE, recognise=_is_flexvar,
    config_from_state=flexvar_config_from_state, build=build_flexvar, scales_key="scales",
    derived=lambda gen: adaln_buffers(gen, gen.backbone.scales.block_causal_bias()),
    tokenizer="flexvae", compose=lambda vae, gen: DirectVQComposition(vae, gen.backbone.scales.sizes),
    sampling=lambda config: dict(OFFICIAL_SAMPLE), token_key="word_embed.weight"))
