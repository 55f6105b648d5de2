"""Training step time of Over-Decoding and MTP-DS against the plain next-token head, measured in one run.

Each variant is the same backbone (same seed, so the same initial weights) with a different output objective:
plain next-token, OD (product form, App. C: one extra V-row output table per further token), OD with a low-rank
projection (d = D/4) in front of that table, and MTP-DS (one extra block plus the shared head). A step is forward,
backward and an AdamW update on one fixed batch. Steps of the variants are interleaved in a shuffled order every
round and each variant's median is compared with the plain model's, so machine noise hits all alike. The analytic
training FLOP ratios (``lit_overtok.nn.counts.flops_per_token``) are printed beside the measured ones.

    python benchmarks/over_decoding.py            # a 4-layer d=256 model with a 50k vocabulary, seq 256, batch 2
    python benchmarks/over_decoding.py --quick    # smaller, under a minute on one CPU thread

Last line: one JSON object with ``od_step_time_ratio`` and ``mtp_ds_step_time_ratio`` (and the rest).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import flops_per_token
from lit_overtok.nn.heads import MultiTokenConfig
from lit_overtok.nn.transformer import Transformer


def variants(args: argparse.Namespace) -> dict[str, ModelConfig]:
    base = ModelConfig(preset=None, n_layer=args.layers, d_model=args.d_model, n_head=args.d_model // 64,
                       d_ff=4 * args.d_model, max_seq_len=args.seq_len, tie_embeddings=False, vocab_pad_multiple=128,
                       vocab_size=args.vocab)
    return {
        "plain": base,
        "od": base.replace(multi_token=MultiTokenConfig(mode="od", n=args.n)),
        "od_low_rank": base.replace(multi_token=MultiTokenConfig(mode="od", n=args.n, low_rank=args.d_model // 4)),
        "mtp_ds": base.replace(multi_token=MultiTokenConfig(mode="mtp_ds", n=args.n)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds (under a minute)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50_280)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--n", type=int, default=2, help="tokens predicted per position (the paper's OD and OT: 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved steps per variant (11; --quick: 21)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default because on shared, busy CPUs multi-threaded steps stall on "
                             "descheduled threads and the timings scatter")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.d_model, args.vocab, args.seq_len, args.batch = 2, 128, 8192, 128, 2
    args.rounds = args.rounds or (21 if args.quick else 11)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = variants(args)
    models, optimizers = {}, {}
    for name, config in configs.items():
        torch.manual_seed(0)
        models[name] = Transformer(config).to(device)
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator).to(device)
    input_ids_BT, labels_BT = ids_BT[:, :-1], ids_BT[:, 1:]

    def step(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = models[name].loss(input_ids_BT, labels_BT)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in configs:  # warm-up: allocator, kernels, AdamW state
        step(name)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in configs}
    order = list(configs)
    shuffler = random.Random(0)
    for _ in range(args.rounds):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    flops = {name: flops_per_token(config, args.seq_len) for name, config in configs.items()}
    print(f"device {device} ({torch.get_num_threads()} CPU threads), {args.layers} layers, d_model {args.d_model}, "
          f"vocab {args.vocab}, seq {args.seq_len}, batch {args.batch}, n {args.n}, {args.rounds} interleaved rounds")
    result = {}
    for name in configs:
        ratio, flop_ratio = median[name] / median["plain"], flops[name] / flops["plain"]
        print(f"{name:12s} median step {median[name] * 1e3:8.1f} ms  ratio {ratio:.3f}  (analytic FLOP ratio {flop_ratio:.3f})")
        if name != "plain":
            result[f"{name}_step_time_ratio"] = round(ratio, 4)
            result[f"{name}_flop_ratio"] = round(flop_ratio, 4)
    result["plain_step_ms"] = round(median["plain"] * 1e3, 2)
    result.update(device=str(device), vocab=args.vocab, d_model=args.d_model, layers=args.layers,
                  seq_len=args.seq_len, batch=args.batch, n=args.n, rounds=args.rounds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
