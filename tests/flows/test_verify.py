"""The verify flow: a table artifact, Completed when everything holds, Failed naming the shard that does not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.shards import layout_for
from tests.flows.helpers import latest_artifact


def test_verify_flow_passes_then_names_a_broken_shard(prefect_api, demo_source, tmp_path, run_config_for, monkeypatch, capsys):
    from flows.pipeline import pipeline
    from flows.verify import verify

    data_dir = str(tmp_path / "data")
    assert pipeline(source=str(demo_source), data_dir=data_dir, max_tokens=64, stages=["download", "chunk", "embed"], return_state=True).is_completed()
    state = verify(name="demo", data_dir=data_dir, max_tokens=64, return_state=True)
    assert state.is_completed() and state.message == "verify: 3 shard(s) ok"
    rows = json.loads(latest_artifact("verify-demo-shards").data)
    assert all(r["ok"] and r["chunks"] == r["embeddings"] and r["dims"] == 384 for r in rows)

    path = layout_for(run_config_for(demo_source)).output_path("embed", "data-00002-of-00003")
    table = pq.read_table(path)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)) * 0.5
    pq.write_table(table.set_column(3, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), 384)), path)
    state = verify(name="demo", data_dir=data_dir, max_tokens=64, return_state=True)
    assert state.is_failed() and "data-00002-of-00003" in state.message
    rows = {r["shard"]: r for r in json.loads(latest_artifact("verify-demo-shards").data)}
    assert not rows["data-00002-of-00003"]["ok"] and "not unit-norm" in rows["data-00002-of-00003"]["problems"]
    assert rows["data-00000-of-00003"]["ok"]

    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    dataset = ["--name", "demo", "--data-dir", data_dir, "--max-tokens", "64"]
    capsys.readouterr()
    assert main(["verify", *dataset, "--shards", "0,data-00001-of-00003"]) == 0, "the broken shard was not asked for"
    assert "verify: 2 shard(s) ok" in capsys.readouterr().out
    assert main(["verify", *dataset, "--shards", "9"]) == 2, "a shard that is not there is bad usage"
    assert "'9' is neither a shard name nor an index from 0 to 2" in capsys.readouterr().err
    assert main(["verify", *dataset]) == 1
    out = capsys.readouterr().out
    assert "None" not in out
    assert re.search(r"data-00002-of-00003 +PROBLEM chunks=\d+ embeddings=\d+ dims=384 .*not unit-norm", out), out

    state = verify(name="demo", data_dir=data_dir, max_tokens=64, shards="", return_state=True)  # a deployment's form left blank
    assert state.is_failed() and state.message == "verify: shards='' names no shard: leave it out to run every shard"
    state = verify(name="demo", data_dir=data_dir, return_state=True)  # the default max_tokens: none made with it
    assert state.is_failed() and "found demo-chunked-64-all-MiniLM-L6-v2: pass the --max-tokens and --model" in state.message


def test_fetch_flow_copies_a_shard_and_previews_it(prefect_api, demo_source, tmp_path):
    from flows.fetch import fetch
    from flows.pipeline import pipeline

    data_dir = str(tmp_path / "data")
    assert pipeline(source=str(demo_source), data_dir=data_dir, max_tokens=64, stages=["download", "chunk"], return_state=True).is_completed()
    path = fetch(name="demo", shard=1, stage="chunk", to=str(tmp_path / "out"), data_dir=data_dir, max_tokens=64)  # an index, as a deployment parameter
    assert path.endswith("out/data-00001-of-00003-chunks.parquet")
    assert pq.read_table(path).equals(pq.read_table(tmp_path / "data" / "demo-chunked-64" / "train" / "data-00001-of-00003.parquet"))
    text = latest_artifact("fetch-demo-chunk").data
    assert "rows" in text and "[0:0]" in text
    copy = fetch(name="demo", shard="data-00000-of-00003", stage="download", to=str(tmp_path / "out"), data_dir=data_dir)  # no --source needed
    assert Path(copy).read_bytes() == (tmp_path / "data" / "demo" / "train" / "data-00000-of-00003.arrow").read_bytes()
    first_doc = pq.read_table(sorted(demo_source.glob("*.parquet"))[0]).column("text")[0].as_py()
    text = latest_artifact("fetch-demo-download").data
    assert f"{copy}: 12 rows" in text and f"  [0] {len(first_doc)} chars: {first_doc[:100].replace(chr(10), ' ')}…" in text, text
    renamed = fetch(name="demo", shard=0, stage="download", to=str(tmp_path / "out" / "copy.bin"), data_dir=data_dir)
    assert f"{renamed}: 12 rows" in latest_artifact("fetch-demo-download").data, "read by its bytes, whatever its name"
    state = fetch(name="demo", shard=7, stage="chunk", to=str(tmp_path / "out"), data_dir=data_dir, max_tokens=64, return_state=True)
    assert state.is_failed() and "'7' is neither a shard name nor an index from 0 to 2" in state.message, "a message, not a traceback"
