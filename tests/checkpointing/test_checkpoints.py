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
