"""Load a ready-to-sample generator from a scalegen checkpoint or an official release (`from_pretrained`)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from scalegen.build import build_generator, build_tokenizer
from scalegen.generators.attention import check_attention_path
from scalegen.hub import resolve
from scalegen.io import load_lightning_checkpoint, load_strict
from scalegen.official import load_pretrained
from scalegen.official.registry import UNREADABLE, not_a_checkpoint, recognise
from scalegen.training.module import GeneratorModule


def load_generator(path: str, vae_path: str | None = None, device: str | torch.device = "cpu", attention: str = "auto"):
    """A `GeneratorModule` in eval mode.

    `path` is a scalegen training checkpoint (`.ckpt`, which carries its config and tokenizer), or an official
    release or its conversion (`scalegen.official.convert`), recognised by its keys or metadata: VAR's `var_d16.pth`,
    M-VAR's `d16.pth`, FlexVAR's `FlexVARd16-epo179.pth`, FlowAR's `FlowAR-L.pth`. Then `vae_path` names the
    tokenizer release it pairs with (`vae_ch160v4096z32.pth`, `FlexVAE.pth`, `kl16.ckpt`), and the module samples
    with the release's official defaults. Either may be `hf://<owner>/<repo>/<file>` or a release name
    (`var_d16`, `vae_var`; `scalegen.hub.HUB_FILES`). `attention` (auto | dense | flex) is the path of a teacher-forced
    pass on this machine (the training run's choice was its own machine's); sampling runs without a mask on any path.
    """
    path, vae_path = resolve(path, "ckpt"), resolve(vae_path, "vae_ckpt")  # Hub ids and release names (official.hub)
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = _training_checkpoint(path) if str(path).endswith(".ckpt") else None
    if ckpt is not None:
        cfg = OmegaConf.create(ckpt["scalegen_config"])
        state = ckpt["state_dict"]
        num_classes = state["generator.backbone.class_emb.weight"].shape[0] - 1
        tokenizer = build_tokenizer(cfg)
        generator, composition = build_generator(cfg, tokenizer, num_classes)
        module = GeneratorModule(tokenizer, generator, composition, ema_decay=cfg.model.ema_decay,
                                 sample=OmegaConf.to_container(cfg.sample), config=ckpt["scalegen_config"])
        load_strict(module, state, f"checkpoint {path}")
    else:
        release = load_pretrained(str(path), None if vae_path is None else str(vae_path))
        module = GeneratorModule(release.tokenizer, release.generator, release.composition, ema_decay=None,
                                 sample=release.sample)
    for generator in (module.generator, module.ema):
        if generator is not None:
            generator.backbone.attention = check_attention_path(attention)
    return module.to(device).eval()


def _training_checkpoint(path) -> dict | None:
    """A scalegen training checkpoint; None for an official release saved as .ckpt (MAR's kl16.ckpt), which
    `load_pretrained` then names (a tokenizer release is refused there: pass it as vae_ckpt)."""
    try:
        return load_lightning_checkpoint(path)
    except UNREADABLE as e:
        raise ValueError(not_a_checkpoint(path, e)) from None
    except ValueError as e:  # readable, but holds no run config
        try:
            recognise(path)
        except ValueError:
            raise e from None
        return None
