"""The summarize stage's pictures: PNG files, and their data: URIs for markdown artifacts."""

from __future__ import annotations

import base64

from fineweb_modal.charts import data_uri, histogram_png, throughput_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_histogram_and_throughput_charts_are_png_files_inlined_byte_for_byte(tmp_path):
    histogram = histogram_png([0, 10, 50, 257], [3, 40, 120], tmp_path / "summary" / "train-chunk-tokens.png", "demo: tokens per chunk")
    throughput = throughput_png({"chunk": {"s0": 9e5, "s1": 8e5}, "embed": {"s0": 1.7e4}}, tmp_path / "summary" / "train-throughput.png", "demo: tokens/s per shard")
    for path in (histogram, throughput):
        png = path.read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 2000, f"{path.name} is a drawn PNG"
        uri = data_uri(path)
        assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png
