"""Training throughput and model FLOP utilisation (MFU) of a d=512 dense model, against this machine's matmul peak.

In one run: measure the machine's fp32 and bf16 matmul FLOP/s (the best of several large square matmuls), then
train a few real Lightning steps (forward, backward, clipping, AdamW) and time them. Model FLOPs come from
``lit_overtok.nn.counts.flops_per_token`` (6 × matmul weights + attention; lookups excluded), so ``mfu`` is achieved model
FLOP/s over the measured peak of the dtype the run used.

    python benchmarks/throughput.py [--quick] [--precision 32-true|bf16-mixed]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts, flops_per_token
from lit_overtok.lightning_module import OverTokLM
from lit_overtok.optim.config import OptimizerConfig


def matmul_peak_flops(dtype: torch.dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up (thread pool, packing buffers)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def random_batches(vocab: int, batch: int, seq_len: int, count: int):
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        ids_BT = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
        yield {"input_ids": ids_BT[:, :-1], "labels": ids_BT[:, 1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and steps: under a minute")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    n_layer, steps, warmup = (2, 6, 2) if args.quick else (6, 14, 4)
    peaks = {
        "fp32": matmul_peak_flops(torch.float32, 2048, 3 if args.quick else 6),
        "bf16": matmul_peak_flops(torch.bfloat16, 2048, 3 if args.quick else 6),
    }
    cfg = ModelConfig(preset=None, vocab_size=args.vocab_size, n_layer=n_layer, d_model=512, n_head=8, d_ff=2048,
                      max_seq_len=args.seq_len, tie_embeddings=False, vocab_pad_multiple=128)
    pl.seed_everything(0, verbose=False)
    module = OverTokLM(model_config=cfg, optimizer=OptimizerConfig(lr=3e-4, warmup_steps=2))
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], precision=args.precision,
                         gradient_clip_val=1.0, limit_val_batches=0)
    batches = list(random_batches(args.vocab_size, args.batch_size, args.seq_len, steps))
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))

    step_time = statistics.median(timer.times[warmup:])
    tokens_per_s = args.batch_size * args.seq_len / step_time
    model_flops_per_s = flops_per_token(cfg, args.seq_len) * tokens_per_s
    peak = peaks["bf16" if args.precision == "bf16-mixed" else "fp32"]
    result = {
        "precision": args.precision,
        "n_layer": n_layer, "d_model": 512, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "non_embedding_params": parameter_counts(cfg).non_embedding,
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "model_flops_per_s": model_flops_per_s,
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_fp32_flops_per_s": peaks["fp32"],
        "matmul_peak_bf16_flops_per_s": peaks["bf16"],
        "mfu": round(model_flops_per_s / peak, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
