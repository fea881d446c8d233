"""Method configs: one dataclass per method, every field with its help text and the paper's default, the ``quick``
(minutes, for the demo) and ``smoke`` (seconds, for tests) presets beside it. The command line is built from these
(``effkern.cli``), so a default exists once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, ClassVar, Self


def arg(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A config field: its default and the help text of its command-line flag; ``choices`` restricts the value (or
    every element of a tuple)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    """A command's settings (every field an ``arg``): presets, validation, identity. A method's flow uses
    :class:`MethodConfig`; a method's other commands (e.g. a server) may use this directly."""

    QUICK: ClassVar[dict] = {}
    SMOKE: ClassVar[dict] = {}
    # fields that say where and how a run shows itself or gets its inputs, not what it computes: not in the hash
    PRESENTATION: ClassVar[tuple[str, ...]] = ("out", "progress")

    @classmethod
    def preset(cls, which: str, **overrides) -> Self:
        """The ``"quick"`` or ``"smoke"`` preset (or ``"default"``), then ``overrides``."""
        presets = {"default": {}, "quick": cls.QUICK, "smoke": cls.SMOKE}
        if which not in presets:
            raise ValueError(f"preset must be one of {sorted(presets)}, got {which!r}")
        return cls(**{**presets[which], **overrides})

    def check(self) -> Self:
        """Validate every field (types, choices) and the method's own rules before any work starts; raises
        ValueError naming the field. Returns self."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ValueError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")
            choices = f.metadata.get("choices")
            values = value if isinstance(value, tuple) else (value,)
            bad = [v for v in values if choices is not None and v not in choices]
            if bad:
                raise ValueError(f"{f.name} must be among {', '.join(map(str, choices))}, got "
                                 f"{', '.join(map(str, bad))}")
        self.validate()
        return self

    def validate(self) -> None:
        """The method's own rules across fields (override); raise ValueError naming the field."""

    def identity(self) -> dict:
        """What the run computes: every field but the :attr:`PRESENTATION` ones, JSON-ready."""
        return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(self).items()
                                      if k not in self.PRESENTATION}))

    def digest(self, fields: tuple[str, ...] | None = None) -> str:
        """A short hash of :meth:`identity` (or of its ``fields`` only: files that depend on part of the config, so
        that configs differing elsewhere share them): files that depend on the config carry it."""
        picked = {k: v for k, v in self.identity().items() if fields is None or k in fields}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass
class MethodConfig(Config):
    """Fields every method has. A method's config subclasses this, sets ``name`` and its own ``out`` default, and
    defines ``QUICK`` / ``SMOKE`` (field overrides) and :meth:`validate` for what one field's choices cannot say."""

    name: ClassVar[str] = ""

    out: str = arg("runs", "output folder: config.json, results.json, plots, checkpoints")
    seed: int = arg(0, "random seed")
    progress: bool = arg(True, "show progress bars")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a tuple of {_describe(args[0])}" if len(args) == 2 and args[1] is Ellipsis else f"a tuple {hint}"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
