"""How lists of names read in messages and logs; no imports from this package, so any module may use it."""

from __future__ import annotations

from typing import Any


def listing(items: list[Any], limit: int = 10, total: int | None = None) -> str:
    """`a, b, c and 7 more`: the first `limit` items of a list (`total`: its full length, when `items` is cut already)."""
    total = len(items) if total is None else total
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {total - min(limit, len(items))} more" if total > min(limit, len(items)) else "")
