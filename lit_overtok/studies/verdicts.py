"""What a study's seeds decide: paired differences, token multipliers and the verdict vocabulary (docs/method.md §4.2).

Arms are compared seed by seed: the treatment run of seed k against the baseline run of seed k (the same data order
and, for the shared weights, the same initialisation), so run-to-run noise common to both cancels. Per pair:

- the **difference** of a final value (treatment - baseline); its summary is the mean over pairs with the 95%
  t-interval (n - 1 degrees of freedom);
- the **token multiplier** (``convergence.estimate``); its summary is the geometric mean over pairs with the 95%
  t-interval of the mean log multiplier, or for one pair the estimator's own interval. Where a pair is censored
  or never crosses, no mean exists: the summary is the median over pairs, a censored pair counting above every
  finite one and a missing crossing below, so the median may itself be a bound ("≥ X") or "never".

The verdict of a difference (and of a multiplier, on its log) follows ``VERDICT_RULES``, used verbatim by the
reports and docs/studies.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lit_overtok.studies.convergence import CENSORED, format_ratio, NEVER, REACHED, Speedup

RESOLVED, DIRECTION_CONSISTENT, UNRESOLVED = "resolved", "direction consistent", "unresolved"
MIN_RESOLVING_PAIRS = 3
VERDICT_RULES = {
    RESOLVED: f"the 95% interval of the paired difference excludes 0, with at least {MIN_RESOLVING_PAIRS} pairs",
    DIRECTION_CONSISTENT: "every pair's difference has the same sign (at least 2 pairs), but the rule for "
                          "'resolved' does not hold",
    UNRESOLVED: "otherwise: the pairs disagree in sign, or there is only one pair (one seed)",
}
"""The verdict vocabulary; a verdict of one pair is written "unresolved (1 seed)"."""

# Student's t, 97.5% quantile, by degrees of freedom (beyond 30, Cornish-Fisher's expansion to 1/df², within 0.001).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def rules_markdown() -> str:
    """The rules as a markdown list, as reports print them."""
    return "\n".join(f"- *{name}*: {rule}." for name, rule in VERDICT_RULES.items())


def verdict(values: list[float], low: Optional[float], high: Optional[float]) -> str:
    """The verdict on per-pair ``values`` (differences, or log multipliers; +-inf for bounds) whose mean has the
    interval [low, high] (None where there is none)."""
    if len(values) >= MIN_RESOLVING_PAIRS and low is not None and (low > 0 or high < 0):
        return RESOLVED
    signs = {math.copysign(1, v) for v in values if v != 0}
    if len(values) >= 2 and len(signs) == 1 and 0 not in values:
        return DIRECTION_CONSISTENT
    return f"{UNRESOLVED} (1 seed)" if len(values) == 1 else UNRESOLVED


@dataclass
class PairedDifference:
    seeds: list[int]
    differences: list[float]
    """Treatment - baseline, one per seed both arms ran."""
    mean: float
    low: Optional[float]
    high: Optional[float]
    """The 95% t-interval of the mean (None with one pair)."""
    verdict: str

    def text(self) -> str:
        interval = "" if self.low is None else f" [{self.low:+.4f}, {self.high:+.4f}]"
        return f"{self.mean:+.4f}{interval} ({len(self.seeds)} pair{'s' * (len(self.seeds) > 1)}): {self.verdict}"


def paired_difference(baseline: dict[int, float], treatment: dict[int, float]) -> Optional[PairedDifference]:
    """The difference of two arms' values over the seeds both have (None when they share none)."""
    seeds = sorted(set(baseline) & set(treatment))
    if not seeds:
        return None
    differences = [treatment[s] - baseline[s] for s in seeds]
    mean = float(np.mean(differences))
    low = high = None
    if len(seeds) >= 2:
        half = t975(len(seeds) - 1) * float(np.std(differences, ddof=1)) / math.sqrt(len(seeds))
        low, high = mean - half, mean + half
    return PairedDifference(seeds, differences, mean, low, high, verdict(differences, low, high))


@dataclass
class Multiplier:
    summary: str
    """'geometric mean' (every pair crossed) or 'median' (some pair censored or never crossing)."""
    status: str
    """REACHED, or CENSORED / NEVER where the median itself is such a pair."""
    value: Optional[float]
    low: Optional[float]
    high: Optional[float]
    pairs: int
    censored: int
    never: int
    verdict: str

    def text(self) -> str:
        counts = ", ".join(f"{n} {what}" for n, what in ((self.censored, "censored"), (self.never, "never"))
                           if n)
        tail = f"{self.pairs} pair{'s' * (self.pairs > 1)}" + (f"; {counts}" if counts else "")
        if self.status == NEVER:
            value = "never"
        elif self.status == CENSORED:
            value = f"≥ {self.value:.2f}x"
        else:
            value = f"{self.value:.2f}x" + ("" if self.low is None else
                                            f" [{format_ratio(self.low)}, {format_ratio(self.high)}]")
        return f"{self.summary} {value} ({tail}): {self.verdict}"


def multiplier(speedups: list[Speedup]) -> Multiplier:
    """The token multiplier over the pairs of one arm and metric (module docstring)."""
    censored = sum(s.status == CENSORED for s in speedups)
    never = sum(s.status == NEVER for s in speedups)
    # Per pair: ln(ratio); a censored pair is at least its bound, a missing crossing is slower than any.
    logs = [math.log(s.ratio) if s.status == REACHED else math.inf if s.status == CENSORED else -math.inf
            for s in speedups]
    if not (censored or never):
        mean = float(np.mean(logs))
        low = high = None
        if len(logs) >= 2:
            half = t975(len(logs) - 1) * float(np.std(logs, ddof=1)) / math.sqrt(len(logs))
            low, high = math.exp(mean - half), math.exp(mean + half)
        elif speedups[0].low is not None:
            low, high = speedups[0].low, speedups[0].high
        log_low = None if low is None else math.log(low) if low > 0 else -math.inf
        log_high = None if high is None else math.log(high)
        return Multiplier("geometric mean", REACHED, math.exp(mean), low, high, len(logs), 0, 0,
                          verdict(logs, log_low, log_high))
    # Sort by the value each pair stands for; a censored pair by its bound among the censored.
    order = sorted(speedups, key=lambda s: (s.status != NEVER, s.status == CENSORED, s.ratio or 0.0))
    middle = order[(len(order) - 1) // 2]  # the lower median: with two pairs, the one that claims less
    # Signs only: faster (> 1x), slower (never reaching the baseline's final value in as many tokens), or unknown
    # (a censored bound below 1x).
    signs = [math.log(s.ratio) if s.status == REACHED else -1.0 if s.status == NEVER else
             1.0 if s.ratio > 1 else 0.0 for s in speedups]
    return Multiplier("median", middle.status, middle.ratio, None, None, len(speedups), censored, never,
                      verdict(signs, None, None))
