"""Choosing shards by index or name."""

from __future__ import annotations

from fineweb_modal.errors import ConfigError
from fineweb_modal.phrasing import listing


def select_shards(available: list[str], selectors: tuple[str, ...] | list[str]) -> list[str]:
    """The shards named or indexed by `selectors` (all when empty), in `available`'s order."""
    if not selectors:
        return list(available)
    if not available:
        raise ConfigError(f"no shards to choose {listing(list(selectors))} from: nothing was found there (check the name, data dir, --max-tokens and --model)")
    chosen: set[str] = set()
    for selector in selectors:
        if selector in available:
            chosen.add(selector)
        elif selector.lstrip("-").isdigit() and -len(available) <= int(selector) < len(available):
            chosen.add(available[int(selector)])
        else:
            raise ConfigError(
                f"shard {selector!r} is neither a shard name nor an index from 0 to {len(available) - 1} (or -1 for the last); "
                f"shards: {listing(available)}"
            )
    return [s for s in available if s in chosen]
