"""Money: per-second rates (the dated table, overrides, live ones), GPU strings, a container's time billed to its shards."""

from __future__ import annotations

import pytest

from fineweb_modal.costs import RATES_USD_PER_SECOND, ContainerClock, Resources, cost_usd, parse_gpu
from fineweb_modal.errors import ConfigError


def test_cost_is_seconds_times_the_rates():
    h100_hour = cost_usd(3600, Resources(cpu=4, memory_gib=16, gpu="H100"))
    expected = 3600 * (4 * RATES_USD_PER_SECOND["cpu_core"] + 16 * RATES_USD_PER_SECOND["memory_gib"] + RATES_USD_PER_SECOND["H100"])
    assert h100_hour == pytest.approx(expected) and 4.0 < h100_hour < 4.3
    assert cost_usd(10, Resources(cpu=1, memory_gib=1), rates={"cpu_core": 1.0, "memory_gib": 0.0}) == 10.0
    assert cost_usd(10, Resources(cpu=0, memory_gib=0, gpu="H100"), rates={"H100": 0.5}) == 5.0


def test_rates_can_be_overridden_from_the_environment(monkeypatch):
    monkeypatch.setenv("FINEWEB_MODAL_RATES", '{"H100": 0.002}')
    assert cost_usd(100, Resources(cpu=0, memory_gib=0, gpu="H100")) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="no price for GPU 'Z9'"):
        cost_usd(1, Resources(cpu=1, memory_gib=1, gpu="Z9"))


def test_gpu_strings_are_read_as_modal_reads_them():
    assert parse_gpu("h100!:2") == ("H100", 2) and parse_gpu("A100") == ("A100-40GB", 1) and parse_gpu("a10g") == ("A10G", 1)
    two_h100 = cost_usd(10, Resources(cpu=0, memory_gib=0, gpu="H100:2"))
    assert two_h100 == pytest.approx(20 * RATES_USD_PER_SECOND["H100"]) == cost_usd(10, Resources(cpu=0, memory_gib=0, gpu="h100!:2"))
    with pytest.raises(ConfigError, match="positive number"):
        parse_gpu("H100:x")


def test_a_containers_time_outside_shard_work_goes_to_the_next_shard_that_works():
    now = [130.0]
    clock = ContainerClock(started=100.0, clock=lambda: now[0])
    assert clock.unbilled_seconds() == 30.0  # start-up and model load, before the first shard
    clock.billed(30.0, 50.0)  # the first shard worked 50 s (the clock reads 180 when its work ends)
    now[0] = 185.0  # its commit, a wait, the next reload: 5 s
    assert clock.unbilled_seconds() == 5.0
    now[0] = 187.0  # a shard done earlier (skipped) bills nothing, so its time waits for the next one
    assert clock.unbilled_seconds() == 7.0
    clock.billed(7.0, 10.0)
    now[0] = 190.0  # the clock may read before the billed work's end (work seconds are rounded): never negative
    assert clock.unbilled_seconds() == 0.0


def test_live_rates_are_matched_by_name_and_read_per_second_or_per_hour():
    from decimal import Decimal

    from fineweb_modal.costs import RATES_USD_PER_SECOND, reconcile_rates

    reported = {
        "gpu.h100": Decimal("0.001"),  # per second
        "gpu.a10g": Decimal("1.10"),  # per hour
        "gpu.a100.80gb": Decimal("0.0007"),
        "cpu": "0.0000125",
        "memory": "0.0000021",
        "gpu.l4": Decimal("800"),  # neither unit lands near the table: left out
        "sandbox.cpu.premium": "junk",
    }
    accepted = reconcile_rates(reported)
    assert accepted["H100"] == 0.001 and accepted["A10G"] == pytest.approx(1.10 / 3600)
    assert accepted["A100-80GB"] == 0.0007 and accepted["cpu_core"] == 0.0000125 and accepted["memory_gib"] == 0.0000021
    assert "L4" not in accepted, "a rate off by more than 4x in both readings is not trusted"
    assert "A10" not in accepted and "A100-40GB" not in accepted, "no key is matched to a shorter or sibling GPU name"
    assert set(accepted) <= set(RATES_USD_PER_SECOND)
    siblings = reconcile_rates({"gpu.a100": 0.000583, "gpu.a10": 0.000306, "gpu.h100": 0.001097})
    assert siblings == {"A100-40GB": 0.000583, "A10": 0.000306, "H100": 0.001097}, "`a10` is a prefix of `a100`: each GPU by its whole name"

