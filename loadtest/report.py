"""The load test report as a terminal/markdown table, JSON and CSV; ``compare`` puts reports side by side."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from loadtest.runner import SCHEMA


@dataclass(frozen=True)
class Column:
    """A figure of a run: where it is in the run dict, its title, the unit scale and format."""

    title: str
    get: Callable[[dict], Optional[float]]
    fmt: str = "{:,.1f}"
    scale: float = 1.0

    def value(self, run: dict) -> Optional[float]:
        try:
            v = self.get(run)
        except (KeyError, TypeError):
            return None
        return v * self.scale if v is not None else None

    def cell(self, run: dict) -> str:
        v = self.value(run)
        return self.fmt.format(v) if v is not None else "n/a"


def _pct(name: str, q: str) -> Callable[[dict], Optional[float]]:
    return lambda run: run[name][q]


RUN_COLUMNS = (
    Column("req/s", lambda r: r["request_throughput"], "{:,.2f}"),
    Column("input tok/s", lambda r: r["input_tok_s"], "{:,.0f}"),
    Column("output tok/s", lambda r: r["output_tok_s"]),
    Column("decode tok/s", lambda r: r["decode_tok_s"]),
    Column("decode tok/s/stream p50", _pct("decode_tok_s_per_stream", "p50")),
    Column("TTFT p50 ms", _pct("ttft_s", "p50"), "{:,.0f}", 1000),
    Column("TTFT p99 ms", _pct("ttft_s", "p99"), "{:,.0f}", 1000),
    Column("TPOT p50 ms", _pct("tpot_s", "p50"), "{:,.1f}", 1000),
    Column("ITL p99 ms", _pct("itl_s", "p99"), "{:,.1f}", 1000),
    Column("E2E p50 s", _pct("e2e_s", "p50"), "{:,.2f}"),
    Column("E2E p99 s", _pct("e2e_s", "p99"), "{:,.2f}"),
    Column("goodput req/s", lambda r: r["goodput"]["request_throughput"], "{:,.2f}"),
    Column("errors", lambda r: r["errors"]["count"], "{:.0f}"),
)
PREFILL_COLUMNS = (
    Column("prefill tok/s (1 stream)", lambda p: p["single_stream_tok_s"], "{:,.0f}"),
    Column("prefill tok/s (aggregate)", lambda p: p["aggregate_tok_s"], "{:,.0f}"),
    Column("TTFT p50 ms (1 stream, max_tokens=1)", _pct("single_stream_ttft_s", "p50"), "{:,.0f}", 1000),
)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def run_table(report: dict[str, Any]) -> str:
    """The final table: the prefill phase, then one row per run (a column per figure)."""
    columns = [c for c in RUN_COLUMNS if c.title != "goodput req/s" or any(r.get("goodput") for r in report["runs"])]
    parts = []
    if report.get("prefill"):
        parts.append(markdown([c.title for c in PREFILL_COLUMNS], [[c.cell(report["prefill"]) for c in PREFILL_COLUMNS]]))
    if report["runs"]:
        parts.append(markdown(["profile", *(c.title for c in columns)],
                              [[r["profile"], *(c.cell(r) for c in columns)] for r in report["runs"]]))
    notes = [f"sweep saturated at {report['saturated_at']}"] if report.get("saturated_at") else []
    notes += ["interrupted: partial report"] if report.get("interrupted") else []
    for run in report["runs"]:
        notes += [f"{run['profile']}: {sample}" for sample in run["errors"]["samples"]]
        if run.get("server"):
            srv = run["server"]
            notes.append(f"{run['profile']}: server counted {srv.get('engine_prompt_tokens', srv.get('gateway_prompt_tokens', 0)):,.0f} "
                         f"prompt / {srv.get('engine_output_tokens', srv.get('gateway_output_tokens', 0)):,.0f} output tokens; "
                         f"client {srv['client_prompt_tokens']:,} / {srv['client_output_tokens']:,}")
    return "\n\n".join(parts + (["\n".join(notes)] if notes else []))


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def write_csv(report: dict[str, Any], path: Path) -> None:
    """One row per request of every run, with the run's profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"profile": run["profile"], **row} for run in report["runs"] for row in run["request_rows"]]
    fields = ["profile", "index", "start_s", "ok", "counted", "status", "prompt_tokens", "output_tokens", "ttft_s",
              "tpot_s", "e2e_s", "max_itl_s", "cancelled", "error"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def load_report(path: Path) -> dict[str, Any]:
    """A saved report, checked to be one this version reads."""
    from core.client import EndpointError

    try:
        report = json.loads(path.read_text())
    except OSError as exc:
        raise EndpointError(f"cannot read the load test report {path}: {exc.strerror}") from None
    except ValueError:
        raise EndpointError(f"{path} is not a qserve load test report (not JSON); pass the file written by "
                            f"`qserve loadtest URL --json FILE.json` (or `-o DIR`)") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise EndpointError(f"{path} is not a qserve load test report of schema {SCHEMA} "
                            f"(found {report.get('schema') if isinstance(report, dict) else type(report).__name__}); "
                            f"rerun `qserve loadtest ... --json FILE.json` with this version")
    return report


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return f" (x{value / base:.2f})" if value is not None and base else ""


def compare(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: a row per figure, a column per report, ratios against the first report.

    Runs are matched by profile; the prefill figures come first.
    """
    names = [name for name, _ in reports]
    rows = []
    for col in PREFILL_COLUMNS:
        values = [col.value(r["prefill"]) if r.get("prefill") else None for _, r in reports]
        rows.append([col.title, *(_cell(col, v, values[0], i) for i, v in enumerate(values))])
    profiles = list(dict.fromkeys(run["profile"] for _, r in reports for run in r["runs"]))
    for profile in profiles:
        runs = [next((run for run in r["runs"] if run["profile"] == profile), None) for _, r in reports]
        for col in RUN_COLUMNS:
            values = [col.value(run) if run else None for run in runs]
            if any(v is not None for v in values):
                rows.append([f"{profile}: {col.title}", *(_cell(col, v, values[0], i) for i, v in enumerate(values))])
    return markdown(["figure", *names], rows)


def _cell(col: Column, value: Optional[float], base: Optional[float], position: int) -> str:
    if value is None:
        return "n/a"
    return col.fmt.format(value) + (_ratio(value, base) if position else "")
