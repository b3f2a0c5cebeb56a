"""Argument validation shared by the functional core, the metric and the callback.

Every check raises with a message that names the argument, what is allowed and what was received.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

ESTIMATORS = ("gaussian_moment", "quadratic_mc", "direct_mc")


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"`{name}` must be an int >= {minimum}{upper}, got {value}.")
    return value


def _check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a positive finite float, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite float, got {value}.")
    return value


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    return str(value)


def _check_num_eigenvectors(value: Any, num_params: int) -> int:
    _check_int("num_eigenvectors", value, minimum=1)
    if value >= num_params:
        raise ValueError(
            f"`num_eigenvectors` must be smaller than the number of trainable parameters ({num_params}), got {value}."
        )
    return value
