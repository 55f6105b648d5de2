"""Grid files of tiny sweeps for the tests of evaluation/sweep.py and evaluation/report.py."""

from __future__ import annotations

from pathlib import Path

import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
# A few-step grammar run of the tiny model: seconds of CPU after train.py's imports.
TINY_RUN = {
    "model.init_args.model_config.preset": "tiny",
    "trainer.max_steps": 5,
    "trainer.val_check_interval": 5,
    "trainer.log_every_n_steps": 1,
    "trainer.enable_progress_bar": False,
    "data.init_args.seq_len": 32,
    "data.init_args.batch_size": 2,
    "data.init_args.val_sentences": 8,
}
TINY_ARMS = {"base": {}, "oe": {"overrides": {"model.init_args.model_config.over_encoding": {"m": 343, "n": 3, "k": 1}}}}


def write_grid(path: Path, arms: dict, output: Path, seeds=(1,), **extra) -> Path:
    """A grid file over the default config with the tiny run's overrides."""
    grid = {"name": "tiny", "output": str(output), "config": str(REPOSITORY / "configs" / "default.yaml"),
            "overrides": TINY_RUN, "seeds": list(seeds), "arms": arms, **extra}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path
