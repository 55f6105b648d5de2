"""The report of a sweep (evaluation/sweep.py): markdown, JSON and PNG figures from its TensorBoard logs and checkpoints.

    python evaluation/report.py configs/sweeps/cfg3f_small.yaml                  # -> results/cfg3f_small/
    python evaluation/report.py configs/sweeps/wiki.yaml --limit 200 --output results/wiki
    python evaluation/report.py configs/sweeps/cfg3f_small.yaml --no-eval        # logs only, no checkpoint scoring

What it holds (docs/method.md §4.2, §4.7):

- **Loss against training tokens** for every arm, ``train/loss_next1`` and ``val/loss``: the mean over seeds and
  the min-max band (``loss_curves.png``).
- **Final loss against log10(input vocabulary size V + m)** (V: the model's vocabulary, m: Over-Encoding's rows, 0
  without it) with the least-squares line, its slope (loss per decade; the paper's OLMoE fit: -0.0256) and R²
  (``vocab_law.png``). Final val/loss is the last validation; final train/loss_next1 is the mean of the points
  logged in the last 10% of training tokens (our choice: a 0.99 EMA over the few hundred points of a CPU run still
  averages in its early steps). The fit takes the arms that differ from the baseline in nothing but
  ``over_encoding`` (or ``report.law_arms``), one point per arm (its seed mean).
- **Convergence speedups** of every arm over the baseline, per shared seed, by ``evaluation/speedup.py``'s
  definition (its ``measure``; loss EMA 0.99 per step, evaluation EMA 0.9 per evaluation interval, as there), on
  speedup.py's default metrics and on ``val/loss``.
- **Benchmark scores** of the final checkpoints (``evaluation/evaluate.py``; ``paper`` = the five downstream tasks
  for text runs, ``grammar`` for cfg runs; near chance at CPU scale, reported all the same). ``--limit N`` scores
  a fixed random subset of about N documents of each task (evaluate.py's ``--limit``).
- **CPU-hours**: the sum of every point's recorded training CPU time (``done.json``), and the evaluation's own.

The grid file's optional ``report`` section: ``baseline`` (default: the first arm), ``law_arms`` (a list),
``tasks``, ``tokenizer`` (text runs whose data module names none), ``limit``. A point resumed after an interruption
has several ``version_N`` folders: they are stitched by step (for each tag a later version replaces the earlier
ones from its first logged step on), and the report lists which versions each point used.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from lit_overtok.evaluation import score_checkpoints
from lit_overtok.studies import speedup
from lit_overtok.studies.sweep import GridError, latest_checkpoint, load_grid, version_folders

LOSS_METRICS = ("train/loss_next1", "val/loss")
LOSS_EMA, EVAL_EMA = 0.99, 0.9  # speedup.py's defaults, the paper's weights
REPORT_KEYS = {"baseline", "law_arms", "tasks", "tokenizer", "limit"}
PAPER_LAW_SLOPE = -0.0256
TAIL_FRACTION = 0.1

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class Run:
    arm: str
    seed: int
    folder: Path
    scalars: Scalars
    versions: list[str]
    done: Optional[dict[str, Any]]  # done.json; None: the point has not finished
    hparams: dict[str, Any]


# ---------------------------------------------------------------------------------------------------- reading
def stitch(parts: list[Scalars]) -> Scalars:
    """One run's scalars from its version folders, oldest first: per tag, a later version wins from its first step."""
    merged: Scalars = {}
    for part in parts:
        for tag, (steps, values) in part.items():
            if tag in merged and steps.size:
                old_steps, old_values = merged[tag]
                keep = old_steps < steps[0]
                steps, values = np.concatenate([old_steps[keep], steps]), np.concatenate([old_values[keep], values])
            merged[tag] = (steps, values)
    return merged


class _HparamsLoader(yaml.SafeLoader):
    """hparams.yaml as Lightning writes it (tuples tagged !!python/tuple), without executing anything else."""


_HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node)))


