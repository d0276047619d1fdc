"""Config checks: every refusal that must come before any compute. Each `_target_` node is checked against its class
signature, and each run key, budget, attention path, optimizer, sampling setting and pairing of parts against what
can run, so an unknown key or an impossible combination fails at once, naming the key and the fix.
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from typing import Iterable, Literal, Union

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from scalegen.errors import ConfigError
from scalegen.generation.options import GenerateOptions
from scalegen.generators import init_var_weights
from scalegen.generators.attention import ATTENTION_PATHS, flex_unavailable
from scalegen.scaleout.distributed import compiler_problem
from scalegen.schedule.anyscale import fixed_parts
from scalegen.schedule.residual import ResidualComposition
from scalegen.schedule.scales import ScaleSchedule
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


BACKBONE_DERIVED = ("num_classes", "token_dim", "scales", "attention")
HEAD_DERIVED = ("width", "cond_dim", "vocab_size", "token_dim")
COMPOSITION_DERIVED = ("tokenizer", "scales")


# the top-level keys a run reads; `extra` is the free namespace for your own keys (sweep tags, notes), read by nothing
RUN_KEYS = ("data", "tokenizer", "backbone", "head", "model", "trainer", "logger", "callbacks", "scales", "task", "seed",
            "tokenizer_ckpt", "init_from", "resume", "resume_changes", "max_nonfinite", "guard", "activation_checkpointing",
            "attention", "compile", "budget", "tokenizer_training",
            "sample", "hydra", "output_dir", "extra")
MODEL_KEYS = ("name", "cond_drop_rate", "ema_decay", "init", "optimizer", "lr_schedule", "composition", "train_scales")
TRAINER_DERIVED = ("default_root_dir", "callbacks", "plugins", "logger")


def _unknown(node, path: str, allowed: Iterable[str], hint: str = "") -> None:
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{path}{key}: unknown key; allowed: {sorted(allowed)}{hint}")


def _integer(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_run_config(cfg: DictConfig) -> None:
    """Every node a run consumes is strict (`+key` additions included) and its numbers are in range, before any
    compute: the top level, model, trainer (keys and types), data.batch_size, tokenizer_training, logger and callbacks
    (the data node's keys: train.py checks them, as `data` may be swapped for a dataset-less check)."""
    _unknown(cfg, "", RUN_KEYS, "; put your own keys under `extra:`")
    _unknown(cfg.model, "model.", MODEL_KEYS)
    if cfg.model.get("init"):
        _unknown(cfg.model.init, "model.init.", list(inspect.signature(init_var_weights).parameters)[1:])
    rate = cfg.model.get("cond_drop_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"model.cond_drop_rate: {rate!r} is not a probability in [0, 1] (the share of labels "
                          "replaced by the null class)")
    decay = cfg.model.get("ema_decay")
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0):
        raise ConfigError(f"model.ema_decay: {decay!r} must be in [0, 1) (e.g. 0.9999), or null (0 too) for no EMA")
    if "batch_size" in cfg.data and not _integer(cfg.data.batch_size, 1):
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size!r} must be an integer >= 1 (images per device)")
    if not _integer(cfg.get("max_nonfinite", 5), 1):
        raise ConfigError(f"max_nonfinite: {cfg.max_nonfinite!r} must be an integer >= 1")
    check_trainer(cfg.trainer)
    check_budget(cfg)
    if cfg.get("tokenizer_training") is not None:
        module = get_class("scalegen.tokenizers.train.TokenizerModule")
        _unknown(cfg.tokenizer_training, "tokenizer_training.",
                 ["max_steps", *list(inspect.signature(module).parameters)[1:]])
    for group in ("logger", "callbacks"):
        for name, node in (cfg.get(group) or {}).items():
            if node is not None:
                check_node(node, f"{group}.{name}")


BUDGET_KINDS = ("steps", "images", "flops", "time")  # what `budget.value` counts (commands/train.py derives max_steps)
BUDGET_UNITS = {"steps": "optimizer steps", "images": "training images seen, all devices",
                "flops": "training FLOPs", "time": "seconds of training"}
BUDGET_EXAMPLES = {"steps": "1000", "images": "1e6", "flops": "1e15", "time": "3600"}


def check_budget(cfg: DictConfig) -> None:
    """budget: {kind, value}; a kind other than steps needs a positive value; the generator's training only."""
    node = cfg.get("budget")
    if node is None:
        return
    _unknown(node, "budget.", ("kind", "value"))
    kind, value = node.get("kind", "steps"), node.get("value")
    if kind not in BUDGET_KINDS:
        raise ConfigError(f"budget.kind: {kind!r} is not one of {list(BUDGET_KINDS)}")
    if cfg.get("task") == "tokenizer" and (kind != "steps" or value is not None):
        raise ConfigError(f"budget.kind={kind} budget.value={value}: a budget sets the generator's training; "
                          "task=tokenizer trains for tokenizer_training.max_steps (set that, with budget.kind=steps "
                          "budget.value=null)")
    if value is None:
        if kind != "steps":
            raise ConfigError(f"budget.value: budget.kind={kind} needs a value ({BUDGET_UNITS[kind]}), e.g. "
                              f"budget.value={BUDGET_EXAMPLES[kind]}")
        return
    if kind == "steps" and not _integer(value, 1):
        raise ConfigError(f"budget.value: {value!r} must be an integer >= 1 (optimizer steps), or null for "
                          "trainer.max_steps")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"budget.value: {value!r} must be a number > 0 ({BUDGET_UNITS[kind]})")


