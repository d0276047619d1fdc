"""Typed generation options: the guidance policy, the schedule, FlexVAR's off-grid rule and the head's own options.

Built once from flat keys (a config's `sample:` block, sample.py's keys, `GeneratorModule.generate(**overrides)`):
every dataclass field below is a config key of the same name, and a key that is none of them is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from scalegen.errors import ConfigError
from scalegen.generation.guidance import GuidancePolicy, ScaleGuidance
from scalegen.schedule.scales import ScaleSchedule


class HeadOptions:
    """Base of each head's own sampling options: a frozen dataclass per head (its `options_type`), fields = keys."""

    @classmethod
    def checked(cls, values: Mapping[str, Any], prefix: str) -> "HeadOptions":
        """The options from config values, a bad one named with where it was set (`prefix`, e.g. "head.")."""
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{prefix}{e}") from None

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse options that the head's vocabulary cannot satisfy (top-k above it); none by default."""

    @staticmethod
    def all_keys() -> set[str]:
        """The keys of every head's options (sample.py reads these from its config, then the model's head checks)."""
        return {f.name for sub in HeadOptions.__subclasses__() for f in fields(sub)}


@dataclass(frozen=True)
class GenerateOptions:
    guidance: GuidancePolicy = field(default_factory=GuidancePolicy)
    head: HeadOptions | None = None  # the head's own (its `options_type`); None: that type's defaults
    scales: ScaleSchedule | None = None  # None: the run's own schedule; else any list the model allows
    trained_sides: tuple[int, ...] | None = None  # FlexVAR: a scale with a side off this list is sampled greedily

    @classmethod
    def of(cls, head, values: Mapping[str, Any] | None = None, *, vocab_size: int | None = None,
           **more) -> "GenerateOptions":
        """Options for `head` (a head or its class) from flat keys; None values are skipped (the default stays).
        vocab_size: the codebook the options must fit (top-k); None: the head's own, when `head` is built."""
        head_cls = head if isinstance(head, type) else type(head)
        given = {k: v for k, v in {**(values or {}), **more}.items() if v is not None}
        groups = {"guidance": _names(GuidancePolicy), "head": _names(head_cls.options_type),
                  "own": ("scales", "trained_sides")}
        allowed = [k for names in groups.values() for k in names]
        unknown = [k for k in given if k not in allowed]
        if unknown:
            raise ConfigError(f"{unknown[0]}: not a sampling option of {head_cls.__name__}; allowed: {sorted(allowed)}")
        part = {name: {k: v for k, v in given.items() if k in keys} for name, keys in groups.items()}
        check_guidance(part["guidance"])
        head_options = head_cls.options_type(**part["head"])
        vocab = vocab_size if vocab_size is not None else getattr(head, "vocab_size", None)
        if isinstance(vocab, int):
            head_options.check_vocabulary(vocab)
        scales, sides = _schedule_keys(given)
        return cls(GuidancePolicy(**part["guidance"]), head_options, scales, sides)

    @staticmethod
    def check_any_head(values: Mapping[str, Any]) -> None:
        """Ranges of the given sampling keys before a model is at hand: the guidance keys and each head's own
        (ValueError naming the key); which keys the model's head takes is checked by `of` once it is loaded."""
        given = {k: v for k, v in values.items() if v is not None}
        check_guidance({k: v for k, v in given.items() if k in _names(GuidancePolicy)})
        _schedule_keys(given)
        for sub in HeadOptions.__subclasses__():
            sub(**{k: v for k, v in given.items() if k in _names(sub)})

    @staticmethod
    def keys(head=None) -> list[str]:
        """Every sampling key (of `head`'s type, or of any head when None)."""
        head_keys = HeadOptions.all_keys() if head is None else _names(head.options_type)
        return sorted({*_names(GuidancePolicy), "scales", "trained_sides", *head_keys})

    def head_options(self, head) -> tuple[HeadOptions, HeadOptions]:
        """(the head's options, their greedy variant: the head's declared `greedy_options` on top)."""
        opts = head.options_type() if self.head is None else self.head
        if not isinstance(opts, head.options_type):
            raise TypeError(f"options for {type(opts).__name__} given to {type(head).__name__} "
                            f"(it takes {head.options_type.__name__})")
        return opts, replace(opts, **head.greedy_options)

    def greedy(self, size: tuple[int, int], guidance: ScaleGuidance) -> bool:
        """FlexVAR samples greedily past max_side and at sides off its trained grid (flexvar.py:230-233)."""
        return guidance.beyond or (bool(self.trained_sides) and not set(size) <= set(self.trained_sides))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_guidance(values: Mapping[str, Any]) -> None:
    """The guidance keys' ranges (ValueError naming the key): a negative CFG scale would push samples away from
    their class under every mixing rule; the FlexVAR step counts are sides and steps."""
    scale = values.get("cfg_scale")
    if scale is not None and (not _number(scale) or not scale >= 0):
        raise ValueError(f"cfg_scale={scale!r}: needs a number >= 0 (var mix: 0 = no guidance; llamagen/flowar: 1 = "
                         "no guidance)")
    for key in ("ratio_steps", "max_side"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{key}={v!r}: needs an integer >= 0 (0 or null: off)")


def _schedule_keys(given: Mapping[str, Any]) -> tuple[ScaleSchedule | None, tuple[int, ...] | None]:
    """`scales` and `trained_sides`, checked (ValueError naming the key)."""
    sides = given.get("trained_sides")
    if sides is not None and not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sides):
        raise ValueError(f"trained_sides={list(sides)!r}: needs a list of integer sides >= 1 ([]: off)")
    scales = given.get("scales")
    if scales is not None:
        try:
            scales = ScaleSchedule.of(scales)
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"scales={list(scales)!r}: {e} (a list of sides, e.g. [1, 2, 4], or of [h, w] pairs, "
                             "each >= 1)") from None
    return scales, None if sides is None else tuple(sides)


def _names(dataclass_type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(dataclass_type))
