"""``train.py generate``: sample continuations of prompts from a checkpoint (the next-token head, KV-cached).

    python train.py generate --checkpoint runs/default/version_0/checkpoints/last.ckpt --num-samples 4
    python train.py generate --checkpoint last.ckpt --prompt "The history of" --temperature 0.8 --top-k 50 \\

The tokenizer is the one the checkpoint was trained with (``checkpointing/tokenizer_binding.py``).
Prints one line per sample: the prompt followed by its continuation, decoded (grammar models spell their ids as
``^`` BOS, terminals, ``$`` EOS); when a sample spans several lines (text), each sample is headed by a
``--- sample i/n ---`` line instead. The same text goes to ``--output`` (default ``<run>/samples.txt``). Sampling stops at the tokenizer's end-of-text unless ``--no-stop-at-eos``; with no
``--prompt`` it starts from BOS (grammars) or end-of-text (text tokenizers, as lm-eval does).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional

import torch

from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.checkpointing.outputs import output_path
from lit_overtok.evaluation.tokenizers import load_tokenizer
from lit_overtok.nn.generation import generate


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training or inference checkpoint (.ckpt)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many tokens per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                        help="keep sampling after the end-of-text token")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizers JSON or grammar:<name> (default: the one the checkpoint was trained with; "
                             "another one is refused)")
    parser.add_argument("--allow-tokenizer-change", action="store_true",
                        help="sample with a --tokenizer other than the one the checkpoint was trained with")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", default=None, help="file for the samples (default: samples.txt in the checkpoint's run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["32", "bf16-mixed"], default="32")
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    return args


def main(argv: Optional[list[str]] = None) -> list[str]:
    args = parse_args(argv)
    model, info = load_transformer(args.checkpoint)
    tokenizer = load_tokenizer(info.tokenizer.resolve(args.tokenizer, args.allow_tokenizer_change))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}; use the tokenizer the model was trained with")
    device = torch.device(args.device)
    model = model.to(device)
    start_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else (
        contextlib.nullcontext())
    samples = []
    for prompt in args.prompt or [""]:
        ids = tokenizer.encode(prompt) if prompt else [start_id]
        if len(ids) >= model.config.max_seq_len:
            raise ValueError(f"prompt {prompt[:40]!r} is {len(ids)} tokens; the model's context is "
                             f"{model.config.max_seq_len} (model_config.max_seq_len)")
        prompt_BT = torch.tensor([ids] * args.num_samples, device=device)
        with autocast:
            out_BT = generate(model, prompt_BT, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              eos_id=tokenizer.eot_id if args.stop_at_eos else None, generator=generator)
        for row in out_BT.tolist():
            continuation = row[len(ids):]
            if args.stop_at_eos and tokenizer.eot_id in continuation:
                continuation = continuation[:continuation.index(tokenizer.eot_id) + 1]
            # An empty prompt's start token is shown only when it is a visible BOS (grammars' ``^``).
            shown = ids if prompt or tokenizer.bos_id is not None else []
            samples.append(tokenizer.decode(shown + continuation))
    text = delimited(samples)
    print(text, end="")
    output = output_path(args.output, args.checkpoint, "samples.txt")
    output.write_text(text)
    print(f"samples in {output}", file=sys.stderr)
    return samples


def delimited(samples: list[str]) -> str:
    """One sample per line; samples that span lines each under a header, so where one ends is never a guess."""
    if not any("\n" in sample for sample in samples):
        return "".join(f"{sample}\n" for sample in samples)
    return "".join(f"--- sample {i}/{len(samples)} ---\n{sample}\n" for i, sample in enumerate(samples, 1))
