"""Argument checks shared by the algorithm factories: fail at construction, naming the field."""

from __future__ import annotations

import numbers
from typing import Iterable

import jax

from nordfl.registry import check_keywords as check_keywords  # noqa: F401  (the one signature check)


def traced(value) -> bool:
    """A value inside a JAX transformation (a grid of hyperparameters vmapped in ``sim.grid``): checked
    where the grid was built, not here, since it has no concrete value."""
    return isinstance(value, jax.core.Tracer)


def check_positive(owner: str, field: str, value) -> None:
    """Raises ValueError unless ``value`` is a real number > 0 (or traced)."""
    if traced(value):
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{owner}: {field} must be a number > 0, got {value!r}")


def check_nonnegative(owner: str, field: str, value) -> None:
    """Raises ValueError unless ``value`` is a real number >= 0 (or traced)."""
    if traced(value):
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{owner}: {field} must be a number >= 0, got {value!r}")


def check_int_at_least(owner: str, field: str, value, minimum: int) -> None:
    """Raises ValueError unless ``value`` is an integer >= ``minimum``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {field} must be an integer >= {minimum}, got {value!r}")


def check_positive_int(owner: str, field: str, value) -> None:
    """Raises ValueError unless ``value`` is an integer >= 1."""
    check_int_at_least(owner, field, value, 1)


def check_fraction(owner: str, field: str, value, *, upper_open: bool = True) -> None:
    """Raises ValueError unless ``0 <= value < 1`` (``<= 1`` when ``upper_open`` is False)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value
    ok = ok and (value < 1 if upper_open else value <= 1)
    if not ok:
        bound = "< 1" if upper_open else "<= 1"
        raise ValueError(f"{owner}: {field} must be a number with 0 <= {field} {bound}, got {value!r}")


def check_choice(owner: str, field: str, value, choices: Iterable[str]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    choices = sorted(choices)
    if value not in choices:
        raise ValueError(f"{owner}: unknown {field} {value!r}; expected one of {', '.join(choices)}")
