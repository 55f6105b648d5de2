"""How many times fewer training tokens a treatment run needs to reach the baseline's final loss (docs/method.md §4.2).

The paper reports "reaches the baseline's final loss with 5.7x fewer tokens" without defining it. Ours, for one
metric both runs logged against training tokens t (x = ln t):

- **fit**: at every logged point, the least-squares line in x through the run's points in the trailing window
  [x - w, x], read at x. w = -ln(1 - f): the window spans the last fraction f (``window``, default 25%) of the
  baseline's tokens, and the same width in x serves both runs (0: values as logged).
- **target**: the baseline's final value = its fitted value at its last point. This is what "reaches the baseline's
  final loss" means here: not its last logged value, which carries one batch's noise, nor a smoothed value that
  lags it.
- **crossing**: where the monotone (isotonic) regression of the treatment's fitted values reaches the target,
  placed between the two points around it by a monotone cubic (PCHIP) in x; speedup = the baseline's final tokens /
  the treatment's tokens there. The isotonic crossing, unlike the first point past the target, does not jump early
  on a noisy curve.
- **censored**: the treatment is past the target from its first point, so it got there at or before that point:
  the speedup is at least baseline tokens / that point's tokens. **never**: it does not reach the target.
- **interval** (95%): a parametric bootstrap. Both fitted curves plus Gaussian noise as large as the points scatter
  around local quadratics (near the target and near the crossing) are re-estimated ``draws`` times; the spread of
  ln(speedup), centred on the estimate and widened by ``WIDEN``, then by the gap between the cubic and a
  straight-line crossing (the interpolation's own error), is the interval.

Why no smoothing bias: a treatment that is the baseline stretched in tokens by s is the baseline shifted by ln s in x,
and a window of fixed width in x fits both alike (points logged evenly in steps have, in x, the same density shape
in every window), so the fitted treatment at x equals the fitted baseline at x + ln s and the crossing lands at ln s,
however long the run and however curved the loss. A per-step EMA spans a different fraction of each run's tokens at
the two crossings (1.82x read for a true 2.0x at 500 steps). ``tests/studies/test_convergence.py`` checks the
estimate and its interval on synthetic curves of 150 to 50,000 steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lit_overtok.errors import InputError

DEFAULT_WINDOW = 0.25
CONFIDENCE = 0.95
DRAWS = 400
WIDEN = 1.25
"""The bootstrap's spread is widened by this factor: it takes the noise as known and the fitted curves as the truth,
and on the synthetic training losses of tests/studies/test_convergence.py it covered the true speedup in 82-93% of
draws, not 95%; widened, >= 90% of the draws of every run length are covered."""
NOISE_POINTS = 8
"""A run's noise is read from at least this many points nearest the target (baseline) or the crossing (treatment)."""

REACHED, CENSORED, NEVER = "reached", "censored", "never"

# Metric direction by name (the tag's last part, without lm-eval's ",<filter>" suffix); nothing is guessed.
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "word_perplexity", "byte_perplexity", "token_perplexity",
                   "bits_per_byte", "bpb", "nll", "error", "ter")
LOWER_IS_BETTER_PREFIXES = ("loss_",)  # our per-head losses: loss_next1, loss_next2, loss_joint, ...
HIGHER_IS_BETTER = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mcc", "bleu", "chrf", "rouge1",
                    "rouge2", "rougeL", "accuracy", "valid_mass", "downstream")


def lower_is_better(metric: str, lower: tuple[str, ...] = (), higher: tuple[str, ...] = ()) -> bool:
    """Whether smaller values of ``metric`` are better: from ``lower``/``higher`` (the user's flags), else the lists
    above; an unknown name is an error naming the flags that settle it."""
    if metric in lower:
        return True
    if metric in higher:
        return False
    name = metric.rsplit("/", 1)[-1].split(",", 1)[0]
    if name in LOWER_IS_BETTER or name.startswith(LOWER_IS_BETTER_PREFIXES):
        return True
    if name in HIGHER_IS_BETTER:
        return False
    raise InputError(f"metric {metric!r}: unknown whether lower or higher is better; pass --lower-is-better {metric} "
                     f"or --higher-is-better {metric}")


