"""How much of the model's raw forward throughput does lm-eval scoring through OverTokEvalLM keep?

    python benchmarks/lm_eval_adapter.py            # cfg-small shape with the GPT-2 vocabulary, 64 HellaSwag docs
    python benchmarks/lm_eval_adapter.py --quick    # under a minute on an idle 2-core machine

Workload: lm-eval's own HellaSwag requests (4 continuations per document, offline data) through
``OverTokEvalLM.loglikelihood``: tokenisation, deduplication, length-sorted padded batches, the next-token head at
continuation positions, log-softmax, gathers. Adapter tokens/s = tokens of the scored sequences (context +
continuation, as the model sees them) / wall time. Raw forward tokens/s = ``model(ids)`` (full next-token logits)
on dense batches of random ids with the same batch size and the requests' mean length. The two alternate for
``--repeats`` rounds; throughputs are medians over rounds and the ratio is the median of the rounds' ratios (each
taken over back-to-back measurements, so machine noise hits both alike). The last line is one JSON object:
adapter_tokens_per_s, forward_tokens_per_s, ratio (+ context). Goal: ratio >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lit_overtok.nn.config import ModelConfig  # noqa: E402
from lit_overtok.evaluation.runner import TaskSuite  # noqa: E402
from lit_overtok.data.locations import data_dir  # noqa: E402
from lit_overtok.evaluation.tokenizers import TextTokenizer  # noqa: E402
from lit_overtok.evaluation.adapter import OverTokEvalLM  # noqa: E402
from lit_overtok.nn.transformer import Transformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cfg-small", help="model shape (lit_overtok.nn.presets.PRESETS)")
    parser.add_argument("--tokenizer", help="tokenizers JSON (default: GPT-2's, tokenizers/gpt2/tokenizer.json in the "
                        "data folder)")
    parser.add_argument("--docs", type=int, default=64, help="HellaSwag documents (4 requests each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="8 documents, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.repeats = 8, 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    gpt2 = data_dir(needed_for="the GPT-2 tokenizer") / "tokenizers/gpt2/tokenizer.json" if not args.tokenizer else None
    tokenizer = TextTokenizer(args.tokenizer or gpt2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=args.preset, vocab_size=tokenizer.vocab_size)).to(args.device).eval()
    lm = OverTokEvalLM(model, tokenizer, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                       progress=False)
    task = TaskSuite(["hellaswag"], subset=args.docs).task_dict["tasks"]["hellaswag"]
    task.build_all_requests(rank=0, world_size=1)
    requests = task.instances
    lengths = [min(len(tokenizer.encode(c + x)), lm.max_length + 1) - 1 for c, x in (r.args for r in requests)]
    tokens = sum(lengths)
    mean_len = round(tokens / len(lengths))
    dense_BT = torch.randint(0, tokenizer.vocab_size, (args.batch_size, mean_len), device=args.device)
    dense_batches = max(1, round(tokens / dense_BT.numel()))

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def adapter_round() -> float:
        sync()
        start = time.perf_counter()
        lm.loglikelihood(requests, disable_tqdm=True)
        sync()
        return tokens / (time.perf_counter() - start)

    @torch.no_grad()
    def forward_round() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(dense_batches):
            model(dense_BT)
        sync()
        return dense_batches * dense_BT.numel() / (time.perf_counter() - start)

    adapter_round(), forward_round()  # warm-up (allocator, kernels)
    adapter, forward = [], []
    for i in range(args.repeats):
        adapter.append(adapter_round())
        forward.append(forward_round())
        print(f"round {i}: adapter {adapter[-1]:,.0f} tok/s, forward {forward[-1]:,.0f} tok/s, "
              f"ratio {adapter[-1] / forward[-1]:.3f}")
    ratio = statistics.median(a / f for a, f in zip(adapter, forward))
    print(json.dumps({
        "adapter_tokens_per_s": round(statistics.median(adapter), 1),
        "forward_tokens_per_s": round(statistics.median(forward), 1), "ratio": round(ratio, 3), "preset": args.preset, "vocab_size": tokenizer.vocab_size,
        "requests": len(requests), "tokens": tokens, "mean_length": mean_len, "batch_size": args.batch_size,
        "device": args.device, "threads": torch.get_num_threads(), "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
