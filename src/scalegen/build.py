"""Config -> objects. The only place that reads the Hydra/OmegaConf tree; the modules take plain arguments.

Every `_target_` node is checked against its class signature before anything is built, so an unknown key or an
impossible pairing fails at once, naming the key.
"""
from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Iterable

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from scalegen.errors import ConfigError
from scalegen.generation.options import GenerateOptions
from scalegen.generators import Generator, init_var_weights
from scalegen.official import load_tokenizer_weights
from scalegen.schedule.anyscale import fixed_parts
from scalegen.schedule.residual import ResidualComposition
from scalegen.schedule.scales import ScaleSchedule
from scalegen.training.module import GeneratorModule
from scalegen.training.optim import SCHEDULES


def check_node(node: DictConfig, path: str, derived: Iterable[str] = (), *, partial: bool = False,
               derived_from: str = "the other parts (tokenizer, data, scales)", group: str | None = None) -> type:
    """The class of a `_target_` node, after checking that every key is one of its arguments.

    partial: the node must say `_partial_: true`, its `derived` arguments being given at build time;
    group: the config group that picks the node (named when something else stands in its place)."""
    if not isinstance(node, DictConfig):
        pick = f"; pick one with {group}=<name> (configs/{group}/)" if group else ""
        raise ConfigError(f"{path}: {node!r} is not a node with a `_target_`{pick}")
    if "_target_" not in node:
        raise ConfigError(f"{path}: needs a `_target_` naming the class to build")
    try:
        cls = get_class(node._target_)
    except Exception as e:  # hydra wraps import errors; keep the message, name the key
        raise ConfigError(f"{path}._target_: cannot import {node._target_!r} ({e})") from None
    params = inspect.signature(cls).parameters
    allowed = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    derived = set(derived)
    for key in node:
        if key.startswith("_"):
            continue
        if key in derived:
            raise ConfigError(f"{path}.{key}: is derived from {derived_from}; remove it")
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key for {cls.__name__}; allowed: {sorted(set(allowed) - derived)}")
    if partial and node.get("_partial_") is not True:
        raise ConfigError(f"{path}._partial_: must be true ({', '.join(sorted(derived))} are given when it is built)")
    return cls


BACKBONE_DERIVED = ("num_classes", "token_dim", "scales")
HEAD_DERIVED = ("width", "cond_dim", "vocab_size", "token_dim")
COMPOSITION_DERIVED = ("tokenizer", "scales")


def composition_name(cls: type) -> str:
    """The `composition=` choice of a composition class: configs/composition/<name>.yaml builds scalegen.schedule.<name>."""
    return cls.__module__.rsplit(".", 1)[-1]


def check_optimizer(model: DictConfig) -> None:
    """model.optimizer: a partial optimizer (its params and LR come from the module); model.lr_schedule: VAR's schedule."""
    check_node(model.get("optimizer"), "model.optimizer", ("params", "lr"), partial=True,
               derived_from="the module (VAR's no-decay groups; peak LR = model.lr_schedule.base_lr x global batch / 256)")
    check_node(model.get("lr_schedule"), "model.lr_schedule")
    if model.lr_schedule.get("kind", "lin0") not in SCHEDULES:
        raise ConfigError(f"model.lr_schedule.kind: {model.lr_schedule.kind!r} is not one of {list(SCHEDULES)}")


