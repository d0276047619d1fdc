"""Load a ready-to-sample generator from a scalegen checkpoint or an official release (`from_pretrained`)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoints import load_lightning_checkpoint
from .composition import ResidualComposition
from .official.table import load_strict, read_checkpoint


def load_generator(path: str, vae_path: str | None = None, device: str | torch.device = "cpu"):
    """A `GeneratorModule` in eval mode.

    `path` is a scalegen training checkpoint (`.ckpt`, which carries its config and tokenizer) or an official VAR
    release (`var_d16.pth`; then `vae_path` names the official `vae_ch160v4096z32.pth`).
    """
    from .build import build_generator, build_tokenizer
    from .module import GeneratorModule

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
    else:
        if vae_path is None:
            raise ValueError(f"{path} is an official VAR release (or its conversion): also give the tokenizer, "
                             "e.g. vae_ckpt=/path/to/vae_ch160v4096z32.pth")
        generator = _load_official_var(str(path))
        vae = _load_official_vae(str(vae_path), generator.backbone.scales.sizes)
        module = GeneratorModule(vae, generator, ResidualComposition(vae), ema_decay=None)
    return module.to(device).eval()


def _load_official_var(path: str):
    from .official.var import build_var, load_var
    if path.endswith(".safetensors"):  # written by scalegen.official.convert: scalegen names + config metadata
        from safetensors.torch import load_file
        from .official.convert import read_meta
        meta = read_meta(path)
        if meta.get("kind") != "var":
            raise ValueError(f"{path}: not a converted VAR checkpoint (metadata kind {meta.get('kind')!r})")
        generator = build_var(meta["config"])
        load_strict(generator, load_file(path), f"checkpoint {path}")
        return generator
    return load_var(read_checkpoint(path))


def _load_official_vae(path: str, scales):
    from .official.var import load_vae
    from .tokenizers import MultiScaleVQVAE
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        from .official.convert import read_meta
        meta = read_meta(path)
        vae = MultiScaleVQVAE(**{**meta.get("config", {}), "v_patch_nums": scales})
        load_strict(vae, load_file(path), f"tokenizer {path}")
        return vae.eval().requires_grad_(False)
    return load_vae(read_checkpoint(path), v_patch_nums=scales)
