"""select_shards: by name or index, in the listing's order; a wrong choice says what there is."""

from __future__ import annotations

import pytest

from fineweb_modal.errors import ConfigError
from fineweb_modal.selection import select_shards

SHARDS = ["data-00000-of-00003", "data-00001-of-00003", "data-00002-of-00003"]


def test_names_and_indices_choose_shards_in_the_listings_order():
    assert select_shards(SHARDS, []) == SHARDS
    assert select_shards(SHARDS, ["2", "data-00000-of-00003"]) == [SHARDS[0], SHARDS[2]]
    assert select_shards(SHARDS, ["-1", "2"]) == [SHARDS[2]], "the last, once"


def test_a_wrong_choice_names_what_there_is():
    with pytest.raises(ConfigError, match=r"'7' is neither a shard name nor an index from 0 to 2 .*shards: data-00000-of-00003"):
        select_shards(SHARDS, ["7"])
    with pytest.raises(ConfigError, match=r"no shards to choose 0 from: nothing was found there \(check the name, data dir"):
        select_shards([], ["0"])
