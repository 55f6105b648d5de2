"""Training throughput and model FLOP utilisation (MFU) of a d=512 dense model, against this machine's matmul peak;
and the peak memory of a training step at a large vocabulary, with and without the chunked (fused) cross-entropy.

In one run: measure the machine's fp32 and bf16 matmul FLOP/s (the best of several large square matmuls), then
train a few real Lightning steps (forward, backward, clipping, AdamW) and time them. Model FLOPs come from
``lit_overtok.nn.counts.flops_per_token`` (6 × matmul weights + attention; lookups excluded), so ``mfu`` is achieved model
FLOP/s over the measured peak of the dtype the run used.

    python benchmarks/throughput.py [--quick] [--precision 32-true|bf16-mixed] [--threads N]
        [--fused-loss] [--activation-checkpointing]   # options of every timed run
        [--compile]        # also time the same model with per-block torch.compile: mfu_compiled, compile_speedup
        [--profile]        # one eager fp32 step's profiler op table on stderr: where the time goes
        [--memory]         # peak memory of one training step (V 100,278, seq 2048, 2 layers, d_model 256, batch 2),
                           # plain vs fused loss: peak_memory_ratio_fused (only this case with --memory-only)

Memory is measured on CPU with the torch profiler's memory view (``profile(profile_memory=True)`` ->
``export_memory_timeline``: every tensor's allocation and release, summed over categories: parameters, gradients,
optimizer state, activations, temporaries), over one step (forward, loss, backward, AdamW step, zero_grad) after a
warm-up step has created the optimizer state. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts, flops_per_token
from lit_overtok.nn.transformer import Transformer
from lit_overtok.training.lightning_module import OverTokLM
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


# The issue's large-vocabulary case: OLMo2's vocabulary, a 2-layer d_model 256 model, batch 2 x 2048.
MEMORY_CASE = dict(vocab_size=100_278, seq_len=2048, batch_size=2, n_layer=2, d_model=256, n_head=4, d_ff=1024)
FUSED_LOSS_CHUNK_LOGITS = 1 << 23  # 8M logits = 32 MiB in fp32 per chunk


def timed_training(config: ModelConfig, args, steps: int, warmup: int) -> float:
    """Median step time of real Lightning training steps of ``config``."""
    pl.seed_everything(0, verbose=False)
    module = OverTokLM(model_config=config, optimizer=OptimizerConfig(lr=3e-4, warmup_steps=2))
    timer = StepTimer()
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], precision=args.precision,
                         gradient_clip_val=1.0, limit_val_batches=0)
    batches = list(random_batches(args.vocab_size, args.batch_size, args.seq_len, steps))
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return statistics.median(timer.times[warmup:])


def warmed_up_step(config: ModelConfig, batch_size: int, seq_len: int, clip_grad: bool) -> Callable[[], None]:
    """One plain fp32 training step of ``config`` on fixed random ids (forward, loss, backward, [clipping,] AdamW,
    zero_grad), already run once so that AdamW's moments exist and each measured step starts from the same state."""
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids_BT = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))

    def step() -> None:
        model.loss(ids_BT[:, :-1], ids_BT[:, 1:])[0].backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return step


