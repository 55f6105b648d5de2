"""Training-step time of the CPU-sized mixture of experts against a dense model with the same active parameters,
and of the fast grouped-matmul path against the per-expert loop, measured in one run.

The three models are trained side by side on the same batches, their steps interleaved round by round (the order
alternating), and each model's median step time is taken, so the ratios hold on a noisy shared machine; the CPU time
of the process is reported beside the wall clock, as it does not count time lost to other processes. A step is what
Lightning runs: forward, loss (with the MoE auxiliary losses), backward and an AdamW update.

    python benchmarks/moe.py             # ~2 minutes on 2 idle CPU cores
    python benchmarks/moe.py --quick     # under a minute on 2 idle CPU cores

The last line is one JSON object with ``moe_vs_dense_step_time_ratio`` (goal: <= 1.5) and
``fast_vs_loop_step_time_ratio`` (fast path time / loop path time; below 1 means the fast path is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts
from lit_overtok.nn.transformer import Transformer
from lit_overtok.optim.build import build_optimizer
from lit_overtok.optim.config import OptimizerConfig


def build(config: ModelConfig):
    torch.manual_seed(0)
    model = Transformer(config).train()
    optimizer, _ = build_optimizer(model, OptimizerConfig(), total_steps=1000)
    return model, optimizer


def timed_step(model: Transformer, optimizer: torch.optim.Optimizer, ids_BT: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one training step (CPU time is immune to other processes' load)."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss, _ = model.loss(ids_BT[:, :-1], ids_BT[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds of batch 4; under a minute on an idle machine")
    parser.add_argument("--preset", default="moe-small", help="the MoE preset (default: moe-small)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8, quick 4)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=5, help="5 = cfg3f's vocabulary")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per model (default 15, quick 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's). On a shared, oversubscribed machine 1 thread "
                             "avoids OpenMP stalls that penalise many small kernels")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (4 if args.quick else 15)
    batch_size = args.batch_size or (4 if args.quick else 8)

    moe_cfg = ModelConfig(preset=args.preset, vocab_size=args.vocab_size, moe={"backend": "grouped_mm"})
    moe = moe_cfg.moe
    # The dense twin: same backbone, one SwiGLU of width K·F, i.e. the weights a routed token uses.
    dense_cfg = ModelConfig(preset=None, vocab_size=args.vocab_size, n_layer=moe_cfg.n_layer, d_model=moe_cfg.d_model,
                            n_head=moe_cfg.n_head, d_ff=moe.top_k * moe.expert_d_ff, max_seq_len=moe_cfg.max_seq_len,
                            tie_embeddings=moe_cfg.tie_embeddings, vocab_pad_multiple=moe_cfg.vocab_pad_multiple)
    loop_cfg = moe_cfg.replace(moe=dataclasses.replace(moe, backend="loop"))
    variants = {"moe_fast": build(moe_cfg), "moe_loop": build(loop_cfg), "dense": build(dense_cfg)}

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (batch_size, args.seq_len + 1), generator=generator)
               for _ in range(rounds + 1)]
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    for round_idx, ids_BT in enumerate(batches):
        order = list(variants) if round_idx % 2 == 0 else list(reversed(variants))
        for name in order:
            wall, cpu = timed_step(*variants[name], ids_BT)
            if round_idx > 0:  # the first round warms up allocators and kernels
                walls[name].append(wall)
                cpus[name].append(cpu)
    median = {name: statistics.median(ts) for name, ts in walls.items()}
    median_cpu = {name: statistics.median(ts) for name, ts in cpus.items()}

    moe_counts, dense_counts = parameter_counts(moe_cfg), parameter_counts(dense_cfg)
    tokens = batch_size * args.seq_len
    print(f"{args.preset}: {moe.num_experts} experts, top-{moe.top_k}, expert width {moe.expert_d_ff}; "
          f"{moe_counts.active / 1e6:.2f}M active / {moe_counts.total / 1e6:.2f}M total parameters")
    print(f"dense twin: d_ff {dense_cfg.d_ff}; {dense_counts.total / 1e6:.2f}M parameters")
    print(f"{tokens} tokens per step, {rounds} timed rounds, {torch.get_num_threads()} threads")
    for name, value in median.items():
        print(f"  {name:9s} median step {value * 1e3:8.1f} ms wall, {median_cpu[name] * 1e3:8.1f} ms CPU "
              f"({tokens / value:7.0f} tokens/s)")
    result = {
        "moe_vs_dense_step_time_ratio": round(median["moe_fast"] / median["dense"], 3),
        "fast_vs_loop_step_time_ratio": round(median["moe_fast"] / median["moe_loop"], 3),
        "loop_vs_dense_step_time_ratio": round(median["moe_loop"] / median["dense"], 3),
        "moe_vs_dense_cpu_time_ratio": round(median_cpu["moe_fast"] / median_cpu["dense"], 3),
        "fast_vs_loop_cpu_time_ratio": round(median_cpu["moe_fast"] / median_cpu["moe_loop"], 3),
        "goal_moe_vs_dense_at_most": 1.5,
        "moe_step_ms": round(median["moe_fast"] * 1e3, 1),
        "loop_step_ms": round(median["moe_loop"] * 1e3, 1),
        "dense_step_ms": round(median["dense"] * 1e3, 1),
        "preset": args.preset, "tokens_per_step": tokens, "rounds": rounds, "threads": torch.get_num_threads(),
        "moe_active_params": moe_counts.active, "moe_total_params": moe_counts.total,
        "dense_params": dense_counts.total,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
