"""A non-editable install works on its own: built from the checkout into a separate folder, then used from another
directory (so neither the checkout nor an editable install can stand in), it trains 5 steps and evaluates one
benchmark task and one grammar task offline from its packaged task files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

from lit_overtok.data.cfg_datamodule import CFGDataModule
from lit_overtok.training.lightning_module import OverTokLM
from tests.fixtures import TEXT_VOCAB

REPO = Path(__file__).resolve().parents[2]


def run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def text_checkpoint(tmp_path: Path) -> Path:
    """A text-vocabulary model after one step (its data is grammar ids; only the vocabulary matters here)."""
    module = OverTokLM(model_config={"preset": "tiny", "vocab_size": TEXT_VOCAB})
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, CFGDataModule(seq_len=16, batch_size=2, val_sentences=2))
    trainer.save_checkpoint(tmp_path / "text.ckpt")
    return tmp_path / "text.ckpt"


def test_installed_package_trains_and_evaluates_from_another_directory(tmp_path, paper_data, text_tokenizer):
    source, site = tmp_path / "source", tmp_path / "site"
    # A copy of what the wheel is built from, so the build leaves nothing in the checkout.
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "lit_overtok", source / "lit_overtok", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(source)], cwd=tmp_path, env=os.environ)
    assert (site / "lit_overtok" / "evaluation" / "tasks" / "offline" / "mmlu_continuation" / "_mmlu.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    located = run([sys.executable, "-c", "import lit_overtok; print(lit_overtok.__file__)"], elsewhere, env)
    assert located.stdout.strip().startswith(str(site))
    run([sys.executable, "-m", "lit_overtok", "fit", "--trainer.max_steps=5", "--trainer.val_check_interval=5",
         "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.default_root_dir=run",
         "--model.init_args.model_config.preset=tiny", "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
         "--data.init_args.val_sentences=2"], elsewhere, env)
    checkpoint = elsewhere / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    run([sys.executable, str(REPO / "evaluation" / "evaluate.py"), "--checkpoint", str(checkpoint),
         "--tasks", "cfg_next_token_validity", "--cfg-num-docs", "4", "--output-dir", "grammar"], elsewhere, env)
    scores = json.loads((elsewhere / "grammar" / "last.json").read_text())["results"]
    assert 0.0 <= scores["cfg_next_token_validity"]["acc,none"] <= 1.0
    run([sys.executable, str(REPO / "evaluation" / "evaluate.py"), "--checkpoint", str(text_checkpoint(tmp_path)),
         "--tasks", "arc_easy", "--data-dir", str(paper_data), "--tokenizer", str(text_tokenizer),
         "--allow-tokenizer-change", "--output-dir", "arc"], elsewhere, env)
    assert 0.0 <= json.loads((elsewhere / "arc" / "text.json").read_text())["results"]["arc_easy"]["acc,none"] <= 1.0
