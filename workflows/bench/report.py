"""The bench report: ``report.json`` (schema ``qserve.bench/1``), ``report.md``, ``report.csv`` and
``report.html``, rows in matrix order, with a ranking of the cells under the user's constraints."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from core.atomic import atomic_output_file, write_text_atomic
from loadtest.report import markdown
from workflows.bench.matrix import Matrix

REPORT_SCHEMA = "qserve.bench/1"  # described by report.schema.json beside this file
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str

    def text(self, row: dict[str, Any]) -> str:
        """The row's value as the tables show it ("" where it was not measured)."""
        value = row.get(self.key)
        return self.fmt.format(value) if value is not None else ""


COLUMNS = [Column("cell", "cell", "{}"), Column("status", "status", "{}"), Column("target", "target", "{}"),
           Column("perplexity", "WikiText-2 ppl", "{:.3f}"), Column("ppl_change", "ppl vs baseline", "{:+.2%}"),
           Column("top1_agreement", "top-1 agree", "{:.2%}"), Column("mean_kl", "KL", "{:.4f}"),
           Column("size_mib", "MiB", "{:.1f}"), Column("bits_per_weight", "bits/weight", "{:.2f}"),
           Column("prefill_tok_s", "prefill tok/s", "{:,.0f}"), Column("decode_tok_s", "decode tok/s (1 stream)", "{:.1f}"),
           Column("aggregate_output_tok_s", "output tok/s (most streams)", "{:.1f}"),
           Column("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"), Column("quantize_s", "quantize s", "{:.0f}"),
           Column("quantize_peak_rss_mib", "quantize peak MiB", "{:,.0f}"), Column("engine_start_s", "engine start s", "{:.0f}")]


class ConstraintError(ValueError):
    """A constraint that cannot be read; the message shows the accepted form."""


@dataclass(frozen=True)
class Constraints:
    """What a cell must meet to be ranked: at most this perplexity increase over the baseline (a fraction), at
    least this single-stream decode throughput."""

    max_ppl_increase: Optional[float] = None
    min_decode_tok_s: Optional[float] = None

    @staticmethod
    def parse(max_ppl_increase: Optional[str], min_decode_tok_s: Optional[float]) -> "Constraints":
        """``max_ppl_increase`` as ``2%`` or ``0.02``."""
        limit = None
        if max_ppl_increase is not None:
            text = max_ppl_increase.strip()
            try:
                limit = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ConstraintError(f"--max-ppl-increase {max_ppl_increase!r} is not a number: give a percentage "
                                      f"such as 2% or a fraction such as 0.02") from None
        return Constraints(limit, min_decode_tok_s)

    def violations(self, row: dict[str, Any]) -> list[str]:
        found = [] if row.get("decode_tok_s") is not None else ["no speed measured (loadtest: false)"]
        if self.max_ppl_increase is not None and (row.get("ppl_change") is None
                                                  or row["ppl_change"] > self.max_ppl_increase):
            found.append(f"perplexity {row.get('ppl_change', float('nan')):+.2%} over the baseline "
                         f"(at most {self.max_ppl_increase:+.2%})")
        if self.min_decode_tok_s is not None and (row.get("decode_tok_s") or 0) < self.min_decode_tok_s and not found:
            found.append(f"decode {row.get('decode_tok_s') or 0:.1f} tok/s (at least {self.min_decode_tok_s:g})")
        return found


def rank(rows: list[dict[str, Any]], constraints: Constraints) -> dict[str, Any]:
    """The finished cells with a measured speed that meet the constraints, fastest single-stream decode first
    (then smallest), and the others with what they missed."""
    ok = [r for r in rows if r.get("status") == "ok"]
    eligible = sorted((r for r in ok if not constraints.violations(r)),
                      key=lambda r: (-(r.get("decode_tok_s") or 0.0), r.get("size_mib") or 0.0))
    return {"constraints": asdict(constraints), "order": "decode tok/s (1 stream), then size",
            "ranked": [{"rank": i, "cell": r["cell"], "decode_tok_s": r.get("decode_tok_s"), "size_mib": r.get("size_mib"),
                        "ppl_change": r.get("ppl_change")} for i, r in enumerate(eligible, 1)],
            "excluded": [{"cell": r["cell"], "why": constraints.violations(r)} for r in ok if constraints.violations(r)]}