def peak_step_memory(config: ModelConfig, batch_size: int, seq_len: int) -> float:
    """Peak bytes held during one fp32 training step (after a warm-up step), from the profiler's memory timeline."""
    step = warmed_up_step(config, batch_size, seq_len, clip_grad=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA in favour of memory snapshots
        path = os.path.join(folder, "memory.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes_by_category = json.load(f)
    return max(sum(sizes) for sizes in sizes_by_category)


def profile_table(config: ModelConfig, batch_size: int, seq_len: int, rows: int = 15) -> str:
    """Where one eager training step's time goes: the profiler's op table by self CPU time (after a warm-up step)."""
    step = warmed_up_step(config, batch_size, seq_len, clip_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def memory_case() -> dict:
    case = MEMORY_CASE
    config = ModelConfig(preset=None, vocab_size=case["vocab_size"], n_layer=case["n_layer"], d_model=case["d_model"],
                      n_head=case["n_head"], d_ff=case["d_ff"], max_seq_len=case["seq_len"], tie_embeddings=False,
                      vocab_pad_multiple=128)
    plain = peak_step_memory(config, case["batch_size"], case["seq_len"])
    fused = peak_step_memory(config.replace(loss_chunk_logits=FUSED_LOSS_CHUNK_LOGITS), case["batch_size"], case["seq_len"])
    return {
        "memory_case": case, "memory_measured_with": "torch.profiler memory timeline (CPU, all categories)",
        "fused_loss_chunk_logits": FUSED_LOSS_CHUNK_LOGITS,
        "peak_memory_plain_mib": round(plain / 2**20, 1), "peak_memory_fused_mib": round(fused / 2**20, 1),
        "peak_memory_ratio_fused": round(fused / plain, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and steps: under a minute")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--fused-loss", action="store_true", help="chunked cross-entropy in the timed runs")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--compile", action="store_true", help="also time per-block torch.compile: mfu_compiled")
    parser.add_argument("--memory", action="store_true", help="also the large-vocabulary peak memory case")
    parser.add_argument("--memory-only", action="store_true", help="only the large-vocabulary peak memory case")
    parser.add_argument("--profile", action="store_true", help="print one eager step's op table (stderr)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = {"threads": torch.get_num_threads()}
    if args.memory or args.memory_only:
        result.update(memory_case())
    if args.memory_only:
        print(json.dumps(result))
        return

    n_layer, steps, warmup = (2, 6, 2) if args.quick else (6, 14, 4)
    peaks = {
        "fp32": matmul_peak_flops(torch.float32, 2048, 3 if args.quick else 6),
        "bf16": matmul_peak_flops(torch.bfloat16, 2048, 3 if args.quick else 6),
    }
    config = ModelConfig(preset=None, vocab_size=args.vocab_size, n_layer=n_layer, d_model=512, n_head=8, d_ff=2048,
                      max_seq_len=args.seq_len, tie_embeddings=False, vocab_pad_multiple=128,
                      loss_chunk_logits=FUSED_LOSS_CHUNK_LOGITS if args.fused_loss else None,
                      activation_checkpointing=args.activation_checkpointing)
    peak = peaks["bf16" if args.precision == "bf16-mixed" else "fp32"]
    flops_per_step = flops_per_token(config, args.seq_len) * args.batch_size * args.seq_len
    step_time = timed_training(config, args, steps, warmup)
    result.update({
        "precision": args.precision, "fused_loss": args.fused_loss, "activation_checkpointing": args.activation_checkpointing,
        "n_layer": n_layer, "d_model": 512, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "non_embedding_params": parameter_counts(config).non_embedding,
        "step_time_s": round(step_time, 4),
        "tokens_per_s": round(args.batch_size * args.seq_len / step_time, 1),
        "model_flops_per_s": flops_per_step / step_time,
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_fp32_flops_per_s": peaks["fp32"],
        "matmul_peak_bf16_flops_per_s": peaks["bf16"],
        "mfu": round(flops_per_step / step_time / peak, 4),
    })
    if args.profile:
        print(profile_table(config, args.batch_size, args.seq_len), file=sys.stderr)
    if args.compile:
        # One more warm-up step: the first steps also compile (forward and backward graphs).
        compiled_time = timed_training(config.replace(compile_blocks=True), args, steps + 1, warmup + 1)
        result.update({
            "step_time_compiled_s": round(compiled_time, 4),
            "tokens_per_s_compiled": round(args.batch_size * args.seq_len / compiled_time, 1),
            "compile_speedup": round(step_time / compiled_time, 4),
            "mfu_compiled": round(flops_per_step / compiled_time / peak, 4),
        })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
