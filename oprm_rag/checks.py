"""The value checks that every options object shares (selection and decoding alike).

Each raises :class:`~oprm_rag.errors.OptionError` naming the option, the rule and the
value given, so that a mistake is named where it was made.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import OptionError

__all__ = ["check_int", "check_float", "check_bool", "check_choice"]


def check_int(name: str, value: Any, low: int | None = None, noun: str = "an int") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name} must be {noun}, got {value!r}")
    if low is not None and value < low:
        raise OptionError(f"{name} must be >= {low}, got {value}")


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise OptionError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise OptionError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise OptionError(f"{name} must be <= {high}, got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices or isinstance(value, bool):
        raise OptionError(f"{name} must be one of {list(choices)}, got {value!r}")
