"""``train.py export`` / ``lit-overtok-export`` on checkpoints of real runs: the transformers model it writes
gives our next-token logits for a dense, an MoE and an Over-Encoding model, and carries the run's tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.cli.main import main as cli_main
from lit_overtok.evaluation.adapter import OverTokEvalLM
from lit_overtok.evaluation.runner import TASK_ROOT, TaskSuite
from lit_overtok.evaluation.tokenizers import GrammarTokenizer

REPO = Path(__file__).resolve().parents[2]
TASK, LIMIT = "cfg_next_token_validity", 16
TOLERANCE = 1e-5  # the MoE residue is summation order (~1e-7); dense and OE are bit-identical


def assert_same_logits(checkpoint: Path, folder: Path, remote_code: bool) -> float:
    ours, _ = load_transformer(checkpoint)
    theirs, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote_code, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids_BT = torch.randint(0, ours.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = (ours(ids_BT) - theirs.eval()(ids_BT).logits).abs().max().item()
    assert delta <= TOLERANCE, delta
    return delta


@pytest.mark.parametrize("family, architecture", [("dense", "Olmo2ForCausalLM"), ("moe", "OlmoeForCausalLM"),
                                                  ("ne", "OverTokOlmo2ForCausalLM")])
def test_train_py_export_round_trip(family, architecture, trained_checkpoint, tmp_path, capsys):
    checkpoint = trained_checkpoint(family)
    cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out
    assert f'"{architecture}"' in (tmp_path / "hf" / "config.json").read_text()
    assert_same_logits(checkpoint, tmp_path / "hf", remote_code=architecture.startswith("OverTok"))


@pytest.mark.parametrize("family", ["oe", "engram"])
def test_train_py_export_of_an_over_encoding_model_with_its_tokenizer(trained_checkpoint, tmp_path, family):
    checkpoint = trained_checkpoint(family)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "export", "--checkpoint", str(checkpoint), "--out",
                           str(tmp_path / "hf")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_logits(checkpoint, tmp_path / "hf", remote_code=True)
    # The grammar's spelling travels with the model (AutoTokenizer reads config.json first: remote code).
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert tokenizer("^312$")["input_ids"] == [0, 3, 1, 2, 4]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 4)


def test_the_export_of_a_text_run_carries_the_tokenizer_it_was_trained_with(text_run, tmp_path):
    """A Wikipedia-like run (its shards' own BPE, recorded in the checkpoint): AutoTokenizer loads the folder and
    spells text as the training tokenizer did. Before the binding the folder had no tokenizer at all."""
    from tokenizers import Tokenizer

    cli_main(["export", "--checkpoint", str(text_run), "--out", str(tmp_path / "hf")])
    recorded = torch.load(text_run, weights_only=False)["WebDatasetDataModule"]["tokenizer"]["file"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the model reads every token of a sentence"
    assert tokenizer(text)["input_ids"] == Tokenizer.from_file(recorded).encode(text).ids
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == Tokenizer.from_file(
        recorded).token_to_id("<|endoftext|>")
    assert_same_logits(text_run, tmp_path / "hf", remote_code=False)


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--checkpoint", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "none.ckpt" in err


def test_lm_eval_cli_scores_the_exported_folder_as_our_adapter_scores_the_checkpoint(trained_checkpoint, tmp_path):
    """lm-eval's own CLI, unmodified (``python -m lm_eval --model hf``), on an exported Over-Encoding model (remote
    code, the run's grammar tokenizer): the same scores as our adapter on the training checkpoint."""
    checkpoint = trained_checkpoint("oe")
    cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the task's !function imports lit_overtok
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32", "--tasks", TASK, "--include_path",
         str(TASK_ROOT / "local"), "--limit", str(LIMIT), "--metadata", json.dumps({"cfg_num_docs": LIMIT}),
         "--device", "cpu", "--batch_size", "8", "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (results_file,) = (tmp_path / "out").glob("**/results_*.json")
    theirs = json.loads(results_file.read_text())["results"][TASK]
    model, _ = load_transformer(checkpoint)
    ours = TaskSuite([TASK], cfg_num_docs=LIMIT).evaluate(OverTokEvalLM(model, GrammarTokenizer("cfg3f"), progress=False),
                                                          limit=LIMIT)["results"][TASK]
    assert theirs["acc,none"] == ours["acc,none"]
    assert theirs["valid_mass,none"] == pytest.approx(ours["valid_mass,none"], abs=1e-6)
