"""The one module that owns money: container-seconds × Modal's per-second rates, from a dated price table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fineweb_modal.errors import ConfigError

# Modal's published per-second rates, read 2026-11 (third-party copies of modal.com/pricing). The modal
# backend replaces them with the workspace's live rates (`Workspace.billing.rates()`, see reconcile_rates)
# when it can read them; `FINEWEB_MODAL_RATES` overrides by hand.
PRICE_TABLE_DATE = "2026-11"
RATES_USD_PER_SECOND: dict[str, float] = {
    "cpu_core": 0.0000131,
    "memory_gib": 0.00000222,
    "T4": 0.000164,
    "L4": 0.000222,
    "A10": 0.000306,
    "A10G": 0.000306,
    "L40S": 0.000542,
    "A100-40GB": 0.000583,
    "A100-80GB": 0.000694,
    "H100": 0.001097,
    "H200": 0.001261,
    "B200": 0.001736,
}


@dataclass(frozen=True)
class Resources:
    """What one container of a stage reserves; Modal bills CPU and memory at max(request, use)."""

    cpu: float
    memory_gib: float
    gpu: str | None = None


# The resources each stage's Modal function requests (deployments/modal_app.py reads these too).
STAGE_RESOURCES: dict[str, Resources] = {
    "download": Resources(cpu=2, memory_gib=4),
    "chunk": Resources(cpu=4, memory_gib=8),
    "embed": Resources(cpu=4, memory_gib=16, gpu="H100"),
    "summarize": Resources(cpu=1, memory_gib=2),
    "download-hub": Resources(cpu=8, memory_gib=32),  # one container: load_dataset + save_to_disk of a whole dataset
}


def stage_resources(stage: str) -> Resources:
    """A stage's resources; `FINEWEB_MODAL_GPU` (set at deploy time, e.g. `A10G`) replaces the GPU type."""
    resources = STAGE_RESOURCES[stage]
    gpu = os.environ.get("FINEWEB_MODAL_GPU")
    if resources.gpu and gpu:
        return Resources(cpu=resources.cpu, memory_gib=resources.memory_gib, gpu=gpu)
    return resources


def current_rates(overrides: dict[str, float] | None = None) -> dict[str, float]:
    """The price table, updated by `FINEWEB_MODAL_RATES` (a JSON object, e.g. `{"H100": 0.00095}`) and `overrides`."""
    from_env = json.loads(os.environ.get("FINEWEB_MODAL_RATES") or "{}")
    return {**RATES_USD_PER_SECOND, **from_env, **(overrides or {})}


def _normalized(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_GPU_ALIASES = {"a100": "a10040gb"}  # Modal's `A100` is the 40 GB card (see parse_gpu)


def reconcile_rates(reported: Mapping[str, object]) -> dict[str, float]:
    """Rates reported by Modal's billing API, as this table's keys in $/second, where they can be trusted.

    The API's key names and units are not documented: a reported key is matched to a table key by name
    (a GPU's whole name: `gpu.a100.80gb` is `A100-80GB`, `gpu.a100` Modal's 40 GB card, never `A10`; `cpu`
    in the name for `cpu_core`, `mem` for `memory_gib`), and its value is read as per second, or else per
    hour, whichever lands within 4× of the dated table; anything else is left out, so a misread unit can
    never multiply costs by 3 600.
    """
    accepted: dict[str, float] = {}
    names = {key: _normalized(key) for key in reported}
    for ours, table_rate in RATES_USD_PER_SECOND.items():
        if ours[0].isupper():  # a GPU
            matches = [key for key, name in names.items() if _GPU_ALIASES.get(name.removeprefix("gpu"), name.removeprefix("gpu")) == _normalized(ours)]
        else:
            wanted = {"cpu_core": "cpu", "memory_gib": "mem"}[ours]
            matches = [key for key, name in names.items() if wanted in name]
        for key in matches:
            try:
                value = float(reported[key])  # Decimal, str or float
            except (TypeError, ValueError):
                continue
            for per_second in (value, value / 3600):
                if table_rate / 4 <= per_second <= table_rate * 4:
                    accepted[ours] = per_second
                    break
            if ours in accepted:
                break
    return accepted


def parse_gpu(gpu: str) -> tuple[str, int]:
    """A Modal GPU string as (price-table type, count): `h100!:2` → (`H100`, 2); `A100` is Modal's 40 GB card."""
    name, _, count = gpu.strip().partition(":")
    name = name.upper().rstrip("!")  # `H100!`: an H100 that Modal will not upgrade; billed as one
    if not count:
        count = "1"
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"GPU {gpu!r}: the count after ':' must be a positive number")
    return {"A100": "A100-40GB"}.get(name, name), int(count)


