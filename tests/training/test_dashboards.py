"""What a run writes for its dashboards, through ``train.py fit`` (and a resumed fit): one step axis (optimizer steps)
for every tag, gradient norms per part (Over-Encoding's sparse tables included), speed and memory in ``train/``, the
HPARAMS tab, parameter counts as text and hyperparameters, plain-YAML hparams, and a progress bar counted in steps
that a resume continues, with lm-eval's bars kept out of it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lit_overtok.cli.main import main as cli_main

B, T = 2, 32


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """4 steps of a sparse-OE model (validation at 2 and 4, evaluation at the end)."""
    root = tmp_path_factory.mktemp("dashboards")
    common = ["--trainer.default_root_dir", str(root), "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
              "--trainer.log_every_n_steps=1", "--model.init_args.model_config.preset=tiny",
              '--model.init_args.model_config.over_encoding={"m": 97, "n": 3, "k": 2, "sparse": true}',
              f"--data.init_args.seq_len={T}", f"--data.init_args.batch_size={B}", "--data.init_args.val_sentences=2"]
    cli_main(["fit", "--trainer.max_steps=4", *common])
    events = EventAccumulator(str(root / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    return {"root": root, "events": events}


def scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in events.Scalars(tag)}


def test_every_tag_shares_the_optimizer_step_axis(run):
    events = run["events"]
    tokens = scalars(events, "train/tokens_seen")
    assert tokens == {step: float(step * B * T) for step in (1, 2, 3, 4)}  # step s: the tokens of s optimizer steps
    assert sorted(scalars(events, "train/loss")) == [1, 2, 3, 4]
    assert sorted(scalars(events, "val/loss")) == [2, 4]  # after 2 and 4 steps, as the evaluation below
    eval_steps = sorted(scalars(events, "eval/cfg_next_token_validity/acc"))
    assert eval_steps == [4] and max(eval_steps) <= max(tokens)  # no evaluation point lies past the run's tokens
    assert sorted(scalars(events, "val/loss_by_tokens")) == [2 * B * T, 4 * B * T]
    assert sorted(scalars(events, "eval/cfg_next_token_validity/acc_by_tokens")) == [4 * B * T]


def test_gradient_norms_globally_and_per_part_including_sparse_tables(run):
    events = run["events"]
    parts = {part: scalars(events, f"train/grad_norm/{part}") for part in ("backbone", "embedding", "heads",
                                                                            "over_encoding")}
    total = scalars(events, "train/grad_norm")
    assert sorted(total) == [1, 2, 3, 4]
    for step, norm in total.items():
        assert norm > 0 and all(parts[part][step] > 0 for part in parts)
        assert norm == pytest.approx(math.sqrt(sum(parts[part][step] ** 2 for part in parts)), rel=1e-5)


def test_speed_memory_and_mfu_are_in_train(run):
    tags = set(run["events"].Tags()["scalars"])
    for tag in ("train/tokens_per_sec", "train/tokens_per_sec_per_device", "train/flops_per_sec_per_device",
                "train/mfu", "train/peak_memory_gib"):
        assert sorted(scalars(run["events"], tag)) == [1, 2, 3, 4], tag
    assert 0 < min(scalars(run["events"], "train/mfu").values()) < 1
    assert not any(tag.startswith(("params/", "train/device/", "validate/")) for tag in tags), sorted(tags)


def test_hparams_tab_parameter_counts_and_plain_yaml(run):
    events = run["events"]
    hparams = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "val/loss" in {metric.name.tag for metric in experiment.metric_infos}  # its final value shows in the tab
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["model_config/n_layer"].number_value == 2
    assert session.hparams["params/over_encoding_tables"].number_value > 0
    assert session.hparams["params/non_embedding"].number_value > 0
    run_shape = {key: session.hparams[f"run/{key}"].number_value for key in
                 ("seq_len", "global_batch", "tokens_per_step", "max_steps", "seed", "token_budget")}
    assert run_shape == {"seq_len": T, "global_batch": B, "tokens_per_step": B * T, "max_steps": 4, "seed": 1234,
                         "token_budget": 4 * B * T}
    assert "parameter_counts/text_summary" in events.Tags()["tensors"]
    saved = yaml.safe_load((Path(run["root"]) / "version_0" / "hparams.yaml").read_text())  # no !!python/tuple
    assert saved["optimizer"]["betas"] == [0.9, 0.95]
    assert saved["parameter_counts"]["total"] > saved["parameter_counts"]["non_embedding"] > 0


def test_the_progress_bar_counts_steps_with_a_total_across_a_resume(tmp_path, capfd):
    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.val_check_interval=3",
              "--trainer.limit_val_batches=1", "--model.init_args.model_config.preset=tiny",
              "--data.init_args.seq_len=16", "--data.init_args.batch_size=2", "--data.init_args.val_sentences=2",
              "--trainer.accumulate_grad_batches=2"]
    cli_main(["fit", "--trainer.max_steps=3", *common])
    first = "".join(capfd.readouterr())  # Lightning draws its bars on stdout, lm-eval on stderr
    cli_main(["fit", "--trainer.max_steps=5", "--ckpt_path", str(tmp_path / "version_0" / "checkpoints" / "last.ckpt"),
              *common])
    resumed = "".join(capfd.readouterr())
    bar = re.compile(r"Training:\s+\d+%\|[^|]*\| (\d+)(?:\.00)?/(\S+) ")  # whole steps (with accumulation: 3.00)
    # Optimizer steps (6 batches under accumulation) out of max_steps, continued by the resumed run.
    assert {total for _, total in bar.findall(first)} == {"3"} and ("3", "3") in bar.findall(first)
    assert {total for _, total in bar.findall(resumed)} == {"5"}
    assert {"3", "5"} <= {step for step, _ in bar.findall(resumed)}
    # tqdm shows an ETA ([elapsed<remaining]) only for a bar with a total; before the first step it is '?'.
    eta = re.compile(r"Training:\s+\d+%\|[^|]*\| 4(?:\.00)?/5 \[[\d:]+<([\d:]+),")
    assert eta.search(resumed), resumed[-2000:]
    # In-training evaluation runs at the end of each fit without drawing lm-eval's own bars into ours.
    assert "Tokenizing inputs" not in first + resumed
