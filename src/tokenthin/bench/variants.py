"""Row variants of a method in the benchmarks: ``METHOD+cal`` and ``METHOD+official``.

* ``METHOD+cal``: the method with a schedule calibrated on the bench's calibration images (encoder tasks only);
* ``METHOD+official``: the method's parity mode, ``official=True`` (the official code's selection, merge values and
  token order), at the same budget as the default row, so each default can be compared with its official release.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CAL = "+cal"
OFFICIAL = "+official"
SUFFIXES = (CAL, OFFICIAL)


def base_name(name: str) -> str:
    """The registered method under a row name: ``tome+official`` -> ``tome``."""
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def apply_kwargs(name: str) -> dict[str, Any]:
    """The extra ``tokenthin.apply`` arguments a row name stands for."""
    return {"official": True} if name.endswith(OFFICIAL) else {}


def has_official(cls: type) -> bool:
    """Whether a method class has a parity mode (an ``official`` parameter)."""
    return "official" in getattr(cls, "params", {})


def check_names(names: Sequence[str], known: Mapping[str, type]) -> str | None:
    """An error message for the first row name that cannot run, or None."""
    for n in names:
        base = base_name(n)
        if base not in known:
            return f"unknown method '{n}'; known: {', '.join(known)}"
        if n.endswith(OFFICIAL) and not has_official(known[base]):
            with_mode = ", ".join(m for m, c in known.items() if has_official(c))
            return (
                f"'{base}' has no official=True mode (README: 'Differences from the official code'); "
                f"methods with one: {with_mode}"
            )
    return None


def with_official(names: Sequence[str], known: Mapping[str, type]) -> list[str]:
    """``names`` plus a ``METHOD+official`` row after each method that has a parity mode (``--official``)."""
    out: list[str] = []
    for n in names:
        out.append(n)
        if n == base_name(n) and has_official(known[n]) and f"{n}{OFFICIAL}" not in names:
            out.append(f"{n}{OFFICIAL}")
    return out
