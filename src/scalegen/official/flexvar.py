"""FlexVAR's releases: `FlexVAE.pth` (the tokenizer, under 'model') and `FlexVARd{16,20,24}-epo*.pth` (bare, or the
trainer's `{'trainer': {'var_wo_ddp': ...}}`; both are read by `read_checkpoint`).

FlexVAE's names are LlamaGen's, which `scalegen.tokenizers.FlexVAE` keeps: its table is the identity. The
transformer's names are VAR's without the level embedding (the released FlexVARd*-epo*.pth); the stored
`attn_bias_for_masking` holds whatever schedule the trainer ran last, so it is rebuilt, never loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from scalegen.generators import Generator
from scalegen.generators.flexvar import ScaleFreeTransformer
from scalegen.heads import CategoricalHead
from scalegen.io import atomic_write, load_strict, read_checkpoint, read_meta, save_safetensors
from scalegen.official.table import Rule, convert
from scalegen.official.var import VAR_TABLE
from scalegen.schedule.direct_vq import DirectVQComposition
from scalegen.schedule.scales import VAR_256, ScaleSchedule
from scalegen.tokenizers.flexvq import FlexVAE

FLEXVAE_TABLE: list[Rule] = [("{rest}", "{rest}")]  # LlamaGen VQ-16 names on both sides

# VAR's table minus `lvl_1L` and `lvl_embed` (FlexVAR has no level embedding); `pos_1LC` is the (1, C, 32, 32) table
FLEXVAR_TABLE: list[Rule] = [r for r in VAR_TABLE if r[0] not in ("lvl_1L", "lvl_embed.{rest}")]

# sides the official sampler treats as trained; others (and sides > max_pn) are sampled greedily (flexvar.py:230)
OFFICIAL_SIDES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)
# eval_c2i.py's settings (cfg 2.5 at 256 px, top-k 900, top-p 0.95, maxpn 16) and the official CFG ramp
OFFICIAL_SAMPLE = dict(cfg=2.5, cfg_schedule="linear", top_k=900, top_p=0.95, more_smooth=False, cfg_mix="var",
                       ratio_steps=9, max_side=16, trained_sides=list(OFFICIAL_SIDES))


# ---- FlexVAE ---------------------------------------------------------------------------------------------------------


def flexvae_config_from_state(state: dict, **overrides) -> dict:
    """The tokenizer's sizes from its keys and shapes."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.conv_blocks."))
    ch_mult = tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.conv_blocks.0.res."))
    vocab, dim = state["quantize.embedding.weight"].shape
    cfg = dict(vocab_size=vocab, codebook_dim=dim, z_channels=state["quant_conv.weight"].shape[1], ch=ch, ch_mult=ch_mult,
               num_res_blocks=blocks, usage_window=state["quantize.codebook_used"].numel()
               if "quantize.codebook_used" in state else 65536)
    cfg.update(overrides)
    return cfg


def load_flexvae(state: dict, config: dict | None = None, **overrides) -> FlexVAE:
    config = config or flexvae_config_from_state(state, **overrides)
    vae = FlexVAE(**config)
    ours, _ = convert(state, FLEXVAE_TABLE)
    load_strict(vae, ours, "FlexVAE checkpoint")
    return vae.eval().requires_grad_(False)


def export_flexvae(vae: FlexVAE) -> dict:
    return convert(vae.state_dict(), FLEXVAE_TABLE, reverse=True)[0]


# ---- the FlexVAR transformer -----------------------------------------------------------------------------------------


