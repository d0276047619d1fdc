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
    def of(cls, head, values: Mapping[str, Any] | None = None, **more) -> "GenerateOptions":
        """Options for `head` (a head or its class) from flat keys; None values are skipped (the default stays)."""
        head_cls = head if isinstance(head, type) else type(head)
        given = {k: v for k, v in {**(values or {}), **more}.items() if v is not None}
        groups = {"guidance": _names(GuidancePolicy), "head": _names(head_cls.options_type),
                  "own": ("scales", "trained_sides")}
        allowed = [k for names in groups.values() for k in names]
        unknown = [k for k in given if k not in allowed]
        if unknown:
            raise ConfigError(f"{unknown[0]}: not a sampling option of {head_cls.__name__}; allowed: {sorted(allowed)}")
        part = {name: {k: v for k, v in given.items() if k in keys} for name, keys in groups.items()}
        sides = given.get("trained_sides")
        return cls(GuidancePolicy(**part["guidance"]), head_cls.options_type(**part["head"]),
                   None if given.get("scales") is None else ScaleSchedule.of(given["scales"]),
                   None if sides is None else tuple(int(s) for s in sides))

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


def _names(dataclass_type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(dataclass_type))
