"""FlowAR's releases `FlowAR-{S,L,H}.pth`: flat state dicts of the official `FlowAR` (flowar.py), buffers included.

The buffers `mask` (the block-causal mask) and `*.rope.freqs` are rebuilt from the schedule and the head size;
a file whose buffers disagree with the rebuilt ones is refused (a different schedule or RoPE than scalegen's).
Reference: the state dict of FlowAR's models/flowar.py:164-449, as the released files hold it.
"""
from __future__ import annotations

import math

import torch

from scalegen.generators import Generator
from scalegen.generators.flowar import FlowARTransformer
from scalegen.generators.rope import rope_frequencies
from scalegen.heads.flow import FlowHead
from scalegen.official.registry import Release, register
from scalegen.official.table import Rule
from scalegen.schedule.direct import DirectComposition
from scalegen.schedule.scales import ScaleSchedule, doubling

ENCODER_RULE: Rule = ("encoder_blocks.{i}.{rest}", "backbone.blocks.{i}.{rest}")
FLOWAR_TABLE: list[Rule] = [
    ("mask", None),  # the block-causal mask, rebuilt from the schedule
    ("{rest}.rope.freqs", None),  # RoPE inverse frequencies, rebuilt from the head size
    ("encoder_pos_embed_learned", "backbone.enc_pos"),
    ("decoder_pos_embed_learned", "backbone.dec_pos"),
    ("diffusion_pos_embed_learned", "backbone.head_pos"),
    ("flownet.{rest}", "head.net.{rest}"),  # the flow head keeps the official names inside
    # both stacks are one `blocks` list: here flowar_table puts a rule per decoder block (decoder_blocks.j is
    # block encoder_depth + j), ahead of the encoder's so that it wins on export
    ENCODER_RULE,
    ("{rest}", "backbone.{rest}"),  # class_emb, z_proj, z_proj_ln, encoder_norm, decoder_embed, decoder_norm
]


def flowar_table(gen: Generator) -> list[Rule]:
    e, n = gen.backbone.encoder_depth, len(gen.backbone.blocks)
    decoder = [(f"decoder_blocks.{j}.{{rest}}", f"backbone.blocks.{e + j}.{{rest}}") for j in range(n - e)]
    at = FLOWAR_TABLE.index(ENCODER_RULE)
    return FLOWAR_TABLE[:at] + decoder + FLOWAR_TABLE[at:]


# the released sizes (flowar.py:428-449) and their README/eval.sh sampling settings
PRESETS = {
    "flowar_s": dict(width=768, encoder_depth=6, decoder_depth=6, num_heads=12, flow_width=1024, depth=2, cross=False,
                     sample=dict(cfg_scale=4.3, num_steps=25, guidance=0.9)),
    "flowar_l": dict(width=1024, encoder_depth=8, decoder_depth=8, num_heads=16, flow_width=1024, depth=12, cross=True,
                     sample=dict(cfg_scale=2.4, num_steps=25, guidance=0.9)),
    "flowar_h": dict(width=1536, encoder_depth=15, decoder_depth=15, num_heads=16, flow_width=1536, depth=12, cross=True,
                     sample=dict(cfg_scale=2.4, num_steps=50, guidance=0.7)),
}
HEAD_KEYS = ("flow_width", "depth", "cross", "head_heads")


def _is_flowar(state) -> bool:
    return "z_proj.weight" in state and any(k.startswith("flownet.") for k in state)