@dataclass
class Curve:
    tokens: np.ndarray
    values: np.ndarray
    steps: np.ndarray


@dataclass
class Speedup:
    metric: str
    lower_is_better: bool
    window: float
    """The fit's window as a fraction of the baseline's final tokens (0: values as logged)."""
    target: float
    baseline_tokens: float
    status: str
    """REACHED, CENSORED (at or before the treatment's first point) or NEVER."""
    treatment_tokens: Optional[float]
    """At the crossing; CENSORED: the first point's tokens (an upper bound); NEVER: None."""
    treatment_best: float
    ratio: Optional[float]
    """REACHED: the estimate; CENSORED: a lower bound; NEVER: None."""
    low: Optional[float] = None
    high: Optional[float] = None
    """The 95% interval of a REACHED ratio (None when neither run has 5 points); 0 (printed "never") or inf at an
    end where more than 2.5% of the draws never crossed or were censored."""
    uninformative: bool = False
    """The baseline's own first point is at or beyond its final value: reaching that says nothing about speed."""

    def text(self) -> str:
        """The ratio as tables print it: never a bare number for a censored or missing crossing."""
        if self.status == NEVER:
            return f"never (best value {self.treatment_best:.4f})"
        if self.status == CENSORED:
            return f"≥ {self.ratio:.2f}x (censored at the first point)"
        interval = "" if self.low is None else f" [{format_ratio(self.low)}, {format_ratio(self.high)}]"
        return f"{self.ratio:.2f}x{interval}"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "text": self.text()}


def format_ratio(ratio: float) -> str:
    """An interval end: "never" for 0 (enough draws never reach the target: not a 0.00x speedup), "∞" for inf."""
    if ratio == 0:
        return "never"
    return "∞" if math.isinf(ratio) else f"{ratio:.2f}x"


# ------------------------------------------------------------------------------------------------------ the fit
def trailing_fit(x: np.ndarray, y: np.ndarray, width: float) -> np.ndarray:
    """At each point i, the least-squares line through the points with x in [x_i - width, x_i], read at x_i.

    ``y`` may carry leading batch dimensions (bootstrap draws); O(points) by running sums. A window holding one
    point gives that point.
    """
    if width <= 0:
        return np.array(y, dtype=np.float64)
    x = x - x[-1]  # running sums of x² stay small
    start = np.searchsorted(x, x - width * (1 + 1e-12), side="left")

    def window_sum(a: np.ndarray) -> np.ndarray:
        running = np.concatenate([np.zeros(a.shape[:-1] + (1,)), np.cumsum(a, axis=-1)], axis=-1)
        return running[..., 1:] - running[..., start]

    count, sx, sxx = window_sum(np.ones_like(x)), window_sum(x), window_sum(x * x)
    sy, sxy = window_sum(y), window_sum(x * y)
    spread = count * sxx - sx * sx
    safe = np.where(count >= 2, spread, 1.0)
    slope = np.where(count >= 2, (count * sxy - sx * sy) / safe, 0.0)
    return (sy + slope * (count * x - sx)) / count


def window_width(window: float) -> float:
    """The fit's width in log tokens for a window of the last ``window`` fraction of the baseline's tokens."""
    if not 0 <= window < 1:
        raise InputError(f"window: a fraction of the baseline's tokens in [0, 1), got {window}")
    return -math.log1p(-window)


def final_value(curve: Curve, window: float = DEFAULT_WINDOW) -> float:
    """A run's final value: its fitted value at its last point (the target a treatment must reach)."""
    return float(trailing_fit(np.log(curve.tokens), curve.values, window_width(window))[-1])


