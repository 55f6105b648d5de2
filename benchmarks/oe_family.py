"""Step-time overhead of the Over-Encoding family over the baseline: OE, LongCat NE and DeepSeek Engram at equal
table parameters, at two table sizes (``docs/oe_family.md``).

For each table budget (the tables of OE-m, n = 3, k = 1) the three families are built to the same table parameters
(``nn.table_budget.size_tables`` for NE, ``nn.engram.table_size_for_budget`` for Engram, one Engram layer before
block 1), all with sparse tables and ``RowSparseAdamW`` (AdamW row semantics), and one training step of each
(zero_grad, forward, loss, backward, clipping, optimizer step) is timed interleaved with a step of the memory-free
baseline on the same batches (``benchmarks/over_encoding.py``'s ``measure``: ratios from one run; an A/A control
shows the noise floor).

    python benchmarks/oe_family.py            # d_model 256, 4 layers, m = 131,071 and 1,048,573: a few minutes
    python benchmarks/oe_family.py --quick    # a smaller backbone, two small m: under a minute

The last line is one JSON object with ``results``: a list of {"family", "m", "table_parameters",
"step_time_ratio", ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lit_overtok
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lit_overtok.nn.counts import parameter_counts  # noqa: E402
from lit_overtok.nn.engram import EngramConfig, table_size_for_budget  # noqa: E402
from lit_overtok.nn.over_encoding import OverEncodingConfig  # noqa: E402
from lit_overtok.nn.table_budget import size_tables  # noqa: E402
from over_encoding import backbone, measure, Trainee  # noqa: E402
from throughput import random_batches  # noqa: E402

FULL_M = [131_071, 1_048_573]  # prime, so no OE table shares a factor with the power-of-two vocabulary
QUICK_M = [4_093, 65_521]


def family_configs(args, m: int) -> dict:
    """The model config of each family whose tables hold OE-m's table parameters (n = 3, k = 1)."""
    oe = OverEncodingConfig(m=m, n=3, k=1, sparse=True)
    budget = sum(oe.row_counts()) * oe.slice_width(args.d_model)
    ne = size_tables(OverEncodingConfig(m=1, n=3, k=1, flavor="longcat", sparse=True), args.d_model, budget, args.vocab)
    size = table_size_for_budget(budget, 1, 3, 4, args.d_model // 2)
    engram = dataclasses.replace(backbone(args), engram=EngramConfig(
        layers=[1], max_n=3, heads=4, ngram_width=args.d_model // 2, table_size=size, sparse=True))
    return {"oe": backbone(args, oe), "ne": backbone(args, ne), "engram": engram}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller backbone, two small m: under a minute")
    parser.add_argument("--m", type=int, nargs="+", help="OE table sizes setting the budgets (default: %s)" % FULL_M)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 (default) is steadier when shared")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up even when stdout is a file
    if args.quick:
        args.layers, args.d_model, args.vocab, args.seq_len, args.batch = 2, 128, 4096, 64, 4
        args.repeats, args.warmup = 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [(b["input_ids"], b["labels"])
               for b in random_batches(args.vocab, args.batch, args.seq_len, args.warmup + args.repeats)]
    baseline = Trainee(backbone(args))
    print(f"backbone: {args.layers} layers, d_model {args.d_model}, V {args.vocab}, batch {args.batch} x "
          f"{args.seq_len}; sparse tables; {torch.get_num_threads()} threads")
    control = measure(baseline, Trainee(backbone(args)), batches, args.warmup)
    print(f"control (baseline vs a copy): ratio {control['step_time_ratio']:.3f} (median of pairs "
          f"{control['median_ratio']:.3f})")
    results = []
    for m in args.m or (QUICK_M if args.quick else FULL_M):
        for family, config in family_configs(args, m).items():
            tables = sum(parameter_counts(config).memory_tables.values())
            timing = measure(baseline, Trainee(config), batches, args.warmup)
            results.append({"family": family, "m": m, "table_parameters": tables,
                            "step_time_ratio": round(timing["step_time_ratio"], 4),
                            "median_ratio": round(timing["median_ratio"], 4),
                            "cpu_time_ratio": round(timing["cpu_time_ratio"], 4), "step_s": round(timing["step_s"], 4),
                            "baseline_step_s": round(timing["baseline_step_s"], 4)})
            print(f"OE-m {m:>9,} budget, {family:>6}: {tables:>11,} table parameters, step "
                  f"{timing['step_s'] * 1e3:7.1f} ms vs baseline {timing['baseline_step_s'] * 1e3:7.1f} ms -> ratio "
                  f"{timing['step_time_ratio']:.3f} (median of pairs {timing['median_ratio']:.3f})")
            gc.collect()
    print(json.dumps({
        "backbone": {"n_layer": args.layers, "d_model": args.d_model, "vocab_size": args.vocab, "batch": args.batch,
                     "seq_len": args.seq_len},
        "control": {k: round(v, 4) for k, v in control.items() if k.endswith("ratio")},
        "results": results,
    }))


if __name__ == "__main__":
    main()
