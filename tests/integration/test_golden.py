"""Behaviour is unchanged by refactors: the default config and its OE, MoE and OT variants reproduce their stored
per-step training losses bit for bit (``tests/integration/golden/train_loss.py``). A change that alters training on purpose
updates ``tests/integration/golden/train_loss.json`` in the same commit (``--write``) and says why."""

import json
import subprocess
import sys
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def test_training_losses_match_the_golden_values_bit_for_bit():
    out = subprocess.run([sys.executable, str(GOLDEN_DIR / "train_loss.py")], capture_output=True, text=True,
                         cwd=GOLDEN_DIR.parents[2], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    expected = json.loads((GOLDEN_DIR / "train_loss.json").read_text())
    assert measured == expected
