"""Does ``sparse: true`` train like dense tables? Same-seed Over-Encoding runs with sparse and dense tables, a second
seed of the dense run for the seed-to-seed noise, and the old lazy rule for contrast (issue 11, item 2).

Each arm is a real ``train.py fit`` of ``configs/wiki/wiki_small_oe.yaml`` (cfg-small, OE-98k: two tables of 98,305
and 98,307 rows, n = 3, k = 1, BPE-8192 Wikipedia, batch 8 x 256), shortened to ``--steps`` with validation every
``--val-every`` steps, one thread each, one after another. A batch looks up 2,048 rows per table, so most rows are
read once in a while and skipped in between: the case where the sparse path's semantics matter. Prepare shards first
(docs/data.md, "Text shards"; one training file is enough for a few hundred steps):

    python -m lit_overtok.data.prepare --output data/wiki_bpe8k_00 --vocab-size 8192 \\
        --train ../shared/data/wikipedia_en_2015/train-00.jsonl.xz \\
        --validation ../shared/data/wikipedia_en_2015/validation.jsonl.xz
    python benchmarks/sparse_vs_dense.py --shards data/wiki_bpe8k_00 --steps 300    # ~4 runs x 3-6 min

Prints val/loss of every arm at every validation and the mean training loss over each validation interval, then the
gaps: sparse - dense (same seed), dense seed 2 - dense (the noise), lazy - dense. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_overtok.studies.run_logs import read_run_scalars  # noqa: E402

ARMS = {  # name: (sparse tables, row semantics, seed)
    "dense": (False, "adamw", 1234),
    "sparse": (True, "adamw", 1234),
    "dense_seed2": (False, "adamw", 1235),
    "sparse_lazy": (True, "lazy", 1234),
}


def train(arm: str, args: argparse.Namespace) -> Path:
    sparse, semantics, seed = ARMS[arm]
    root = Path(args.output) / arm
    command = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/wiki/wiki_small_oe.yaml"),
        "--trainer.max_steps", str(args.steps), "--trainer.val_check_interval", str(args.val_every),
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--data.init_args.train_shards", args.shards,
        "--model.init_args.model_config.over_encoding.sparse", str(sparse).lower(),
        "--model.init_args.optimizer.sparse_row_semantics", semantics,
        "--model.init_args.optimizer.warmup_steps", str(max(1, args.steps // 30)),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return root


def curves(run: Path, val_every: int) -> dict[str, np.ndarray]:
    """val/loss at each validation (Lightning logs it at the index of the last step done, as train/*), and the mean
    train/loss_next1 over the ``val_every`` steps up to it."""
    scalars = read_run_scalars(str(run))
    val_steps, val = scalars["val/loss"]
    steps, train_loss = scalars["train/loss_next1"]
    means = [train_loss[(steps > s - val_every) & (steps <= s)].mean() for s in val_steps]
    return {"steps": val_steps, "val": val, "train": np.array(means)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="data/wiki_bpe8k_00", help="prepared WebDataset shards (manifest.json)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--output", default="runs/sparse_vs_dense")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    results = {}
    for arm in args.arms:
        print(f"training {arm} ...", flush=True)
        results[arm] = curves(train(arm, args), args.val_every)
    steps = results[args.arms[0]]["steps"]
    print("| step | " + " | ".join(f"{arm} val / train" for arm in args.arms) + " |")
    print("|---|" + "---|" * len(args.arms))
    for i, step in enumerate(steps):
        cells = [f"{results[a]['val'][i]:.4f} / {results[a]['train'][i]:.4f}" for a in args.arms]
        print(f"| {int(step) + 1} | " + " | ".join(cells) + " |")
    summary = {"steps": args.steps, "val_every": args.val_every}
    for arm in args.arms:
        if arm == "dense" or "dense" not in results:
            continue
        for key in ("val", "train"):
            gap = results[arm][key] - results["dense"][key]
            summary[f"{arm}_minus_dense_{key}_max_abs"] = round(float(np.abs(gap).max()), 5)
            summary[f"{arm}_minus_dense_{key}_final"] = round(float(gap[-1]), 5)
        print(f"{arm} - dense: val max |gap| {summary[f'{arm}_minus_dense_val_max_abs']:.4f}, final "
              f"{summary[f'{arm}_minus_dense_val_final']:+.4f}; train-interval mean max |gap| "
              f"{summary[f'{arm}_minus_dense_train_max_abs']:.4f}")
    summary["curves"] = {arm: {k: [round(float(v), 5) for v in r[k]] for k in ("val", "train")}
                         for arm, r in results.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
