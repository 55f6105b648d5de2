"""Does data ever stall training? Tokens/s the WebDataset DataModule delivers against tokens/s the CPU-sized wiki
model consumes, measured in one run, plus the preparation speed (MB of text per second).

    python benchmarks/dataloader.py                 # configs/wiki/wiki_small.yaml; its shards if prepared
    python benchmarks/dataloader.py --quick         # under a minute on an idle 2-core machine
    python benchmarks/dataloader.py --config configs/wiki/wiki_small_oe.yaml --shards data/wiki_bpe8k

1. prepare: the first ``--prepare-mb`` MB of text of ``wikipedia_en_2015/train-00.jsonl.xz`` (re-compressed as
   xz) through ``lit_overtok.data.prepare`` with the wiki tokenizer (``<shards>/tokenizer.json``; GPT-2's if the
   wiki shards are not prepared), one tokenizer process per CPU core. MB/s = characters of text / wall time.
2. loader: the config's data module (seq_len, batch_size, num_workers, shuffle buffer) over ``--shards`` (or the
   shards of step 1), read in the main process as a Trainer would: tokens of ``input_ids`` per second.
3. train: the config's model, forward + backward + optimizer step on batches of that loader: tokens per second.
Loader and training rounds alternate and each figure is the median over rounds, so machine noise hits both alike.
The last line is one JSON object: loader_tokens_per_s, train_tokens_per_s, ratio, prepare_mb_per_s (+ context).
"""

from __future__ import annotations

import argparse
import itertools
import json
import lzma
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Only light imports at module level: prepare's spawned tokenizer processes re-run this file's top level, and torch
# would cost each of them seconds (main() imports the rest).
from lit_overtok.data.prepare import PrepareConfig, prepare  # noqa: E402

from lit_overtok.data.locations import data_dir  # noqa: E402

WIKI = "wikipedia_en_2015/train-00.jsonl.xz"  # inside the data folder
GPT2 = "tokenizers/gpt2/tokenizer.json"


def prepare_speed(workdir: Path, tokenizer: Path, megabytes: float) -> tuple[float, Path]:
    """MB/s of ``prepare`` on a slice of the wiki corpus; returns it and the shard directory it wrote."""
    source = workdir / "slice.jsonl.xz"
    budget = megabytes * 1e6
    wiki = data_dir(needed_for="the Wikipedia corpus") / WIKI
    with lzma.open(wiki, "rt") as lines, lzma.open(source, "wt", preset=1) as out:
        for line in lines:
            if budget <= 0:
                break
            out.write(line)
            budget -= len(json.loads(line)["text"])
    output = workdir / "shards"
    result = prepare(PrepareConfig(output=output, train=[str(source)], validation=[str(source)],
                                   tokenizer=str(tokenizer), shard_tokens=1 << 18, progress=False))
    return result["stats"]["mb_per_s"], output


def data_module(data_args: dict, shards: Path):
    from lit_overtok.data.webdataset_datamodule import WebDatasetDataModule

    args = {k: v for k, v in data_args.items() if k not in ("train_shards", "val_shards", "tokenizer", "manifest")}
    dm = WebDatasetDataModule(train_shards=str(shards), **args)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
    dm.setup("fit")
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/wiki/wiki_small.yaml")
    parser.add_argument("--shards", help="prepared shards for the loader (default: the config's, if prepared)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--prepare-mb", type=float, default=None)
    args = parser.parse_args()
    import torch
    import yaml

    from lit_overtok.configuration import config_from
    from lit_overtok.nn.config import ModelConfig
    from lit_overtok.data.webdataset_datamodule import CORRUPT_KEY
    from lit_overtok.nn.transformer import Transformer
    from lit_overtok.optim.build import build_optimizer
    from lit_overtok.optim.config import OptimizerConfig

    rounds = args.rounds or (3 if args.quick else 5)
    loader_batches, train_steps = (20, 1) if args.quick else (100, 3)
    prepare_mb = args.prepare_mb or (2.0 if args.quick else 8.0)

    config = yaml.safe_load((REPO / args.config).read_text())
    data_args = config["data"]["init_args"]
    model_args = config["model"]["init_args"]
    configured = REPO / data_args["train_shards"]
    shards = Path(args.shards) if args.shards else (configured if (configured / "manifest.json").is_file() else None)
    tokenizer = shards / "tokenizer.json" if shards is not None else data_dir(needed_for="the GPT-2 tokenizer") / GPT2

    with tempfile.TemporaryDirectory() as workdir:
        prepare_mb_per_s, sliced = prepare_speed(Path(workdir), tokenizer, prepare_mb)
        dm = data_module(data_args, shards or sliced)
        torch.manual_seed(0)
        model_cfg = config_from(ModelConfig, {**model_args.get("model_config", {}), "vocab_size": dm.vocab_size},
                                "model_config")
        model = Transformer(model_cfg)
        optimizer, _ = build_optimizer(model, config_from(OptimizerConfig, model_args.get("optimizer") or {}, "optimizer"), total_steps=10**6)
        stream = iter(dm.train_dataloader())

        def train_step(batch: dict) -> None:
            batch.pop(CORRUPT_KEY)
            loss, _ = model.loss(batch["input_ids"], batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train_step(next(stream))  # untimed: the first step allocates the optimizer state and warms the allocator
        loader_rates, train_rates = [], []
        for _ in range(rounds):
            for _ in range(2 * max(1, dm.hparams.num_workers)):  # what the workers prefetched during training
                next(stream)
            started = time.perf_counter()
            tokens = sum(next(stream)["input_ids"].numel() for _ in range(loader_batches))
            loader_rates.append(tokens / (time.perf_counter() - started))

            batches = list(itertools.islice(stream, train_steps))
            started = time.perf_counter()
            for batch in batches:
                train_step(batch)
            train_rates.append(sum(b["input_ids"].numel() for b in batches) / (time.perf_counter() - started))
            print(f"round: loader {loader_rates[-1]:,.0f} tok/s, train {train_rates[-1]:,.0f} tok/s", flush=True)

    loader, train = statistics.median(loader_rates), statistics.median(train_rates)
    print(f"prepare {prepare_mb_per_s:.2f} MB/s of text with {os.cpu_count()} processes; loader {loader:,.0f} tok/s "
          f"vs training {train:,.0f} tok/s = {loader / train:.1f}x (goal >= 20x)")
    print(json.dumps({
        "loader_tokens_per_s": round(loader, 1), "train_tokens_per_s": round(train, 1),
        "ratio": round(loader / train, 2), "prepare_mb_per_s": round(prepare_mb_per_s, 3),
        "config": args.config,
        "shards": str(shards or "prepared slice"), "seq_len": dm.hparams.seq_len, "batch_size": dm.hparams.batch_size,
        "num_workers": dm.hparams.num_workers, "prepare_processes": os.cpu_count(), "prepare_text_mb": prepare_mb,
        "rounds": rounds,
    }))


if __name__ == "__main__":
    main()