def scatter(x: np.ndarray, y: np.ndarray, near: float, width: float) -> np.ndarray:
    """How far points fall from the quadratic through their two neighbours on each side, scaled to one point's
    noise: the residuals within 2 windows of ``near``, at least the ``NOISE_POINTS`` nearest (none with fewer than
    5 points). Where the curve bends on the scale of the logging gaps the bend counts as noise: the interval errs
    wide."""
    if x.size < 5:
        return np.zeros(0)
    middle = np.arange(2, x.size - 2)
    distance = np.abs(x[middle] - near)
    count = max(NOISE_POINTS, int((distance <= 2 * width).sum()))
    middle = middle[np.argsort(distance, kind="stable")[:count]]
    neighbours = middle[:, None] + np.array([-2, -1, 1, 2])
    dx = x[neighbours] - x[middle, None]
    scale = np.abs(dx).max(axis=1, keepdims=True)
    middle, neighbours, dx, scale = (a[scale[:, 0] > 0] for a in (middle, neighbours, dx, scale))  # repeated tokens
    u = dx / scale
    design = np.stack([np.ones_like(u), u, u * u], axis=-1)
    weights = np.linalg.pinv(design)[:, 0, :]  # the quadratic's value at the middle point, from the neighbours
    return (y[middle] - (weights * y[neighbours]).sum(-1)) / np.sqrt(1 + (weights * weights).sum(-1))


