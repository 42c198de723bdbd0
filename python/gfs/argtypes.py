"""argparse types shared by every `gfs` subcommand: each parses one argument or raises
argparse.ArgumentTypeError saying what was expected."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def int_list(example: str = "8,16,32"):
    """A type: comma-separated positive ints, at least one."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers like {example}: {exc}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one number, like {example}")
        return values

    return parse


def names_from(choices):
    """A type: comma-separated names, each one of `choices`."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def number(ok, expected: str):
    """A type: a finite float for which ok(value) holds, else an error saying `expected`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse
