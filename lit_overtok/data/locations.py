"""Where the data folder is: the offline benchmark splits (``<folder>/<split>.jsonl``), tokenizers and corpora.

One rule for every reader (the benchmark tasks, ``evaluate.py --data-dir``, ``LMEvalCallback(data_dir=...)``,
``lm_eval --metadata '{"data_dir": ...}'``, the benchmark scripts): the folder given explicitly, else the
environment variable ``LIT_OVERTOK_DATA``, else ``../shared/data`` beside a source checkout; otherwise a one-line
error saying what is missing and how to provide it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from lit_overtok.errors import InputError

ENV_VAR = "LIT_OVERTOK_DATA"
CHECKOUT = Path(__file__).resolve().parents[2]  # the repository, when the package is used from a source checkout
BESIDE_CHECKOUT = CHECKOUT.parent / "shared" / "data"


def data_dir(explicit: Union[str, Path, None] = None, needed_for: str = "the offline benchmark data") -> Path:
    """The data folder: ``explicit``, then ``$LIT_OVERTOK_DATA``, then ``../shared/data`` beside a checkout.

    ``needed_for`` names what the caller reads, for the error raised when no folder is found.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        if not Path(from_env).is_dir():
            raise InputError(f"{ENV_VAR}={from_env} is not a folder; point it at the data folder (holding "
                             "<task>/<split>.jsonl, tokenizers/...) or unset it")
        return Path(from_env)
    # An installed copy has no checkout around it; only a checkout's neighbour counts.
    if (CHECKOUT / "pyproject.toml").is_file() and BESIDE_CHECKOUT.is_dir():
        return BESIDE_CHECKOUT
    raise InputError(f"no data folder for {needed_for}: give one (evaluate.py --data-dir, "
                     f"LMEvalCallback(data_dir=...), lm_eval --metadata '{{\"data_dir\": ...}}'), set {ENV_VAR}, or "
                     f"place it at {BESIDE_CHECKOUT}; for the standard benchmarks, --online uses lm-eval's own "
                     "datasets instead")
