"""Faults across ranks (issue 22 item 4): real ``train.py fit`` runs on 2 and 3 gloo ranks (forked, with the
environment torchrun gives), under DDP with replicated tables, ``ShardedDDPStrategy`` with row-sharded OE tables and
``FSDP2Strategy`` with either, stopped by a SIGTERM to every rank or a SIGKILL of one. Afterwards every checkpoint
under a checkpoint's name verifies and loads (no half-written one), the surviving ranks have ended, and ``--ckpt_path
auto`` resumes to the losses of the uninterrupted run.

Each fault comes at a known point: a SIGTERM while rank 0 is held at the end of step 3 and the other ranks have run
on into step 4's collectives (the ranks are at different points, as a scheduler's signals find them), a SIGKILL of a
rank while every rank is held there (after the step-2 checkpoint), or a SIGKILL of rank 0 in the middle of writing
the step-4 sharded checkpoint (after the ranks' shards, before the folder is complete). The uninterrupted run is one
process on the same global batches (the ranks train as one process: ``test_parallel_training``), so the resumed
losses match it to the tolerance the resume tests there use (rel 1e-5).
"""

from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lit_overtok.checkpointing.files import find_resume_checkpoint
from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.checkpointing.integrity import verify_checkpoint
from lit_overtok.cli.main import main as cli_main
from tests.distributed.lightning_cases import CLIP, MODELS, OPTIMIZER, SEED
from tests.distributed.rank_faults import end_all, kill_all, start_ranks, wait_for

STEPS, EVERY = 4, 2
END_TIMEOUT_S = 180  # a 2-core machine under load; a hang is minutes more
STRATEGIES = {
    "ddp": "ddp",
    "sharded_ddp": {"class_path": "lit_overtok.distributed.strategies.ShardedDDPStrategy"},
    "fsdp2": {"class_path": "lit_overtok.distributed.strategies.FSDP2Strategy"},
}
_REPLICATED = MODELS["dense_ot_replicated"]
FAULT_MODELS = {
    "sharded": MODELS["dense_ot"],  # OE + MTP-DS on the tiny backbone, row-sharded sparse tables
    "replicated": _REPLICATED,  # the same with replicated tables (sparse gradients, all-reduced by DDP)
    # FSDP2 shards replicated tables as any weight, which sparse gradients cannot be: dense table gradients.
    "replicated_dense_grads": {**_REPLICATED, "over_encoding": {**_REPLICATED["over_encoding"], "sparse": False}},
}
# (strategy, model): replicated ("dense") and row-sharded OE tables.
SETUPS = {
    "ddp_dense": ("ddp", "replicated"),
    "sharded_ddp_sharded": ("sharded_ddp", "sharded"),
    "fsdp2_dense": ("fsdp2", "replicated_dense_grads"),
    "fsdp2_sharded": ("fsdp2", "sharded"),
}
# (setup, world, fault): "sigterm" to all ranks; "kill<r>": SIGKILL rank r, all held after step 3;
# "kill_saving": SIGKILL rank 0 inside the step-4 sharded checkpoint's save.
CASES = [
    ("ddp_dense", 2, "sigterm"), ("ddp_dense", 2, "kill1"),
    ("sharded_ddp_sharded", 2, "sigterm"), ("sharded_ddp_sharded", 2, "kill_saving"),
    ("fsdp2_dense", 2, "sigterm"), ("fsdp2_dense", 2, "kill0"),
    ("fsdp2_sharded", 2, "sigterm"), ("fsdp2_sharded", 2, "kill_saving"),
    ("sharded_ddp_sharded", 3, "sigterm"), ("fsdp2_sharded", 3, "kill2"),
]


def config(root: Path, strategy, model: str, devices: int, extra_callbacks: list, record: Path = None) -> dict:
    """The run under ``root/runs``; its losses in ``record`` (default ``root/record``)."""
    callbacks = [
        {"class_path": "tests.distributed.lightning_cases.Recorder",
         "init_args": {"out": str(record or root / "record")}},
        {"class_path": "lit_overtok.checkpointing.run_checkpoint.RunCheckpoint",
         "init_args": {"every_n_train_steps": EVERY}},
        *extra_callbacks,
    ]
    return {
        "seed_everything": SEED,
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": strategy, "max_steps": STEPS,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "log_every_n_steps": 1, "gradient_clip_val": CLIP,
                    "use_distributed_sampler": False, "default_root_dir": str(root / "runs"), "callbacks": callbacks},
        "model": {"init_args": {"model_config": FAULT_MODELS[model], "optimizer": OPTIMIZER}},
        "data": {"class_path": "tests.distributed.lightning_cases.FixedGlobalBatches", "init_args": {"steps": STEPS}},
    }


def write_config(root: Path, name: str, settings: dict) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(yaml.safe_dump(settings))
    return str(root / name)


