"""The bench report's arithmetic: ranking under constraints, the Pareto front, the findings' verdicts, and the
files written (JSON schema, Markdown, CSV, HTML with its plots) from recorded cell results, no engine."""

from __future__ import annotations

import csv
import json

import pytest

from workflows.bench.findings import compute_findings, token_kl
from workflows.bench.html import pareto_front
from workflows.bench.matrix import load_matrix, parse_matrix, preset_path
from workflows.bench.report import ConstraintError, Constraints, rank, write_reports


def validate_report(path):
    """The report file against the schema qserve ships (report.schema.json)."""
    import jsonschema

    from workflows.bench.report import SCHEMA_FILE

    jsonschema.validate(json.loads(path.read_text()), json.loads(SCHEMA_FILE.read_text()))


def test_the_schema_refuses_a_report_that_breaks_it(tmp_path):
    import jsonschema

    test_reports_are_written_from_recorded_results(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    report["rows"][0]["status"] = "done"
    (tmp_path / "bad.json").write_text(json.dumps(report))
    with pytest.raises(jsonschema.ValidationError, match="'done' is not one of"):
        validate_report(tmp_path / "bad.json")


def _row(cell, ppl_change, decode, size, status="ok"):
    return {"cell": cell, "status": status, "ppl_change": ppl_change, "decode_tok_s": decode, "size_mib": size}


def test_ranking_keeps_cells_within_the_constraints_fastest_first():
    rows = [_row("bf16", 0.0, 28.0, 258), _row("w8", 0.01, 35.0, 160), _row("w4", 0.05, 40.0, 90),
            _row("w4-gptq", 0.015, 35.0, 90), _row("broken", None, None, None, status="failed"),
            _row("w3-dequantized", 0.3, None, 258)]
    ranking = rank(rows, Constraints.parse("2%", 30))
    assert [r["cell"] for r in ranking["ranked"]] == ["w4-gptq", "w8"]  # same speed: the smaller first
    why = {e["cell"]: e["why"] for e in ranking["excluded"]}
    assert set(why) == {"bf16", "w4", "w3-dequantized"} and "decode 28.0 tok/s" in why["bf16"][0]
    assert "+5.00%" in why["w4"][0] and why["w3-dequantized"][0] == "no speed measured (loadtest: false)"
    assert [r["cell"] for r in rank(rows, Constraints())["ranked"]] == ["w4", "w4-gptq", "w8", "bf16"]


@pytest.mark.parametrize("text, value", [("2%", 0.02), ("0.5 %", 0.005), ("0.02", 0.02)])
def test_ppl_constraints_read_percent_or_fraction(text, value):
    assert Constraints.parse(text, None).max_ppl_increase == pytest.approx(value)


def test_a_bad_constraint_says_the_accepted_form():
    with pytest.raises(ConstraintError, match="give a percentage such as 2%"):
        Constraints.parse("two", None)


def test_pareto_front_is_the_undominated_points_fastest_first():
    points = {"bf16": (28, 22.7), "w8": (35, 23.0), "w4": (40, 25.0), "w4-bad": (38, 30.0), "w8-slow": (30, 23.5)}
    assert pareto_front(points) == ["w4", "w8", "bf16"]


def test_token_kl_is_zero_for_the_same_text_and_grows_with_difference():
    same = token_kl([1, 2, 3, 3], [1, 2, 3, 3], vocab=10)
    near, far = token_kl([1, 2, 3, 3], [1, 2, 3, 4], vocab=10), token_kl([1, 2, 3, 3], [5, 6, 7, 8], vocab=10)
    assert same == pytest.approx(0.0, abs=1e-12) and 0 < near < far


def _llmc_rows(**ppl):
    """Every llmc-findings cell finished, with the perplexities given (others 25) and plausible speeds."""
    cells = load_matrix(preset_path("llmc-findings")).cells
    rows = []
    for c in cells:
        rows.append({"cell": c.name, "status": "ok", "perplexity": ppl.get(c.name.replace("-", "_"), 25.0),
                     "prefill_tok_s": 2500.0, "decode_tok_s": 28.0, "kv_cache_tokens": 46592})
    by = {r["cell"]: r for r in rows}
    by["w8a8-rtn"].update(prefill_tok_s=3000.0, decode_tok_s=33.0)
    by["kv-fp8"]["kv_cache_tokens"] = 93184
    return rows


def test_llmc_findings_verdicts_follow_the_numbers(tmp_path):
    matrix = load_matrix(preset_path("llmc-findings"))
    (tmp_path / "findings_data.json").write_text(json.dumps(
        {"token_kl": {"wikitext2_valid": 0.2, "lambada": 0.9}, "simulated_kv": {"bf16": 22.0, "kivi4": 22.5, "kivi2": 30.0}}))
    held = compute_findings(matrix, _llmc_rows(bf16=22.0, w4_gptq=24.0, w4_gptq_lambada=24.5, w3_awq_sym=40.0,
                                               w3_awq_asym=35.0, w4_awq=24.2, w4_awq_gptq=23.8, w4_rotate_rtn=26.0,
                                               w4_rotate_gptq=24.1, w3_rtn=50.0, w3_rtn_down8=42.0, w3_rtn_attn8=45.0,
                                               kv_fp8=22.5), tmp_path)
    assert [f["verdict"] for f in held] == ["reproduced"] * 5 + ["not measured", "reproduced"]
    failed = compute_findings(matrix, _llmc_rows(w4_gptq=25.0, w4_gptq_lambada=24.0, w3_rtn_down8=46.0), tmp_path)
    assert failed[0]["verdict"] == failed[3]["verdict"] == "not reproduced here"
    rows = _llmc_rows()
    rows[[r["cell"] for r in rows].index("w4-awq")] = {"cell": "w4-awq", "status": "failed", "error": "E: boom"}
    missing = compute_findings(matrix, rows, tmp_path)
    assert missing[2]["verdict"] == "not measured" and "w4-awq has no perplexity (E: boom)" in missing[2]["measured"]


def test_reports_are_written_from_recorded_results(tmp_path):
    matrix = parse_matrix({"model": "m", "baseline": "bf16", "cells": [
        {"name": "bf16", "scheme": "float"}, {"name": "w4", "scheme": "w4a16"}, {"name": "w8", "scheme": "w8a16"}]})
    latency = [{"profile": "c=8", "ttft_ms": [100.0, 120.0, 180.0], "tpot_ms": [30.0, 31.0, 35.0]}]
    layers = [{"index": i, "output_rel_error": {"q_proj": 0.01 * (i + 1)}, "weight_kurtosis": {"q_proj": 3.0 + i},
               "input_kurtosis": {"q_proj": 5.0}} for i in range(4)]
    results = {"bf16": {"status": "ok", "perplexity": 20.0, "size_mib": 258.0, "decode_tok_s": 28.0, "latency": latency},
               "w4": {"status": "ok", "perplexity": 21.0, "size_mib": 90.0, "decode_tok_s": 24.0, "latency": latency,
                      "agreement": {"positions": 100, "top1_agreement": 0.9, "mean_kl": 0.05}, "tasks": {"arc_easy": {"items": 4, "acc": 0.5}},
                      "layers": layers},
               "w8": {"status": "failed", "error": "EngineStartError: refused"}}
    report = write_reports(matrix, results, tmp_path, Constraints(max_ppl_increase=0.1), log=lambda m: None)
    assert json.loads((tmp_path / "report.json").read_text())["schema"] == report["schema"] == "qserve.bench/1"
    validate_report(tmp_path / "report.json")
    rows = {r["cell"]: r for r in report["rows"]}
    assert rows["w4"]["ppl_change"] == pytest.approx(0.05) and rows["w4"]["top1_agreement"] == 0.9
    assert rows["w4"]["task:arc_easy"] == 0.5 and rows["w8"]["status"] == "failed"
    assert [r["cell"] for r in report["ranking"]["ranked"]] == ["bf16", "w4"]
    with open(tmp_path / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["cell"] for r in table] == ["bf16", "w4", "w8"] and table[2]["error"] == "EngineStartError: refused"
    assert "arc_easy acc" in (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    for png in ("accuracy_size.png", "accuracy_speed.png", "latency.png", "layers.png"):
        assert f'src="report_files/{png}"' in page and (tmp_path / "report_files" / png).stat().st_size > 5000, png


def test_the_html_report_opens_in_a_real_browser_with_its_plots_loaded(tmp_path):
    from tests.browser import open_page

    test_reports_are_written_from_recorded_results(tmp_path)
    shown = open_page(tmp_path / "report.html", tmp_path / "screenshot.png")
    assert len(shown["images"]) == 4
    for image in shown["images"]:  # a missing file loads as a broken image: complete, but 0 wide
        assert image["complete"] and image["width"] >= 600 and image["height"] >= 100, image
    assert "Ranking" in shown["text"] and "w4" in shown["text"]
    assert (tmp_path / "screenshot.png").stat().st_size > 50_000
