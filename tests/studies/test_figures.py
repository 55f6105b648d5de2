"""lit_overtok.studies.figures: readable study figures, paired differences, and no law through fewer than 3 points."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from lit_overtok.studies import figures
from lit_overtok.studies.convergence import Curve


def curve(speed: float, offset: float, every: int = 10) -> Curve:
    steps = np.arange(every, 501, every, dtype=np.float64)
    tokens = steps * 2048
    return Curve(tokens, 6.0 + 3.0 * (1 + speed * tokens / 40960) ** -0.35 + offset, steps)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_paired_differences_are_per_seed_on_a_shared_grid():
    base = {1: curve(1.0, 0.0), 2: curve(1.0, 0.1)}
    treat = {1: curve(1.0, -0.03, every=5), 2: curve(1.0, 0.07), 3: curve(1.0, 9.0)}
    tokens, differences = figures.paired_differences(base, treat)
    assert differences.shape == (2, tokens.size)  # seed 3 has no baseline: not a pair
    np.testing.assert_allclose(differences, -0.03, atol=5e-4)  # the fits of curves logged every 5 and 10 steps
    assert figures.paired_differences(base, {5: curve(1.0, 0.0)}) is None


def test_the_study_figure_is_written_at_a_readable_resolution(tmp_path):
    curves = {metric: {"baseline": {1: curve(1.0, 0.0), 2: curve(1.0, 0.02)},
                       "oe": {1: curve(1.5, 0.0), 2: curve(1.5, 0.02)}} for metric in ("train/loss_next1", "val/loss")}
    labels = {"baseline": "baseline, 1.84M params", "oe": "oe, 18.6M params"}
    figures.plot_study(curves, {"oe": "baseline"}, labels, 1e-4, tmp_path / "curves.png")
    width, height = png_size(tmp_path / "curves.png")
    assert (width, height) == (2 * 7 * figures.DPI, int(9.5 * figures.DPI)) and figures.DPI >= 100


@pytest.mark.parametrize("distinct, drawn", [(2, False), (3, True)])
def test_no_law_is_drawn_through_fewer_than_three_input_vocabularies(tmp_path, distinct, drawn):
    x = [3.9, 4.6, 5.1][:distinct]
    points = {"val/loss": {f"arm{i}": (v, [6.6 - 0.01 * i, 6.61 - 0.01 * i]) for i, v in enumerate(x)}}
    fits = {"val/loss": {"slope": -0.01, "intercept": 6.64, "slope_low": -0.03, "slope_high": 0.01}}
    assert figures.plot_law(points, fits, -0.0256, tmp_path / "law.png") is drawn
    assert (tmp_path / "law.png").exists() is drawn
