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
    assert state.message.endswith("on an H100 (transformers); GPU rates for a BERT-base-sized model such as nomic-ai/nomic-embed-text-v1.5; from 3 shards sampled"), state.message
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
    assert state.is_failed() and state.message == "plan: no downloaded shards for nothing; run the download stage first (a Hub dataset can be planned before: pass its --source)"
    assert isinstance(outcome(state), ConfigError), "refused with a message, not raised through Prefect (a traceback)"


def test_a_hub_dataset_is_planned_before_its_download(prefect_api, demo_source, tmp_path, monkeypatch, folder_as_hub_repo, capsys):
    """`org/demo` is a local folder standing in for the Hub repo (no Hub here), read through the same load_dataset calls."""
    import shutil

    from flows.cli import main
    from flows.plan import plan
    from tests.flows.helpers import task_runs_of

    shutil.copytree(demo_source, tmp_path / "org" / "demo")
    monkeypatch.chdir(tmp_path)
    state = plan(source="hf://org/demo", data_dir="data", max_tokens=64, return_state=True)
    assert state.is_completed(), state.message
    assert state.message.endswith("from the first 36 of 36 docs streamed from the Hub"), state.message
    (run,) = task_runs_of([state.state_details.flow_run_id], expected=1)
    assert run.name == "plan-hub-demo" and run.state.message.endswith("from the first 36 of 36 docs (not downloaded)")
    assert not (tmp_path / "data").exists(), "nothing downloaded"

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    assert main(["plan", "--source", "hf://org/demo", "--max-tokens", "64"]) == 0
    assert "transformers  H100" in capsys.readouterr().out
    assert main(["plan", "--source", "hf://org/demo", "--shards", "0"]) == 2
    assert "before the download a Hub dataset is planned whole" in capsys.readouterr().err
    assert main(["plan", "--max-tokens", "64"]) == 2 and "plan needs --name (a downloaded dataset) or --source" in capsys.readouterr().err
    assert main(["plan", "--source", "hf://org/demo", "--text-column", "body"]) == 2
    assert "hf://datasets/org/demo: column(s) ['body'] not found; the shard has ['text', " in capsys.readouterr().err, "refused, naming a flag plan has"
    assert main(["plan", "--source", "hf://org/demo", "--split", "test"]) == 2 and "has no split 'test': it has train" in capsys.readouterr().err
