"""``train.py strip``: a small inference checkpoint without optimizer state or training-only heads, which every
reader loads (evaluate.py, generate, export, ``OverTokLM.load_from_checkpoint``) and which predicts exactly as the
training checkpoint's next-token head does."""

from __future__ import annotations

import pytest
import torch

from lit_overtok.evaluation import score_checkpoints as evaluate
from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.cli.main import main as cli_main
from lit_overtok.training.lightning_module import OverTokLM


def test_strip_drops_optimizer_state_and_over_decoding_heads(trained_checkpoint, tmp_path, capsys):
    source = trained_checkpoint("od")
    out = tmp_path / "model.ckpt"
    cli_main(["strip", "--checkpoint", str(source), "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    full, small = torch.load(source, weights_only=False), torch.load(out, weights_only=False)
    assert "optimizer_states" in full and "optimizer_states" not in small and "lr_schedulers" not in small
    assert any(k.startswith("transformer.multi_token_head.") for k in full["state_dict"])
    assert not any(k.startswith("transformer.multi_token_head.") for k in small["state_dict"])
    assert small["hyper_parameters"]["model_config"]["multi_token"] is None
    assert small["inference_only"]["dropped_heads"] == "od"
    assert out.stat().st_size < 0.5 * source.stat().st_size
    # The next-token model is unchanged, whoever loads it.
    trained, _ = load_transformer(source)
    stripped, info = load_transformer(out)
    assert info.global_step == 2 and info.data["grammar"] == "cfg3f"
    ids_BT = torch.randint(0, 7, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(ids_BT), stripped(ids_BT))
        module, meta = evaluate.load_checkpoint(out, "cpu")
        assert torch.equal(module(ids_BT), trained(ids_BT)) and meta["global_step"] == 2
        assert torch.equal(OverTokLM.load_from_checkpoint(out).eval()(ids_BT), trained(ids_BT))


def test_strip_refuses_its_own_input_and_a_file_that_is_not_a_checkpoint(trained_checkpoint, tmp_path, capsys):
    source = trained_checkpoint("dense")
    capsys.readouterr()  # not what trained the checkpoint, when this test trained it
    for args in (["--checkpoint", str(source), "--out", str(source)],
                 ["--checkpoint", str(source.parent.parent / "hparams.yaml"), "--out", str(tmp_path / "x.ckpt")],
                 ["--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x.ckpt")]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["strip", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err


def test_an_ne_run_strips_and_resumes_with_its_options(trained_checkpoint, tmp_path):
    # LongCat's N-gram Embedding: the flavor and its ignored ids travel in the hyperparameters, so a stripped or a
    # resumed model hashes and combines as the trained one did.
    source = trained_checkpoint("ne")
    out = tmp_path / "model.ckpt"
    cli_main(["strip", "--checkpoint", str(source), "--out", str(out)])
    trained, _ = load_transformer(source)
    stripped, _ = load_transformer(out)
    oe = stripped.config.over_encoding
    assert (oe.flavor, oe.proj_bias, oe.ignore_ids, oe.row_counts()) == ("longcat", False, [0], [97, 99, 101, 103])
    ids_BT = torch.randint(0, 7, (2, 20), generator=torch.Generator().manual_seed(0))
    ids_BT[:, [0, 7]] = 0
    with torch.no_grad():
        assert torch.equal(trained(ids_BT), stripped(ids_BT))
    from tests.conftest import RUN_FAMILIES, TINY_FIT
    cli_main(["fit", f"--trainer.default_root_dir={tmp_path / 'resumed'}", *TINY_FIT, *RUN_FAMILIES["ne"],
              "--trainer.max_steps=3", f"--ckpt_path={source}"])
    resumed, info = load_transformer(tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt")
    assert info.global_step == 3 and resumed.config.over_encoding == oe
    with torch.no_grad():
        assert not torch.equal(resumed(ids_BT), trained(ids_BT))  # it trained on from the checkpoint


def test_an_engram_checkpoint_carries_its_compressed_ids_through_strip_and_resume(text_corpus, tmp_path):
    # The compressed ids are built from the tokenizer file at the start of training; afterwards the checkpoint alone
    # must give them (evaluation and generation on a machine without the file, a resumed run).
    import shutil

    from tokenizers import Tokenizer

    from lit_overtok.nn.token_compression import compressed_id_map

    tokenizer = tmp_path / "tokenizer.json"
    shutil.copyfile(text_corpus / "tokenizer.json", tokenizer)
    engram = f'{{"layers": [1], "table_size": 61, "heads": 2, "ngram_width": 8, "sparse": true, "tokenizer": "{tokenizer}"}}'
    args = ["fit", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--model.init_args.model_config.preset=tiny", f"--model.init_args.model_config.engram={engram}",
            "--data=lit_overtok.data.webdataset_datamodule.WebDatasetDataModule",
            f"--data.init_args.train_shards={text_corpus}", "--data.init_args.seq_len=16", "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0", "--data.init_args.val_batches=1"]
    cli_main([*args, "--trainer.max_steps=2"])
    tokenizer.unlink()
    last = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "model.ckpt"
    cli_main(["strip", "--checkpoint", str(last), "--out", str(out)])
    trained, _ = load_transformer(last)
    stripped, _ = load_transformer(out)
    expected = compressed_id_map(Tokenizer.from_file(str(text_corpus / "tokenizer.json")), trained.config.vocab_size)
    assert stripped.engram.compressed_ids.tolist() == expected and max(expected) + 1 < len(expected)
    ids_BT = torch.randint(0, trained.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(ids_BT), stripped(ids_BT))
    cli_main([*args, "--trainer.max_steps=4", f"--ckpt_path={last}"])
    resumed, info = load_transformer(last)
    assert info.global_step == 4 and resumed.engram.compressed_ids.tolist() == expected
