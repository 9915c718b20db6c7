"""``report.html``: the bench tables and the plots people look at, as PNG files beside it in ``report_files/``:
accuracy against size, accuracy against decode throughput with the Pareto front marked, each cell's latency
distribution, and per-layer error and kurtosis of the calibrated cells."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

from core.atomic import write_text_atomic

FILES = "report_files"


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (throughput, perplexity) no other point beats on both (higher throughput, lower
    perplexity), fastest first."""
    front = [name for name, (speed, ppl) in points.items()
             if not any(s >= speed and p <= ppl and (s, p) != (speed, ppl) for s, p in points.values())]
    return sorted(front, key=lambda n: -points[n][0])


def _measured(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) is not None for k in keys)]


def _scatter(ax: Any, rows: list[dict[str, Any]], x: str, baseline: str) -> None:
    for r in rows:
        base = r["cell"] == baseline
        ax.scatter(r[x], r["perplexity"], marker="*" if base else "o", s=140 if base else 40,
                   color="black" if base else "tab:blue", zorder=3)
        ax.annotate(r["cell"], (r[x], r["perplexity"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.grid(alpha=0.3)


def _accuracy_size(rows: list[dict[str, Any]], baseline: str, ax: Any) -> bool:
    rows = _measured(rows, "perplexity", "size_mib")
    _scatter(ax, rows, "size_mib", baseline)
    ax.set_xlabel("weights (MiB)")
    ax.set_title("accuracy against size (star: baseline)")
    return bool(rows)


def _accuracy_speed(rows: list[dict[str, Any]], baseline: str, ax: Any) -> bool:
    rows = _measured(rows, "perplexity", "decode_tok_s")
    _scatter(ax, rows, "decode_tok_s", baseline)
    front = pareto_front({r["cell"]: (r["decode_tok_s"], r["perplexity"]) for r in rows})
    by_name = {r["cell"]: r for r in rows}
    if front:
        ax.plot([by_name[n]["decode_tok_s"] for n in front], [by_name[n]["perplexity"] for n in front], "--o",
                color="tab:red", mfc="none", ms=12, label="Pareto front", zorder=2)
        ax.legend(fontsize=8)
    ax.set_xlabel("decode tok/s, 1 stream (higher is better)")
    ax.set_title("accuracy against decode throughput")
    return bool(rows)


def _latency(rows: list[dict[str, Any]], axes: Any) -> bool:
    rows = [r for r in _measured(rows, "latency") if r["latency"]]
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        data = [r["latency"][-1][key] or [0.0] for r in rows]
        if data:
            ax.boxplot(data, orientation="horizontal", tick_labels=[f"{r['cell']} ({r['latency'][-1]['profile']})" for r in rows])
        ax.set_title(f"{title}, at the most streams")
        ax.grid(alpha=0.3)
    return bool(rows)


def _layers(rows: list[dict[str, Any]], axes: Any) -> bool:
    # a cell whose layers quantized no linear (a KV-cache-only recipe) has nothing to draw
    rows = [r for r in _measured(rows, "layers") if any(layer["output_rel_error"] for layer in r["layers"])]
    for r in rows:
        layers = sorted(r["layers"], key=lambda layer: layer["index"])
        index = [layer["index"] for layer in layers]
        axes[0].plot(index, [sum(v := list(layer["output_rel_error"].values())) / max(len(v), 1) for layer in layers],
                     "o-", ms=3, label=r["cell"])
        axes[1].plot(index, [max(layer["weight_kurtosis"].values(), default=0.0) for layer in layers], "o-", ms=3,
                     label=r["cell"])
    axes[0].set_title("mean output relative error of the layer's linears")
    axes[1].set_title("largest weight kurtosis in the layer (as quantized)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=7)
    return bool(rows)


def _figure(path: Path, shape: tuple[int, int], size: tuple[float, float], draw: Callable[[Any], bool]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False)
    drawn = draw(axes[0] if shape[0] == 1 and shape[1] > 1 else axes[0][0])
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_plots(report: dict[str, Any], out_dir: Path) -> list[tuple[str, Path]]:
    """The plots that have data, as (title, PNG path)."""
    rows, baseline = report["rows"], report["baseline"]
    folder = out_dir / FILES
    folder.mkdir(parents=True, exist_ok=True)
    n = max(len(_measured(rows, "latency")), 1)
    plots = [("Accuracy against size", "accuracy_size.png", (1, 1), (8, 5), lambda ax: _accuracy_size(rows, baseline, ax)),
             ("Accuracy against decode throughput", "accuracy_speed.png", (1, 1), (8, 5),
              lambda ax: _accuracy_speed(rows, baseline, ax)),
             ("Latency per cell", "latency.png", (1, 2), (13, 1.2 + 0.45 * n), lambda axes: _latency(rows, axes)),
             ("Per-layer error and kurtosis (calibrated cells)", "layers.png", (1, 2), (13, 4),
              lambda axes: _layers(rows, axes))]
    made = []
    for title, name, shape, size, draw in plots:
        if _figure(folder / name, shape, size, draw):
            made.append((title, folder / name))
        else:
            (folder / name).unlink(missing_ok=True)
    return made


def _table(headers: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def write_html(report: dict[str, Any], columns: list[Any], out_dir: Path) -> Path:
    """Writes ``report.html`` and its plots; returns its path."""
    from workflows.bench.findings import FINDINGS_HEADER, findings_rows
    from workflows.bench.report import RANKING_HEADER, ranking_rows

    plots = write_plots(report, out_dir)
    parts = [f"<h1>qserve bench: {html.escape(report['model'])}</h1>",
             f"<p>baseline: {html.escape(report['baseline'])}</p>",
             _table([c.title for c in columns], [[c.text(r) for c in columns] for r in report["rows"]])]
    ranking = report["ranking"]
    parts += ["<h2>Ranking</h2>", f"<p>constraints: {html.escape(str(ranking['constraints']))}; order: "
              f"{html.escape(ranking['order'])}</p>", _table(RANKING_HEADER, ranking_rows(ranking))]
    parts += [f"<p>not ranked: {html.escape(e['cell'])}: {html.escape('; '.join(e['why']))}</p>" for e in ranking["excluded"]]
    if report.get("findings"):
        parts += ["<h2>Findings</h2>", _table(FINDINGS_HEADER, findings_rows(report["findings"]))]
    parts += [f"<h2>{html.escape(title)}</h2><img src=\"{FILES}/{path.name}\" alt=\"{html.escape(title)}\">"
              for title, path in plots]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}")
    path = out_dir / "report.html"
    write_text_atomic(path, f"<!doctype html><html><head><meta charset=\"utf-8\"><title>qserve bench</title>"
                            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
    return path
