"""Configuration fields defined once: the dataclass field, its check and its CLI option.

An application's configuration (e.g. ``jaxtrain.apps.digits.TrainConfig``) declares each field
with `option`: its default, help text and allowed values. From that one declaration

* `validate` checks a whole configuration (from Python, or a ``config.json`` holding
  anything), naming the field, what is allowed and what was given;
* `add_arguments` generates the command-line options (names, types, defaults, help,
  choices), whose value checks are the same `check` calls;
* `from_args` reads the parsed options back into field values.

So an allowed value, a default or a help text is written in exactly one place. This is
application code: the training core (state, steps, loop) never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

from jaxtrain.state import check_key_seed

_META = "jaxtrain_option"


@dataclasses.dataclass(frozen=True)
class Option:
    """What a configuration field allows, and how the command line spells it.

    Attributes:
        help: one line for ``--help``.
        choices: the allowed values (strings), or None.
        minimum: the smallest allowed number (inclusive), or None.
        above: numbers must be greater than this (exclusive), or None.
        below: numbers must be smaller than this (exclusive), or None.
        seed: an integer seed: the one seed rule (`jaxtrain.state.check_key_seed`).
        metavar: the value's name in ``--help``.
    """

    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    above: float | None = None
    below: float | None = None
    seed: bool = False
    metavar: str | None = None


def option(default: Any, help: str, **allowed: Any) -> Any:
    """A dataclass field with its `Option` (the arguments of `Option` as keywords).

    Args:
        default: the field's default.
        help: one line for ``--help``.
        **allowed: ``choices``, ``minimum``, ``above``, ``below``, ``seed``, ``metavar``.

    Returns:
        A ``dataclasses.field`` carrying the option in its metadata.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Config:
        ...     epochs: int = option(40, "training epochs", minimum=1)
        >>> validate(Config(epochs=0))
        Traceback (most recent call last):
        ...
        ValueError: epochs must be an integer >= 1; got 0.
    """
    return dataclasses.field(default=default, metadata={_META: Option(help, **allowed)})


def _kind(field: dataclasses.Field) -> tuple[str, bool]:
    """(``"int" | "float" | "str" | "bool"``, whether None is allowed) from the annotation."""
    parts = [p.strip() for p in str(field.type).split("|")]
    return parts[0], "None" in parts[1:]


def is_sweep(field: dataclasses.Field) -> bool:
    """Whether the field also takes a list of values (``lr: float | list[float]``).

    A population run (``jaxtrain train --population N``) trains one member per value.
    """
    return any(p.strip().startswith("list[") for p in str(field.type).split("|")[1:])


def sweep_syntax(kind: str) -> str:
    """The command-line spellings of a list of values (`parse_values`), for messages."""
    if kind == "float":
        return "A,B,C (a list) or logspace:LO:HI:N (N log-spaced values, ends included)"
    return "A,B,C (a list)"


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def expected(field: dataclasses.Field) -> str:
    """What a field allows, in words (``"an integer >= 1 or unset"``).

    Args:
        field: a field made by `option`.

    Returns:
        The phrase the error messages use.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class Config:
        ...     smoothing: float = option(0.1, "label smoothing", minimum=0, below=1)
        >>> expected(dataclasses.fields(Config)[0])
        'a finite number in [0, 1)'
    """
    opt: Option = field.metadata[_META]
    kind, optional = _kind(field)
    if opt.choices is not None:
        words = f"one of {', '.join(opt.choices)}"
    elif opt.seed:
        words = "an integer seed in [0, 4294967295] (2**32 - 1)"
    elif opt.minimum is not None and opt.below is not None:
        words = f"{_TYPE_NAMES[kind]} in [{opt.minimum:g}, {opt.below:g})"
    elif opt.minimum is not None:
        words = f"{_TYPE_NAMES[kind]} >= {opt.minimum:g}"
    elif opt.above is not None and opt.below is not None:
        words = f"a finite number in ({opt.above:g}, {opt.below:g})"
    elif opt.above is not None:
        words = f"a finite number > {opt.above:g}"
    else:
        words = _TYPE_NAMES[kind]
    if kind == "float" and opt.choices is None and "finite" not in words:
        words = words.replace("a number", "a finite number")
    return words + (" or unset" if optional else "")


def check(field: dataclasses.Field, value: Any) -> None:
    """Raises ValueError unless ``value`` is allowed for ``field`` (type, range, choices).

    Args:
        field: a field made by `option`.
        value: the value to check.

    Raises:
        ValueError: ``"<name> must be <expected>; got <value>."``
    """
    opt: Option = field.metadata[_META]
    kind, optional = _kind(field)
    if value is None and optional:
        return
    if is_sweep(field) and isinstance(value, (list, tuple)):
        _check_list(field, value)
        return
    types: Any = {"int": int, "float": (int, float), "str": str, "bool": bool}[kind]
    if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
        raise ValueError(
            f"{field.name} must be {_TYPE_NAMES[kind]}{' or unset' if optional else ''}; "
            f"got {value!r} ({type(value).__name__})."
        )
    if opt.seed:
        check_key_seed(value, field.name, top=2**32 - 1)
        return
    bad = (
        (opt.choices is not None and value not in opt.choices)
        or (kind == "float" and not math.isfinite(value))
        or (opt.minimum is not None and value < opt.minimum)
        or (opt.above is not None and not value > opt.above)
        or (opt.below is not None and not value < opt.below)
    )
    if bad:
        raise ValueError(f"{field.name} must be {expected(field)}; got {value!r}.")


def _check_list(field: dataclasses.Field, values: Any) -> None:
    """A sweep field's list: a non-empty JSON list, each value allowed for the field."""
    if not isinstance(values, list) or not values:
        raise ValueError(
            f"{field.name} must be {expected(field)}, or a non-empty list of such values; "
            f"got {values!r}."
        )
    for v in values:
        try:
            check(field, v)
        except ValueError as e:
            raise ValueError(f"{str(e).rstrip('.')} (in the list {values!r}).") from None
    if len(set(values)) != len(values):
        raise ValueError(
            f"{field.name} lists a value twice: {values!r}. Fix: list each value once (a "
            "population trains every combination once)."
        )


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that carry an `Option`."""
    return [f for f in dataclasses.fields(cls) if _META in f.metadata]


def validate(config: Any) -> None:
    """Checks every field of ``config`` with `check` (the first bad one raises).

    Args:
        config: a dataclass instance whose fields were made by `option`.

    Raises:
        ValueError: naming the field, what it allows and what it holds.
    """
    for field in option_fields(type(config)):
        check(field, getattr(config, field.name))


def flag(field: dataclasses.Field) -> str:
    """The command-line spelling: ``--batch-size``; ``--no-progress`` for a bool that is on."""
    name = field.name.replace("_", "-")
    kind, _ = _kind(field)
    return f"--no-{name}" if kind == "bool" and field.default is True else f"--{name}"


def parse_values(text: str, kind: str) -> Any:
    """A sweep option's text: one value, a list ``A,B,C``, or ``logspace:LO:HI:N``.

    Args:
        text: the command-line text.
        kind: ``"int"`` or ``"float"`` (``logspace`` is for floats only).

    Returns:
        A number for one value, a list of numbers otherwise.

    Raises:
        ValueError: text that is none of these (the message says what was expected).

    Example:
        >>> parse_values("1e-3,1e-2", "float"), parse_values("logspace:1e-4:1e-2:3", "float")
        ([0.001, 0.01], [0.0001, 0.001, 0.01])
        >>> parse_values("0,1,2", "int"), parse_values("7", "int")
        ([0, 1, 2], 7)
    """
    parse = {"int": int, "float": float}[kind]
    if text.startswith("logspace:"):
        parts = text.split(":")[1:]
        if kind != "float" or len(parts) != 3:
            raise ValueError("logspace:LO:HI:N with two bounds and a count")
        from jaxtrain.population import log_space

        try:
            return log_space(float(parts[0]), float(parts[1]), int(parts[2]))
        except ValueError:
            raise ValueError(
                "logspace:LO:HI:N with finite bounds > 0 and an integer count N >= 1"
            ) from None
    if "," in text:
        return [parse(item) for item in text.split(",")]
    return parse(text)


def _converter(field: dataclasses.Field):
    """argparse ``type=``: parses the text, then the same `check` as `validate`."""
    kind, _ = _kind(field)
    parse: Callable[[str], Any] = {"int": int, "float": float, "str": str}[kind]
    if is_sweep(field):
        parse = functools.partial(parse_values, kind=kind)

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError as e:
            if is_sweep(field):
                raise argparse.ArgumentTypeError(
                    f"expected {expected(field)}, or a list of them ({sweep_syntax(kind)}); got "
                    f"{text!r}" + (f": {e}" if str(e).startswith("logspace") else "")
                ) from None
            raise argparse.ArgumentTypeError(f"expected {expected(field)}, got {text!r}") from None
        if isinstance(value, list):
            try:
                _check_list(field, value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e).rstrip(".")) from None
            return value
        try:
            check(field, value)
        except ValueError as e:
            message = str(e).rstrip(".")
            if not field.metadata[_META].seed:  # the seed rule's message says it all
                message = f"expected {expected(field)}, got {text}"
            raise argparse.ArgumentTypeError(message) from None
        return value

    convert.__name__ = expected(field)  # argparse names the type in some messages
    return convert


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where it says nothing.

    An unset default (None: the help says what unset means) and the on/off state of a
    switch are left out.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action) or ""


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one command-line option per `option` field of dataclass ``cls``.

    Bools become switches (``--tensorboard``; ``--no-progress`` for a field that is on by
    default); choices become argparse choices; other values are checked by `check`.
    Each option's ``dest`` is the field's name, so `from_args` needs no mapping.

    Args:
        parser: the (sub)command's parser.
        cls: the configuration dataclass.
    """
    for field in option_fields(cls):
        opt: Option = field.metadata[_META]
        kind, _ = _kind(field)
        if kind == "bool":
            action = "store_false" if field.default is True else "store_true"
            parser.add_argument(flag(field), dest=field.name, action=action, help=opt.help)
            continue
        help_text = opt.help
        if is_sweep(field):  # the list syntax, said once here for every sweep option
            help_text += f"; with --population: {sweep_syntax(kind)}"
        kwargs: dict[str, Any] = {"dest": field.name, "default": field.default, "help": help_text}
        if opt.choices is not None:
            kwargs["choices"] = opt.choices
        else:
            kwargs["type"] = _converter(field)
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        parser.add_argument(flag(field), **kwargs)


def from_args(args: argparse.Namespace, cls: type, only: Iterable[str] | None = None) -> dict:
    """The field values in parsed ``args`` (``only``: just these field names).

    Args:
        args: from a parser that `add_arguments` filled.
        cls: the configuration dataclass.
        only: restrict to these fields (e.g. the options given on the command line).

    Returns:
        ``{field name: value}``.
    """
    names = {f.name for f in option_fields(cls)}
    if only is not None:
        names &= set(only)
    return {name: getattr(args, name) for name in names}


# argparse value types for options that are not configuration fields (the commands'
# own flags), with the same style of message: what was expected, what was given.


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def field_list(text: str) -> list[str]:
    """argparse ``type=``: comma-separated configuration field names (``lr,max-steps``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected field names separated by commas, got {text!r}")
    return names
