"""An HTML report with PNG plots: latency distributions, throughput against load, a request timeline."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from loadtest.report import PREFILL_COLUMNS, RUN_COLUMNS


def _counted(run: dict[str, Any], key: str) -> list[float]:
    return [row[key] for row in run["request_rows"] if row["ok"] and row["counted"] and row[key] is not None]


def _latency_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, [("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"), ("e2e_s", "E2E (s)")]):
        scale = 1.0 if key == "e2e_s" else 1000.0
        for run in report["runs"]:
            values = sorted(v * scale for v in _counted(run, key))
            if values:  # an empirical CDF reads better than a histogram at tens of requests
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=run["profile"])
        ax.set_title(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _throughput_plot(report: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if (r["rate"] or r["concurrency"])]
    if len(runs) < 2:
        return False
    by_rate = runs[0]["rate"] is not None
    xs = [r["rate"] if by_rate else r["concurrency"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    left.plot(xs, [r["output_tok_s"] or 0 for r in runs], "o-", label="output tok/s")
    left.plot(xs, [r["decode_tok_s"] or 0 for r in runs], "s--", label="decode tok/s")
    right.plot(xs, [(r["ttft_s"]["p50"] or 0) * 1000 for r in runs], "o-", label="TTFT p50")
    right.plot(xs, [(r["ttft_s"]["p99"] or 0) * 1000 for r in runs], "s--", label="TTFT p99")
    for ax, ylabel in ((left, "tokens/s"), (right, "ms")):
        ax.set_xlabel("offered rate (req/s)" if by_rate else "concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _timeline_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.2))
    for run in report["runs"]:
        rows = [r for r in run["request_rows"] if r["e2e_s"] is not None]
        ax.scatter([r["start_s"] for r in rows], [r["e2e_s"] for r in rows], s=8, label=run["profile"],
                   marker="o", alpha=0.7)
    ax.set_xlabel("request sent at (s from its run's start)")
    ax.set_ylabel("E2E latency (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(report: dict[str, Any], path: Path) -> list[Path]:
    """Writes ``path`` and its PNG plots beside it (``STEM-*.png``); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    path.parent.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, Path]] = [("Latency distributions (counted requests)", path.with_name(f"{path.stem}-latency.png"))]
    _latency_plot(report, plots[0][1])
    throughput = path.with_name(f"{path.stem}-throughput.png")
    if _throughput_plot(report, throughput):
        plots.append(("Throughput and TTFT against load", throughput))
    timeline = path.with_name(f"{path.stem}-timeline.png")
    _timeline_plot(report, timeline)
    plots.append(("Request timeline", timeline))
    settings = [[k, str(v)] for k, v in report["settings"].items()]
    parts = [f"<h1>Load test: {html.escape(report['model'])} at {html.escape(report['url'])}</h1>",
             f"<p>started {html.escape(report['started_at'])}"
             + (" &mdash; <b>interrupted: partial report</b>" if report.get("interrupted") else "") + "</p>"]
    if report.get("prefill"):
        parts += ["<h2>Prefill (max_tokens=1)</h2>",
                  _table([c.title for c in PREFILL_COLUMNS], [[c.cell(report["prefill"]) for c in PREFILL_COLUMNS]])]
    parts += ["<h2>Runs</h2>", _table(["profile", *(c.title for c in RUN_COLUMNS)],
                                      [[r["profile"], *(c.cell(r) for c in RUN_COLUMNS)] for r in report["runs"]])]
    parts += [f"<h2>{html.escape(title)}</h2><img src=\"{png.name}\" alt=\"{html.escape(title)}\">" for title, png in plots]
    parts += ["<h2>Settings</h2>", _table(["setting", "value"], settings)]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}")
    path.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>qserve load test</title>"
                    f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return [path, *(png for _, png in plots)]

