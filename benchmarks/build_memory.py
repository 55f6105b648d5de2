"""Peak host memory per rank while FSDP2 sets a large model up: built where sharded (parameters on the meta device,
drawn after ``fully_shard``, each rank only its shards: ``lit_overtok.nn.deferred_init``) against a checkout that
builds the whole model on every rank first; with the start-of-run memory estimate beside it.

For each preset, 2 gloo ranks on the CPU (``FSDP2Strategy``, fp32 unless ``--precision``) run a real ``Trainer.fit``
up to ``on_fit_start``: the model is built, sharded, drawn, and the optimizer created (AdamW's moments are allocated
at the first step, so they are not included: this is the setup, not training); ``--steps N`` goes on through N
optimizer steps instead (from the second on, a step computes its gradients while AdamW's moments are held: the steady
state of training). Each rank
reports its peak resident set (``ru_maxrss``), the peak up to the end of the module's constructor
(``peak_constructed``), its resident set after the imports (``baseline``), after the constructor (``constructed``) and
at the end (``set_up``); each figure is the larger of the two ranks'. Beside them, the start-of-run estimate the fit
printed (``distributed.memory``): ``estimate_setup`` is its part that exists at setup (the process as measured at the
start of the fit, weights and tables), ``estimate_total`` adds gradients, AdamW's moments and FSDP2's gathered units
(``estimate_gathered``), which exist within steps. ``--precision bf16-true`` halves the model's bytes, so that steps
of olmo2-1b fit this host (2 ranks x 11 GiB in fp32).

    OMP_NUM_THREADS=1 python benchmarks/build_memory.py [--before-root CHECKOUT] [--presets olmo2-1b olmoe-1.3b]
        [--steps 2] [--precision bf16-true]

``--before-root``: a checkout whose package is measured first (PYTHONPATH), e.g. main before this change; the ratio
after/before of the peaks is then printed per preset. ``olmoe-1.3b`` gets a row-sharded Over-Encoding of 200k-row
tables (the paper's OE-12.8M tables, 13.1B parameters, are beyond one host; sharded tables were already placed per
rank before this change). Each launch checks the host's available memory first and stops rather than push a shared
machine into swapping. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# The presets' tokenizers (configs/olmo2: OLMo2's, V = 100,278; configs/olmoe: GPT-NeoX's, V = 50,280).
PRESETS = {
    "olmo2-151m": {"preset": "olmo2-151m", "vocab_size": 100_278},  # a quick check of the script itself
    "olmo2-1b": {"preset": "olmo2-1b", "vocab_size": 100_278},
    "olmoe-1.3b": {"preset": "olmoe-1.3b", "vocab_size": 50_280,
                   "over_encoding": {"m": 200_003, "n": 3, "k": 2, "sparse": True, "sharded": True}},
}
WORLD = 2


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_main(preset: str, out: str, steps: int, precision: str) -> None:
    """One rank: a real fit, stopped at on_fit_start (after configure_model and the strategy's setup), or after
    ``steps`` optimizer steps."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lit_overtok.distributed.strategies import FSDP2Strategy
    from lit_overtok.nn.config import ModelConfig
    from lit_overtok.training import lightning_module
    from lit_overtok.training.lightning_module import OverTokLM

    torch.set_num_threads(1)
    baseline = rss_bytes()

    class SetUp(Exception):
        pass

    class Stop(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            if not steps:
                raise SetUp

    if not steps:
        # The setup alone is measured: fit's check that training fits the host (olmo2-1b's steps in fp32 do not at
        # 2 ranks here) would stop it before the part this measures.
        lightning_module.check_fits = lambda *args: None
    pl.seed_everything(1234, verbose=False)
    config = ModelConfig(**PRESETS[preset])
    module = OverTokLM(model_config=config)
    peak_constructed = peak_bytes()
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=FSDP2Strategy(), max_steps=max(1, steps),
                         precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Stop()])
    ids = torch.zeros(1, 9, dtype=torch.long)
    batches = DataLoader([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}] * max(1, steps), batch_size=None)
    built = rss_bytes()  # after the OverTokLM constructor: the whole model on an eager build, its buffers on meta
    try:
        trainer.fit(module, train_dataloaders=batches)
    except SetUp:
        pass
    # The estimate the fit printed (the process as measured at its start); absent on checkouts older than it.
    estimate = getattr(module, "memory_estimate", None)
    estimates = {} if estimate is None else {
        "estimate_total": estimate.total, "estimate_setup": estimate.at_setup, "estimate_process": estimate.process,
        "estimate_gathered": estimate.gathered}
    Path(out).write_text(json.dumps({
        "peak": peak_bytes(), "peak_constructed": peak_constructed, "baseline": baseline,
        "constructed": built, "set_up": rss_bytes(),
        **estimates}))


