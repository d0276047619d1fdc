"""Load a ready-to-sample generator from a scalegen checkpoint or an official release (`from_pretrained`)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from scalegen.build import build_generator, build_tokenizer
from scalegen.io import load_lightning_checkpoint, load_strict, read_checkpoint, read_meta
from scalegen.official.flexvar import is_flexvar_file, load_flexvar_release
from scalegen.official.flowar import load_flowar_release
from scalegen.official.mvar import build_mvar, load_mvar
from scalegen.official.var import build_var, load_vae, load_var
from scalegen.schedule.residual import ResidualComposition
from scalegen.tokenizers import MultiScaleVQVAE
from scalegen.training.module import GeneratorModule


def load_generator(path: str, vae_path: str | None = None, device: str | torch.device = "cpu"):
    """A `GeneratorModule` in eval mode.

    `path` is a scalegen training checkpoint (`.ckpt`, which carries its config and tokenizer) or an official VAR
    release (`var_d16.pth`; then `vae_path` names the official `vae_ch160v4096z32.pth`); M-VAR releases (`d16.pth`
    of OliverRen/M-VAR, which use the same tokenizer) and their conversions are recognised by their keys, as are
    FlexVAR's (`FlexVARd16-epo179.pth` with `vae_path` = `FlexVAE.pth`).
    """

    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if str(path).endswith(".ckpt"):
        ckpt = load_lightning_checkpoint(path)
        cfg = OmegaConf.create(ckpt["scalegen_config"])
        state = ckpt["state_dict"]
        num_classes = state["generator.backbone.class_emb.weight"].shape[0] - 1
        tokenizer = build_tokenizer(cfg)
        generator, composition = build_generator(cfg, tokenizer, num_classes)
        module = GeneratorModule(tokenizer, generator, composition, ema_decay=cfg.model.ema_decay,
                                 sample=OmegaConf.to_container(cfg.sample), config=ckpt["scalegen_config"])
        load_strict(module, state, f"checkpoint {path}")
    elif _is_flexvar(str(path)):  # FlexVAR release or conversion: FlexVAE tokenizer, official sampling defaults
        tokenizer, generator, composition, sample = load_flexvar_release(str(path), None if vae_path is None else str(vae_path))
        module = GeneratorModule(tokenizer, generator, composition, ema_decay=None, sample=sample)
    elif (flowar := _load_official_flowar(str(path), vae_path)) is not None:  # FlowAR-{S,L,H}.pth + kl16.ckpt
        tokenizer, generator, composition, sample = flowar  # sampling defaults: the release's README settings
        module = GeneratorModule(tokenizer, generator, composition, ema_decay=None, sample=sample)
    else:
        if vae_path is None:
            raise ValueError(f"{path} is an official VAR release (or its conversion): also give the tokenizer, "
                             "e.g. vae_ckpt=/path/to/vae_ch160v4096z32.pth")
        generator = _load_official_var(str(path))
        vae = _load_official_vae(str(vae_path), generator.backbone.scales.sizes)
        module = GeneratorModule(vae, generator, ResidualComposition(vae), ema_decay=None)
    return module.to(device).eval()


def _load_official_flowar(path: str, vae_path):
    """(tokenizer, generator, composition, sampling defaults) of an official FlowAR release; None for other files."""
    return load_flowar_release(path, None if vae_path is None else str(vae_path))


def _is_flexvar(path: str) -> bool:
    return is_flexvar_file(path)


def _load_official_var(path: str):
    if path.endswith(".safetensors"):  # written by scalegen.official.convert: scalegen names + config metadata
        from safetensors.torch import load_file
        meta = read_meta(path)
        if meta.get("kind") not in ("var", "mvar"):
            raise ValueError(f"{path}: not a converted VAR or M-VAR checkpoint (metadata kind {meta.get('kind')!r})")
        generator = (build_mvar if meta["kind"] == "mvar" else build_var)(meta["config"])
        load_strict(generator, load_file(path), f"checkpoint {path}")
        return generator
    state = read_checkpoint(path)
    if "blocks.0.mamba.A_log" in state:  # an M-VAR release (OliverRen/M-VAR): VAR's keys plus a Mamba2 per block
        return load_mvar(state)
    return load_var(state)


def _load_official_vae(path: str, scales):
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        meta = read_meta(path)
        vae = MultiScaleVQVAE(**{**meta.get("config", {}), "v_patch_nums": scales})
        load_strict(vae, load_file(path), f"tokenizer {path}")
        return vae.eval().requires_grad_(False)
    return load_vae(read_checkpoint(path), v_patch_nums=scales)
