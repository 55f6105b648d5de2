"""Data-parallel training through the real Lightning Trainer on gloo (CPU) equals one process on the same global
batch: losses, every gradient, every parameter after 4 AdamW steps (with global-norm clipping), OE coverage and MoE
expert load, and outputs. Row-sharded Over-Encoding tables at 2 and 3 ranks (uneven row blocks at 3), under
``ShardedDDPStrategy`` and ``FSDP2Strategy``, on an OT model (OE + MTP-DS, sparse tables) and an MoE model (OE with
dense table gradients), and Engram's sharded sparse tables at 2 ranks under both. Sharded checkpoints saved at 2
ranks resume at 2 and 3 and load at 1.

Runs, kept few because each costs seconds (forked ranks share the test process's imports):
- two torchrun launches with node ranks 0 and 1, one process each, of ``train.py fit`` (DDP, OT model), saving
  sharded checkpoints at steps 2 and 4;
- 2 forked ranks: resume that run from step 2 (DDP), the MoE model under FSDP2 (with a checkpoint at step 4), and
  the OT model with replicated tables under Lightning's plain DDPStrategy;
- 3 forked ranks: the MoE model under DDP, the OT model under FSDP2, and the step-2 checkpoint resumed at 3;
- 2 forked ranks, on their own: the Engram model under DDP (checkpoints) and FSDP2.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from tests.distributed.harness import free_port, run_ranks
from tests.distributed.lightning_cases import CLIP, fit, fit_on_rank, MODELS, OPTIMIZER, probe_ids, SEED

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _record(directory: Path) -> dict:
    return torch.load(directory / "record.pt", weights_only=False)


def assert_matches_one_process(record: dict, reference: dict, steps: range = range(STEPS)) -> None:
    assert record["losses"] == pytest.approx(reference["losses"][steps.start:], rel=1e-5)
    for step, grads in zip(steps, record["grads"]):
        assert grads.keys() == reference["grads"][step].keys()
        for name, grad in grads.items():
            assert_close(grad, reference["grads"][step][name], rtol=1e-4, atol=1e-5, msg=f"step {step} {name}")
    assert record["params"].keys() == reference["params"].keys()
    for name, value in record["params"].items():
        # Adam divides by sqrt(v) + eps: where a gradient is ~0, its float rounding still moves a weight a little
        # (eps is raised for this, ``lightning_cases.OPTIMIZER``), of the 4e-2 that four steps of lr 1e-2 can move it.
        assert_close(value, reference["params"][name], rtol=1e-4, atol=5e-5, msg=name)
    assert record["metrics"] == pytest.approx(reference["metrics"], rel=1e-6)
    assert_close(record["logits"], reference["logits"], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def reference(runs):
    """One process, the whole global batch, 4 steps, for each model (computed once, on first use)."""
    cache = {}

    def get(model: str) -> dict:
        if model not in cache:
            fit(model, "auto", str(runs / f"reference_{model}"), steps=STEPS)
            cache[model] = _record(runs / f"reference_{model}")
        return cache[model]
    return get


@pytest.fixture(scope="module")
def two_nodes(runs) -> Path:
    """``train.py fit`` launched twice by torchrun, as on two machines (node ranks 0 and 1, one process each)."""
    config = {
        "seed_everything": SEED,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "num_nodes": 2, "max_steps": STEPS, "logger": False,
            "strategy": {"class_path": "lit_overtok.distributed.strategies.ShardedDDPStrategy"},
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, "gradient_clip_val": CLIP,
            "use_distributed_sampler": False, "default_root_dir": str(runs / "two_nodes"),
            "callbacks": [
                {"class_path": "tests.distributed.lightning_cases.Recorder",
                 "init_args": {"out": str(runs / "two_nodes")}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(runs / "checkpoints"), "filename": "{step}", "every_n_train_steps": 2,
                               "save_top_k": -1}},
            ],
        },
        "model": {"init_args": {"model_config": MODELS["dense_ot"], "optimizer": OPTIMIZER}},
        "data": {"class_path": "tests.distributed.lightning_cases.FixedGlobalBatches", "init_args": {"steps": STEPS}},
    }
    (runs / "two_nodes.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "train.py", "fit", "--config", str(runs / "two_nodes.yaml")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [launch.communicate(timeout=300)[0] for launch in launches]
    for launch, output in zip(launches, outputs):
        assert launch.returncode == 0, output[-5000:]
    assert "memory per rank" in outputs[0]  # the estimate, printed at the start
    assert "Training finished: 4 optimizer steps" in outputs[0]  # and the summary at the end (rank 0 only)
    return runs


@pytest.fixture(scope="module")
def two_ranks(two_nodes) -> Path:
    runs = two_nodes
    run_ranks(2, fit_on_rank, [
        dict(model="dense_ot", strategy="ddp", out=str(runs / "resume_at_2"), steps=STEPS,
             ckpt_path=str(runs / "checkpoints" / "step=2.ckpt")),
        dict(model="moe_oe", strategy="fsdp2", out=str(runs / "fsdp2_moe_at_2"), steps=STEPS,
             checkpoint_dir=str(runs / "fsdp2_checkpoints")),
        dict(model="dense_ot_replicated", strategy="plain_ddp", out=str(runs / "replicated_at_2"), steps=STEPS),
    ], init_process_group=False)
    return runs


@pytest.fixture(scope="module")
def three_ranks(two_nodes) -> Path:
    runs = two_nodes
    run_ranks(3, fit_on_rank, [
        dict(model="moe_oe", strategy="ddp", out=str(runs / "ddp_moe_at_3"), steps=STEPS),
        dict(model="dense_ot", strategy="fsdp2", out=str(runs / "fsdp2_ot_at_3"), steps=STEPS),
        dict(model="dense_ot", strategy="ddp", out=str(runs / "resume_at_3"), steps=STEPS,
             ckpt_path=str(runs / "checkpoints" / "step=2.ckpt")),
    ], init_process_group=False)
    return runs


def test_two_nodes_under_ddp_train_the_ot_model_as_one_process(two_nodes, reference):
    record = _record(two_nodes / "two_nodes")
    assert record["world"] == 2
    assert_matches_one_process(record, reference("dense_ot"))
    # The checkpoints are folders of per-rank shards: no rank wrote the whole table.
    assert sorted(p.name for p in (two_nodes / "checkpoints").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]
    assert len(list((two_nodes / "checkpoints" / "step=4.ckpt").glob("*.distcp"))) == 2


def test_ne_with_sharded_sparse_tables_at_two_ranks_trains_as_one_process(runs, reference):
    run_ranks(2, fit_on_rank, [dict(model="dense_ne", strategy="ddp", out=str(runs / "ne_at_2"), steps=STEPS)],
              init_process_group=False)
    assert_matches_one_process(_record(runs / "ne_at_2"), reference("dense_ne"))


def test_fsdp2_at_two_ranks_trains_the_moe_model_as_one_process(two_ranks, reference):
    assert_matches_one_process(_record(two_ranks / "fsdp2_moe_at_2"), reference("moe_oe"))


def test_replicated_tables_under_plain_ddp_train_as_the_sharded_ones(two_ranks, reference):
    # Same initial table either way, sparse gradients all-reduced by DDP, coverage the OR (MAX) over ranks.
    assert_matches_one_process(_record(two_ranks / "replicated_at_2"), reference("dense_ot"))


def test_ddp_at_three_ranks_trains_the_moe_model_as_one_process(three_ranks, reference):
    assert_matches_one_process(_record(three_ranks / "ddp_moe_at_3"), reference("moe_oe"))


def test_fsdp2_at_three_ranks_trains_the_ot_model_as_one_process(three_ranks, reference):
    assert_matches_one_process(_record(three_ranks / "fsdp2_ot_at_3"), reference("dense_ot"))


@pytest.mark.parametrize("world", [2, 3])
def test_a_checkpoint_saved_at_two_ranks_resumes_at_two_and_three(two_ranks, three_ranks, reference, world):
    record = _record(two_ranks / f"resume_at_{world}")
    assert record["world"] == world
    # Steps 3 and 4 after the resume equal the uninterrupted run's: weights, moments and schedule all came back.
    assert_matches_one_process(record, reference("dense_ot"), steps=range(2, STEPS))


def assert_loads_in_one_process(checkpoint: Path, expected: dict):
    """The sharded checkpoint, loaded without a process group, holds the one-process run's weights and outputs."""
    from lit_overtok.evaluation.score_checkpoints import load_checkpoint

    network, meta = load_checkpoint(checkpoint, "cpu")
    assert meta["global_step"] == STEPS
    for name, value in network.named_parameters():
        assert_close(value.detach(), expected["params"][name], rtol=1e-4, atol=5e-5, msg=name)
    with torch.no_grad():
        assert_close(network(probe_ids()), expected["logits"], rtol=1e-4, atol=1e-5)
    return network


