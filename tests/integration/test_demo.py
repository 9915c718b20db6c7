"""`qserve demo` as a user runs it, smallest form: one scheme, one perplexity window, the output in tmp_path. It is
the bench `demo` preset, so its report is the bench report."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import run_qserve

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_writes_the_table_and_its_runs_files(tmp_path):
    out = tmp_path / "demo"
    result = run_qserve("demo", "--scheme", "w8a8", "--windows", "1", "-o", str(out), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {row["cell"]: row for row in report["rows"]}
    assert list(rows) == ["bf16", "w8a8"] and report["baseline"] == "bf16"
    for name, row in rows.items():
        assert row["status"] == "ok" and row["perplexity_detail"]["windows"] == 1, name
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["aggregate_output_tok_s"] > 0, name
        assert (out / "logs" / f"gateway-{name}.log").exists(), name
    # bf16 21.0, W8A8 21.6 on 20 windows (README): W8A8 costs a few percent; serving the wrong checkpoint or a
    # broken export is far off
    assert 0.99 < rows["w8a8"]["perplexity"] / rows["bf16"]["perplexity"] < 1.1, rows
    assert rows["w8a8"]["size_mib"] < 0.75 * rows["bf16"]["size_mib"]
    assert 0.8 < rows["w8a8"]["top1_agreement"] < 1.0  # close to bf16, not identical
    assert (rows["w8a8"]["checkpoint"] and (out / "report.html").exists())
    table = (out / "report.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "|---" not in line]
    assert [line.split("|")[1].strip() for line in lines][:3] == ["cell", "bf16", "w8a8"]
    assert "| w8a8 | ok | vllm |" in result.stdout
