"""The plan flow forecasts from samples of every downloaded shard, as a table artifact."""

from __future__ import annotations

import json

from tests.flows.helpers import latest_artifact


def test_plan_flow_forecasts_the_downloaded_shards(prefect_api, demo_source, tmp_path):
    from flows.download import download
    from flows.plan import plan

    data_dir = str(tmp_path / "data")
    assert download(source=str(demo_source), data_dir=data_dir, return_state=True).is_completed()
    state = plan(name="demo", data_dir=data_dir, max_tokens=64, return_state=True)
    rows = state.result()
    assert state.message.endswith("on an H100 (transformers); GPU rates for a BERT-base-sized model such as nomic-ai/nomic-embed-text-v1.5"), state.message
    by_key = {(r["engine"], r["gpu"]): r for r in rows}
    from fineweb_modal.plan import measured_tokens_per_s

    gpus = {"H100", "A10G", "L4", *measured_tokens_per_s()}  # and the GPU the committed benchmark ran on
    assert set(by_key) == {(e, g) for e in ("transformers", "tei") for g in gpus}
    assert all(r["chunks"] > 36 and r["embed tokens"] > r["chunks"] * 3 and r["cost $"] >= 0 for r in rows)
    artifact = json.loads(latest_artifact("plan-demo-forecast").data)
    assert artifact == rows


def test_plan_before_download_says_what_to_do(prefect_api, tmp_path):
    from fineweb_modal.errors import ConfigError
    from flows.outcome import outcome
    from flows.plan import plan

    state = plan(name="nothing", data_dir=str(tmp_path), return_state=True)
    assert state.is_failed() and state.message == "plan: no downloaded shards for nothing; run the download stage first"
    assert isinstance(outcome(state), ConfigError), "refused with a message, not raised through Prefect (a traceback)"
