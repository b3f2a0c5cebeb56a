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


def _check_optional_positive(name: str, value: Any) -> float | None:
    return None if value is None else _check_positive_float(name, value)


def _check_sigma(sigma: Any) -> float | str:
    """A positive finite float or ``"auto"``."""
    if sigma == "auto":
        return "auto"
    try:
        return _check_positive_float("sigma", sigma)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("positive finite float", "positive finite float or 'auto'", 1)) from None


def _check_device(name: str, value: Any) -> str | None:
    """None or a string that ``torch.device`` accepts."""
    if value is None:
        return None
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"`{name}` must be None or a torch device string such as 'cpu' or 'cuda:0', got {value!r}."
        ) from err
    return value


def _check_prefix(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or value.endswith("/"):
        raise ValueError(f"`{name}` must be a non-empty string not ending in '/', got {value!r}.")
    return value


def _check_sample_sizes(name: str, value: Any, num_probe_samples: int) -> list[int] | None:
    """None or a non-empty strictly increasing list of positive ints up to ``num_probe_samples``."""
    if value is None:
        return None
    sizes = list(value)
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in sizes)
    if not sizes or not ok or any(v < 1 for v in sizes) or sizes != sorted(set(sizes)):
        raise ValueError(f"`{name}` must be a non-empty strictly increasing list of positive ints, got {value!r}.")
    if sizes[-1] > num_probe_samples:
        raise ValueError(f"`{name}` must not exceed num_probe_samples={num_probe_samples}, got {value!r}.")
    return sizes