@pytest.mark.parametrize("folder", ["checkpoints", "fsdp2_checkpoints"])
def test_a_sharded_checkpoint_loads_in_one_process_for_evaluation(two_ranks, reference, folder):
    model = "dense_ot" if folder == "checkpoints" else "moe_oe"
    assert_loads_in_one_process(two_ranks / folder / "step=4.ckpt", reference(model))


@pytest.fixture(scope="module")
def engram_runs(runs) -> Path:
    """Engram with sharded sparse tables at 2 forked ranks: ShardedDDP (checkpoints at steps 2 and 4), then FSDP2."""
    run_ranks(2, fit_on_rank, [
        dict(model="dense_engram", strategy="ddp", out=str(runs / "engram_ddp_at_2"), steps=STEPS,
             checkpoint_dir=str(runs / "engram_checkpoints")),
        dict(model="dense_engram", strategy="fsdp2", out=str(runs / "engram_fsdp2_at_2"), steps=STEPS),
    ], init_process_group=False)
    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_engram_with_sharded_sparse_tables_at_two_ranks_trains_as_one_process(engram_runs, reference, strategy):
    record = _record(engram_runs / f"engram_{strategy}_at_2")
    assert record["world"] == 2
    assert_matches_one_process(record, reference("dense_engram"))


