"""Lists in messages."""

from __future__ import annotations

from fineweb_modal.phrasing import listing


def test_a_long_list_is_cut_saying_how_many_more():
    assert listing(["a", "b"]) == "a, b"
    assert listing([f"s{i}" for i in range(12)]) == "s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 and 2 more"
    assert listing([3, 9], limit=8, total=40) == "3, 9 and 38 more", "a list cut already counts what it lost"

