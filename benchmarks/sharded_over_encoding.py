"""Row-sharded vs replicated Over-Encoding tables at 2 gloo ranks on CPU: memory, step time, bytes moved (issue 13).

    python benchmarks/sharded_over_encoding.py            # m: the largest that fits replicated (see --memory-fraction)
    python benchmarks/sharded_over_encoding.py --quick    # m = 200,003, a few steps: well under two minutes

One step = look up B·T positions per rank in each of the k(n-1) hashed tables (uniformly random rows, as hashed
n-grams are), a linear loss, backward, and the optimizer step of the project's sparse path (``RowSparseAdamW``):
- sharded: ``RowShardedEmbedding`` (all-to-all lookups; each rank holds and updates only its rows);
- replicated: today's sparse path under data parallelism: the whole table on every rank, its sparse gradient
  all-reduced (what DDP does with sparse gradients on gloo), every rank updating the same rows;
- replicated_dense (``--arms``; slow at large m): the paper's presumed setup, dense gradient all-reduce and AdamW.
Prints per-arm step times (median over steps, slowest rank), per-rank table memory (weight, optimizer state and
coverage flags), bytes per step (counted by the table's collectives, the bytes the processes wrote to their sockets
according to /proc/self/io, and the analytic expectation), then one line of JSON: ``table_memory_ratio``,
``step_time_ratio`` (sharded / replicated), ``bytes_measured``, ``bytes_analytic`` and the details.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lit_overtok
from lit_overtok.nn.sharded_table import expected_bytes_per_step, RowShardedEmbedding  # noqa: E402
from lit_overtok.optim.sparse_adamw import RowSparseAdamW  # noqa: E402

WORLD = 2


def socket_bytes_written() -> int:
    """Bytes this process wrote (write/writev, gloo's TCP sends included) since it started, from /proc/self/io."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def largest_m(fraction: float, tables: int, width: int) -> int:
    """The largest odd m whose replicated tables (weight + 2 moments + coverage byte per row, on every rank) fit in
    ``fraction`` of the memory available now."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    rows = int(fraction * available / WORLD / (12 * width + 1))
    return (rows // tables) | 1


def run_arm(arm: str, args, rank: int, table_rows: list[int]) -> dict:
    num_rows, n_tables = sum(table_rows), len(table_rows)
    offsets = torch.tensor([sum(table_rows[:i]) for i in range(n_tables)])
    if arm == "sharded":
        table = RowShardedEmbedding(num_rows, args.width, sparse=True)
        table.reset_parameters(seed=1)
    else:
        table = nn.Embedding(num_rows, args.width, sparse=arm == "replicated")
        table.register_buffer("rows_touched", torch.zeros(num_rows, dtype=torch.bool))  # as OverEncoding keeps
        nn.init.normal_(table.weight, std=0.02)
    table.train()
    optimizer_class = torch.optim.AdamW if arm == "replicated_dense" else RowSparseAdamW
    optimizer = optimizer_class(table.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1000 + rank)
    moduli = torch.tensor(table_rows)
    times, wire = [], []
    for step in range(args.warmup + args.steps):
        ids_BTI = (torch.randint(0, 2**62, (args.batch, args.seq, n_tables), generator=g) % moduli) + offsets
        coef_BTIW = torch.randn(args.batch, args.seq, n_tables, args.width, generator=g)
        if arm == "sharded":
            table.stats.reset()
        dist.barrier()
        written, start = socket_bytes_written(), time.perf_counter()
        if arm != "sharded":
            table.rows_touched[ids_BTI.flatten()] = True
        loss = (table(ids_BTI) * coef_BTIW).sum() / coef_BTIW[..., 0].numel()
        loss.backward()
        if arm != "sharded":  # DDP's gradient averaging (sparse or dense), by hand in this model-free benchmark
            grad = table.weight.grad
            dist.all_reduce(grad)
            table.weight.grad = grad / WORLD
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, written = time.perf_counter() - start, socket_bytes_written() - written
        if step >= args.warmup:
            times.append(elapsed)
            wire.append(written)
    result = {"step_ms": 1e3 * statistics.median(times), "table_state_bytes": state_bytes(table, optimizer),
              "wire_bytes": statistics.median(wire)}
    if arm == "sharded":
        result["counted_bytes"] = table.stats.bytes_sent  # the last step's
        result["counted_by_kind"] = dict(table.stats.sent)
    return result


def worker(rank: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    table_rows = [args.m + 2 * i for i in range(args.tables)]  # OE's m + 2i rows per table
    results = {}
    for arm in args.arms:
        arm_result = run_arm(arm, args, rank, table_rows)
        # Bytes: summed over ranks (each rank's sends to the other); time: the slowest rank's median.
        totals = torch.tensor([arm_result["wire_bytes"], arm_result.get("counted_bytes", 0)], dtype=torch.float64)
        dist.all_reduce(totals)
        slowest = torch.tensor([arm_result["step_ms"]], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        arm_result.update(wire_bytes=totals[0].item(), counted_bytes=totals[1].item(), step_ms=slowest.item())
        results[arm] = arm_result
    if rank == 0:
        results["analytic"] = expected_bytes_per_step(table_rows, args.width, WORLD, args.batch * args.seq)
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="m = 200,003 and 6 steps (well under two minutes)")
    parser.add_argument("--m", type=int, default=None, help="rows of the first table (default: the largest that "
                                                           "fits replicated in --memory-fraction of free memory)")
    parser.add_argument("--memory-fraction", type=float, default=0.25)
    parser.add_argument("--tables", type=int, default=2, help="k(n-1) hashed tables (n=3, k=1: 2)")
    parser.add_argument("--width", type=int, default=64, help="slice width d_model / (k(n-1))")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=["sharded", "replicated"],
                        choices=["sharded", "replicated", "replicated_dense"])
    args = parser.parse_args()
    if args.quick:
        args.m, args.steps = args.m or 200_003, min(args.steps, 6)
    args.m = args.m or largest_m(args.memory_fraction, args.tables, args.width)
    os.environ["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.spawn(worker, args=(port, args, out), nprocs=WORLD, join=True)
        results = torch.load(out, weights_only=False)
    analytic = results.pop("analytic")
    print(f"world {WORLD} (gloo, CPU, 1 thread per rank), {args.tables} tables of ~{args.m:,} rows x {args.width} "
          f"(fp32), {args.batch}x{args.seq} positions per rank, RowSparseAdamW")
    for arm, r in results.items():
        print(f"  {arm:17s} step {r['step_ms']:8.1f} ms   table+optimizer per rank "
              f"{r['table_state_bytes'] / 2**20:9.1f} MiB   written to sockets per step (all ranks) "
              f"{r['wire_bytes'] / 2**20:8.2f} MiB")
    sharded, replicated = results["sharded"], results.get("replicated")
    print(f"  sharded bytes per step (all ranks): counted {sharded['counted_bytes'] / 2**20:.3f} MiB, analytic "
          f"{analytic['total'] / 2**20:.3f} MiB, on the sockets {sharded['wire_bytes'] / 2**20:.3f} MiB; rank 0 by kind "
          f"{sharded['counted_by_kind']}")
    summary = {
        "table_memory_ratio": sharded["table_state_bytes"] / replicated["table_state_bytes"] if replicated else None,
        "step_time_ratio": sharded["step_ms"] / replicated["step_ms"] if replicated else None,
        "bytes_measured": sharded["counted_bytes"],
        "bytes_analytic": analytic["total"],
        "bytes_on_sockets": sharded["wire_bytes"],
        "m": args.m, "tables": args.tables, "width": args.width, "world": WORLD,
        "step_ms": {arm: round(r["step_ms"], 2) for arm, r in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
