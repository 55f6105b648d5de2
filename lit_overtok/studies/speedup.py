"""Convergence speedup of a treatment run over a baseline run, from their TensorBoard logs (docs/method.md §4.2).

    python evaluation/speedup.py --baseline runs/base/version_0 --treatment runs/oe/version_0

For each metric both runs logged (the next-token training loss ``train/loss_next1``, ``eval/downstream`` and every
``eval/<task>/<metric>``; or ``--metrics``):

1. map the logged steps to training tokens through ``train/tokens_seen`` (linear between logged points);
2. smooth each curve with TensorBoard's debiased EMA on the *optimizer-step* axis, with the paper's weights: 0.99 per
   step for losses (``--loss-ema``, ``--loss-ema-steps 1``), 0.9 for evaluation metrics per evaluation interval of
   the baseline (``--eval-ema``; ``--eval-ema-steps`` fixes the unit instead), i.e. per evaluation point as the paper
   draws them. Between two logged points the curve is taken as linear and every step in between enters the average
   as if it had been logged, so the result does not depend on how often a run logged (a per-point EMA, as
   TensorBoard draws it, makes a 0.99 weight span 100 steps at ``log_every_n_steps: 1`` and 5,000 at 50);
3. place each smoothed value at the same EMA of the tokens (the centre of mass of its averaging window): an EMA lags
   its curve by w/(1-w) steps, and against the raw tokens that lag would shift the two crossings by different
   fractions of their token counts (5.57x read for a true 5.7x over 20k steps); what remains is second order, the
   curve's bend over the window (1% on the tests' curves);
4. target = the baseline's final smoothed value, reached by the baseline at its last point (the paper's "reaches the
   baseline's final loss with N x fewer tokens"; not where its noisy smoothed curve first touches that value);
5. the treatment *reaches* the target at the first point where its smoothed curve is <= the target for losses (and
   perplexities), >= for everything else, the crossing placed by linear interpolation between that point and the
   one before; speedup = baseline tokens / treatment tokens.

[UNCONFIRMED] the paper does not define the speedup; this is its most plausible reading (docs/method.md §4.2). Our
choices: the step axis for the EMA, the linear curve between logged points, the lag removed by step 3, and the
evaluation EMA's unit. A reading's noise grows as logging thins out (a value logged every 50 steps carries the
information of one step, not of 50): log the loss often for speedups.
Writes a markdown table (stdout and ``--output``, default ``speedup.md`` in the treatment's run folder) and a PNG
(``--plot``, default ``speedup.png`` beside the table) with both curves and the crossings marked; a treatment that never reaches the target is reported as such, with its best smoothed value.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lit_overtok.checkpointing.outputs import output_path
from lit_overtok.studies.run_logs import read_run_scalars

TOKENS_TAG = "train/tokens_seen"
DEFAULT_LOSS_TAG = "train/loss_next1"


@dataclass
class Curve:
    tokens: np.ndarray
    values: np.ndarray
    steps: np.ndarray
    """The optimizer step of every point (smoothing runs on this axis)."""


@dataclass
class Speedup:
    metric: str
    lower_is_better: bool
    target: float
    baseline_tokens: float  # at its last point, on the smoothed token axis
    treatment_tokens: Optional[float]  # None: never reached
    treatment_best: float

    @property
    def ratio(self) -> Optional[float]:
        if self.treatment_tokens is None:
            return None
        return math.inf if self.treatment_tokens == 0 else self.baseline_tokens / self.treatment_tokens


def is_loss(metric: str) -> bool:
    return "loss" in metric or "ppl" in metric


def ema(values: np.ndarray, weight: float, steps: Optional[np.ndarray] = None) -> np.ndarray:
    """TensorBoard's debiased exponential moving average, with ``weight`` per optimizer step (0 = no smoothing).

    ``steps`` (increasing) are the points' optimizer steps; None means consecutive steps, which is exactly
    TensorBoard's smoothing of the points. Between two points Δ steps apart the curve is linear, and each of the Δ
    steps enters the average as if it had been logged, in closed form (O(points), not O(steps)): with a = the
    previous value and b = this one, the Δ updates ``s <- w·s + (1 - w)·f_j`` with f_j = a + (b - a)·j/Δ sum to
    ``w^Δ·s + (1 - w^Δ)·b - (b - a)·c``, ``c = w·(1 - Δ·w^(Δ-1) + (Δ-1)·w^Δ) / ((1 - w)·Δ)``; the debiasing
    normaliser takes ``w^Δ·n + (1 - w^Δ)``.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"EMA weight must be in [0, 1), got {weight}")
    steps = np.arange(len(values), dtype=np.float64) if steps is None else np.asarray(steps, dtype=np.float64)
    out = np.empty(len(values), dtype=np.float64)
    total = norm = 0.0
    for i, value in enumerate(values):
        if i == 0:
            total, norm = (1 - weight) * value, 1 - weight
        else:
            gap = steps[i] - steps[i - 1]
            if gap <= 0:
                raise ValueError(f"steps must increase, got {steps[i - 1]} then {steps[i]}")
            decay = weight**gap
            ramp = weight * (1 - gap * weight ** (gap - 1) + (gap - 1) * decay) / ((1 - weight) * gap)
            total = decay * total + (1 - decay) * value - (value - values[i - 1]) * ramp
            norm = decay * norm + (1 - decay)
        out[i] = total / norm
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


