"""Config -> objects. With scalegen.checks, the only place that reads the Hydra/OmegaConf tree; the modules take plain
arguments. Every node is checked (scalegen.checks) before anything is built, so an unknown key or an impossible
pairing fails at once, naming the key.
"""
from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from scalegen.checks import COMPOSITION_DERIVED, build_guard, check_generator_config, check_node
from scalegen.generators import Generator, init_var_weights
from scalegen.official import load_tokenizer_weights
from scalegen.training.module import GeneratorModule


def build_tokenizer(cfg: DictConfig, checkpoint: str | None = None):
    tokenizer = instantiate(cfg.tokenizer, _convert_="all")
    if checkpoint:
        load_tokenizer_weights(tokenizer, checkpoint)
    return tokenizer


def build_generator(cfg: DictConfig, tokenizer, num_classes: int):
    check_node(cfg.model.get("composition"), "model.composition", COMPOSITION_DERIVED, partial=True, group="composition")
    composition = instantiate(cfg.model.composition, _convert_="all")(tokenizer, list(cfg.scales))
    backbone = instantiate(cfg.backbone, num_classes=num_classes, token_dim=composition.token_dim,
                           scales=composition.scales.sizes, attention=cfg.get("attention", "auto"), _convert_="all")
    head = instantiate(cfg.head, width=backbone.width, cond_dim=backbone.width, vocab_size=composition.vocab_size,
                       token_dim=composition.token_dim, _convert_="all")
    generator = Generator(backbone, head)
    init = cfg.model.get("init")
    if init:
        init_var_weights(generator, **init)
    return generator, composition


def build_module(cfg: DictConfig, num_classes: int, tokenizer_ckpt: str | None = None):
    check_generator_config(cfg)
    tokenizer = build_tokenizer(cfg, tokenizer_ckpt)
    generator, composition = build_generator(cfg, tokenizer, num_classes)
    model = cfg.model
    return GeneratorModule(
        tokenizer, generator, composition, optimizer=instantiate(model.optimizer, _convert_="all"),
        lr_schedule=instantiate(model.lr_schedule), batch_size=cfg.data.batch_size, ema_decay=model.ema_decay,
        cond_drop_rate=model.cond_drop_rate, sample=OmegaConf.to_container(cfg.sample, resolve=True),
        config=run_config(cfg), max_nonfinite=cfg.get("max_nonfinite", 5),
        train_scales=instantiate(model.train_scales) if model.get("train_scales") is not None else None,
        activation_checkpointing=cfg.get("activation_checkpointing", False), guard=build_guard(cfg),
        compile=cfg.get("compile", False))


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config a checkpoint keeps: everything but the run-folder-bound logger and callbacks."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("logger", "callbacks")]),
                                  resolve=True)
