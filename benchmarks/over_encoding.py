"""Over-Encoding overhead across m: training-step time and memory of the same backbone with and without OE.

For each table size m and each path (dense: dense table gradients + AdamW; sparse: sparse row gradients + the row
AdamW of ``lit_overtok.optim.sparse_adamw`` with its default catch-up, which trains as dense AdamW; sparse_lazy: the
same with ``sparse_row_semantics: lazy``, the old rule, for comparison), one training step (zero_grad, forward, loss, backward, global-norm
clipping at 1.0 as the Trainer does, optimizer step) is timed interleaved with a step of the OE-free baseline on the
same batch (ratios inside one run; see ``measure`` for the estimators), and an A/A control (the baseline against a
copy of itself) shows the noise floor. ``embedding_overhead`` times the input embedding's share of a step alone
(forward, backward, clipping, update: tens of ms, so its best-of-many is steady) and gives its extra cost over the
plain embedding as a fraction of a baseline step. ``memory_bytes`` is weights + optimizer state after the first steps (AdamW
keeps two moments per parameter on both paths); the dense path also holds a dense table gradient, reported as
``gradient_bytes``. The paper measures under 5% throughput cost at m = 10^7 (docs/method.md §4.11); the goal here is at
most 1.05x for the sparse path at every m.

    python benchmarks/over_encoding.py --repeats 15   # m up to 2.1M rows (8.6 GB for the dense path), ~20 minutes
    python benchmarks/over_encoding.py --quick        # a smaller backbone, two small m: under a minute

The last line is one JSON object with ``results``: a list of {"m", "path", "step_time_ratio", "memory_bytes", ...}.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from lit_overtok.nn import hooks
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.transformer import Transformer
from lit_overtok.optim.build import build_optimizer
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.nn.over_encoding import OverEncodingConfig

# Odd (prime) m, so no table shares a factor with the power-of-two vocabulary.
FULL_M = [16_381, 131_071, 1_048_573, 2_097_143]
QUICK_M = [4_093, 65_521]


def backbone(args, over_encoding=None) -> ModelConfig:
    return ModelConfig(preset=None, n_layer=args.layers, d_model=args.d_model, n_head=args.d_model // 64,
                       d_ff=4 * args.d_model, max_seq_len=args.seq_len, tie_embeddings=False, vocab_pad_multiple=1,
                       vocab_size=args.vocab, over_encoding=over_encoding)


class Trainee:
    """A model, its optimizer (built exactly as training builds it) and a timed training step."""

    def __init__(self, config: ModelConfig, row_semantics: str = "adamw") -> None:
        torch.manual_seed(0)
        self.transformer = Transformer(config)
        optimizer = OptimizerConfig(lr=1e-3, warmup_steps=0, sparse_row_semantics=row_semantics)
        self.optimizer, _ = build_optimizer(self.transformer, optimizer, total_steps=1000)
        self.clip = self.optimizer.clip_grad_norm_ if isinstance(self.optimizer, hooks.ClipsOwnGradients) else None

    def step(self, ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> tuple[float, float]:
        """(wall-clock seconds, CPU seconds of this process) of one training step."""
        start, start_cpu = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.transformer.loss(ids_BT, labels_BT)
        loss.backward()
        if self.clip is not None:  # sparse gradients: the optimizer's own clipping (as the LightningModule routes it)
            self.clip(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), 1.0)
        self.optimizer.step()
        return time.perf_counter() - start, time.process_time() - start_cpu

    def embedding_step(self, ids_BT: torch.Tensor, grad_BTD: torch.Tensor) -> float:
        """Wall seconds of the input embedding's share of a step: its forward and backward, clipping, the update."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.transformer.embed(ids_BT).backward(grad_BTD)
        if self.clip is not None:
            self.clip(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.transformer.embed.parameters(), 1.0)
        self.optimizer.step()  # parameters without a gradient are skipped
        return time.perf_counter() - start

    def memory(self) -> tuple[int, int]:
        """(weights + optimizer state, gradient buffers) in bytes."""
        weights = sum(p.numel() * p.element_size() for p in self.transformer.parameters())
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        grads = 0
        for p in self.transformer.parameters():
            if p.grad is not None:
                g = p.grad.coalesce() if p.grad.is_sparse else p.grad
                grads += (g.values().numel() + g.indices().numel()) * 4 if g.is_sparse else g.numel() * g.element_size()
        return weights + state, grads


def measure(baseline: Trainee, variant: Trainee, batches, warmup: int) -> dict[str, float]:
    """Step-time ratios of variant to baseline, the two alternating on the same batches after ``warmup`` steps each.

    ``step_time_ratio`` compares the fastest step of each (the step least disturbed by other jobs, the usual estimator
    on a shared machine); ``median_ratio`` is the median of the paired per-batch ratios; ``cpu_time_ratio`` compares
    the fastest steps in process CPU time.
    """
    for ids_BT, labels_BT in batches[:warmup]:
        baseline.step(ids_BT, labels_BT)
        variant.step(ids_BT, labels_BT)
    wall_variant, wall_baseline, cpu_variant, cpu_baseline = [], [], [], []
    for i, (ids_BT, labels_BT) in enumerate(batches[warmup:]):
        # Alternate which goes first so that neither always follows the other's cache effects.
        if i % 2:
            (w_v, c_v), (w_b, c_b) = variant.step(ids_BT, labels_BT), baseline.step(ids_BT, labels_BT)
        else:
            (w_b, c_b), (w_v, c_v) = baseline.step(ids_BT, labels_BT), variant.step(ids_BT, labels_BT)
        wall_variant.append(w_v)
        wall_baseline.append(w_b)
        cpu_variant.append(c_v)
        cpu_baseline.append(c_b)
    return {
        "step_time_ratio": min(wall_variant) / min(wall_baseline),
        "median_ratio": statistics.median(v / b for v, b in zip(wall_variant, wall_baseline)),
        "cpu_time_ratio": min(cpu_variant) / min(cpu_baseline),
        "step_s": min(wall_variant), "baseline_step_s": min(wall_baseline),
    }