def measure(metric: str, baseline: Curve, treatment: Curve, weight: float,
            weight_steps: float = 1.0) -> tuple[Speedup, Curve, Curve]:
    """Smooth both curves on the step axis (``weight`` per ``weight_steps`` steps; tokens with the same EMA, steps 2-3
    of the module docstring) and measure the speedup of ``treatment`` at the baseline's final smoothed value, which
    the baseline reaches at its last point."""
    lower = is_loss(metric)
    per_step = weight ** (1.0 / weight_steps)
    base, treat = (Curve(ema(c.tokens, per_step, c.steps), ema(c.values, per_step, c.steps), c.steps)
                   for c in (baseline, treatment))
    target = float(base.values[-1])
    best = float(treat.values.min() if lower else treat.values.max())
    result = Speedup(metric, lower, target, float(base.tokens[-1]), first_reach(treat, target, lower), best)
    return result, base, treat


def logging_interval(curve: Curve) -> float:
    """The median gap between a curve's logged steps (1 for a single point)."""
    return float(np.median(np.diff(curve.steps))) if len(curve.steps) > 1 else 1.0


# ------------------------------------------------------------------------------------------------ reading runs
def read_scalars(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tag: (steps, values)}`` of a run's scalars, sorted by step; a run resumed into several version folders
    is read as one (``lit_overtok.studies.run_logs``)."""
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
    return Curve(tokens, values, steps)


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
    parser.add_argument("--loss-ema-steps", type=float, default=1.0,
                        help="optimizer steps the loss EMA weight applies to (default 1: per step)")
    parser.add_argument("--eval-ema-steps", type=float, default=None,
                        help="optimizer steps the evaluation EMA weight applies to (default: the baseline's interval "
                             "between evaluations of that metric, i.e. per evaluation point)")
    parser.add_argument("--output", default=None, help="markdown table (default: speedup.md in the treatment's folder)")
    parser.add_argument("--plot", default=None,
                        help="PNG of the curves with the crossings marked (default: speedup.png beside the table)")
    args = parser.parse_args(argv)

    baseline, treatment = read_scalars(args.baseline), read_scalars(args.treatment)
    metrics = args.metrics.split(",") if args.metrics else default_metrics(baseline, treatment)
    if not metrics:
        parser.error("the runs share no loss or eval/* scalars; name them with --metrics")
    results, panels = [], []
    for metric in metrics:
        raw_base = token_curve(baseline, metric, f"baseline {args.baseline}")
        raw_treat = token_curve(treatment, metric, f"treatment {args.treatment}")
        if is_loss(metric):
            weight, weight_steps = args.loss_ema, args.loss_ema_steps
        else:
            weight, weight_steps = args.eval_ema, args.eval_ema_steps or logging_interval(raw_base)
        result, base, treat = measure(metric, raw_base, raw_treat, weight, weight_steps)
        results.append(result)
        panels.append((result, raw_base, raw_treat, base, treat))
        if first_reach(base, result.target, result.lower_is_better) == base.tokens[0]:
            print(f"{metric}: the baseline's smoothed curve starts at or beyond its final value {result.target:.4f}, "
                  "so reaching it says nothing about speed", file=sys.stderr)
        if result.treatment_tokens is None:
            print(f"{metric}: the treatment never reaches the baseline's final smoothed value {result.target:.4f} "
                  f"within its {format_tokens(float(treat.tokens[-1]))} tokens (its best: {result.treatment_best:.4f})",
                  file=sys.stderr)
    table = markdown(results)
    print(table)
    output = output_path(args.output, args.treatment, "speedup.md")
    plot_path = output_path(args.plot, output.parent, "speedup.png")
    output.write_text(table)
    plot(panels, plot_path, ("baseline", "treatment"))
    print(f"table: {output}, plot: {plot_path}", file=sys.stderr)
    return results