def flexvar_config_from_state(state: dict, scales=None) -> dict:
    """The architecture from the keys and shapes; `scales` is the schedule it starts with (default: training's)."""
    _, width, grid, _ = state["pos_1LC"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    l2 = "blocks.0.attn.scale_mul_1H11" in state
    return dict(num_classes=state["class_emb.weight"].shape[0] - 1, token_dim=state["word_embed.weight"].shape[1],
                scales=ScaleSchedule.of(scales or VAR_256).sizes, depth=depth, width=width, pos_grid=grid,
                num_heads=state["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else depth,
                shared_aln="shared_ada_lin.1.weight" in state, attn_l2_norm=l2, vocab_size=state["head.weight"].shape[0])


def is_flexvar_state(state: dict) -> bool:
    """FlexVAR's position table is 2-D (1, C, grid, grid); VAR's is one row per token (1, L, C)."""
    return "pos_1LC" in state and state["pos_1LC"].ndim == 4


def build_flexvar(config: dict) -> Generator:
    cfg = dict(config)
    vocab = cfg.pop("vocab_size")
    backbone = ScaleFreeTransformer(**cfg)
    return Generator(backbone, CategoricalHead(backbone.width, backbone.width, vocab, backbone.blocks[0].norm.eps))


def load_flexvar(state: dict, config: dict | None = None, scales=None) -> Generator:
    """Official FlexVAR state dict -> scalegen Generator, strictly; the masking buffer is rebuilt from `scales`."""
    gen = build_flexvar(config or flexvar_config_from_state(state, scales))
    ours, _ = convert(state, FLEXVAR_TABLE)
    load_strict(gen, ours, "FlexVAR checkpoint")
    return gen


def export_flexvar(gen: Generator) -> dict:
    """scalegen Generator -> the official layout, with the buffers the release carries (mask of the current schedule)."""
    state, _ = convert(gen.state_dict(), FLEXVAR_TABLE, reverse=True)
    bb = gen.backbone
    state["attn_bias_for_masking"] = bb.scales.block_causal_bias().view(1, 1, bb.scales.num_tokens, -1)
    for i in range(len(bb.blocks)):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(bb.width)
    return state


# ---- files: official .pth or converted .safetensors -> a ready GeneratorModule ---------------------------------------


def _read(path: str, kind: str):
    """(state dict, config or None): a converted safetensors carries scalegen names and its config."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        meta = read_meta(path)
        if meta.get("kind") != kind:
            raise ValueError(f"{path}: not a converted {kind} checkpoint (metadata kind {meta.get('kind')!r})")
        return load_file(path), meta["config"]
    return read_checkpoint(path), None


def read_flexvar(path: str, scales=None) -> Generator:
    state, config = _read(path, "flexvar")
    if config is None:
        return load_flexvar(state, scales=scales)
    gen = build_flexvar(config)
    load_strict(gen, state, f"checkpoint {path}")
    return gen


def read_flexvae(path: str) -> FlexVAE:
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    state, config = _read(path, "flexvae")
    if config is None:
        return load_flexvae(state)
    vae = FlexVAE(**config)
    load_strict(vae, state, f"tokenizer {path}")
    return vae.eval().requires_grad_(False)


def is_flexvar_file(path: str) -> bool:
    """A FlexVAR release or its conversion; the release is memory-mapped, so asking costs no full read."""
    if path.endswith(".safetensors"):
        return read_meta(path).get("kind") == "flexvar"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) file cannot be mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("trainer", "var_wo_ddp", "state_dict", "model", "module"):  # the wrappers read_checkpoint accepts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return isinstance(obj, dict) and is_flexvar_state(obj)


def load_flexvar_release(path: str, vae_path: str | None):
    """An official FlexVAR release (or its conversion) + FlexVAE -> (tokenizer, generator, composition, the official
    sampling defaults)."""
    if vae_path is None:
        raise ValueError(f"{path} is an official FlexVAR release (or its conversion): also give the tokenizer, "
                         "e.g. vae_ckpt=/path/to/FlexVAE.pth")
    generator = read_flexvar(path)
    vae = read_flexvae(vae_path)
    composition = DirectVQComposition(vae, generator.backbone.scales.sizes)
    return vae, generator, composition, dict(OFFICIAL_SAMPLE)


# ---- the converter (python -m scalegen.official.convert flexvar|flexvae ...) -----------------------------------------


def to_scalegen(kind: str, src: str, dst: str, scales=None) -> None:
    state = read_checkpoint(src)
    if kind == "flexvar":
        config = flexvar_config_from_state(state, scales)
        model = load_flexvar(state, config)
    else:
        config = flexvae_config_from_state(state)
        model = load_flexvae(state, config)
    config = {k: [list(s) for s in v] if k == "scales" else list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    save_safetensors(model.state_dict(), dst, metadata={"kind": kind, "config": json.dumps(config)})
    print(f"{src}: {sum(p.numel() for p in model.parameters()):,} parameters -> {dst}")


def to_official(kind: str, src: str, dst: str) -> None:
    if kind == "flexvar":
        state = export_flexvar(read_flexvar(src))
    else:
        state = export_flexvae(read_flexvae(src))
    atomic_write(dst, lambda tmp: torch.save(state, tmp))
    print(f"{src} -> {dst} ({len(state)} official keys)")
