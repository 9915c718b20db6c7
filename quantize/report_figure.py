"""The per-layer report as a figure: output error, weight and input kurtosis of each linear kind by depth.

Three panels share the layer axis, one line per linear kind (``q_proj``, ``down_proj``...): the relative
output error of the quantized linear on calibration inputs (log scale), then weight and input kurtosis, dashed
before a transform (SmoothQuant, AWQ) and solid as quantized, the views of LLMC's Tables 2 and 7.
"""

from __future__ import annotations

from pathlib import Path


def _kind(name: str) -> str:
    """``self_attn.q_proj`` -> ``q_proj``: one line per linear kind across layers."""
    return name.rsplit(".", 1)[-1]


def _series(layers: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per linear kind, the layer indices and values of ``layers[i][key]`` (kinds absent from a layer skipped)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for layer in layers:
        for name, value in layer.get(key, {}).items():
            xs, ys = series.setdefault(_kind(name), ([], []))
            xs.append(layer["index"])
            ys.append(value)
    return series


def write_report_figure(path: Path, layers: list[dict], title: str = "") -> None:
    """Writes the report's figure to ``path`` (PNG); ``layers`` are the rows of ``quantization_report.json``."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and never one needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    # all three on log scales: errors span decades, and Pearson kurtosis (>= 1) does with outlier channels
    panels = [("output_rel_error", None, "output relative error"),
              ("weight_kurtosis", "weight_kurtosis_before", "weight kurtosis"),
              ("input_kurtosis", "input_kurtosis_before", "input kurtosis")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (after_key, before_key, label) in zip(axes, panels):
        before = _series(layers, before_key) if before_key else {}
        for i, (kind, (xs, ys)) in enumerate(sorted(_series(layers, after_key).items())):
            color = colors[i % len(colors)]
            ax.plot(xs, ys, marker=".", color=color, label=kind)
            if kind in before:
                ax.plot(*before[kind], linestyle="--", color=color, alpha=0.6)
        ax.set_ylabel(label + (" (dashed: before transform)" if before else ""))
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(ncol=4, fontsize="small")
    axes[-1].set_xlabel("decoder layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
