"""Convergence speedup of a treatment run over a baseline run, from their TensorBoard logs (docs/method.md §4.2).

    python evaluation/speedup.py --baseline runs/base/version_0 --treatment runs/oe/version_0

For each metric both runs logged (the next-token training loss ``train/loss_next1``, ``val/loss``,
``eval/downstream`` and every ``eval/<task>/<metric>``; or ``--metrics``): the logged steps are mapped to training
tokens through ``train/tokens_seen``, and the speedup is measured as ``lit_overtok.studies.convergence`` defines it
(docs/studies.md, "Reading a speedup"): the baseline's final value is its fitted value at its last point (a straight
line in log tokens through its last ``--window`` = 25% of tokens); the treatment reaches it where the monotone
regression of its own fit does; speedup = baseline tokens / treatment tokens, with a 95% bootstrap interval. A
treatment already past the target at its first point is reported as "≥ X (censored at the first point)", one that
never reaches it as "never (best value v)". Lower is better for losses and perplexities, higher for accuracies
(explicit lists in ``convergence``); any other metric needs ``--lower-is-better`` or ``--higher-is-better``.

Writes a markdown table (stdout and ``--output``, default ``speedup.md`` in the treatment's run folder), the same as
JSON (``--json``, default beside it) and a PNG (``--plot``, default ``speedup.png`` beside the table) with both
curves, their fits, the target and the crossing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from lit_overtok.studies import convergence
from lit_overtok.studies.convergence import Curve, Speedup
from lit_overtok.checkpointing.outputs import output_path
from lit_overtok.studies.run_logs import read_run_scalars

TOKENS_TAG = "train/tokens_seen"
DEFAULT_LOSS_TAG = "train/loss_next1"
HELD_OUT_TAG = "val/loss"
DEFINITION = ("Target: the baseline's final value, i.e. its fitted value at its last point (a least-squares line in "
              "log tokens through its points in the last {window:.0%} of its tokens). The treatment reaches it where "
              "the monotone regression of the same fit does; speedup = baseline tokens / treatment tokens, "
              "[95% interval]. docs/studies.md, 'Reading a speedup'.")


# ------------------------------------------------------------------------------------------------ reading runs
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
        # Steps past the last logged one (an evaluation at the end of fit) continue the last tokens-per-step rate;
        # steps before the first one scale its tokens per step (so distinct steps keep distinct tokens).
        rate = (known_tokens[-1] - known_tokens[-2]) / (known_steps[-1] - known_steps[-2])
        beyond = steps > known_steps[-1]
        tokens[beyond] = known_tokens[-1] + (steps[beyond] - known_steps[-1]) * rate
        before = steps < known_steps[0]
        tokens[before] = steps[before] * (known_tokens[0] / max(known_steps[0], 1.0))
    keep = tokens > 0  # a point logged before any token was seen has no place on a log-token axis
    return Curve(tokens[keep], values[keep], steps[keep])


def default_metrics(baseline: dict, treatment: dict) -> list[str]:
    common = set(baseline) & set(treatment)
    loss = [DEFAULT_LOSS_TAG] if DEFAULT_LOSS_TAG in common else (["train/loss"] if "train/loss" in common else [])
    held_out = [HELD_OUT_TAG] if HELD_OUT_TAG in common else []
    evals = sorted(tag for tag in common if tag.startswith("eval/")
                   and not tag.endswith("_by_tokens") and tag != "eval/wall_time_s")
    return loss + held_out + evals


def measure(metric: str, baseline: Curve, treatment: Curve, lower: bool, window: float = convergence.DEFAULT_WINDOW,
            draws: int = convergence.DRAWS) -> tuple[Speedup, np.ndarray, np.ndarray]:
    """``convergence.estimate``, with a one-line error for a curve too short to measure."""
    for run, curve in (("baseline", baseline), ("treatment", treatment)):
        if curve.tokens.size == 0:
            raise ValueError(f"{metric}: the {run} logged it at no step with training tokens")
    return convergence.estimate(metric, baseline, treatment, lower, window, draws)


# ------------------------------------------------------------------------------------------------------ output
def format_tokens(tokens: Optional[float]) -> str:
    if tokens is None:
        return "—"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return f"{tokens:.0f}"


def markdown(results: list[Speedup]) -> str:
    window = results[0].window if results else convergence.DEFAULT_WINDOW
    lines = [DEFINITION.format(window=window), "",
             "| metric | better | target (baseline's fitted final value) | baseline tokens | treatment tokens | speedup |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.metric} | {'lower' if r.lower_is_better else 'higher'} | {r.target:.4f} | "
                     f"{format_tokens(r.baseline_tokens)} | {format_tokens(r.treatment_tokens)} | {r.text()} |")
    return "\n".join(lines) + "\n"


def plot(panels: list[tuple[Speedup, Curve, Curve, np.ndarray, np.ndarray]], path: Path,
         labels: tuple[str, str]) -> None:
    from lit_overtok.studies.figures import DPI, pyplot

    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5 * rows), squeeze=False)
    for ax, (result, base, treat, base_fit, treat_fit) in zip(axes.flat, panels):
        for curve, fit, label, colour in ((base, base_fit, labels[0], "C0"), (treat, treat_fit, labels[1], "C1")):
            ax.plot(curve.tokens, curve.values, color=colour, alpha=0.3, linewidth=0.8)
            ax.plot(curve.tokens, fit, color=colour, linewidth=2, label=f"{label} (fitted)")
        ax.axhline(result.target, color="gray", linestyle=":", linewidth=1, label="target: baseline's final value")
        ax.plot([result.baseline_tokens], [result.target], "o", color="C0")
        if result.treatment_tokens is not None:
            ax.axvline(result.treatment_tokens, color="C1", linestyle="--", linewidth=1)
            ax.plot([result.treatment_tokens], [result.target], "o", color="C1")
        ax.set_title(f"{result.metric}: {result.text()}")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(result.metric)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def metric_list(values: list[str]) -> tuple[str, ...]:
    return tuple(m for value in values for m in value.split(",") if m)


def main(argv: Optional[list[str]] = None) -> list[Speedup]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True,
                        help="baseline run folder (TensorBoard event files; its version_* folders are read as one run)")
    parser.add_argument("--treatment", required=True, help="treatment run folder")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated scalar tags (default: the training loss, val/loss and eval/*)")
    parser.add_argument("--window", type=float, default=convergence.DEFAULT_WINDOW,
                        help="the fit's window, as a fraction of the baseline's tokens (0: values as logged)")
    parser.add_argument("--lower-is-better", action="append", default=[], metavar="METRIC[,METRIC]",
                        help="metrics whose smaller values are better, beyond the known losses and perplexities")
    parser.add_argument("--higher-is-better", action="append", default=[], metavar="METRIC[,METRIC]",
                        help="metrics whose larger values are better, beyond the known accuracies")
    parser.add_argument("--draws", type=int, default=convergence.DRAWS, help="bootstrap draws of the interval")
    parser.add_argument("--output", default=None, help="markdown table (default: speedup.md in the treatment's folder)")
    parser.add_argument("--json", default=None, help="the table's numbers as JSON (default: --output's name, .json)")
    parser.add_argument("--plot", default=None,
                        help="PNG of the curves with the crossings marked (default: speedup.png beside the table)")
    args = parser.parse_args(argv)
    lower, higher = metric_list(args.lower_is_better), metric_list(args.higher_is_better)

    baseline, treatment = read_run_scalars(args.baseline), read_run_scalars(args.treatment)
    metrics = args.metrics.split(",") if args.metrics else default_metrics(baseline, treatment)
    if not metrics:
        parser.error("the runs share no loss or eval/* scalars; name them with --metrics")
    directions = {metric: convergence.lower_is_better(metric, lower, higher) for metric in metrics}
    results, panels = [], []
    for metric in metrics:
        base = token_curve(baseline, metric, f"baseline {args.baseline}")
        treat = token_curve(treatment, metric, f"treatment {args.treatment}")
        result, base_fit, treat_fit = measure(metric, base, treat, directions[metric], args.window, args.draws)
        results.append(result)
        panels.append((result, base, treat, base_fit, treat_fit))
        if result.uninformative:
            print(f"{metric}: the baseline's fitted curve starts at or beyond its final value {result.target:.4f}, "
                  "so reaching it says nothing about speed", file=sys.stderr)
    table = markdown(results)
    print(table)
    output = output_path(args.output, args.treatment, "speedup.md")
    plot_path = output_path(args.plot, output.parent, "speedup.png")
    output.write_text(table)
    json_path = Path(args.json) if args.json else output.with_suffix(".json")
    json_path.write_text(json.dumps([r.as_dict() for r in results], indent=1))
    plot(panels, plot_path, ("baseline", "treatment"))
    print(f"table: {output}, JSON: {json_path}, plot: {plot_path}", file=sys.stderr)
    return results