def check_trainer(node: DictConfig) -> None:
    """trainer: the keys of lightning.Trainer, each of the type its signature declares (`max_steps=abc` fails
    here, not inside the Trainer after the data and model are built)."""
    cls = check_node(node, "trainer", TRAINER_DERIVED, group="trainer",
                     derived_from="the run (run folder, callbacks and logger groups, cluster plugins)")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: the keys are still checked
        return
    for key in node:
        if key.startswith("_") or key not in hints or OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if not _fits(value, hints[key]):
            raise ConfigError(f"trainer.{key}: {value!r} is not of type {_type_name(hints[key])}")


def _fits(value, hint) -> bool:
    """Whether a config value can be of type `hint`; a type it cannot judge (a class, a callable) passes."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence, Iterable) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) or OmegaConf.is_dict(value)
    return True


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, Literal):
        return " or ".join(_type_name(a) if typing.get_origin(hint) is Union else repr(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def composition_name(cls: type) -> str:
    """The `composition=` choice of a composition class: configs/composition/<name>.yaml builds scalegen.schedule.<name>."""
    return cls.__module__.rsplit(".", 1)[-1]


def check_attention(cfg: DictConfig) -> None:
    """attention: auto | dense | flex; flex only where FlexAttention can train (on the trainer's accelerator, without
    attention dropout), else refused now with the reason."""
    path = cfg.get("attention", "auto")
    if path not in ATTENTION_PATHS:
        raise ConfigError(f"attention: {path!r} is not one of {' | '.join(ATTENTION_PATHS)} (auto: FlexAttention where "
                          "it runs, else the dense mask)")
    if path != "flex":
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        accelerator = "cuda"
    elif accelerator == "auto":
        accelerator = "cpu"
    why = flex_unavailable(accelerator, float(cfg.backbone.get("attn_drop_rate") or 0.0))
    if why:
        raise ConfigError(f"attention=flex: {why} (trainer.accelerator={cfg.trainer.get('accelerator', 'auto')}, "
                          f"backbone.attn_drop_rate={cfg.backbone.get('attn_drop_rate', 0.0)}); use attention=dense, "
                          "or attention=auto (FlexAttention where it runs, else dense)")


def check_optimizer(model: DictConfig) -> None:
    """model.optimizer: a partial optimizer (its params and LR come from the module); model.lr_schedule: VAR's schedule."""
    check_node(model.get("optimizer"), "model.optimizer", ("params", "lr"), partial=True,
               derived_from="the module (VAR's no-decay groups; peak LR = model.lr_schedule.base_lr x global batch / 256)")
    check_node(model.get("lr_schedule"), "model.lr_schedule")
    if model.lr_schedule.get("kind", "lin0") not in SCHEDULES:
        raise ConfigError(f"model.lr_schedule.kind: {model.lr_schedule.kind!r} is not one of {list(SCHEDULES)}")


def check_generator_config(cfg: DictConfig) -> None:
    """Everything that can be known wrong before building: keys, ranges, pairings, scale list vs latent size."""
    check_run_config(cfg)
    tok_cls = check_node(cfg.tokenizer, "tokenizer", group="tokenizer")
    backbone_cls = check_node(cfg.backbone, "backbone", BACKBONE_DERIVED, group="backbone",
                              derived_from="the other parts (tokenizer, data, scales) and the run (attention)")
    check_attention(cfg)
    head_cls = check_node(cfg.head, "head", HEAD_DERIVED, group="head")
    comp_cls = check_node(cfg.model.get("composition"), "model.composition", COMPOSITION_DERIVED, partial=True,
                          group="composition")
    comp = composition_name(comp_cls)
    check_optimizer(cfg.model)
    fix = pairing_fix(tok_cls, head_cls, random_schedule=cfg.model.get("train_scales") is not None)
    why = comp_cls.incompatible(tok_cls)  # the part interfaces are declared: scalegen.parts
    if why:
        raise ConfigError(f"model.composition={comp}: {why}; {fix}")
    check_schedule_changes(cfg, backbone_cls, comp_cls)
    if head_cls.needs_discrete and not tok_cls.discrete:
        raise ConfigError(f"head={head_cls.__name__} predicts code indices, but tokenizer={tok_cls.__name__} is continuous; "
                          f"{fix}")
    comp_discrete = comp_cls.discrete
    if head_cls.needs_discrete and not comp_discrete:
        raise ConfigError(f"model.composition={comp} gives continuous latents, but head={head_cls.__name__} predicts code "
                          f"indices; {fix}")
    if not head_cls.needs_discrete and comp_discrete:
        raise ConfigError(f"model.composition={comp} gives code indices, but head={head_cls.__name__} regresses continuous "
                          f"latents; {fix}")
    check_sampling(cfg, head_cls)
    build_guard(cfg)
    check_compile(cfg)
    residual = issubclass(comp_cls, ResidualComposition)
    if residual and not tok_cls.residual:
        raise ConfigError(f"model.composition={comp} needs a residual multi-scale quantizer; {tok_cls.__name__} has none; "
                          f"{fix}")
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