def embedding_overhead(baseline: Trainee, variant: Trainee, batches, d_model: int, repeats: int) -> float:
    """Extra seconds of the variant's embedding-only step over the baseline's, fastest of ``repeats`` alternating pairs.

    Tens of milliseconds each, so many repeats are cheap and the minimum is steady.
    """
    grad_BTD = torch.randn(*batches[0][0].shape, d_model, generator=torch.Generator().manual_seed(1))
    times_baseline, times_variant = [], []
    for i in range(repeats):
        ids_BT = batches[i % len(batches)][0]
        times_baseline.append(baseline.embedding_step(ids_BT, grad_BTD))
        times_variant.append(variant.embedding_step(ids_BT, grad_BTD))
    return min(times_variant) - min(times_baseline)


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # progress shows up even when stdout is a file
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small m, fewer steps: under a minute")
    parser.add_argument("--m", type=int, nargs="+", help="table sizes (default: %s)" % FULL_M)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dense-repeats", type=int, default=3,
                        help="repeats for the dense path, whose cost is far from the baseline's at large m")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 (default) is steadier on a shared machine, 0 keeps torch's default")
    args = parser.parse_args()
    if args.quick:  # a smaller backbone and fewer steps
        args.layers, args.d_model, args.vocab, args.seq_len, args.batch = 2, 128, 4096, 64, 4
        args.repeats, args.warmup = 7, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    m_values = args.m or (QUICK_M if args.quick else FULL_M)

    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.repeats):
        ids_BT = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator)
        batches.append((ids_BT[:, :-1], ids_BT[:, 1:]))
    baseline = Trainee(backbone(args))
    print(f"backbone: {args.layers} layers, d_model {args.d_model}, V {args.vocab}, batch {args.batch} x "
          f"{args.seq_len}, OE n={args.n} k={args.k}; {torch.get_num_threads()} threads")
    # A/A control: a second copy of the baseline against the first shows the noise floor of the ratios.
    control = measure(baseline, Trainee(backbone(args)), batches, args.warmup)
    print(f"control (baseline vs a copy): ratio {control['step_time_ratio']:.3f} (median of pairs "
          f"{control['median_ratio']:.3f}), CPU {control['cpu_time_ratio']:.3f}")
    results = []
    baseline_times = [control["baseline_step_s"]]
    for m in m_values:
        for path in ("dense", "sparse", "sparse_lazy"):
            oe = OverEncodingConfig(m=m, n=args.n, k=args.k, sparse=path != "dense")
            variant = Trainee(backbone(args, oe), "lazy" if path == "sparse_lazy" else "adamw")
            repeats = args.repeats if path != "dense" else min(args.repeats, args.dense_repeats)
            timing = measure(baseline, variant, batches[: args.warmup + repeats], args.warmup)
            memory, gradients = variant.memory()
            baseline_times.append(timing["baseline_step_s"])
            # The embedding's extra cost alone, as a fraction of a baseline step: the same question with less noise.
            extra_s = embedding_overhead(baseline, variant, batches, args.d_model, 3 * repeats)
            timing["embedding_overhead"] = extra_s / timing["baseline_step_s"]
            results.append({"m": m, "path": path, "step_time_ratio": round(timing["step_time_ratio"], 4),
                            "memory_bytes": memory, "median_ratio": round(timing["median_ratio"], 4),
                            "cpu_time_ratio": round(timing["cpu_time_ratio"], 4), "gradient_bytes": gradients,
                            "embedding_overhead": round(timing["embedding_overhead"], 4),
                            "step_s": round(timing["step_s"], 4), "repeats": repeats})
            print(f"m={m:>9,} {path:>11}: step {timing['step_s'] * 1e3:8.1f} ms vs baseline "
                  f"{timing['baseline_step_s'] * 1e3:7.1f} ms -> ratio {timing['step_time_ratio']:.3f} (median of "
                  f"pairs {timing['median_ratio']:.3f}), CPU {timing['cpu_time_ratio']:.3f}, embedding alone "
                  f"+{100 * timing['embedding_overhead']:.1f}%; weights+optimizer "
                  f"{memory / 2**30:.2f} GiB, gradients {gradients / 2**30:.2f} GiB")
            del variant
            gc.collect()
    baseline_memory, _ = baseline.memory()
    sparse_max = max(r["step_time_ratio"] for r in results if r["path"] == "sparse")
    lazy_max = max(r["step_time_ratio"] for r in results if r["path"] == "sparse_lazy")
    print(f"sparse path: worst ratio {sparse_max:.3f} (goal <= 1.05; the lazy rule's {lazy_max:.3f}); baseline "
          f"weights+optimizer {baseline_memory / 2**20:.1f} MiB")
    print(json.dumps({
        "backbone": {"n_layer": args.layers, "d_model": args.d_model, "vocab_size": args.vocab, "batch": args.batch,
                     "seq_len": args.seq_len, "n": args.n, "k": args.k},
        "baseline_step_s": round(min(baseline_times), 4), "baseline_memory_bytes": baseline_memory,
        "control": {k: round(v, 4) for k, v in control.items() if k.endswith("ratio")},
        "sparse_max_step_time_ratio": sparse_max, "sparse_lazy_max_step_time_ratio": lazy_max, "results": results,
    }))


if __name__ == "__main__":
    main()
