"""Paired differences, token multipliers and the verdict rules of lit_overtok.studies.verdicts, on numbers whose
answers are known."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lit_overtok.studies import verdicts
from lit_overtok.studies.convergence import CENSORED, NEVER, REACHED, Speedup

REPOSITORY = Path(__file__).resolve().parents[2]


def speedup(status: str, ratio, low=None, high=None) -> Speedup:
    return Speedup("val/loss", True, 0.25, 6.5, 1e6, status, None if ratio is None else 1e6 / ratio, 6.4, ratio,
                   low, high)


def test_the_paired_difference_is_the_mean_with_its_t_interval():
    paired = verdicts.paired_difference({1: 6.60, 2: 6.62, 3: 6.58, 4: 6.70}, {1: 6.55, 2: 6.58, 3: 6.55, 5: 6.0})
    assert paired.seeds == [1, 2, 3] and paired.differences == pytest.approx([-0.05, -0.04, -0.03])
    # mean -0.04, sd 0.01, t(2) = 4.303: half-width 4.303 * 0.01 / sqrt(3)
    assert paired.mean == pytest.approx(-0.04)
    assert paired.high == pytest.approx(-0.04 + 4.303 * 0.01 / math.sqrt(3))
    assert paired.verdict == verdicts.RESOLVED and "resolved" in paired.text()


@pytest.mark.parametrize("differences, expected", [
    ([-0.05, -0.04, -0.03], verdicts.RESOLVED),
    ([-0.05, -0.001, -0.09], verdicts.DIRECTION_CONSISTENT),  # every pair agrees, but the interval includes 0
    ([-0.05, -0.04], verdicts.DIRECTION_CONSISTENT),  # two pairs never resolve, however far apart from 0
    ([-0.05, 0.01, -0.03], verdicts.UNRESOLVED),
    ([-0.3], "unresolved (1 seed)"),
])
def test_the_verdict_rules(differences, expected):
    paired = verdicts.paired_difference({s: 1.0 for s in range(len(differences))},
                                        {s: 1.0 + d for s, d in enumerate(differences)})
    assert paired.verdict == expected


def test_the_rules_are_stated_once_and_printed_verbatim():
    text = verdicts.rules_markdown()
    for name, rule in verdicts.VERDICT_RULES.items():
        assert f"- *{name}*: {rule}." in text
    assert "at least 3 pairs" in verdicts.VERDICT_RULES[verdicts.RESOLVED]


def test_t_quantiles():
    assert verdicts.t975(1) == 12.706 and verdicts.t975(30) == 2.042
    assert verdicts.t975(31) == pytest.approx(2.0395, abs=0.001)
    assert verdicts.t975(1000) == pytest.approx(1.962, abs=1e-3)


def test_a_multiplier_over_crossing_pairs_is_their_geometric_mean():
    result = verdicts.multiplier([speedup(REACHED, 2.0), speedup(REACHED, 8.0), speedup(REACHED, 4.0)])
    assert result.summary == "geometric mean" and result.value == pytest.approx(4.0)
    logs = [math.log(2), math.log(8), math.log(4)]
    half = 4.303 * (math.log(2) * 1.0) / math.sqrt(3)  # sd of the logs = ln 2
    assert (result.low, result.high) == pytest.approx((4 * math.exp(-half), 4 * math.exp(half)))
    assert result.verdict == verdicts.verdict(logs, math.log(result.low), math.log(result.high))
    one = verdicts.multiplier([speedup(REACHED, 1.8, 1.5, 2.2)])
    assert (one.low, one.high) == (1.5, 2.2) and one.verdict == "unresolved (1 seed)"
    assert one.text() == "geometric mean 1.80x [1.50x, 2.20x] (1 pair): unresolved (1 seed)"


def test_censored_and_missing_crossings_make_the_summary_a_median_that_counts_them():
    result = verdicts.multiplier([speedup(REACHED, 2.1), speedup(CENSORED, 3.0), speedup(NEVER, None)])
    assert result.summary == "median" and result.status == REACHED and result.value == pytest.approx(2.1)
    assert (result.censored, result.never) == (1, 1) and result.verdict == verdicts.UNRESOLVED
    assert result.text() == "median 2.10x (3 pairs; 1 censored, 1 never): unresolved"
    # The median may itself be a bound: never a bare ratio.
    bound = verdicts.multiplier([speedup(CENSORED, 2.5), speedup(CENSORED, 3.0), speedup(REACHED, 2.0)])
    assert bound.status == CENSORED and bound.text().startswith("median ≥ 2.50x (3 pairs; 2 censored)")
    assert bound.verdict == verdicts.DIRECTION_CONSISTENT  # all three faster, but no interval to resolve with
    slower = verdicts.multiplier([speedup(NEVER, None), speedup(NEVER, None)])
    assert slower.text() == "median never (2 pairs; 2 never): direction consistent"


@pytest.mark.parametrize("document", ["docs/studies.md", "results/README.md"])
def test_the_documents_state_the_rules_verbatim(document):
    assert verdicts.rules_markdown() in (REPOSITORY / document).read_text()