def test_a_sharded_engram_checkpoint_loads_in_one_process_for_evaluation_and_generation(engram_runs, reference):
    from lit_overtok.nn.generation import generate

    assert len(list((engram_runs / "engram_checkpoints" / "step=4.ckpt").glob("*.distcp"))) == 2
    network = assert_loads_in_one_process(engram_runs / "engram_checkpoints" / "step=4.ckpt",
                                          reference("dense_engram"))
    # KV- and n-gram-cached greedy decoding equals greedy decoding by full recomputation.
    ids_BT = probe_ids()[:, :3]
    generated_BT = generate(network, ids_BT, 5, temperature=0)
    with torch.no_grad():
        for _ in range(5):
            ids_BT = torch.cat([ids_BT, network(ids_BT)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated_BT, ids_BT)


SHARD_DAMAGE = {  # issue 22: a flipped byte loaded other weights silently; the others were tracebacks
    "flipped byte in a shard": (lambda f: _flip(next(f.glob("*.distcp"))), "do not match the CRC-32 recorded"),
    "truncated shard": (lambda f: _truncate(next(f.glob("*.distcp"))), r"bytes, \d+ when it was saved"),
    "empty meta.pt": (lambda f: (f / "meta.pt").write_bytes(b""), r"meta.pt is 0 bytes"),
    "missing shard": (lambda f: next(f.glob("*.distcp")).unlink(), "is missing from the sharded checkpoint"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def test_every_reader_takes_a_sharded_oe_checkpoint_and_refuses_a_damaged_one_in_one_line(two_nodes, tmp_path,
                                                                                          capsys):
    from lit_overtok.checkpointing.inference import read_checkpoint
    from lit_overtok.checkpointing.integrity import CheckpointError
    from lit_overtok.cli.main import main as cli_main

    source = two_nodes / "checkpoints" / "step=4.ckpt"  # ShardedDDPStrategy, row-sharded OE tables
    assert (source / "checksums.json").is_file()
    readers = {
        "generate": ["generate", "--checkpoint", "{}", "--tokenizer", "grammar:cfg3f", "--max-new-tokens", "3"],
        "export": ["export", "--checkpoint", "{}", "--out", str(tmp_path / "hf"), "--tokenizer", "grammar:cfg3f"],
        "strip": ["strip", "--checkpoint", "{}", "--out", str(tmp_path / "small.ckpt")],
    }
    for args in readers.values():
        cli_main([str(source) if a == "{}" else a for a in args])
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "small.ckpt").is_file()
    for kind, (damage, message) in SHARD_DAMAGE.items():
        folder = tmp_path / kind.replace(" ", "_")
        shutil.copytree(source, folder)
        damage(folder)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(folder)
        capsys.readouterr()
        for name, args in readers.items():
            with pytest.raises(SystemExit) as stopped:
                cli_main([str(folder) if a == "{}" else a for a in args])
            err = capsys.readouterr().err
            assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), \
                (kind, name, err)
