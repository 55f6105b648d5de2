"""Convergence speedup of a treatment run over a baseline run, from their TensorBoard logs (PAPER.md §4.2).

    python evaluation/speedup.py --baseline runs/base/version_0 --treatment runs/oe/version_0

For each metric both runs logged (the next-token training loss ``train/loss_next1``, ``eval/downstream`` and every
``eval/<task>/<metric>``; or ``--metrics``):

1. map the logged steps to training tokens through ``train/tokens_seen`` (linear between logged points);
2. smooth each curve with TensorBoard's debiased EMA, weight 0.99 for losses and 0.9 for evaluation metrics
   (the paper's weights);
3. target = the baseline's final smoothed value; a curve *reaches* it at the first point where it is <= the target
   for losses (and perplexities), >= for everything else, the crossing placed by linear interpolation between
   that point and the one before;
4. speedup = tokens the baseline needs to reach its target / tokens the treatment needs.

[UNCONFIRMED] the paper does not define the speedup; this is its most plausible reading (PAPER.md §4.2).
Writes a markdown table (stdout and ``--output``) and a PNG (``--plot``) with both curves and the crossings
marked; a treatment that never reaches the target is reported as such, with its best smoothed value.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lit_overtok.evaluation.run_logs import read_run_scalars

TOKENS_TAG = "train/tokens_seen"
DEFAULT_LOSS_TAG = "train/loss_next1"


@dataclass
class Curve:
    tokens: np.ndarray
    values: np.ndarray


@dataclass
class Speedup:
    metric: str
    lower_is_better: bool
    target: float
    baseline_tokens: float
    treatment_tokens: Optional[float]  # None: never reached
    treatment_best: float

    @property
    def ratio(self) -> Optional[float]:
        if self.treatment_tokens is None:
            return None
        return math.inf if self.treatment_tokens == 0 else self.baseline_tokens / self.treatment_tokens


def is_loss(metric: str) -> bool:
    return "loss" in metric or "ppl" in metric


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average debiased for its zero start (weight 0 = none)."""
    if not 0 <= weight < 1:
        raise ValueError(f"EMA weight must be in [0, 1), got {weight}")
    out = np.empty(len(values), dtype=np.float64)
    last = 0.0
    for i, value in enumerate(values):
        last = last * weight + (1 - weight) * value
        out[i] = last / (1 - weight ** (i + 1))
    return out


def first_reach(curve: Curve, target: float, lower_is_better: bool) -> Optional[float]:
    """Tokens at which the curve first reaches ``target`` (interpolated), or None if it never does."""
    reached = curve.values <= target if lower_is_better else curve.values >= target
    hits = np.flatnonzero(reached)
    if hits.size == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return float(curve.tokens[0])
    (t0, t1), (v0, v1) = curve.tokens[i - 1:i + 1], curve.values[i - 1:i + 1]
    return float(t0 + (t1 - t0) * (target - v0) / (v1 - v0))


def measure(metric: str, baseline: Curve, treatment: Curve, weight: float) -> tuple[Speedup, Curve, Curve]:
    """Smooth both curves and measure the speedup of ``treatment`` at the baseline's final smoothed value."""
    lower = is_loss(metric)
    base = Curve(baseline.tokens, ema(baseline.values, weight))
    treat = Curve(treatment.tokens, ema(treatment.values, weight))
    target = float(base.values[-1])
    best = float(treat.values.min() if lower else treat.values.max())
    result = Speedup(metric, lower, target, first_reach(base, target, lower), first_reach(treat, target, lower), best)
    return result, base, treat


