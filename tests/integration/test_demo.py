"""`qserve demo` as a user runs it, smallest form: one scheme, one perplexity window, the output in tmp_path."""

from __future__ import annotations

import json

import pytest

from serving.server import free_port
from tests.integration.conftest import run_qserve

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_writes_the_table_and_its_runs_files(tmp_path):
    out = tmp_path / "demo"
    result = run_qserve("demo", "--scheme", "w8a8", "--windows", "1", "--port", str(free_port()), "-o", str(out),
                        timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "demo.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["bf16", "w8a8"]
    for name, row in rows.items():
        assert row["perplexity_detail"]["windows"] == 1, name
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["aggregate_output_tok_s"] > 0, name
        assert (out / "logs" / f"gateway-{name}.log").exists(), name
    # bf16 21.0, W8A8 21.6 on 20 windows (README): W8A8 costs a few percent; serving the wrong checkpoint or a
    # broken export is far off
    assert 0.99 < rows["w8a8"]["perplexity"] / rows["bf16"]["perplexity"] < 1.1, rows
    assert rows["w8a8"]["size_mib"] < 0.75 * rows["bf16"]["size_mib"]
    assert (out / "checkpoints" / "smollm2-135m-w8a8-rtn" / "config.json").exists()
    table = (out / "demo.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines] == ["variant", "bf16", "w8a8"]
    assert table.strip().endswith(report["table"].strip()) and report["table"] in result.stdout