def _count(state: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _scales_from_mask(mask: torch.Tensor) -> tuple[int, ...] | None:
    """Each row of the block-causal mask sees every token up to the end of its scale: distinct counts -> scales."""
    ends = sorted(set((mask.reshape(mask.shape[-2], -1) == 0).sum(-1).tolist()))
    counts = [b - a for a, b in zip([0] + ends[:-1], ends)]
    sides = [math.isqrt(n) for n in counts]
    return tuple(sides) if all(s * s == n for s, n in zip(sides, counts)) else None


def flowar_config_from_state(state: dict, scales=None, **overrides) -> dict:
    """Infer the architecture from the keys and shapes (head counts from the RoPE buffers, the schedule from the mask)."""
    L, width = state["encoder_pos_embed_learned"].shape[1:]
    if scales is None:
        scales = _scales_from_mask(state["mask"]) if "mask" in state else None
        if scales is None:  # no mask buffer: FlowAR's doubling schedule of that length
            side = 1
            while ScaleSchedule.of(doubling(side)).num_tokens < L:
                side *= 2
            scales = doubling(side)
    scales = ScaleSchedule.of(scales)
    if scales.num_tokens != L:
        raise ValueError(f"scales {scales.sizes} give {scales.num_tokens} tokens but the position tables have {L}: pass scales=")
    freqs = state.get("encoder_blocks.0.attn.rope.freqs")
    heads = width // (4 * freqs.numel()) if freqs is not None else None
    head_w = state["flownet.input_proj.weight"].shape[0]
    head_freqs = state.get("flownet.res_blocks.0.attn.rope.freqs")
    preset = next((p for p in PRESETS.values() if p["width"] == width), None)
    if heads is None:
        if preset is None:
            raise ValueError("the file has no rope.freqs buffers and its width matches no preset: pass num_heads=")
        heads = preset["num_heads"]
    cfg = dict(
        num_classes=state["class_emb.weight"].shape[0] - 1, token_dim=state["z_proj.weight"].shape[1],
        scales=scales.sizes, width=width, encoder_depth=_count(state, "encoder_blocks."),
        decoder_depth=_count(state, "decoder_blocks."), num_heads=heads,
        flow_width=head_w, depth=_count(state, "flownet.res_blocks."),
        cross=any(".crossattn." in k for k in state),
        head_heads=head_w // (4 * head_freqs.numel()) if head_freqs is not None else max(head_w // 64, 1))
    return {**cfg, **overrides}


def build_flowar(config: dict) -> Generator:
    cfg = dict(config)
    head = {k: cfg.pop(k) for k in HEAD_KEYS}
    backbone = FlowARTransformer(**cfg)
    return Generator(backbone, FlowHead(backbone.width, backbone.width, token_dim=backbone.token_dim,
                                        flow_width=head["flow_width"], depth=head["depth"],
                                        cross=head["cross"], num_heads=head["head_heads"]))


def preset_sampling(config: dict) -> dict:
    """The README's sampling settings of the release this config matches (else FlowAR-L's)."""
    for p in PRESETS.values():
        if all(config.get(k) == p[k] for k in ("width", "encoder_depth", "flow_width", "depth", "cross")):
            return dict(p["sample"], cfg_schedule="flowar")
    return dict(PRESETS["flowar_l"]["sample"], cfg_schedule="flowar")


def official_buffers(gen: Generator) -> dict[str, torch.Tensor]:
    """The release's `mask` and every `rope.freqs`, rebuilt from the schedule and the head sizes."""
    bb, net = gen.backbone, gen.head.net
    L = bb.scales.num_tokens
    out = {"mask": bb.scales.block_causal_bias().view(1, 1, L, L)}
    ar_freqs = rope_frequencies(bb.blocks[0].attn.head_dim) if len(bb.blocks) else None
    for i in range(len(bb.blocks)):
        name, j = ("encoder_blocks", i) if i < bb.encoder_depth else ("decoder_blocks", i - bb.encoder_depth)
        out[f"{name}.{j}.attn.rope.freqs"] = ar_freqs
    for i, blk in enumerate(net.res_blocks):
        head_freqs = rope_frequencies(blk.attn.head_dim)
        out[f"flownet.res_blocks.{i}.attn.rope.freqs"] = head_freqs
        if hasattr(blk, "crossattn"):
            out[f"flownet.res_blocks.{i}.crossattn.rope.freqs"] = head_freqs
    return out


# a file whose buffers differ from the rebuilt ones (another schedule or RoPE layout) is refused, not loaded
FLOWAR = register(Release(
    kind="flowar", title="FlowAR", file="FlowAR-L.pth", table=FLOWAR_TABLE, recognise=_is_flowar,
    config_from_state=flowar_config_from_state, build=build_flowar, scales_key="scales", table_for=flowar_table,
    derived=official_buffers, checked=("mask", "{rest}.rope.freqs"),
    tokenizer="kl16", compose=lambda vae, gen: DirectComposition(vae, gen.backbone.scales),
    sampling=preset_sampling, token_key="z_proj.weight"))
