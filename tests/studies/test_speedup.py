"""evaluation/speedup.py on synthetic TensorBoard runs whose speedups are known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lit_overtok.studies import speedup
from lit_overtok.studies.run_logs import event_folders

TOKENS_PER_STEP = 1000
STEPS = 200


def write_run(folder: Path, rate: float, eval_every: int = 20, tokens_every: int = 10,
              tokens_per_step: int = TOKENS_PER_STEP) -> None:
    """Loss falls and accuracy rises linearly in tokens at ``rate`` x the baseline's pace, then level off.

    Tokens are logged every ``tokens_every`` steps and evaluations every ``eval_every`` steps, so the script has to
    map evaluation steps to tokens between logged points.
    """
    writer = SummaryWriter(str(folder / "version_0"))
    for step in range(1, STEPS + 1):
        progress = min(1.0, rate * step / STEPS)
        if step % tokens_every == 0:
            writer.add_scalar("train/tokens_seen", step * tokens_per_step, step)
        writer.add_scalar("train/loss_next1", 4.0 - 2.0 * progress, step)
        if step % eval_every == 0:
            writer.add_scalar("eval/piqa/acc_norm", 0.5 + 0.2 * progress, step)
            writer.add_scalar("eval/downstream", 0.3 + 0.1 * min(1.0, 0.5 * rate * step / STEPS), step)
    writer.close()


def test_known_speedups_without_smoothing_and_a_treatment_that_never_gets_there(tmp_path, capsys):
    write_run(tmp_path / "base", rate=1.0)
    write_run(tmp_path / "oe", rate=2.5)
    results = speedup.main(["--baseline", str(tmp_path / "base"), "--treatment", str(tmp_path / "oe"),
                            "--loss-ema", "0", "--eval-ema", "0", "--output", str(tmp_path / "s.md"),
                            "--plot", str(tmp_path / "s.png")])
    by_metric = {r.metric: r for r in results}
    assert set(by_metric) == {"train/loss_next1", "eval/piqa/acc_norm", "eval/downstream"}
    loss = by_metric["train/loss_next1"]
    assert loss.lower_is_better and loss.target == pytest.approx(2.0)
    assert loss.baseline_tokens == pytest.approx(STEPS * TOKENS_PER_STEP)
    assert loss.ratio == pytest.approx(2.5)
    assert by_metric["eval/piqa/acc_norm"].ratio == pytest.approx(2.5)
    assert not by_metric["eval/piqa/acc_norm"].lower_is_better
    # The downstream curves reach only half their range by the end; the treatment's 2.5x pace still gets there.
    assert by_metric["eval/downstream"].ratio == pytest.approx(2.5)
    table = (tmp_path / "s.md").read_text()
    assert "| train/loss_next1 | lower | 2.0000 | 200k | 80k | 2.50x |" in table
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    slow = speedup.main(["--baseline", str(tmp_path / "oe"), "--treatment", str(tmp_path / "base"),
                         "--metrics", "eval/downstream", "--output", str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png")])
    assert slow[0].treatment_tokens is None and slow[0].ratio is None
    assert "never reaches the baseline's final smoothed value" in capsys.readouterr().err
    assert "not reached" in (tmp_path / "t.md").read_text()


def write_logged_curve(folder: Path, tag: str, curve, every: int, noise: float, seed: int, steps: int = 20_000,
                       tokens_per_step: int = TOKENS_PER_STEP) -> None:
    """``curve(tokens)`` plus Gaussian noise, logged with the tokens every ``every`` optimizer steps (as Lightning's
    ``log_every_n_steps`` writes the value of that step)."""
    logged = np.arange(every, steps + 1, every)
    values = curve(logged * tokens_per_step) + noise * np.random.default_rng(seed).standard_normal(len(logged))
    writer = SummaryWriter(str(folder / "version_0"))
    for step, value in zip(logged.tolist(), values.tolist()):
        writer.add_scalar("train/tokens_seen", step * tokens_per_step, step)
        writer.add_scalar(tag, value, step)
    writer.close()


def loss_curve(tokens):
    return 2.0 + 3.0 / (1.0 + tokens / 2e6)


def accuracy_curve(tokens):
    return 0.25 + 0.4 * tokens / (tokens + 2e7)


def measured(tmp_path: Path, tag: str, curve, speed: float, every: tuple[int, int], noise: float, *args) -> float:
    """The speedup read for a treatment that follows ``curve`` ``speed`` x faster in tokens (known answer: speed)."""
    base, treat = tmp_path / f"base_{every[0]}", tmp_path / f"treat_{every[1]}_{speed}"
    write_logged_curve(base, tag, curve, every[0], noise, seed=1)
    write_logged_curve(treat, tag, lambda tokens: curve(speed * tokens), every[1], noise, seed=2)
    results = speedup.main(["--baseline", str(base), "--treatment", str(treat), "--metrics", tag, *args,
                            "--output", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")])
    return results[0].ratio


@pytest.mark.parametrize("noise", [0.0, 0.005])
@pytest.mark.parametrize("every", [(10, 10), (50, 50), (100, 100), (10, 50), (50, 10)])
def test_the_loss_speedup_does_not_depend_on_how_often_the_runs_logged(tmp_path, every, noise):
    # 20,000 steps; the treatment reaches every loss value with 5.7x fewer tokens. A 0.99 EMA over *logged points*
    # spanned 100 points (1,000 steps at every 10, 5,000 at every 50) and read 4.3x, 3.4x, 2.5x for the same runs.
    ratio = measured(tmp_path, "train/loss_next1", loss_curve, 5.7, every, noise)
    assert ratio == pytest.approx(5.7, rel=0.02)


@pytest.mark.parametrize("noise", [0.0, 0.005])
@pytest.mark.parametrize("every", [(100, 100), (100, 500)])
def test_a_noisy_accuracy_curve_reads_its_true_speedup(tmp_path, every, noise):
    # Evaluations every 100 (or 500) steps, the 0.9 EMA per baseline evaluation point; true speedup 3.0. The
    # baseline's tokens are its tokens at its last point, not where its noisy smoothed curve first touches its final
    # value, and the smoothing's lag is taken out on both curves.
    ratio = measured(tmp_path, "eval/piqa/acc_norm", accuracy_curve, 3.0, every, noise)
    assert ratio == pytest.approx(3.0, rel=0.02)


def test_a_fixed_evaluation_ema_unit_makes_the_evaluation_interval_irrelevant(tmp_path):
    ratios = [measured(tmp_path, "eval/piqa/acc_norm", accuracy_curve, 3.0, every, 0.0, "--eval-ema-steps", "100")
              for every in ((100, 100), (500, 200), (200, 500))]
    assert ratios == pytest.approx([ratios[0]] * 3, rel=1e-3) and ratios[0] == pytest.approx(3.0, rel=0.02)


def test_ema_on_the_step_axis_equals_a_per_step_ema_of_the_linearly_interpolated_curve():
    rng = np.random.default_rng(0)
    steps = np.cumsum(rng.integers(1, 40, size=60)).astype(float) + 7
    values = rng.standard_normal(60).cumsum()
    every_step = np.arange(steps[0], steps[-1] + 1)
    dense = speedup.ema(np.interp(every_step, steps, values), 0.97)  # every step logged: TensorBoard's own EMA
    np.testing.assert_allclose(speedup.ema(values, 0.97, steps), dense[(steps - steps[0]).astype(int)], rtol=1e-10)
    np.testing.assert_array_equal(speedup.ema(values, 0.0, steps), values)
    with pytest.raises(ValueError, match="steps must increase"):
        speedup.ema(values[:3], 0.9, np.array([1.0, 3.0, 3.0]))


def test_ema_is_tensorboards_debiased_average():
    values = np.array([1.0, 3.0, 2.0, 5.0])
    reference, last = [], 0.0
    for i, v in enumerate(values):
        last = 0.9 * last + 0.1 * v
        reference.append(last / (1 - 0.9 ** (i + 1)))
    np.testing.assert_allclose(speedup.ema(values, 0.9), reference)
    assert speedup.ema(values, 0.9)[0] == 1.0  # debiased: no pull towards zero at the start
    np.testing.assert_array_equal(speedup.ema(values, 0.0), values)


def test_smoothed_curves_that_differ_only_in_tokens_per_step_give_exactly_that_ratio(tmp_path):
    # The same values per step, but each treatment step is worth 2.5x fewer tokens: the EMA (over logged points)
    # is identical in steps, so the smoothed crossing lands 2.5x earlier in tokens.
    write_run(tmp_path / "base", rate=1.0, eval_every=1)
    write_run(tmp_path / "oe", rate=1.0, eval_every=1, tokens_per_step=TOKENS_PER_STEP * 2 // 5)
    results = speedup.main(["--baseline", str(tmp_path / "base"), "--treatment", str(tmp_path / "oe"),
                            "--output", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")])
    assert {r.metric for r in results} == {"train/loss_next1", "eval/piqa/acc_norm", "eval/downstream"}
    for result in results:
        assert result.ratio == pytest.approx(2.5)
    loss = next(r for r in results if r.metric == "train/loss_next1")
    assert loss.target > 2.0 + 0.3  # the 0.99 EMA lags the raw final loss of 2.0 by much on 200 points


def test_a_folder_with_several_runs_is_refused(tmp_path):
    write_run(tmp_path / "a", rate=1.0)
    write_run(tmp_path / "b", rate=1.0)
    with pytest.raises(ValueError, match="holds several runs"):
        event_folders(str(tmp_path))


def test_a_baseline_that_starts_at_its_final_value_is_flagged(tmp_path, capsys):
    write_run(tmp_path / "flat", rate=0.0)
    write_run(tmp_path / "oe", rate=2.0)
    speedup.main(["--baseline", str(tmp_path / "flat"), "--treatment", str(tmp_path / "oe"),
                            "--metrics", "eval/piqa/acc_norm", "--output", str(tmp_path / "s.md"),
                            "--plot", str(tmp_path / "s.png")])
    assert "starts at or beyond its final value" in capsys.readouterr().err
