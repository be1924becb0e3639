"""publish --dry-run writes exactly what would be uploaded; without a token it refuses before any work."""

from __future__ import annotations

import pyarrow.parquet as pq


def test_dry_run_writes_joined_shards_and_a_card(prefect_api, demo_source, tmp_path, monkeypatch, capsys):
    from flows.cli import main
    from flows.pipeline import pipeline

    data_dir = str(tmp_path / "data")
    assert pipeline(source=str(demo_source), data_dir=data_dir, max_tokens=64, stages=["download", "chunk", "embed"], return_state=True).is_completed()
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    out = tmp_path / "out"
    argv = ["publish", "--name", "demo", "--data-dir", data_dir, "--max-tokens", "64", "--repo-id", "me/demo-embeddings"]
    assert main([*argv, "--dry-run", "--to", str(out)]) == 0
    assert f"the folder that would be uploaded is {out}" in capsys.readouterr().out
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert files == [f"data/train/data-0000{i}-of-00003.parquet" for i in range(3)]
    table = pq.read_table(out / files[0])
    chunks = pq.read_table(tmp_path / "data" / "demo-chunked-64" / "train" / "data-00000-of-00003.parquet")
    assert table.column_names == [*chunks.column_names, "embedding"] and table.num_rows == chunks.num_rows
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "path: data/train/*.parquet" in card and "sentence-transformers/all-MiniLM-L6-v2" in card
    assert "| chunks | " in card and "384 dims" in card

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(argv) == 2, "no token is a configuration error"
    captured = capsys.readouterr()
    assert "needs a Hub token" in captured.err and "Traceback" not in captured.out + captured.err
