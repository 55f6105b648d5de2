"""The output modes train from their configs through the real CLI, log per-head losses to TensorBoard, and a
checkpoint trained with Over-Decoding serves plain next-token inference."""

import glob
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_overtok.cli.main import main
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts, flops_per_token
from lit_overtok.nn.generation import generate
from lit_overtok.training.lightning_module import OverTokLM

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Each config, shrunk to the tiny preset and a 2-step run; the per-head losses it must log.
RUNS = {
    "cfg3f_small_od3": {"loss_next1", "loss_joint", "loss_next2", "loss_next3"},
    "cfg3f_small_od3_product": {"loss_next1", "loss_next2", "loss_next3"},
    "cfg3f_small_mtp_ds": {"loss_next1", "loss_next2"},
    "cfg3f_small_ot": {"loss_next1", "loss_next2"},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    done: dict[str, Path] = {}

    def train(name: str) -> Path:
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            main(args=[
                "fit", "--config", str(CONFIGS / "cfg" / f"{name}.yaml"),
                "--model.init_args.model_config.preset", "tiny",
                "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "2", "--data.init_args.val_sentences", "2",
                "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2",
                "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
            ])
            done[name] = root / "version_0"
        return done[name]

    return train


def scalars(run: Path) -> dict[str, list[float]]:
    events = EventAccumulator(glob.glob(str(run / "events.out.tfevents.*"))[0])
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_output_modes_train_from_configs_and_log_per_head_losses(name, run_dir):
    logged = scalars(run_dir(name))
    assert {f"train/{part}" for part in RUNS[name]} <= set(logged)
    assert len(logged["train/loss_next2"]) == 2 and "eval/cfg_next_token_validity/acc" in logged
    multi_token = yaml.safe_load((CONFIGS / "cfg" / f"{name}.yaml").read_text())["model"]["init_args"]["model_config"]["multi_token"]
    weights = multi_token.get("loss_weights") or [1.0] * (multi_token["n"] - 1)
    # train/loss is the weighted objective: next-token loss plus lambda_j times each further head's loss
    # (the joint mode's loss is the joint cross-entropy, logged as loss_joint).
    for step in range(2):
        if "loss_joint" in RUNS[name]:
            expected = logged["train/loss_joint"][step]
        else:
            expected = logged["train/loss_next1"][step] + sum(
                w * logged[f"train/loss_next{j}"][step] for j, w in enumerate(weights, start=2))
        assert logged["train/loss"][step] == pytest.approx(expected, rel=1e-5)


def test_a_checkpoint_trained_with_od_serves_plain_next_token_inference(run_dir):
    checkpoint = run_dir("cfg3f_small_od3_product") / "checkpoints" / "last.ckpt"
    trained = OverTokLM.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    assert trained.transformer.multi_token_head is not None
    # A plain next-token model takes the checkpoint once the training-only head's weights are dropped.
    plain_cfg = trained.model_config.replace(multi_token=None)
    plain = OverTokLM(model_config=plain_cfg).eval()
    plain.configure_model()  # parameters built on the meta device: allocate them before loading weights
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    dropped = {k: v for k, v in state.items() if not k.startswith("transformer.multi_token_head.")}
    assert len(dropped) < len(state)
    plain.load_state_dict(dropped, strict=True)
    ids_BT = torch.randint(0, plain_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain(ids_BT), trained(ids_BT), rtol=0, atol=0)
    prompt_B1 = torch.zeros(3, 1, dtype=torch.long)
    outputs = [generate(m.transformer, prompt_B1, 24, temperature=1.0, generator=torch.Generator().manual_seed(1))
               for m in (plain, trained)]
    assert torch.equal(*outputs)


@pytest.mark.parametrize("path", ["cfg/cfg3f_large_od3.yaml", "cfg/cfg3f_large_od3_product.yaml",
                                  "olmoe/olmoe_1.3b_ot12.8m.yaml"])
def test_gpu_sized_configs_build_with_the_expected_heads(path):
    model_args = yaml.safe_load((CONFIGS / path).read_text())["model"]["init_args"]["model_config"]
    vocab = 7 if path.startswith("cfg/") else 50_280
    config = ModelConfig(vocab_size=vocab, **model_args)
    counts = parameter_counts(config)  # built on the meta device
    D, n = config.d_model, config.multi_token.n
    if config.multi_token.mode == "joint":
        assert counts.embedding == vocab * D + vocab ** n * D  # untied 1-gram table + the V^n joint table
    elif config.multi_token.mode == "od":
        assert counts.embedding == vocab * D * n  # tied 1-gram table/head 1, plus heads 2..n
    assert flops_per_token(config, 512) > flops_per_token(ModelConfig(vocab_size=vocab, **{**model_args, "multi_token": None}), 512)
