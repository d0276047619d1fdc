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
from scalegen.io import atomic_write, load_strict, read_checkpoint, read_meta, save_safetensors
from scalegen.official.kl16 import export_kl, kl_config_from_state, load_kl
from scalegen.official.table import Rule, convert
from scalegen.schedule.direct import DirectComposition
from scalegen.schedule.scales import ScaleSchedule, doubling
from scalegen.tokenizers.kl import AutoencoderKL

FLOWAR_TABLE: list[Rule] = [
    ("mask", None),  # the block-causal mask, rebuilt from the schedule
    ("{rest}.rope.freqs", None),  # RoPE inverse frequencies, rebuilt from the head size
    ("encoder_pos_embed_learned", "backbone.enc_pos"),
    ("decoder_pos_embed_learned", "backbone.dec_pos"),
    ("diffusion_pos_embed_learned", "backbone.head_pos"),
    ("flownet.{rest}", "head.net.{rest}"),  # the flow head keeps the official names inside
    # both stacks are one `blocks` list: decoder block i is block encoder_depth + i (renumbered by _join/_split_stacks)
    ("encoder_blocks.{i}.{rest}", "backbone.blocks.{i}.{rest}"),
    ("{rest}", "backbone.{rest}"),  # class_emb, z_proj, z_proj_ln, encoder_norm, decoder_embed, decoder_norm
]


def _join_stacks(state: dict, encoder_depth: int) -> dict:
    """Official names -> one numbering: decoder_blocks.i becomes encoder_blocks.(encoder_depth + i)."""
    out = {}
    for k, v in state.items():
        if k.startswith("decoder_blocks."):
            i, rest = k[len("decoder_blocks."):].split(".", 1)
            k = f"encoder_blocks.{int(i) + encoder_depth}.{rest}"
        out[k] = v
    return out


def _split_stacks(state: dict, encoder_depth: int) -> dict:
    """The inverse of _join_stacks."""
    out = {}
    for k, v in state.items():
        if k.startswith("encoder_blocks."):
            i, rest = k[len("encoder_blocks."):].split(".", 1)
            if int(i) >= encoder_depth:
                k = f"decoder_blocks.{int(i) - encoder_depth}.{rest}"
        out[k] = v
    return out

# the released sizes (flowar.py:428-449) and their README/eval.sh sampling settings
PRESETS = {
    "flowar_s": dict(width=768, encoder_depth=6, decoder_depth=6, num_heads=12, flow_width=1024, depth=2, cross=False,
                     sample=dict(cfg=4.3, num_steps=25, guidance=0.9)),
    "flowar_l": dict(width=1024, encoder_depth=8, decoder_depth=8, num_heads=16, flow_width=1024, depth=12, cross=True,
                     sample=dict(cfg=2.4, num_steps=25, guidance=0.9)),
    "flowar_h": dict(width=1536, encoder_depth=15, decoder_depth=15, num_heads=16, flow_width=1536, depth=12, cross=True,
                     sample=dict(cfg=2.4, num_steps=50, guidance=0.7)),
}
HEAD_KEYS = ("flow_width", "depth", "cross", "head_heads")


def is_flowar_state(state: dict) -> bool:
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