# ------------------------------------------------------------------------------------------------- the crossing
def _pchip_slope(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Fritsch-Carlson's derivative at point k (monotone cubic); the neighbouring secant at either end."""
    if k == 0:
        return (y[1] - y[0]) / (x[1] - x[0])
    if k == x.size - 1:
        return (y[k] - y[k - 1]) / (x[k] - x[k - 1])
    h0, h1 = x[k] - x[k - 1], x[k + 1] - x[k]
    d0, d1 = (y[k] - y[k - 1]) / h0, (y[k + 1] - y[k]) / h1
    if d0 * d1 <= 0:
        return 0.0
    w0, w1 = 2 * h1 + h0, h1 + 2 * h0
    return (w0 + w1) / (w0 / d0 + w1 / d1)


def _cubic_crossing(x: np.ndarray, y: np.ndarray, i: int, target: float) -> float:
    """Where the monotone cubic between points i-1 and i takes ``target`` (bisection; it lies between them)."""
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    h = x1 - x0
    d0, d1 = _pchip_slope(x, y, i - 1) * h, _pchip_slope(x, y, i) * h

    def cubic(u: float) -> float:
        return ((2 * u**3 - 3 * u**2 + 1) * y0 + (u**3 - 2 * u**2 + u) * d0 + (3 * u**2 - 2 * u**3) * y1
                + (u**3 - u**2) * d1 - target)

    low, high = 0.0, 1.0
    above = cubic(0.0) > 0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if (cubic(middle) > 0) == above else (low, middle)
    return x0 + h * (low + high) / 2


def _not_reached(values: np.ndarray, target, lower: bool) -> np.ndarray:
    """How far each value is from the target on the wrong side (negative: past it)."""
    return values - target if lower else target - values


def crossing_index(fitted: np.ndarray, target, lower: bool) -> np.ndarray:
    """k such that the monotone (isotonic) regression of ``fitted`` is short of the target at points < k and has
    reached it from point k on: the k that maximises the sum of ``_not_reached`` over points < k (0: reached from
    the first point, CENSORED; the number of points: NEVER). Unlike the first point past the target, this does not
    jump early on a noisy curve. ``fitted`` may carry leading batch dimensions (bootstrap draws)."""
    gaps = _not_reached(fitted, target, lower)
    sums = np.concatenate([np.zeros(gaps.shape[:-1] + (1,)), np.cumsum(gaps, axis=-1)], axis=-1)
    return sums.argmax(axis=-1)


def crossing(x: np.ndarray, fitted: np.ndarray, target: float, lower: bool) -> tuple[str, float, float]:
    """(status, x at the crossing, the same by a straight line); x of the first point when CENSORED.

    Between the last point short of the target and the first past it (``crossing_index``), by the monotone cubic
    through the fitted points where they straddle the target, else at the middle of the gap (noise reversed them;
    the straight-line value is then an end of the gap, so the interval takes the whole uncertainty)."""
    k = int(crossing_index(fitted, target, lower))
    if k == 0:
        return CENSORED, float(x[0]), float(x[0])
    if k == x.size:
        return NEVER, math.nan, math.nan
    if _not_reached(fitted[k - 1], target, lower) > 0 >= _not_reached(fitted[k], target, lower):
        straight = x[k - 1] + (x[k] - x[k - 1]) * (target - fitted[k - 1]) / (fitted[k] - fitted[k - 1])
        return REACHED, _cubic_crossing(x, fitted, k, target), float(straight)
    return REACHED, float((x[k - 1] + x[k]) / 2), float(x[k])


def _draw_log_ratios(base_x: np.ndarray, base_fit: np.ndarray, treat_x: np.ndarray, treat_fit: np.ndarray,
                     noise: float, width: float, lower: bool, draws: int, seed: int) -> np.ndarray:
    """ln(speedup) of ``draws`` replicas (fitted curves plus noise), crossings by straight lines; +inf where a draw
    is censored (an unbounded speedup), -inf where it never crosses."""
    rng = np.random.default_rng(seed)
    base = trailing_fit(base_x, base_fit + noise * rng.standard_normal((draws, base_x.size)), width)
    treat = trailing_fit(treat_x, treat_fit + noise * rng.standard_normal((draws, treat_x.size)), width)
    target = base[:, -1:]
    k = crossing_index(treat, target, lower)
    before, after = np.maximum(k - 1, 0), np.minimum(k, treat_x.size - 1)
    rows = np.arange(draws)
    y0, y1 = treat[rows, before], treat[rows, after]
    straddle = (_not_reached(y0, target[:, 0], lower) > 0) & (_not_reached(y1, target[:, 0], lower) <= 0)
    fraction = np.where(straddle, (target[:, 0] - y0) / np.where(straddle, y1 - y0, 1.0), 0.5)
    log_ratio = base_x[-1] - (treat_x[before] + (treat_x[after] - treat_x[before]) * fraction)
    return np.where(k == 0, math.inf, np.where(k == treat_x.size, -math.inf, log_ratio))


def estimate(metric: str, baseline: Curve, treatment: Curve, lower: bool, window: float = DEFAULT_WINDOW,
             draws: int = DRAWS, seed: int = 0) -> tuple[Speedup, np.ndarray, np.ndarray]:
    """The speedup of ``treatment`` over ``baseline`` on ``metric`` (module docstring), and both fitted curves;
    ``draws=0`` skips the interval."""
    width = window_width(window)
    base_x, treat_x = np.log(baseline.tokens), np.log(treatment.tokens)
    base_fit = trailing_fit(base_x, baseline.values, width)
    treat_fit = trailing_fit(treat_x, treatment.values, width)
    target = float(base_fit[-1])
    best = float(treat_fit.min() if lower else treat_fit.max())
    status, x_cubic, x_straight = crossing(treat_x, treat_fit, target, lower)
    result = Speedup(metric, lower, window, target, float(baseline.tokens[-1]), status,
                     None if status == NEVER else math.exp(x_cubic), best,
                     None if status == NEVER else math.exp(base_x[-1] - x_cubic),
                     uninformative=bool(crossing_index(base_fit, target, lower) == 0))
    # One noise for both runs (the same metric, batch size or evaluation set): each run alone may have too few points.
    residuals = np.concatenate([scatter(base_x, baseline.values, base_x[-1], width),
                                scatter(treat_x, treatment.values, x_cubic, width)]) if draws else []
    if status == REACHED and len(residuals):
        noise = float(1.4826 * np.median(np.abs(residuals)))
        log_ratios = _draw_log_ratios(base_x, base_fit, treat_x, treat_fit, noise, width, lower, draws, seed)
        tail = (1 - CONFIDENCE) / 2
        with np.errstate(invalid="ignore"):  # inf - inf where most draws are censored: no finite centre
            spread = WIDEN * np.quantile(log_ratios - np.median(log_ratios), [tail, 1 - tail])
        interpolation = abs(x_cubic - x_straight)
        centre = base_x[-1] - x_cubic
        result.low = float(np.exp(centre + spread[0] - interpolation)) if np.isfinite(spread[0]) else 0.0
        result.high = float(np.exp(centre + spread[1] + interpolation)) if np.isfinite(spread[1]) else math.inf
    return result, base_fit, treat_fit
