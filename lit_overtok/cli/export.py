"""``train.py export`` (console script ``lit-overtok-export``): a checkpoint as a Hugging Face ``transformers`` folder.

    python train.py export --checkpoint runs/x/version_0/checkpoints/last.ckpt --out hf_model
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf_model')"   # + trust_remote_code=True for OE

The tokenizer travels with the model: the one the checkpoint's data module names (a grammar is written as a
one-character-per-id ``tokenizers`` JSON, as lit_overtok's evaluation spells it), or ``--tokenizer``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from lit_overtok.checkpointing.inference import load_transformer, tokenizer_spec
from lit_overtok.evaluation.tokenizers import GrammarTokenizer, load_tokenizer, TextTokenizer
from lit_overtok.export.hf import EXPERT_LAYOUTS, export_to_hf
from lit_overtok.errors import entry_point, InputError


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(prog="train.py export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training or inference checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--expert-layout", choices=EXPERT_LAYOUTS, default="per_expert",
                        help="MoE experts: one Linear per expert (the published OLMoE files) or transformers 5's fused "
                             "tensors (remote-code models are always fused)")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizers JSON or grammar:<name> (default: the one the checkpoint's data module names)")
    parser.add_argument("--eos-token", default="<|endoftext|>", help="the end-of-text token of a tokenizers JSON")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; export writes a folder (config, weights, tokenizer): give a new "
                              "or existing folder")
    model, info = load_transformer(args.checkpoint)
    spec = args.tokenizer or tokenizer_spec(info.data)
    tokens: dict = {}
    if spec is not None:
        tokenizer = load_tokenizer(spec) if spec.startswith("grammar:") else TextTokenizer(spec, args.eos_token)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                             f"is {model.cfg.vocab_size}; export with the tokenizer the model was trained with")
        if isinstance(tokenizer, GrammarTokenizer):
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save_tokenizers_json(out / "tokenizer.json")
            tokens = dict(tokenizer_file=out / "tokenizer.json", eos_token=tokenizer.chars[tokenizer.eot_id],
                          bos_token=tokenizer.chars[tokenizer.bos_id], bos_token_id=tokenizer.bos_id)
        else:
            tokens = dict(tokenizer_file=tokenizer.name, eos_token=args.eos_token)
        tokens["eos_token_id"] = tokenizer.eot_id
    written = export_to_hf(model, out, dtype=getattr(torch, args.dtype), expert_layout=args.expert_layout, **tokens)
    print(f"wrote {written}" + ("" if spec else " (no tokenizer: the checkpoint names none; pass --tokenizer)"))
    return written


run = entry_point(main)  # the console script lit-overtok-export