def read_run(arm: str, seed: int, folder: Path) -> Optional[Run]:
    """A point's stitched scalars, or None when it has logged nothing yet."""
    versions = [v for v in version_folders(folder) if any(v.glob("events.out.tfevents*"))]
    if not versions:
        return None
    hparams_files = [v / "hparams.yaml" for v in versions if (v / "hparams.yaml").is_file()]
    hparams = yaml.load(hparams_files[-1].read_text(), Loader=_HparamsLoader) if hparams_files else {}
    done = json.loads((folder / "done.json").read_text()) if (folder / "done.json").is_file() else None
    return Run(arm, seed, folder, stitch([speedup.read_scalars(str(v)) for v in versions]), [v.name for v in versions],
               done, hparams or {})


def input_vocabulary(run: Run) -> Optional[int]:
    """V + m (docs/method.md §4.7): the model's vocabulary plus Over-Encoding's rows (m = 0 without it)."""
    model = run.hparams.get("model_config") or {}
    if not model.get("vocab_size"):
        return None
    return int(model["vocab_size"]) + int((model.get("over_encoding") or {}).get("m", 0))


def law_signature(run: Run) -> str:
    """The model config without its input vocabulary: arms with equal signatures differ only in Over-Encoding."""
    model = {k: v for k, v in (run.hparams.get("model_config") or {}).items() if k != "over_encoding"}
    return json.dumps(model, sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------------- numbers
def mean_band(curves: list[speedup.Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' curves on the token grid of the sparsest one, over the range they share: (tokens, mean, min, max)."""
    start, end = max(c.tokens[0] for c in curves), min(c.tokens[-1] for c in curves)
    grid = min(curves, key=lambda c: c.tokens.size).tokens
    grid = grid[(grid >= start) & (grid <= end)]
    stacked = np.stack([np.interp(grid, c.tokens, c.values) for c in curves])
    return grid, stacked.mean(0), stacked.min(0), stacked.max(0)


def final_value(curve: speedup.Curve, metric: str) -> float:
    if metric == "val/loss":
        return float(curve.values[-1])
    tail = curve.tokens >= curve.tokens[-1] - TAIL_FRACTION * (curve.tokens[-1] - curve.tokens[0])
    return float(curve.values[tail].mean())


def fit_line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares y = intercept + slope x, with R² (1 - residual / total sum of squares)."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (intercept + slope * x)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - residual / total if total > 0 else 1.0,
            "points": int(x.size)}


def finals(runs_by_arm: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Per arm: input vocabulary, and per loss metric the seeds' final values, their mean and spread (max - min)."""
    table = {}
    for arm, runs in runs_by_arm.items():
        row: dict[str, Any] = {"input_vocab": input_vocabulary(runs[0]), "seeds": [r.seed for r in runs],
                               "tokens": float(speedup.token_curve(runs[0].scalars, LOSS_METRICS[0], arm).tokens[-1])}
        for metric in LOSS_METRICS:
            values = [final_value(speedup.token_curve(r.scalars, metric, f"{arm}/seed{r.seed}"), metric)
                      for r in runs if metric in r.scalars]
            if values:
                row[metric] = {"per_seed": values, "mean": float(np.mean(values)), "spread": float(np.ptp(values))}
        table[arm] = row
    return table


def vocabulary_law(final: dict[str, dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """The log-linear fit of each loss metric over ``arms`` (None where fewer than two input vocabularies)."""
    law: dict[str, Any] = {"arms": arms}
    for metric in LOSS_METRICS:
        points = [(math.log10(final[a]["input_vocab"]), final[a][metric]["mean"]) for a in arms
                  if final[a]["input_vocab"] and metric in final[a]]
        distinct = len({x for x, _ in points})
        law[metric] = fit_line(*map(np.array, zip(*points))) if distinct >= 2 else None
    return law


def speedups(baseline: list[Run], treatment: list[Run]) -> list[dict[str, Any]]:
    """``speedup.measure`` for every metric both runs of a seed logged (speedup.py's defaults), seed by seed."""
    rows = []
    base_by_seed = {r.seed: r for r in baseline}
    for treat in treatment:
        base = base_by_seed.get(treat.seed)
        if base is None:
            continue
        # speedup.py's metrics, and the held-out loss: the paper's "reaches the baseline's final loss" reads on it too.
        held_out = [m for m in ("val/loss",) if m in base.scalars and m in treat.scalars]
        for metric in speedup.default_metrics(base.scalars, treat.scalars) + held_out:
            base_curve = speedup.token_curve(base.scalars, metric, str(base.folder))
            treat_curve = speedup.token_curve(treat.scalars, metric, str(treat.folder))
            # speedup.py's weights: losses per optimizer step, evaluations per baseline evaluation interval.
            weight, weight_steps = ((LOSS_EMA, 1.0) if speedup.is_loss(metric)
                                    else (EVAL_EMA, speedup.logging_interval(base_curve)))
            result, smoothed_base, _ = speedup.measure(metric, base_curve, treat_curve, weight, weight_steps)
            rows.append({"arm": treat.arm, "seed": treat.seed, "metric": metric, "target": result.target,
                         "baseline_tokens": result.baseline_tokens, "treatment_tokens": result.treatment_tokens,
                         "ratio": result.ratio,
                         # e.g. a single evaluation: the baseline "reaches" its target at once (speedup.py warns too)
                         "uninformative": result.baseline_tokens == float(smoothed_base.tokens[0])})
    return rows


def evaluate_checkpoints(runs: list[Run], tasks: str, limit: Optional[int], tokenizer: Optional[str],
                         out_dir: Path) -> dict[str, Any]:
    """Score each finished point's final checkpoint with evaluation/evaluate.py; its files go to ``out_dir``."""
    scored = [(run, latest_checkpoint(run.folder)) for run in runs]
    scored = [(run, ckpt) for run, ckpt in scored if ckpt is not None]
    before = resource.getrusage(resource.RUSAGE_SELF)
    argv = ["--checkpoint", *[str(c) for _, c in scored], "--tasks", tasks, "--output-dir", str(out_dir)]
    argv += ["--limit", str(limit)] if limit else []
    argv += ["--tokenizer", tokenizer] if tokenizer else []
    try:
        rows, error = (score_checkpoints.main(argv) if scored else []), None
    except (ValueError, FileNotFoundError) as failure:  # e.g. a task the model cannot hold: report it, keep the rest
        rows, error = [], f"{type(failure).__name__}: {failure}"
        print(f"evaluation failed: {error}", file=sys.stderr)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"tasks": tasks, "limit": limit, "error": error,
            "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "per_point": [{"arm": run.arm, "seed": run.seed, "checkpoint": str(ckpt), "step": row["step"],
                           "scores": row["scores"], "downstream": row["downstream"]}
                          for (run, ckpt), row in zip(scored, rows)]}


# ------------------------------------------------------------------------------------------------------ output
def plot_curves(runs_by_arm: dict[str, list[Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LOSS_METRICS), figsize=(10, 3.6), squeeze=False)
    for ax, metric in zip(axes.flat, LOSS_METRICS):
        for arm, runs in runs_by_arm.items():
            curves = [speedup.token_curve(r.scalars, metric, arm) for r in runs if metric in r.scalars]
            if not curves:
                continue
            tokens, mean, low, high = mean_band(curves)
            line, = ax.plot(tokens, mean, label=f"{arm} ({len(curves)} seed{'s' * (len(curves) > 1)})", linewidth=1.2,
                            marker="." if tokens.size <= 30 else None)  # a handful of validations stays visible
            ax.fill_between(tokens, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_law(final: dict[str, dict[str, Any]], law: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LOSS_METRICS), figsize=(10, 3.6), squeeze=False)
    for ax, metric in zip(axes.flat, LOSS_METRICS):
        for arm in law["arms"]:
            if metric in final[arm] and final[arm]["input_vocab"]:
                x = math.log10(final[arm]["input_vocab"])
                ax.plot([x] * len(final[arm][metric]["per_seed"]), final[arm][metric]["per_seed"], ".", color="gray")
                ax.plot([x], [final[arm][metric]["mean"]], "o", label=arm)
        fit = law[metric]
        if fit:
            xs = np.array(ax.get_xlim())
            ax.plot(xs, fit["intercept"] + fit["slope"] * xs, "k--", linewidth=1,
                    label=f"slope {fit['slope']:.4f}/decade, R² {fit['r2']:.3f}")
        ax.set_title(f"final {metric}", fontsize=10)
        ax.set_xlabel("log10(input vocabulary V + m)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def seed_summary(values: dict[str, Any]) -> str:
    """Mean over seeds ± half their range (max - min), and the number of seeds."""
    count = len(values["per_seed"])
    if count == 1:
        return f"{values['mean']:.4f} (1 seed)"
    return f"{values['mean']:.4f} ± {values['spread'] / 2:.4f} ({count} seeds)"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Study `{report['name']}`", "", f"Grid: `{report['grid']}`; baseline arm `{report['baseline']}`. "
             f"Training CPU-hours: **{report['cpu_hours']:.3f}** over {report['points_done']} finished points "
             f"(attempts killed before they could record their time are not counted).", "",
             "## Runs", "", "| arm | seed | finished | last step | versions | CPU s |", "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lines.append(f"| {run['arm']} | {run['seed']} | {'yes' if run['done'] else 'no'} | {run['last_step']} | "
                     f"{' + '.join(run['versions'])} | {run['cpu_seconds']:.0f} |")
    lines += ["", "## Final loss", "", "![loss curves](loss_curves.png)", "",
              "Mean over seeds ± half their range. Final val/loss: the last validation; final train/loss_next1: the "
              "mean of the points logged in the last 10% of training tokens.", "",
              "| arm | input vocab V + m | tokens | " + " | ".join(f"final {m}" for m in LOSS_METRICS) + " |",
              "|---|---|---|" + "---|" * len(LOSS_METRICS)]
    for arm, row in report["final"].items():
        cells = [seed_summary(row[m]) if m in row else "—" for m in LOSS_METRICS]
        lines.append(f"| {arm} | {row['input_vocab'] or '—'} | {speedup.format_tokens(row['tokens'])} | " + " | ".join(cells) + " |")
    law = report["law"]
    lines += ["", "## Loss against log10(input vocabulary)", "", f"Arms fitted: {', '.join(law['arms'])}.", ""]
    for metric in LOSS_METRICS:
        fit = law[metric]
        lines.append(f"- {metric}: " + ("fewer than two input vocabularies among the arms; no fit" if fit is None else
                     f"L = {fit['intercept']:.4f} {fit['slope']:+.4f} · log10(V + m), R² = {fit['r2']:.3f} over "
                     f"{fit['points']} arms{' (two points: R² is 1 by construction)' * (fit['points'] == 2)} "
                     f"(paper, OLMoE-1.3B: {PAPER_LAW_SLOPE} per decade)"))
    lines += ["", "![vocabulary law](vocab_law.png)", "", "## Convergence speedup over the baseline", "",
              "By `evaluation/speedup.py`'s definition (its docstring), seed by seed against the baseline's run of "
              "the same seed; per-seed targets and tokens are in report.json.", "", "| arm | metric | per seed | mean over the seeds that reach it |",
              "|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in report["speedups"]:
        groups.setdefault((row["arm"], row["metric"]), []).append(row)
    for (arm, metric), rows in groups.items():
        per_seed = ", ".join(f"{r['seed']}: " + ("not reached" if r["ratio"] is None else f"{r['ratio']:.2f}x")
                             + (" †" if r["uninformative"] else "") for r in rows)
        reached = [r["ratio"] for r in rows if r["ratio"] is not None]
        mean = f"{np.mean(reached):.2f}x ({len(reached)} of {len(rows)})" if reached else "not reached"
        lines.append(f"| {arm} | {metric} | {per_seed} | {mean} |")
    if any(r["uninformative"] for r in report["speedups"]):
        lines += ["", "† the baseline's smoothed curve starts at or beyond its final value (e.g. a single evaluation), "
                  "so reaching it says nothing about speed."]
    evaluation = report.get("evaluation")
    lines += ["", "## Benchmarks of the final checkpoints", ""]
    if evaluation is None:
        lines.append("Not run (`--no-eval`).")
    elif evaluation["error"]:
        lines.append(f"`evaluation/evaluate.py --tasks {evaluation['tasks']}` failed: {evaluation['error']}")
    else:
        tasks = sorted({t for p in evaluation["per_point"] for t in p["scores"]})
        lines += [f"`evaluation/evaluate.py --tasks {evaluation['tasks']}`, limit {evaluation['limit']}, "
                  f"{evaluation['cpu_seconds']:.0f} CPU s; files in `eval/`.", "",
                  "| arm | seed | step | " + " | ".join(tasks) + " | downstream |", "|---|---|---|" + "---|" * (len(tasks) + 1)]
        for point in evaluation["per_point"]:
            scores = [" / ".join(f"{k} {v:.3f}" for k, v in sorted(point["scores"].get(t, {}).items())) for t in tasks]
            downstream = "—" if point["downstream"] is None else f"{point['downstream']:.4f}"
            lines.append(f"| {point['arm']} | {point['seed']} | {point['step']} | " + " | ".join(scores) + f" | {downstream} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main
def build(grid_path: str, output: Optional[str] = None, evaluate: bool = True, limit: Optional[int] = None,
          tasks: Optional[str] = None, tokenizer: Optional[str] = None) -> dict[str, Any]:
    grid = load_grid(grid_path)
    options = grid.report
    unknown = sorted(set(options) - REPORT_KEYS)
    if unknown:
        raise GridError(f"{grid.path}: report: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(REPORT_KEYS))}")
    baseline = options.get("baseline", next(iter(grid.arms)))
    if baseline not in grid.arms:
        raise GridError(f"{grid.path}: report.baseline: no arm {baseline!r}; arms: {', '.join(grid.arms)}")
    out = Path(output or Path("results") / grid.name)
    out.mkdir(parents=True, exist_ok=True)

    runs = [run for arm in grid.arms.values() for seed in arm.seeds
            if (run := read_run(arm.name, seed, grid.output / arm.name / f"seed{seed}")) is not None]
    if not runs:
        raise GridError(f"{grid.output}: no point has logged anything yet; run evaluation/sweep.py {grid.path} first")
    finished: dict[str, list[Run]] = {}
    for run in runs:
        if run.done is not None:
            finished.setdefault(run.arm, []).append(run)
    if baseline not in finished:
        raise GridError(f"{grid.output}: the baseline arm {baseline!r} has no finished point yet")
    final = finals(finished)
    law_arms = options.get("law_arms") or [a for a in finished
                                           if law_signature(finished[a][0]) == law_signature(finished[baseline][0])]
    missing = [a for a in law_arms if a not in finished]
    if missing:
        raise GridError(f"{grid.path}: report.law_arms: {', '.join(missing)} has no finished point")
    report: dict[str, Any] = {
        "name": grid.name, "grid": str(grid.path), "baseline": baseline,
        "cpu_hours": sum(r.done["cpu_seconds"] for rs in finished.values() for r in rs) / 3600,
        "points_done": sum(len(rs) for rs in finished.values()),
        "runs": [{"arm": r.arm, "seed": r.seed, "done": r.done is not None, "versions": r.versions,
                  "last_step": int(max(s[-1] for t, (s, _) in r.scalars.items() if s.size and not t.endswith("_by_tokens"))),
                  "cpu_seconds": r.done["cpu_seconds"] if r.done else 0.0} for r in runs],
        "final": final, "law": vocabulary_law(final, law_arms),
        "speedups": [row for arm in finished if arm != baseline for row in speedups(finished[baseline], finished[arm])],
    }
    if evaluate:
        all_finished = [r for rs in finished.values() for r in rs]
        default_tasks = "grammar" if all_finished[0].hparams.get("grammar") else "paper"
        report["evaluation"] = evaluate_checkpoints(all_finished, tasks or options.get("tasks", default_tasks),
                                                    limit or options.get("limit"), tokenizer or options.get("tokenizer"),
                                                    out / "eval")
    plot_curves(finished, out / "loss_curves.png")
    plot_law(final, report["law"], out / "vocab_law.png")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    print(f"report: {out / 'report.md'}", file=sys.stderr)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="the sweep's grid YAML file")
    parser.add_argument("--output", default=None, help="report folder (default results/<name>)")
    parser.add_argument("--no-eval", action="store_true", help="skip scoring the final checkpoints")
    parser.add_argument("--limit", type=int, default=None, help="score a fixed random subset of about N documents per task")
    parser.add_argument("--tasks", default=None, help="evaluate.py tasks (default: grammar for cfg runs, else paper)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer of text runs whose data module names none")
    args = parser.parse_args(argv)
    try:
        report = build(args.grid, args.output, not args.no_eval, args.limit, args.tasks, args.tokenizer)
    except (GridError, KeyError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if (report.get("evaluation") or {}).get("error") else 0