def report_rows(matrix: Matrix, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell in matrix order, with the change against the baseline and the agreement flattened."""
    baseline = results.get(matrix.baseline, {}).get("perplexity")
    rows = []
    for cell in matrix.cells:
        result = results.get(cell.name, {"status": "not run"})
        row = {"cell": cell.name, "target": cell.target, **result}
        if baseline and result.get("perplexity"):
            row["ppl_change"] = result["perplexity"] / baseline - 1
        row.update({k: v for k, v in (result.get("agreement") or {}).items() if k in ("top1_agreement", "mean_kl")})
        for task, metrics in (result.get("tasks") or {}).items():
            row[f"task:{task}"] = metrics.get("acc", metrics.get("exact_match"))
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[Column]:
    tasks = sorted({k for r in rows for k in r if k.startswith("task:")})
    columns = [c for c in COLUMNS if c.key in ("cell", "status") or any(r.get(c.key) is not None for r in rows)]
    return columns[:7] + [Column(t, t.removeprefix("task:") + " acc", "{:.3f}") for t in tasks] + columns[7:]


def markdown_table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    return markdown([c.title for c in columns], [[c.text(row) for c in columns] for row in rows])


RANKING_HEADER = ["rank", "cell", "decode tok/s", "MiB", "ppl vs baseline"]


def ranking_rows(ranking: dict[str, Any]) -> list[list[str]]:
    """The ranked cells as the Markdown and HTML tables show them."""
    return [[str(r["rank"]), r["cell"], f"{r['decode_tok_s'] or 0:.1f}", f"{r['size_mib'] or 0:.1f}",
             f"{r['ppl_change']:+.2%}" if r["ppl_change"] is not None else ""] for r in ranking["ranked"]]


def ranking_markdown(ranking: dict[str, Any]) -> str:
    excluded = [f"\nnot ranked: {e['cell']}: {'; '.join(e['why'])}" for e in ranking["excluded"]]
    return "\n".join([markdown(RANKING_HEADER, ranking_rows(ranking)), *excluded])


def write_reports(matrix: Matrix, results: dict[str, dict[str, Any]], out_dir: Path,
                  constraints: Optional[Constraints] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes every report file and returns the JSON report."""
    from workflows.bench.findings import compute_findings, findings_markdown
    from workflows.bench.html import write_html

    rows = report_rows(matrix, results)
    columns = _columns(rows)
    ranking = rank(rows, constraints or Constraints())
    findings = compute_findings(matrix, rows, out_dir, log) if matrix.findings else None
    report = {"schema": REPORT_SCHEMA, "model": matrix.model, "baseline": matrix.baseline, "rows": rows,
              "ranking": ranking, "findings": findings}
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    table = markdown_table(rows, columns)
    parts = [f"# qserve bench: {matrix.model}", f"baseline: {matrix.baseline}", table, "## Ranking", ranking_markdown(ranking)]
    if findings:
        parts += ["## Findings", findings_markdown(findings)]
    write_text_atomic(out_dir / "report.md", "\n\n".join(parts) + "\n")
    with atomic_output_file(out_dir / "report.csv", force=True) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([c.key for c in columns] + ["error"])
        for row in rows:
            writer.writerow([row.get(c.key, "") for c in columns] + [row.get("error", "")])
    write_html(report, columns, out_dir)
    log(f"\n{table}\n\n{ranking_markdown(ranking)}\n"
        + (f"\n{findings_markdown(findings)}\n" if findings else "")
        + f"\nsaved {out_dir / 'report.md'}, report.html, report.json and report.csv")
    return report
