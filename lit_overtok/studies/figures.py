"""A study's figures (docs/method.md §4.2, §4.7): loss curves with the paired difference to the baseline, and the
input-vocabulary law.

Curves are drawn against training tokens on a log axis (a speedup is then a horizontal shift), with the baseline's
CPU-seconds on the top axis: per seed a thin line, per arm the mean over seeds thick, both fitted as the speedup
estimator fits them (``convergence.trailing_fit``: batch noise hides a 0.03 gap in raw training losses). Below each
metric: treatment - baseline, seed by seed on the baseline's token grid, the mean over pairs with the range over pairs
as a band. A law is drawn only through at least 3 distinct input vocabularies (two points fit any line exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from lit_overtok.studies.convergence import Curve, DEFAULT_WINDOW, trailing_fit, window_width

DPI = 120
FONT_SIZE = 11
MIN_LAW_POINTS = 3
WIDTH = window_width(DEFAULT_WINDOW)

SeedCurves = dict[int, Curve]


def fitted(curve: Curve) -> np.ndarray:
    return trailing_fit(np.log(curve.tokens), curve.values, WIDTH)


def on_grid(curve: Curve, tokens: np.ndarray) -> np.ndarray:
    """The fitted curve at ``tokens`` (linear in log tokens between its points)."""
    return np.interp(np.log(tokens), np.log(curve.tokens), fitted(curve))


def shared_grid(curves: list[Curve]) -> np.ndarray:
    """The sparsest curve's tokens within the range every curve covers."""
    start, end = max(c.tokens[0] for c in curves), min(c.tokens[-1] for c in curves)
    grid = min(curves, key=lambda c: c.tokens.size).tokens
    return grid[(grid >= start) & (grid <= end)]


def paired_differences(baseline: SeedCurves, treatment: SeedCurves) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(tokens, differences per pair: pairs x tokens) of treatment - baseline over their shared seeds and tokens."""
    seeds = sorted(set(baseline) & set(treatment))
    if not seeds:
        return None
    grid = shared_grid([baseline[s] for s in seeds] + [treatment[s] for s in seeds])
    return grid, np.stack([on_grid(treatment[s], grid) - on_grid(baseline[s], grid) for s in seeds])


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1, "legend.fontsize": FONT_SIZE - 1})
    return plt


def _late_range(values: list[np.ndarray], tokens: list[np.ndarray]) -> tuple[float, float]:
    """y limits that show the last 80% of training in log tokens (the first steps would squash every gap)."""
    late = [v[t >= t[0] * (t[-1] / t[0]) ** 0.2] for v, t in zip(values, tokens)]
    low, high = min(float(v.min()) for v in late if v.size), max(float(v.max()) for v in late if v.size)
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def plot_study(curves: dict[str, dict[str, SeedCurves]], baselines: dict[str, str], labels: dict[str, str],
               seconds_per_token: Optional[float], path: Path) -> None:
    """``curves[metric][arm][seed]``; ``baselines[arm]``: the arm each treatment is paired with (arms not in it
    are baselines); ``labels[arm]`` for the legend (parameter counts); the top axis shows CPU seconds at
    ``seconds_per_token`` (the main baseline's), none when it is None."""
    plt = pyplot()
    metrics = list(curves)
    fig, axes = plt.subplots(2, len(metrics), figsize=(7 * len(metrics), 9.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    colours = {arm: f"C{i}" for i, arm in enumerate(labels)}
    for column, metric in enumerate(metrics):
        ax, diff_ax = axes[0, column], axes[1, column]
        drawn_values, drawn_tokens = [], []
        for arm, seeds in curves[metric].items():
            for curve in seeds.values():
                ax.plot(curve.tokens, fitted(curve), color=colours[arm], linewidth=0.7, alpha=0.45)
            grid = shared_grid(list(seeds.values()))
            mean = np.mean([on_grid(c, grid) for c in seeds.values()], axis=0)
            ax.plot(grid, mean, color=colours[arm], linewidth=2.2,
                    label=f"{labels[arm]} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
            drawn_values.append(mean)
            drawn_tokens.append(grid)
            if arm not in baselines or baselines[arm] not in curves[metric]:
                continue
            paired = paired_differences(curves[metric][baselines[arm]], seeds)
            if paired is not None:
                tokens, differences = paired
                diff_ax.plot(tokens, differences.mean(0), color=colours[arm], linewidth=2,
                             label=f"{arm} − {baselines[arm]} ({differences.shape[0]} "
                                   f"pair{'s' * (differences.shape[0] > 1)})")
                diff_ax.fill_between(tokens, differences.min(0), differences.max(0), color=colours[arm], alpha=0.2,
                                     linewidth=0)
        ax.set_ylim(*_late_range(drawn_values, drawn_tokens))
        ax.set_title(f"{metric}: fitted per seed (thin), mean over seeds (thick)")
        ax.set_ylabel(metric)
        ax.ticklabel_format(axis="y", useOffset=False)  # losses as they are, not as offsets from 6.5
        diff_ax.axhline(0.0, color="black", linewidth=0.8)
        diff_ax.set_title(f"{metric}: treatment − baseline, mean over seed pairs, band = their range")
        diff_ax.set_ylabel(f"Δ {metric}")
        for a in (ax, diff_ax):
            a.set_xscale("log")
            a.set_xlabel("training tokens")
            a.grid(True, which="both", alpha=0.25)
            if a.get_legend_handles_labels()[0]:
                a.legend(loc="upper right")
        if seconds_per_token:
            top = ax.secondary_xaxis("top", functions=(lambda t: t * seconds_per_token,
                                                       lambda s: s / seconds_per_token))
            top.set_xlabel("CPU seconds (at the baseline's rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_law(points: dict[str, dict[str, tuple[float, list[float]]]], fits: dict[str, Optional[dict]],
             paper_slope: float, path: Path) -> bool:
    """Final loss against log10(V + m): ``points[metric][arm] = (log10(V + m), per-seed finals)`` with each
    metric's least-squares ``fits``. Draws nothing and returns False with fewer than ``MIN_LAW_POINTS`` distinct
    input vocabularies."""
    if min((len({x for x, _ in by_arm.values()}) for by_arm in points.values()), default=0) < MIN_LAW_POINTS:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(6.5 * len(points), 5), squeeze=False)
    for ax, (metric, by_arm) in zip(axes.flat, points.items()):
        for i, (arm, (x, finals)) in enumerate(by_arm.items()):
            ax.plot([x] * len(finals), finals, ".", color=f"C{i}", alpha=0.6)
            ax.plot([x], [np.mean(finals)], "o", color=f"C{i}", markersize=8, label=arm)
        fit = fits.get(metric)
        if fit:
            xs = np.array(ax.get_xlim())
            interval = (f" [{fit['slope_low']:+.4f}, {fit['slope_high']:+.4f}]" if fit.get("slope_low") is not None
                        else "")
            ax.plot(xs, fit["intercept"] + fit["slope"] * xs, "k--", linewidth=1.2,
                    label=f"slope {fit['slope']:+.4f}{interval}/decade (paper {paper_slope})")
        ax.set_title(f"final {metric} against the input vocabulary")
        ax.set_xlabel("log10(input vocabulary V + m)")
        ax.set_ylabel(f"final {metric}")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(True, alpha=0.25)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True