# the tokenizer configs of each kind, digits first (configs/tokenizer/)
TOKENIZERS = {"residual": "msvq_digits (or msvq_var)", "single-scale VQ": "flexvae_digits (or flexvae)",
              "continuous": "kl_digits (or kl16)"}


def pairing_fix(tok_cls: type, head_cls: type, random_schedule: bool = False) -> str:
    """The overrides that make a tokenizer and a head compose (named in every pairing refusal): a categorical head
    needs code indices (a residual quantizer with composition=residual, a single-scale VQ with direct_vq), a flow
    head regresses latents (composition=direct, any tokenizer). With a random schedule per step (FlexVAR's
    model.train_scales), the residual composition, tied to its schedule, also needs model.train_scales=null."""
    flow = "head=flow with composition=direct"
    residual = "composition=residual" + (" model.train_scales=null" if random_schedule else "")
    if not head_cls.needs_discrete:
        return "use composition=direct (any tokenizer's latent)"
    if tok_cls.residual:
        return f"use {residual}, or {flow}"
    if tok_cls.discrete:
        return f"use composition=direct_vq, or {flow}"
    return (f"use tokenizer={TOKENIZERS['residual']} with {residual}, tokenizer={TOKENIZERS['single-scale VQ']} "
            f"with composition=direct_vq, or {flow}")


RUN_SAMPLE_KEYS = ("per_class", "seed")  # the `sample` keys of the run itself, not options of generation


def check_sampling(cfg: DictConfig, head_cls: type) -> None:
    """The head's sampling defaults (head.num_steps, ...) and every sampling option of the run (sample.*), built as
    the typed options they become, so an unknown key or a value that cannot work fails now, naming it."""
    own = [f.name for f in fields(head_cls.options_type)]
    defaults = head_cls.options_type.checked({k: cfg.head[k] for k in own if cfg.head.get(k) is not None}, "head.")
    vocab = cfg.tokenizer.get("vocab_size") if head_cls.needs_discrete else None
    if isinstance(vocab, int):
        try:
            defaults.check_vocabulary(vocab)
        except ValueError as e:
            raise ConfigError(f"head.{e}") from None
    run_sample = cfg.get("sample") or {}
    per_class, seed = run_sample.get("per_class", 1), run_sample.get("seed", 0)
    if not (isinstance(per_class, int) and not isinstance(per_class, bool) and per_class >= 1):
        raise ConfigError(f"sample.per_class: {per_class!r} must be an integer >= 1 (images per class in the grids)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"sample.seed: {seed!r} must be an integer")
    sample = {k: v for k, v in run_sample.items() if k not in RUN_SAMPLE_KEYS}
    try:
        GenerateOptions.of(head_cls, sample, vocab_size=vocab if isinstance(vocab, int) else None)
    except ConfigError as e:
        raise ConfigError(f"sample.{e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sample.{e}") from None


def check_schedule_changes(cfg: DictConfig, backbone_cls: type, composition_cls: type) -> None:
    """Random training schedules (model.train_scales) and another list at generation (sample.scales) need parts
    that can change their schedule (scalegen.schedule.anyscale); VAR's residual tokens and per-token positions cannot."""
    train_scales = cfg.model.get("train_scales")
    if train_scales is not None:
        check_node(train_scales, "model.train_scales")
    sample_scales = (cfg.get("sample") or {}).get("scales")
    try:
        changes = sample_scales is not None and ScaleSchedule.of(sample_scales) != ScaleSchedule.of(cfg.scales)
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"sample.scales: {e} (a list of sides, e.g. [1, 2, 4], or of [h, w] pairs, each >= 1)") from None
    fixes = {"model.train_scales": "model.train_scales=null (train on `scales`)",
             "sample.scales": "sample.scales=null (generate on `scales`)"}
    for key, asked in (("model.train_scales", train_scales is not None), ("sample.scales", changes)):
        fixed = fixed_parts(backbone_cls, composition_cls) if asked else []
        if fixed:
            raise ConfigError(f"{key}: this model runs only on the scales it was built with (scales); " + "; ".join(fixed)
                              + f". Set {fixes[key]}, or pick parts that run any list (backbone=flexvar or mvar_flex "
                              "with composition=direct_vq)")


def check_compile(cfg: DictConfig) -> None:
    """compile=true needs a working compiler on the run's device: tried once on a tiny function, before any data."""
    value = cfg.get("compile", False)
    if not isinstance(value, bool):
        raise ConfigError(f"compile: {value!r} must be true or false")
    if not value:
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    device = "cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    why = compiler_problem(device)
    if why:
        raise ConfigError(f"compile=true: torch.compile cannot run on {device} here ({why}); use compile=false "
                          "(the same model, eager)")


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