def launch(preset: str, package_root: Path, steps: int, precision: str) -> dict:
    """2 ranks of this script on ``package_root``'s package; their reports combined (GiB)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        processes = []
        for rank in range(WORLD):
            env = {**os.environ, "PYTHONPATH": str(package_root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
            processes.append(subprocess.Popen(
                [sys.executable, __file__, "--rank-of", preset, "--out", f"{tmp}/rank{rank}.json"]
                + ["--steps", str(steps), "--precision", precision], env=env,
                cwd=tmp, stdout=subprocess.DEVNULL if rank else None))
        if any(p.wait() != 0 for p in processes):
            raise SystemExit(f"build_memory: a rank of {preset} on {package_root} failed (see above)")
        reports = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(WORLD)]
    commit = subprocess.run(["git", "-C", str(package_root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"commit": commit, "peak_gib": max(r["peak"] for r in reports) / GIB,
            "peak_constructed_gib": max(r["peak_constructed"] for r in reports) / GIB,
            "baseline_gib": max(r["baseline"] for r in reports) / GIB,
            "constructed_gib": max(r["constructed"] for r in reports) / GIB,
            "set_up_gib": max(r["set_up"] for r in reports) / GIB,
            **{f"{key}_gib": max(r[key] for r in reports) / GIB for key in reports[0] if key.startswith("estimate")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["olmo2-1b", "olmoe-1.3b"], choices=list(PRESETS))
    parser.add_argument("--before-root", type=Path, help="a checkout to measure first (the eager build)")
    parser.add_argument("--steps", type=int, default=0,
                        help="measure through this many optimizer steps (0: the setup only; from the 2nd step on, "
                             "AdamW's moments are held while a step's gradients are computed)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-true"],
                        help="the parameters' dtype (bf16-true halves every figure, so a step of olmo2-1b fits)")
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.out, args.steps, args.precision)
        return
    from lit_overtok.distributed.memory import estimate_per_rank
    from lit_overtok.nn.config import ModelConfig
    from lit_overtok.nn.counts import parameter_counts

    result = {"world": WORLD}
    for preset in args.presets:
        # Refuse to start what could not fit now: a rank needs about the estimate (1 GiB for the process), and an
        # eager build (``--before-root``) holds the whole model on each rank besides.
        config = ModelConfig(**PRESETS[preset])
        estimate = estimate_per_rank(config, WORLD, fsdp=True, precision=args.precision, process=GIB)
        per_rank = estimate.total if args.steps else estimate.at_setup
        if args.before_root is not None:
            per_rank += parameter_counts(config).total * (2 if args.precision == "bf16-true" else 4)
        need = WORLD * per_rank + 2 * GIB
        if available_bytes() < need:
            raise SystemExit(f"build_memory: {preset} may need {need / GIB:.1f} GiB, the host has "
                             f"{available_bytes() / GIB:.1f} GiB available; run it when it has")
        runs = {}
        if args.before_root is not None:
            runs["before"] = launch(preset, args.before_root.resolve(), args.steps, args.precision)
        runs["after"] = launch(preset, REPO, args.steps, args.precision)
        if "before" in runs:
            runs["ratio"] = runs["after"]["peak_gib"] / runs["before"]["peak_gib"]
        for name, run in runs.items():
            print(f"{preset} {name}: {run if name == 'ratio' else json.dumps(run)}", flush=True)
        result[preset] = runs
    print(json.dumps(result))


if __name__ == "__main__":
    main()