# ------------------------------------------------------------------------------------------------ reading runs
def read_scalars(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` of a run's scalars, sorted by step; a run resumed into several version folders
    is read as one (``lit_overtok.evaluation.run_logs``)."""
    return read_run_scalars(path)


def token_curve(scalars: dict[str, tuple[np.ndarray, np.ndarray]], metric: str, run: str) -> Curve:
    """The metric against training tokens: steps mapped through ``train/tokens_seen`` (linear, extrapolated)."""
    if metric not in scalars:
        raise KeyError(f"{run} has no scalar {metric!r}")
    if TOKENS_TAG not in scalars:
        raise KeyError(f"{run} has no {TOKENS_TAG!r} scalar to map steps to tokens")
    steps, values = scalars[metric]
    known_steps, known_tokens = scalars[TOKENS_TAG]
    if known_steps.size == 1:
        tokens = steps * (known_tokens[0] / max(known_steps[0], 1.0))
    else:
        tokens = np.interp(steps, known_steps, known_tokens)
        # Steps past the last logged one (an evaluation at the end of fit) continue the last tokens-per-step rate.
        rate = (known_tokens[-1] - known_tokens[-2]) / (known_steps[-1] - known_steps[-2])
        beyond = steps > known_steps[-1]
        tokens[beyond] = known_tokens[-1] + (steps[beyond] - known_steps[-1]) * rate
    return Curve(tokens, values)


def default_metrics(baseline: dict, treatment: dict) -> list[str]:
    common = set(baseline) & set(treatment)
    loss = [DEFAULT_LOSS_TAG] if DEFAULT_LOSS_TAG in common else (["train/loss"] if "train/loss" in common else [])
    evals = sorted(tag for tag in common if tag.startswith("eval/")
                   and not tag.endswith("_by_tokens") and tag != "eval/wall_time_s")
    return loss + evals


# ------------------------------------------------------------------------------------------------------ output
def format_tokens(tokens: Optional[float]) -> str:
    if tokens is None:
        return "not reached"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return f"{tokens:.0f}"


def markdown(results: list[Speedup]) -> str:
    lines = ["| metric | better | target (baseline final, smoothed) | baseline tokens | treatment tokens | speedup |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.metric} | {'lower' if r.lower_is_better else 'higher'} | {r.target:.4f} | "
                     f"{format_tokens(r.baseline_tokens)} | {format_tokens(r.treatment_tokens)} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(panels: list[tuple[Speedup, Curve, Curve, Curve, Curve]], path: Path, labels: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax, (result, raw_base, raw_treat, base, treat) in zip(axes.flat, panels):
        for raw, smooth, label, color in ((raw_base, base, labels[0], "tab:blue"), (raw_treat, treat, labels[1], "tab:orange")):
            ax.plot(raw.tokens, raw.values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(smooth.tokens, smooth.values, color=color, label=label)
        ax.axhline(result.target, color="gray", linestyle=":", linewidth=1)
        ax.axvline(result.baseline_tokens, color="tab:blue", linestyle="--", linewidth=1)
        ax.plot([result.baseline_tokens], [result.target], "o", color="tab:blue")
        if result.treatment_tokens is not None:
            ax.axvline(result.treatment_tokens, color="tab:orange", linestyle="--", linewidth=1)
            ax.plot([result.treatment_tokens], [result.target], "o", color="tab:orange")
            title = f"{result.metric}: {result.ratio:.2f}x"
        else:
            title = f"{result.metric}: not reached"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[Speedup]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True,
                        help="baseline run folder (TensorBoard event files; its version_* folders are read as one run)")
    parser.add_argument("--treatment", required=True, help="treatment run folder")
    parser.add_argument("--metrics", default=None, help="comma-separated scalar tags (default: loss and eval/*)")
    parser.add_argument("--loss-ema", type=float, default=0.99, help="EMA weight for losses (paper: 0.99)")
    parser.add_argument("--eval-ema", type=float, default=0.9, help="EMA weight for evaluation metrics (paper: 0.9)")
    parser.add_argument("--output", default="speedup.md", help="markdown table")
    parser.add_argument("--plot", default="speedup.png", help="PNG of the curves with the crossings marked")
    args = parser.parse_args(argv)

    baseline, treatment = read_scalars(args.baseline), read_scalars(args.treatment)
    metrics = args.metrics.split(",") if args.metrics else default_metrics(baseline, treatment)
    if not metrics:
        parser.error("the runs share no loss or eval/* scalars; name them with --metrics")
    results, panels = [], []
    for metric in metrics:
        raw_base = token_curve(baseline, metric, f"baseline {args.baseline}")
        raw_treat = token_curve(treatment, metric, f"treatment {args.treatment}")
        result, base, treat = measure(metric, raw_base, raw_treat, args.loss_ema if is_loss(metric) else args.eval_ema)
        results.append(result)
        panels.append((result, raw_base, raw_treat, base, treat))
        if result.baseline_tokens == base.tokens[0]:
            print(f"{metric}: the baseline's smoothed curve starts at or beyond its final value {result.target:.4f}, "
                  "so reaching it says nothing about speed", file=sys.stderr)
        if result.treatment_tokens is None:
            print(f"{metric}: the treatment never reaches the baseline's final smoothed value {result.target:.4f} "
                  f"within its {format_tokens(float(treat.tokens[-1]))} tokens (its best: {result.treatment_best:.4f})",
                  file=sys.stderr)
    table = markdown(results)
    print(table)
    Path(args.output).write_text(table)
    plot(panels, Path(args.plot), ("baseline", "treatment"))
    print(f"table: {args.output}, plot: {args.plot}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
