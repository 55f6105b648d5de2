"""lm-eval's own CLI scores our checkpoints as ``--model lit_overtok`` (``lit-overtok-lm-eval``), with the scores of
the same model scored in-process; registering keeps lm-eval's built-in models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.evaluation.adapter import OverTokEvalLM
from lit_overtok.evaluation.lm_eval_cli import OverTokCheckpointLM, register
from lit_overtok.evaluation.runner import TASK_ROOT, TaskSuite
from lit_overtok.evaluation.tokenizers import GrammarTokenizer

REPO = Path(__file__).resolve().parents[2]
TASK, LIMIT = "cfg_next_token_validity", 16


def test_lm_eval_cli_scores_a_checkpoint_as_in_process(trained_checkpoint, tmp_path):
    checkpoint = trained_checkpoint("oe")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lit_overtok.evaluation.lm_eval_cli", "--model", "lit_overtok", "--model_args",
         f"checkpoint={checkpoint}", "--tasks", TASK, "--include_path", str(TASK_ROOT / "local"), "--limit",
         str(LIMIT), "--metadata", json.dumps({"cfg_num_docs": LIMIT}), "--device", "cpu", "--output_path",
         str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert TASK in done.stdout  # lm-eval's own results table
    (results_file,) = tmp_path.glob("**/results_*.json")  # in a folder named after the model arguments
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "lit_overtok"
    # The tokenizer came from the checkpoint (its data module's grammar); the same task in-process agrees.
    model, _ = load_transformer(checkpoint)
    direct = TaskSuite([TASK], cfg_num_docs=LIMIT).evaluate(OverTokEvalLM(model, GrammarTokenizer("cfg3f"),
                                                                          progress=False), limit=LIMIT)
    for metric in ("acc,none", "valid_mass,none"):
        assert results["results"][TASK][metric] == direct["results"][TASK][metric]


def test_register_keeps_lm_eval_builtin_models():
    from lm_eval.api.registry import get_model

    register()
    register()  # idempotent
    assert get_model("lit_overtok") is OverTokCheckpointLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own table is still there