def flowar_config_from_state(state: dict, scales=None) -> dict:
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
    return dict(
        num_classes=state["class_emb.weight"].shape[0] - 1, token_dim=state["z_proj.weight"].shape[1],
        scales=scales.sizes, width=width, encoder_depth=_count(state, "encoder_blocks."),
        decoder_depth=_count(state, "decoder_blocks."), num_heads=heads,
        flow_width=head_w, depth=_count(state, "flownet.res_blocks."),
        cross=any(".crossattn." in k for k in state),
        head_heads=head_w // (4 * head_freqs.numel()) if head_freqs is not None else max(head_w // 64, 1))


def build_flowar(config: dict) -> Generator:
    cfg = dict(config)
    head = {k: cfg.pop(k) for k in HEAD_KEYS}
    backbone = FlowARTransformer(**cfg)
    return Generator(backbone, FlowHead(backbone.width, backbone.width, token_dim=backbone.token_dim,
                                        scales=backbone.scales.sizes, flow_width=head["flow_width"], depth=head["depth"],
                                        cross=head["cross"], num_heads=head["head_heads"]))


def preset_sampling(config: dict) -> dict:
    """The README's sampling settings of the release this config matches (else FlowAR-L's)."""
    for p in PRESETS.values():
        if all(config.get(k) == p[k] for k in ("width", "encoder_depth", "flow_width", "depth", "cross")):
            return dict(p["sample"], cfg_schedule="flowar")
    return dict(PRESETS["flowar_l"]["sample"], cfg_schedule="flowar")


def _official_buffers(gen: Generator) -> dict[str, torch.Tensor]:
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


def load_flowar(state: dict, config: dict | None = None, **overrides) -> Generator:
    """Official FlowAR state dict -> scalegen Generator, strictly; the rebuilt buffers must equal the file's."""
    config = config or {**flowar_config_from_state(state), **overrides}
    gen = build_flowar(config)
    ours, dropped = convert(_join_stacks(state, config["encoder_depth"]), FLOWAR_TABLE)
    rebuilt = _official_buffers(gen)
    for key in dropped:
        key = _split_stacks({key: None}, config["encoder_depth"]).popitem()[0]
        if key not in rebuilt or rebuilt[key].shape != state[key].shape or not torch.equal(rebuilt[key], state[key].float()):
            raise ValueError(f"buffer {key!r} of the checkpoint differs from the one rebuilt for scales "
                             f"{gen.backbone.scales.sizes} (another schedule or RoPE layout?)")
    load_strict(gen, ours, "FlowAR checkpoint")
    return gen


def export_flowar(gen: Generator) -> dict:
    """scalegen Generator -> the official flat state dict (with `mask` and every `rope.freqs`), loadable strictly."""
    state, _ = convert(gen.state_dict(), FLOWAR_TABLE, reverse=True)
    state = _split_stacks(state, gen.backbone.encoder_depth)
    state.update(_official_buffers(gen))
    return state


def read_flowar_release(path: str) -> dict | None:
    """The state dict of an official FlowAR file (memory-mapped), or None if the file holds another model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError):  # not a zip-format file: load it plainly
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state if isinstance(state, dict) and is_flowar_state(state) else None


def _load_kl_file(path: str):

    if path.endswith(".safetensors"):  # converted by `convert kl16`: scalegen names + config metadata
        from safetensors.torch import load_file

        vae = AutoencoderKL(**read_meta(path)["config"])
        load_strict(vae, load_file(path), f"tokenizer {path}")
        return vae.eval().requires_grad_(False)
    return load_kl(read_checkpoint(path))


def load_flowar_release(path: str, vae_path: str | None):
    """FlowAR-{S,L,H}.pth (or its `convert flowar` safetensors) + MAR's kl16.ckpt -> (tokenizer, generator,
    composition, sampling defaults); None when `path` holds another model. The VAE's latent channels must be
    what the generator's z_proj reads."""
    from pathlib import Path


    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        meta = read_meta(path)
        if meta.get("kind") != "flowar":
            return None
        config = meta["config"]
        generator = build_flowar(config)
        load_strict(generator, load_file(path), f"checkpoint {path}")
    else:
        state = read_flowar_release(path)
        if state is None:
            return None
        config = flowar_config_from_state(state)
        generator = load_flowar(state, config)
    if vae_path is None:
        raise ValueError(f"{path} is an official FlowAR release: also give its tokenizer, vae_ckpt=/path/to/kl16.ckpt")
    if not Path(vae_path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {vae_path}")
    vae = _load_kl_file(vae_path)
    if vae.latent_channels != config["token_dim"]:
        raise ValueError(f"vae_ckpt: the KL VAE's latent has {vae.latent_channels} channels, but {path} reads "
                         f"{config['token_dim']} (z_proj.weight): give the tokenizer the model was trained with")
    return vae, generator, DirectComposition(vae, generator.backbone.scales), preset_sampling(config)


# -- the converter's `flowar` and `kl16` kinds (python -m scalegen.official.convert) ----------------------------------
def to_scalegen(kind: str, src: str, dst: str, scales=None) -> None:
    import json


    state = read_checkpoint(src)
    if kind == "flowar":
        config = flowar_config_from_state(state, scales)
        model = load_flowar(state, config)
    else:
        config = kl_config_from_state(state)
        model = load_kl(state, config)
    config = {k: [list(s) for s in v] if k == "scales" else (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    save_safetensors(model.state_dict(), dst, metadata={"kind": kind, "config": json.dumps(config)})
    print(f"{src}: {sum(p.numel() for p in model.parameters()):,} parameters -> {dst}")


def to_official(kind: str, src: str, dst: str) -> None:
    from safetensors.torch import load_file


    meta = read_meta(src)
    if meta.get("kind") != kind:
        raise ValueError(f"{src} holds kind {meta.get('kind')!r}, not {kind!r}")
    if kind == "flowar":
        model = build_flowar(meta["config"])
        load_strict(model, load_file(src), f"checkpoint {src}")
        out = export_flowar(model)  # flat, as FlowAR-*.pth
    else:
        model = AutoencoderKL(**meta["config"])
        load_strict(model, load_file(src), f"checkpoint {src}")
        out = {"model": export_kl(model)}  # MAR's loader reads ["model"]
    atomic_write(dst, lambda tmp: torch.save(out, tmp))
    print(f"{src} -> {dst}")