def check_generator_config(cfg: DictConfig) -> None:
    """Everything that can be known wrong before building: keys, pairings, scale list vs latent size."""
    tok_cls = check_node(cfg.tokenizer, "tokenizer", group="tokenizer")
    backbone_cls = check_node(cfg.backbone, "backbone", BACKBONE_DERIVED, group="backbone")
    head_cls = check_node(cfg.head, "head", HEAD_DERIVED, group="head")
    comp_cls = check_node(cfg.model.get("composition"), "model.composition", COMPOSITION_DERIVED, partial=True,
                          group="composition")
    comp = composition_name(comp_cls)
    check_optimizer(cfg.model)
    why = comp_cls.incompatible(tok_cls)  # the part interfaces are declared: scalegen.parts
    if why:
        raise ConfigError(f"model.composition={comp}: {why}")
    check_schedule_changes(cfg, backbone_cls, comp_cls)
    if head_cls.needs_discrete and not tok_cls.discrete:
        raise ConfigError(f"head={head_cls.__name__} predicts code indices, but tokenizer={tok_cls.__name__} is continuous: "
                          "use a VQ tokenizer or a flow head")
    comp_discrete = comp_cls.discrete
    if head_cls.needs_discrete and not comp_discrete:
        raise ConfigError(f"model.composition={comp} gives continuous latents, but head={head_cls.__name__} predicts code "
                          "indices: use composition=residual with a VQ tokenizer, or a flow head")
    if not head_cls.needs_discrete and comp_discrete:
        raise ConfigError(f"model.composition={comp} gives code indices, but head={head_cls.__name__} regresses continuous "
                          "latents: use composition=direct")
    check_sampling(cfg, head_cls)
    build_guard(cfg)
    residual = issubclass(comp_cls, ResidualComposition)
    if residual and not tok_cls.residual:
        raise ConfigError(f"model.composition={comp} needs a residual multi-scale quantizer; {tok_cls.__name__} has none: "
                          "use composition=direct_vq (VQ) or composition=direct (continuous)")
    tok_scales = cfg.tokenizer.get("v_patch_nums")
    if residual and tok_scales is not None and list(tok_scales) != list(cfg.scales):
        raise ConfigError(f"scales {list(cfg.scales)} differ from tokenizer.v_patch_nums {list(tok_scales)}: residual "
                          "(VAR) tokens are defined by the quantizer's schedule, so generate with the schedule it was trained on")
    if cfg.data.get("image_size") is not None:
        down = 2 ** (len(cfg.tokenizer.get("ch_mult", (1, 1, 2, 2, 4))) - 1)
        latent = cfg.data.image_size // down
        last = cfg.scales[-1]
        last = (last, last) if isinstance(last, int) else tuple(last)
        if last != (latent, latent):
            raise ConfigError(f"scales: the last scale {last} must equal the latent size {latent}x{latent} "
                              f"(data.image_size {cfg.data.image_size} / tokenizer downsampling {down})")


RUN_SAMPLE_KEYS = ("per_class", "seed")  # the `sample` keys of the run itself, not options of generation


def check_sampling(cfg: DictConfig, head_cls: type) -> None:
    """The head's sampling defaults (head.num_steps, ...) and every sampling option of the run (sample.*), built as
    the typed options they become, so an unknown key or a value that cannot work fails now, naming it."""
    own = [f.name for f in fields(head_cls.options_type)]
    head_cls.options_type.checked({k: cfg.head[k] for k in own if cfg.head.get(k) is not None}, "head.")
    sample = {k: v for k, v in (cfg.get("sample") or {}).items() if k not in RUN_SAMPLE_KEYS}
    try:
        GenerateOptions.of(head_cls, sample)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sample.{e}") from None


def check_schedule_changes(cfg: DictConfig, backbone_cls: type, composition_cls: type) -> None:
    """Random training schedules (model.train_scales) and another list at generation (sample.scales) need parts
    that can change their schedule (scalegen.schedule.anyscale); VAR's residual tokens and per-token positions cannot."""
    train_scales = cfg.model.get("train_scales")
    if train_scales is not None:
        check_node(train_scales, "model.train_scales")
    sample_scales = (cfg.get("sample") or {}).get("scales")
    changes = sample_scales is not None and ScaleSchedule.of(sample_scales) != ScaleSchedule.of(cfg.scales)
    for key, asked in (("model.train_scales", train_scales is not None), ("sample.scales", changes)):
        fixed = fixed_parts(backbone_cls, composition_cls) if asked else []
        if fixed:
            raise ConfigError(f"{key}: this model runs only on the scales it was built with (scales); " + "; ".join(fixed))


def build_guard(cfg: DictConfig):
    """The step guard (`guard`: outlier loss / gradient norm checks), checked key by key; None when `guard: null`."""
    node = cfg.get("guard")
    if node is None:
        return None
    check_node(node, "guard")
    try:
        return instantiate(node, _convert_="all")
    except Exception as e:  # hydra wraps the constructor's ValueError; keep its message, name the node
        cause = e.__cause__ if isinstance(e.__cause__, ValueError) else e
        raise ConfigError(f"guard.{cause}") from None


def build_tokenizer(cfg: DictConfig, checkpoint: str | None = None):
    tokenizer = instantiate(cfg.tokenizer, _convert_="all")
    if checkpoint:
        load_tokenizer_weights(tokenizer, checkpoint)
    return tokenizer


def build_generator(cfg: DictConfig, tokenizer, num_classes: int):
    check_node(cfg.model.get("composition"), "model.composition", COMPOSITION_DERIVED, partial=True, group="composition")
    composition = instantiate(cfg.model.composition, _convert_="all")(tokenizer, list(cfg.scales))
    backbone = instantiate(cfg.backbone, num_classes=num_classes, token_dim=composition.token_dim,
                           scales=composition.scales.sizes, _convert_="all")
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
        activation_checkpointing=cfg.get("activation_checkpointing", False), guard=build_guard(cfg))


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config a checkpoint keeps: everything but the run-folder-bound logger and callbacks."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("logger", "callbacks")]),
                                  resolve=True)
