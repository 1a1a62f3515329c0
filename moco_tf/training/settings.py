"""A setting declared once: its default, help, bounds and role (recipe or operational) sit beside
its dataclass field, and everything else reads them from there: the command lines' absl flags
(moco_tf.cli.flags generates them), the range checks, config.json, the resume comparison.

    lr: float = setting(0.03, "Learning rate per 256 images ...", check=POSITIVE_FLOAT)

Recipe settings change the math, so a resumed run must keep them; operational ones (paths, how
often to log, which devices) may change between a run and its resume. A field's flag is named
like the field, so every message names the flag the user typed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from moco_tf.errors import UserError

MAX_INT = 2**31 - 1  # any integer setting above is a typo; seeds end there too


class ConfigError(UserError):
    """A setting out of range, or a config file that does not hold a valid config; one line naming
    the flag (or the key)."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule a setting's value keeps, and how a refusal words it: "--NAME must be WORDING, got V".
    None passes (an unset optional setting)."""

    test: Callable[[Any], bool]
    wording: str

    def __call__(self, name: str, value: Any) -> None:
        if value is not None and not self.test(value):
            raise ConfigError(f"--{name} must be {self.wording}, got {shown(value)}")


def _finite(test: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and test(v)


POSITIVE = Check(lambda v: v >= 1, "positive")
POSITIVE_OR_UNSET = Check(lambda v: v >= 1, "positive (or unset)")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")
SEED = Check(lambda v: 0 <= v < 2**31, "in [0, 2**31)")
POSITIVE_FLOAT = Check(_finite(lambda v: v > 0), "a finite number > 0")
NON_NEGATIVE_FLOAT = Check(_finite(lambda v: v >= 0), "a finite number >= 0")
MOMENTUM = Check(_finite(lambda v: 0 <= v < 1), "a finite number in [0, 1)")
SHARE = Check(_finite(lambda v: 0 < v <= 1), "a finite number in (0, 1]")
POSITIVE_EPOCHS = Check(lambda v: all(m >= 1 for m in v), "positive epochs")


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - absl's name for it
    *,
    check: Check | None = None,
    recipe: bool | None = None,
    default_factory: Any = dataclasses.MISSING,
    parts: Mapping[str, tuple[str, Check | None]] | None = None,
) -> Any:
    """A dataclass field that is a setting. recipe: None takes the section's role (its RECIPE).
    parts: for a field that holds several flags (the backbone: arch, width, cifar_stem), each
    one's help and check."""
    metadata = {"help": help, "check": check, "recipe": recipe, "parts": parts}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting as a flag: its name, value, type, role, help and check."""

    name: str
    value: Any
    hint: Any
    recipe: bool
    help: str
    check: Check | None


def settings_of(section_type: type) -> list[dataclasses.Field]:
    """The fields of a config class that are settings (not bookkeeping such as `unrecorded`)."""
    return [f for f in dataclasses.fields(section_type) if "help" in f.metadata]


def is_recipe(section_type: type, field: dataclasses.Field) -> bool:
    role = field.metadata.get("recipe")
    return section_type.RECIPE if role is None else role


def leaves(section: Any) -> Iterator[Leaf]:
    """Every setting of one section (an instance) as flags; a field with parts gives one per part
    (`value.to_dict()` holds the parts' values)."""
    hints = typing.get_type_hints(type(section))
    for field in settings_of(type(section)):
        value = getattr(section, field.name)
        recipe = is_recipe(type(section), field)
        if field.metadata["parts"]:
            part_hints = typing.get_type_hints(type(value))
            for name, sub in value.to_dict().items():
                help_text, check = field.metadata["parts"][name]
                yield Leaf(name, sub, part_hints[name], recipe, help_text, check)
        else:
            yield Leaf(field.name, value, hints[field.name], recipe, field.metadata["help"], field.metadata["check"])


def check_leaf(leaf: Leaf) -> None:
    """The leaf's value within its flag's bounds: at most MAX_INT if an integer, its choices if a
    Literal, its own check."""
    value = leaf.value
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT:
        raise ConfigError(f"--{leaf.name} must be at most 2**31 - 1, got {value}")
    choices = literal_choices(leaf.hint)
    if choices and value not in choices:
        raise ConfigError(f"--{leaf.name} must be one of {', '.join(choices)}, got {value!r}")
    if leaf.check is not None:
        leaf.check(leaf.name, value)


def literal_choices(hint: Any) -> tuple[str, ...]:
    """The choices of a Literal hint (optional or not); () for any other type."""
    hint = required(hint)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def required(hint: Any) -> Any:
    """`int` for `int | None`; the hint itself otherwise."""
    if optional(hint):
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    return hint


def shown(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)


def typed(name: str, value: Any, hint: Any, flags: bool) -> Any:
    """`value` as the field's type, or a ConfigError naming the key (the flag with `flags`).
    Bounds and choices are check_leaf's."""
    if optional(hint) and value is None:
        return None
    hint = required(hint)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is Literal:
        ok = value in typing.get_args(hint) or (flags and isinstance(value, str))
    elif typing.get_origin(hint) is tuple:  # tuple[int, ...]
        ok = isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - a new field type needs a rule here
        raise TypeError(f"no rule for {name}: {hint}")
    if not ok:
        raise ConfigError(f"{'--' if flags else ''}{name} must be {_kind(hint)}, got {value!r}")
    return value


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(typing.get_args(hint))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a list of integers"
    )


def parse_list_of_ints(name: str, items: Any) -> tuple[int, ...]:
    """Integers from a flag list ("120,160" or ["120", "160"], as absl's DEFINE_list gives)."""
    items = items.split(",") if isinstance(items, str) else list(items)
    items = [m.strip() if isinstance(m, str) else m for m in items if m != ""]
    try:
        if any(isinstance(m, bool) or not isinstance(m, int | str) for m in items):
            raise ValueError
        return tuple(int(m) for m in items)
    except ValueError:
        raise ConfigError(f"--{name} must be epochs (integers), got {shown(items)}") from None
