"""publish --dry-run writes exactly what would be uploaded; without a token it refuses before any work."""

from __future__ import annotations

import socket

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
    assert "max 64 tokens per chunk ([CLS]/[SEP] included), 10% overlap, `sentence-transformers/all-MiniLM-L6-v2`'s tokenizer, text column `text`" in card, "enough to cut it again"

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(argv) == 2, "no token is a configuration error"
    captured = capsys.readouterr()
    assert "needs a Hub token" in captured.err and "Traceback" not in captured.out + captured.err

    # Written again into the same folder with fewer shards: the earlier publish's files go, so none is uploaded stale.
    assert main([*argv, "--dry-run", "--to", str(out), "--shards", "0"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == ["data/train/data-00000-of-00003.parquet"]
    # Every file in the folder would be uploaded: one that is no publish's is refused, as is a file or a bad repo id.
    (out / "notes.txt").write_text("not for the Hub")
    assert main([*argv, "--dry-run", "--to", str(out)]) == 2
    assert "holds files that an upload would take along (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").is_file() and (out / "README.md").is_file(), "nothing deleted on a refusal"
    assert main([*argv, "--dry-run", "--to", str(out / "notes.txt")]) == 2 and "is a file" in capsys.readouterr().err
    assert main([*argv[:-1], "not-a-repo-id", "--dry-run"]) == 2 and "is not a Hub dataset id" in capsys.readouterr().err

    # One shard embedded again with another prefix (a partial rerun): one folder, two kinds of vectors. Neither
    # verify nor publish passes it, and both say which shards hold which prefix.
    from flows.embed import embed
    from flows.verify import verify

    assert embed(name="demo", data_dir=data_dir, max_tokens=64, prefix="query: ", shards=[1], return_state=True).is_completed()
    mixed = "the shards' embed files differ in their prefix: '' for data-00000-of-00003, data-00002-of-00003; 'query: ' for data-00001-of-00003"
    state = verify(name="demo", data_dir=data_dir, max_tokens=64, return_state=True)
    assert state.is_failed() and state.message.startswith(f"verify: {mixed}"), state.message
    assert main(["verify", "--name", "demo", "--data-dir", data_dir, "--max-tokens", "64"]) == 1
    assert mixed in "".join(capsys.readouterr())
    assert main([*argv, "--dry-run", "--to", str(tmp_path / "mixed")]) == 2
    assert mixed in capsys.readouterr().err and not (tmp_path / "mixed").exists()
    assert main(["status", "--data-dir", str(data_dir), "--name", "demo"]) == 1, "status fails on it too"
    assert f"    mixed   {mixed}; rerun embed over all of them with one config" in capsys.readouterr().out


def test_a_partial_dataset_is_refused_unless_allowed_and_an_upload_leaves_no_copy_behind(prefect_api, hub_api, demo_source, tmp_path, monkeypatch, capsys):
    from flows import publish as publish_module
    from flows.cli import main
    from flows.pipeline import pipeline

    data_dir = tmp_path / "data"
    assert pipeline(source=str(demo_source), data_dir=str(data_dir), max_tokens=64, stages=["download", "chunk", "embed"], return_state=True).is_completed()
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    (demo_source / "data-00003-of-00003.jsonl").write_text('{"text": broken')  # a shard whose download fails
    assert not pipeline(source=str(demo_source), data_dir=str(data_dir), max_tokens=64, stages=["download", "chunk", "embed"], return_state=True).is_completed()
    argv = ["publish", "--name", "demo", "--data-dir", str(data_dir), "--max-tokens", "64", "--repo-id", "me/demo-embeddings", "--dry-run"]
    assert main([*argv, "--to", str(tmp_path / "refused")]) == 2
    assert "1 of 4 shard(s) of demo are not embedded (data-00003-of-00003)" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists(), "refused before any work"
    assert main([*argv, "--to", str(tmp_path / "partial"), "--allow-partial"]) == 0
    assert len(list((tmp_path / "partial").rglob("*.parquet"))) == 3
    assert "| shards | 3 of 4: not embedded, left out: data-00003-of-00003 |" in (tmp_path / "partial" / "README.md").read_text()
    verified = main(["verify", "--name", "demo", "--data-dir", str(data_dir), "--max-tokens", "64"])
    assert verified == 1 and "data-00003-of-00003" in capsys.readouterr().out, "verify counts the shard that never reached chunk"

    uploaded = {}

    def upload_folder_double(folder, repo_id, token, private=True):  # stands in for the Hub (no network here)
        uploaded.update(folder=folder, files=sorted(p.name for p in folder.rglob("*.parquet")))
        return f"https://huggingface.co/datasets/{repo_id}"

    monkeypatch.setattr(publish_module, "upload_folder", upload_folder_double)
    upload = [a for a in argv if a != "--dry-run"] + ["--allow-partial"]
    monkeypatch.setenv("HF_TOKEN", "hf_read")  # the Hub (its test double, hub_api) says the token cannot write
    assert main(upload) == 2
    assert "the Hub token of me is read-only: publishing needs a token with write access" in capsys.readouterr().err and not uploaded
    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    assert main(upload) == 2 and "the Hub refused the token (HTTP 401" in capsys.readouterr().err and not uploaded
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert main([*upload[:-2], "someone-else/demo-embeddings", "--allow-partial"]) == 2
    assert "who cannot create datasets under 'someone-else'" in capsys.readouterr().err and not uploaded
    import huggingface_hub.constants

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with monkeypatch.context() as offline:
        offline.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        assert main(upload) == 2 and f"cannot reach the Hub at {endpoint}" in capsys.readouterr().err and not uploaded
    assert main(upload) == 0

    # The Hub refuses the upload itself (a fine-grained token without write access to this repo): said, not retried.
    from tests.fineweb_modal.test_publish import _HubAnswered

    tries = []

    def refused_upload(folder, repo_id, token, private=True):
        tries.append(folder)
        raise _HubAnswered(403)

    monkeypatch.setattr(publish_module, "upload_folder", refused_upload)
    assert main([a for a in argv if a != "--dry-run"] + ["--allow-partial"]) == 1
    assert "error: the upload to me/demo-embeddings failed (_HubAnswered: HTTP 403)" in capsys.readouterr().err
    assert len(tries) == 1 and not tries[0].exists(), "not retried; the temp copy removed all the same"
    assert len(uploaded["files"]) == 3 and not uploaded["folder"].exists(), "the temp copy of the dataset is removed after the upload"
