"""Settings that are command-line flags, each declared once: beside its default, a config field
says its flag, its help and how its text is read; the command line is built from the fields.

    max_line: int = setting(65536, "--max-line", "longest request line in bytes", count)

:func:`add_flags` adds a dataclass's flags to an argparse parser (nested config dataclasses
too) and :func:`from_flags` builds the dataclass back from the parsed arguments. No I/O.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

#: The metadata key under which a field keeps its :class:`Flag`.
FLAG: Final = "p2ppay.flag"


@dataclass(frozen=True, slots=True)
class Flag:
    name: str
    help: str
    #: reads the flag's text (argparse's ``type``); None: the text itself
    parse: Callable[[str], Any] | None = None
    #: turns what was read into the field's value (e.g. hours into seconds)
    convert: Callable[[Any], Any] | None = None
    #: the default as the flag would be written (when it is not the field's own value)
    shown_default: Any = None
    #: how --help words the default instead (e.g. "cores - 1")
    default_text: str | None = None
    choices: Sequence[str] | None = None
    #: argparse action: "store_true", "append"
    action: str | None = None
    metavar: str | None = None
    #: not given on the command line means "the field's default, worked out elsewhere": the
    #: parser's default is None and the field keeps its own
    optional: bool = False


def setting(
    default: Any = dataclasses.MISSING,
    flag: str = "",
    help: str = "",
    parse: Callable[[str], Any] | None = None,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **options: Any,
) -> Any:
    """A dataclass field that is also the command-line flag ``flag``."""
    metadata = {FLAG: Flag(flag, help, parse, **options)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field[Any]) -> Flag | None:
    found = field.metadata.get(FLAG)
    return found if isinstance(found, Flag) else None


def _nested(cls: type[Any], field: dataclasses.Field[Any]) -> type[Any] | None:
    """The config dataclass a field holds, if it is one (its own fields are flags)."""
    kind = typing.get_type_hints(cls).get(field.name)
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def fields_and_flags(
    cls: type[Any], prefix: str = ""
) -> Iterator[tuple[str, dataclasses.Field[Any], Flag | None]]:
    """Every field of ``cls`` and of the config dataclasses it holds, as (dest, field, flag)."""
    for field in dataclasses.fields(cls):
        dest = f"{prefix}{field.name}"
        flag = flag_of(field)
        nested = None if flag is not None else _nested(cls, field)
        if nested is not None:
            yield from fields_and_flags(nested, f"{dest}__")
        else:
            yield dest, field, flag


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_flags(parser: argparse.ArgumentParser, cls: type[Any], *, skip: Sequence[str] = ()) -> None:
    """Add a flag for every field of ``cls`` (and of the config dataclasses it holds) that has
    one; ``skip`` names fields the caller adds itself."""
    for dest, field, flag in fields_and_flags(cls):
        if flag is None or dest in skip:
            continue
        kwargs: dict[str, Any] = {"dest": dest, "help": flag.help}
        default = flag.shown_default if flag.shown_default is not None else _default(field)
        if flag.optional:
            default = None
        if flag.action is not None:
            kwargs["action"] = flag.action
            kwargs["default"] = [] if flag.action == "append" else default
        else:
            kwargs["default"] = default
            if flag.parse is not None:
                kwargs["type"] = flag.parse
        if flag.choices is not None:
            kwargs["choices"] = list(flag.choices)
        if flag.metavar is not None:
            kwargs["metavar"] = flag.metavar
        elif flag.action is None and flag.choices is None:
            kwargs["metavar"] = flag.name.lstrip("-").upper().replace("-", "_")
        if flag.default_text is not None:
            kwargs["help"] = f"{flag.help} (default: {flag.default_text})"
        parser.add_argument(flag.name, **kwargs)


def from_flags(cls: type[Any], args: argparse.Namespace, prefix: str = "", **given: Any) -> Any:
    """``cls`` built from what :func:`add_flags` parsed into ``args``; ``given`` values win.

    Raises ValueError (from the dataclasses' own checks) for values that do not go together."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            values[field.name] = given[field.name]
            continue
        dest = f"{prefix}{field.name}"
        flag = flag_of(field)
        nested = None if flag is not None else _nested(cls, field)
        if nested is not None:
            values[field.name] = from_flags(nested, args, f"{dest}__")
        elif flag is not None and hasattr(args, dest):
            value = getattr(args, dest)
            if value is None and flag.optional:
                continue
            values[field.name] = flag.convert(value) if flag.convert is not None else value
    return cls(**values)


# --- how flags' text is read -----------------------------------------------------------------


def _whole_number(text: str, least: int, most: int | None, what: str = "whole number") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
    if value < least or (most is not None and value > most):
        within = f"at least {least}" if most is None else f"within {least}..{most}"
        raise argparse.ArgumentTypeError(f"{text} must be {within}")
    return value


def count(text: str) -> int:
    """A whole number, at least 1."""
    return _whole_number(text, 1, None)


def whole(text: str) -> int:
    """A whole number, 0 or more."""
    return _whole_number(text, 0, None)


def port(text: str) -> int:
    """A TCP port, or 0 for any free one."""
    return _whole_number(text, 0, 65535, "port number")


#: The longest any duration flag may be (about 31 years): beyond it the clocks and timers
#: underneath (threading waits, C timestamps) overflow, and nothing means to wait that long.
MAX_SECONDS = 1e9
#: PostgreSQL takes its timeouts in milliseconds as a 32-bit number.
PG_MAX_SECONDS = 2_147_483


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} must be at most {MAX_SECONDS:.0f} seconds")
    return value


def pg_seconds(text: str) -> float:
    """Seconds that PostgreSQL (or libpq) is given: at least 1 ms, at most 2^31 - 1 ms."""
    value = seconds(text)
    if not 0.001 <= value <= PG_MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text} must be within 0.001..{PG_MAX_SECONDS} seconds (PostgreSQL's limits)"
        )
    return value


def pg_count(text: str) -> int:
    """A whole number libpq is given: 1 to 2^31 - 1."""
    return _whole_number(text, 1, 2**31 - 1)


def seconds_or_zero(text: str) -> float:
    """Seconds, or 0 (what the setting then turns off is its own)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} must be 0 seconds or more")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} must be at most {MAX_SECONDS:.0f} seconds")
    return value


def seconds_or_off(text: str) -> float:
    """Seconds, or 0 for no limit at all."""
    try:
        if float(text) == 0:
            return math.inf
    except ValueError:
        pass  # seconds() says what is wrong with it
    return seconds(text)
