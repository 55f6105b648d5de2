"""``train.py export`` (console script ``lit-overtok-export``): a checkpoint as a Hugging Face ``transformers`` folder.

    python train.py export --checkpoint runs/x/version_0/checkpoints/last.ckpt          # writes runs/x/version_0/hf
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('runs/x/version_0/hf')"   # + trust_remote_code=True for OE

The tokenizer travels with the model, always: the one the checkpoint was trained with (``checkpointing/
tokenizer_binding.py``; a grammar is written as a one-character-per-id ``tokenizers`` JSON, as lit_overtok's
evaluation spells it), so ``AutoTokenizer.from_pretrained`` loads it. A checkpoint whose tokenizer cannot be found is
refused in one line (pass ``--tokenizer`` with the recorded file).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.checkpointing.outputs import output_path
from lit_overtok.evaluation.tokenizers import GrammarTokenizer, load_tokenizer, TextTokenizer
from lit_overtok.export.hf import EXPERT_LAYOUTS, export_to_hf
from lit_overtok.errors import entry_point, InputError


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="train.py export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training or inference checkpoint (.ckpt)")
    parser.add_argument("--out", default=None, help="the folder to write (default: <run>/hf of the checkpoint's run)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--expert-layout", choices=EXPERT_LAYOUTS, default="per_expert",
                        help="MoE experts: one Linear per expert (the published OLMoE files) or transformers 5's fused "
                             "tensors (remote-code models are always fused)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizers JSON or grammar:<name> (default: the one the checkpoint was trained with; "
                             "another one is refused)")
    parser.add_argument("--allow-tokenizer-change", action="store_true",
                        help="ship a --tokenizer other than the one the checkpoint was trained with")
    parser.add_argument("--eos-token", default="<|endoftext|>", help="the end-of-text token of a tokenizers JSON")
    args = parser.parse_args(argv)

    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; export writes a folder (config, weights, tokenizer): give a new "
                         "or existing folder")
    model, info = load_transformer(args.checkpoint)  # verified first: a damaged checkpoint replaces nothing
    out = output_path(args.out, args.checkpoint, "hf")
    spec = info.tokenizer.resolve(args.tokenizer, args.allow_tokenizer_change)  # never an export without one
    tokenizer = load_tokenizer(spec) if spec.startswith("grammar:") else TextTokenizer(spec, args.eos_token)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"is {model.config.vocab_size}; export with the tokenizer the model was trained with")
    if isinstance(tokenizer, GrammarTokenizer):
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_tokenizers_json(out / "tokenizer.json")
        tokens = dict(tokenizer_file=out / "tokenizer.json", eos_token=tokenizer.chars[tokenizer.eot_id],
                      bos_token=tokenizer.chars[tokenizer.bos_id], bos_token_id=tokenizer.bos_id)
    else:
        tokens = dict(tokenizer_file=tokenizer.name, eos_token=args.eos_token)
    tokens["eos_token_id"] = tokenizer.eot_id
    written = export_to_hf(model, out, dtype=getattr(torch, args.dtype), expert_layout=args.expert_layout, **tokens)
    print(f"wrote {written} (tokenizer {tokenizer.name})")
    return written


run = entry_point(main)  # the console script lit-overtok-export
