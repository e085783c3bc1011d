"""Evaluation figures (PNG).  Each function writes one file and returns its path.

Uses matplotlib's object API with the Agg canvas directly, so importing this module never switches the
global pyplot backend of the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vllm_dspark.eval.metrics import ReliabilityBins

__all__ = [
    "plot_conditional_acceptance",
    "plot_reliability",
    "plot_survival",
    "plot_throughput",
    "plot_throughput_vs_concurrency",
]

_DPI = 120


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike, layout: bool = True) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _per_position(curves: Mapping[str, Sequence[float]], path, title: str, ylabel: str,
                  counts: Mapping[str, Sequence[int]] | None = None, legend: Mapping[str, str] | None = None,
                  subtitle: str = "") -> str:
    """Lines per drafter; each point labelled with its sample count (``counts``, when given); positions without
    data (nan) marked "no data" on the axis instead of a line to 0; the legend outside the axes."""
    if not curves:
        raise ValueError("nothing to plot: no curves given")
    fig = _new_figure(9.0, 4.8)
    ax = fig.add_subplot()
    k_max = 0
    empty_marked = False
    for c, (label, values) in enumerate(curves.items()):
        y = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        x = np.arange(1, y.shape[0] + 1)
        k_max = max(k_max, y.shape[0])
        (line,) = ax.plot(x, y, marker="o", label=(legend or {}).get(label, label))
        n = None if counts is None or label not in counts else list(counts[label])
        for xi, yi, ni in zip(x, y, n or [None] * len(x)):
            if np.isfinite(yi) and ni is not None:
                # alternate above / below so that two curves' counts at one point stay readable
                ax.annotate(f"n={ni}", (xi, yi), textcoords="offset points", xytext=(0, 8 if c % 2 == 0 else -13),
                            ha="center", fontsize="x-small", color=line.get_color())
        empty = x[~np.isfinite(y)]
        if empty.size:
            ax.plot(empty, np.full(empty.shape, 0.02), linestyle="none", marker="x", color="grey",
                    label=None if empty_marked else "no data (no round reached this position)")
            empty_marked = True
    ax.set_xticks(np.arange(1, k_max + 1))
    ax.set_xlim(0.5, k_max + 0.5)
    ax.set_ylim(0.0, 1.08)
    ax.set_xlabel("draft position k")
    ax.set_ylabel(ylabel)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_conditional_acceptance(
    curves: Mapping[str, Sequence[float]], path, title: str = "Conditional acceptance by draft position", *,
    counts: Mapping[str, Sequence[int]] | None = None, legend: Mapping[str, str] | None = None, subtitle: str = "",
) -> str:
    """One line per drafter: P(position k accepted | k-1 accepted) for k = 1..K (the paper's Fig. 2).
    ``counts``: per drafter, the rounds that reached each position (the ratio's denominator)."""
    return _per_position(curves, path, title, "P(k accepted | k-1 accepted)", counts, legend, subtitle)


def plot_survival(
    curves: Mapping[str, Sequence[float]], path, title: str = "Survival (accept_rate@k) by draft position", *,
    counts: Mapping[str, Sequence[int]] | None = None, legend: Mapping[str, str] | None = None, subtitle: str = "",
) -> str:
    """One line per drafter: P(at least k drafts accepted) for k = 1..K (DeepSpec's accept_rate@k).
    ``counts``: per drafter, the rounds that drafted at least k tokens (the denominator)."""
    return _per_position(curves, path, title, "P(≥ k drafts accepted)", counts, legend, subtitle)


def _is_bins(x) -> bool:
    return isinstance(x, ReliabilityBins) or (
        isinstance(x, tuple) and len(x) == 4 and all(np.ndim(v) == 1 for v in x)
    )


def _bins_ece(b: ReliabilityBins) -> float:
    counts = np.asarray(b.counts, dtype=np.float64)
    ok = counts > 0
    if not ok.any():
        return float("nan")
    gap = np.abs(np.asarray(b.accuracy)[ok] - np.asarray(b.confidence)[ok])
    return float((gap * counts[ok]).sum() / counts[ok].sum())


def plot_reliability(bins, path, title: str = "Reliability of predicted survival", *, subtitle: str = "") -> str:
    """Reliability diagram(s): observed acceptance vs predicted survival, with the diagonal y = x.

    ``bins`` may be
      * one :class:`ReliabilityBins` (pooled),
      * a list of them, one per draft position (one panel per position),
      * a dict ``{label: ReliabilityBins}`` or ``{label: [ReliabilityBins per position]}`` overlaying curves,
        e.g. ``{"before calibration": ..., "after calibration": ...}``.
    Each panel's title carries its sample count and each curve's ECE; a panel without samples says so (no ECE).
    """
    if _is_bins(bins):
        curves = {"": [ReliabilityBins(*bins)]}
    elif isinstance(bins, Mapping):
        curves = {str(k): [ReliabilityBins(*v)] if _is_bins(v) else [ReliabilityBins(*b) for b in v]
                  for k, v in bins.items()}
    else:
        curves = {"": [ReliabilityBins(*b) for b in bins]}
    if not curves or any(len(v) == 0 for v in curves.values()):
        raise ValueError("nothing to plot: no reliability bins given")
    num_panels = max(len(v) for v in curves.values())
    cols = min(num_panels, 4)
    rows = -(-num_panels // cols)
    fig = _new_figure(3.2 * cols + 1.0, 3.4 * rows + 1.2) if num_panels > 1 else _new_figure(5.5, 5.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    handles = {}
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= num_panels:
            ax.set_visible(False)
            continue
        (diag,) = ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        handles["perfect calibration"] = diag
        n, hits, eces = 0, 0, []
        for label, per_pos in curves.items():
            if p >= len(per_pos):
                continue
            b = per_pos[p]
            ok = np.asarray(b.counts) > 0
            if int(np.asarray(b.counts).sum()) > n:
                n = int(np.asarray(b.counts).sum())
                hits = int(round(float((np.asarray(b.accuracy)[ok] * np.asarray(b.counts)[ok]).sum())))
            if not ok.any():
                continue
            # clip_on=False: points at (0, 0), common at late positions, stay visible on the axes' corner
            (line,) = ax.plot(np.asarray(b.confidence)[ok], np.asarray(b.accuracy)[ok], marker="o", clip_on=False)
            handles.setdefault(label or "observed", line)
            eces.append(f"{label + ' ' if label else ''}{_bins_ece(b):.3f}")
        if n == 0:
            ax.text(0.5, 0.5, "no data\n(no round drafted this far)", ha="center", va="center", color="grey",
                    transform=ax.transAxes)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("predicted survival")
        ax.set_ylabel("observed acceptance rate")
        head = f"position {p + 1}: " if num_panels > 1 else ""
        ece = f"\nECE {', '.join(eces)}" if eces else ""
        ax.set_title(f"{head}n={n}" + (f", {hits} accepted" if n else "") + ece, fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize="medium")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize="small",
               frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path, layout=False)


def _throughput_table(results: Sequence[Mapping]) -> tuple[list[str], list[int], np.ndarray]:
    """-> (methods in first-seen order, sorted concurrencies, [M, C] mean tokens/s, nan when missing)."""
    if not results:
        raise ValueError("nothing to plot: no throughput results given")
    methods: list[str] = []
    for r in results:
        if r["method"] not in methods:
            methods.append(r["method"])
    conc = sorted({int(r["concurrency"]) for r in results})
    total = np.zeros((len(methods), len(conc)))
    count = np.zeros_like(total)
    for r in results:
        i, j = methods.index(r["method"]), conc.index(int(r["concurrency"]))
        total[i, j] += float(r["tokens_per_s"])
        count[i, j] += 1
    with np.errstate(invalid="ignore"):
        return methods, conc, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot_throughput(results: Sequence[Mapping], path, title: str = "Output throughput by concurrency", *,
                    subtitle: str = "") -> str:
    """Grouped bars: one group per concurrency, one bar per method (repeated runs are averaged).

    ``results`` items: ``{"method": str, "concurrency": int, "tokens_per_s": float}``.
    """
    methods, conc, tps = _throughput_table(results)
    fig = _new_figure(max(9.0, 1.2 * len(conc) + 4.0), 4.8)  # room for the legend beside the axes
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    x = np.arange(len(conc))
    for i, m in enumerate(methods):
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(tps[i]), width, label=m)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0f}" for v in tps[i]], fontsize="x-small")
    ax.set_xticks(x, [str(c) for c in conc])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output throughput (tokens/s)")
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_throughput_vs_concurrency(
    results: Sequence[Mapping], path, title: str = "Output throughput vs concurrency", *, subtitle: str = ""
) -> str:
    """One line per method: tokens/s against concurrency (log2 x axis when it spans more than 8x)."""
    methods, conc, tps = _throughput_table(results)
    fig = _new_figure(9.0, 4.8)
    ax = fig.add_subplot()
    for i, m in enumerate(methods):
        ok = ~np.isnan(tps[i])
        ax.plot(np.asarray(conc)[ok], tps[i][ok], marker="o", label=m)
    if conc[0] > 0 and conc[-1] / conc[0] > 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output throughput (tokens/s)")
    ax.set_ylim(bottom=0)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _save(fig, path)