def losses(root: Path) -> list[float]:
    return torch.load(root / "record" / "record.pt", weights_only=False)["losses"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per model, the losses of one uninterrupted process on the same global batches (computed on first use)."""
    runs, cache = tmp_path_factory.mktemp("uninterrupted"), {}

    def get(model: str) -> list[float]:
        if model not in cache:
            root = runs / model
            cli_main(["fit", "--config", write_config(root, "fit.yaml", config(root, "auto", model, 1, []))])
            cache[model] = losses(root)
            assert len(cache[model]) == STEPS
        return cache[model]
    return get


def interrupt(root: Path, strategy, model: str, world: int, fault: str) -> list[int]:
    """Start the run on ``world`` ranks, deliver ``fault``, and return the ranks' exit codes."""
    if fault == "kill_saving":
        extra = [{"class_path": "tests.distributed.rank_faults.KillInShardedSave",
                  "init_args": {"step": 4, "rank": 0}}]
    else:  # SIGTERM: rank 0 held, the others run on into step 4's collectives; SIGKILL: all held
        extra = [{"class_path": "tests.distributed.rank_faults.HoldAt",
                  "init_args": {"step": 3, "folder": str(root), "ranks": "0" if fault == "sigterm" else "all"}}]
    args = ["fit", "--config", write_config(root, "fit.yaml", config(root, strategy, model, world, extra))]
    processes = start_ranks(world, args, root / "logs")
    try:
        deliver(root, processes, fault)
    except BaseException:
        kill_all(processes)
        raise
    return end_all(processes, END_TIMEOUT_S)


def deliver(root: Path, processes: list, fault: str) -> None:
    world = len(processes)

    def reached(condition):  # a rank that ended before the fault ends the wait at once
        def check() -> bool:
            ended = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode is not None}
            assert not ended, f"ranks ended before the fault (exit codes {ended}); see {root / 'logs'}"
            return condition()
        return check

    if fault == "sigterm":
        wait_for(reached(lambda: (root / "held.0").exists()), END_TIMEOUT_S, "rank 0 at step 3")
        for p in processes:
            os.kill(p.pid, signal.SIGTERM)
        # Released only once rank 0 has taken the signal (the others are inside collectives, so they take theirs
        # when rank 0 joins them).
        wait_for(reached(lambda: "SIGTERM: saving" in (root / "logs" / "rank0.log").read_text()), 60,
                 "rank 0's handler")
        (root / "release").write_text("")
    elif fault.startswith("kill") and fault != "kill_saving":
        wait_for(reached(lambda: all((root / f"held.{r}").exists() for r in range(world))), END_TIMEOUT_S,
                 "every rank held")
        os.kill(processes[int(fault[4:])].pid, signal.SIGKILL)
        (root / "release").write_text("")


@pytest.mark.parametrize("setup, world, fault", CASES, ids=[f"{s}-{w}ranks-{f}" for s, w, f in CASES])
def test_a_fault_across_ranks_leaves_whole_checkpoints_and_auto_resumes_to_the_same_losses(
        tmp_path, uninterrupted, setup, world, fault):
    strategy_name, model = SETUPS[setup]
    strategy = STRATEGIES[strategy_name]
    codes = interrupt(tmp_path, strategy, model, world, fault)
    if fault == "sigterm":  # every rank saved step 3 together and stopped with 128 + SIGTERM
        assert codes == [128 + signal.SIGTERM] * world, codes
        expected_step = 3
    else:  # the killed rank died; the others ended (a peer's lost connection), not hung
        killed = 0 if fault == "kill_saving" else int(fault[4:])
        assert codes[killed] == -signal.SIGKILL and all(c not in (0, None) for c in codes), codes
        expected_step = 2

    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sharded folder without its checksums only warns: count it as half-written
        for path in folder.glob("*.ckpt"):
            verify_checkpoint(path)
    partial = [p.name for p in folder.glob(".*.partial")]
    if fault == "kill_saving":  # the folder the ranks were writing kept its hidden temporary name
        assert len(partial) == 1 and partial[0].startswith(".epoch=0-step=4.ckpt."), partial
    newest = find_resume_checkpoint(tmp_path / "runs")
    network, info = load_transformer(newest)
    assert info.global_step == expected_step, (newest, sorted(p.name for p in folder.iterdir()))

    resume = tmp_path / "resumed"
    settings = config(tmp_path, strategy, model, world, [], record=resume / "record")
    args = ["fit", "--config", write_config(resume, "fit.yaml", settings), "--ckpt_path", "auto"]
    assert end_all(start_ranks(world, args, resume / "logs"), END_TIMEOUT_S) == [0] * world
    assert not [p for p in folder.glob(".*.partial")]  # the dead writer's folder is removed at the next start
    # Steps after the checkpoint equal the uninterrupted run's: weights, moments, schedule and data position came back.
    assert losses(resume) == pytest.approx(uninterrupted(model)[expected_step:], rel=1e-5)