def _gpu_rate(gpu: str, table: dict[str, float]) -> float:
    name, count = parse_gpu(gpu)
    if name not in table:
        raise ConfigError(f"no price for GPU {gpu!r}; known: {', '.join(sorted(k for k in table if k[0].isupper()))} (add one with FINEWEB_MODAL_RATES)")
    return table[name] * count


def check_gpu(gpu: str, rates: dict[str, float] | None = None) -> None:
    """Refuse a GPU string this table cannot price (a ConfigError naming the known ones)."""
    _gpu_rate(gpu, current_rates(rates))


def rate_per_second(resources: Resources, rates: dict[str, float] | None = None) -> float:
    """Dollars per second for one container with these resources."""
    table = current_rates(rates)
    rate = resources.cpu * table["cpu_core"] + resources.memory_gib * table["memory_gib"]
    return rate + (_gpu_rate(resources.gpu, table) if resources.gpu else 0.0)


def cost_usd(seconds: float, resources: Resources, rates: dict[str, float] | None = None) -> float:
    """Dollars for `seconds` of one container with these resources."""
    return seconds * rate_per_second(resources, rates)


def format_usd(amount: float) -> str:
    """`$0.012`, `$1.23`, `$0.00004`: enough digits to see a per-shard cost."""
    if amount == 0:
        return "$0"
    if amount >= 1:
        return f"${amount:,.2f}"
    return f"${amount:.3g}" if amount >= 0.001 else f"${amount:.1e}"


# The dollars a failed attempt was billed ride on its error under this attribute (an exception's attributes
# survive pickling, so across a process or Modal boundary too); its notes say the same to people.
BILLED_ATTRIBUTE = "billed_usd"
# The sum over all the failed attempts of one shard's task run, on its last error.
FAILED_ATTEMPTS_ATTRIBUTE = "failed_attempts_usd"


def put_dollars(exc: BaseException, dollars: float, attribute: str = BILLED_ATTRIBUTE) -> bool:
    """Set dollars on an error under `attribute`; False for an error type that takes no attributes (the budget goes without)."""
    try:
        setattr(exc, attribute, dollars)
    except (AttributeError, TypeError):
        return False
    return True


def mark_billed(exc: BaseException, dollars: float, how: str) -> None:
    """Record on a failed attempt's error what it was billed, for the caller's budget and its reader."""
    if put_dollars(exc, dollars):
        exc.add_note(f"this attempt was billed {format_usd(dollars)} ({how})")


def billed_on(exc: BaseException, attribute: str = BILLED_ATTRIBUTE) -> float | None:
    """The dollars on an error under `attribute` (what mark_billed or put_dollars recorded); None when nothing did."""
    dollars = getattr(exc, attribute, None)
    return float(dollars) if isinstance(dollars, (int, float)) else None


class ContainerClock:
    """A container's billed seconds outside shard work, charged to the next shard that works.

    Modal bills a container from its start to its stop: its start-up and imports, a model loaded in
    `@modal.enter`, Volume reloads and commits, waits between inputs. Each shard that works pays for the
    time since the previous one's work ended (the container's start, for the first), and so does a failed
    attempt (on its error: see mark_billed); only the idle time after a container's last shard, before it
    scales down, is in no shard's cost.
    """

    def __init__(self, started: float | None = None, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._unbilled_since = clock() if started is None else started

    def unbilled_seconds(self) -> float:
        """Seconds since the container started or the last billed shard's work ended."""
        return max(0.0, self._clock() - self._unbilled_since)

    def billed(self, overhead_seconds: float, work_seconds: float) -> None:
        """Record that a shard paid `overhead_seconds` (as read from unbilled_seconds) and its own work."""
        self._unbilled_since += overhead_seconds + work_seconds
