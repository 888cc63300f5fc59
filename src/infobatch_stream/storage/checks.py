"""Argument checks shared by every layer, so each setting is refused the same way, by name.

``bool`` is an ``int`` in Python; a setting given ``True`` is a mistake, never a 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None, *,
              numpy: bool = True) -> int:
    """``value`` as an int in [low, high]; ValueError naming ``name`` otherwise.

    ``numpy=False`` refuses numpy integers too (settings documented as plain ints).

    >>> check_int(3, "window", 1)
    3
    >>> check_int(True, "window", 1)
    Traceback (most recent call last):
    ...
    ValueError: window must be an int >= 1, got True
    """
    ints = (int, np.integer) if numpy else int
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, ints) \
        and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{name} must be an int{_bounds(low, high)}, got {value!r}")
    return int(value)


def check_number(value: Any, name: str, low: float, high: float, *,
                 high_open: bool = False) -> float:
    """``value`` as a float in [low, high] (or [low, high) with ``high_open``); ValueError else.

    >>> check_number(0.5, "prune_ratio", 0, 1, high_open=True)
    0.5
    """
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float)) \
        and low <= value and (value < high if high_open else value <= high)
    if not ok:
        span = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    return float(value)


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    return "" if high is None else f" <= {high}"


def first_names(names: list[str], count: int = 5) -> str:
    """The first ``count`` names, comma-separated, with `` ...`` when there are more.

    >>> first_names(["a", "b", "c"], 2)
    'a, b ...'
    """
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")
