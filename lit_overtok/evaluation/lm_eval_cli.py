"""lit_overtok checkpoints as an lm-eval model: ``--model lit_overtok`` in lm-eval's own CLI.

lm-eval 0.4.13 resolves ``--model`` only in its in-process registry, and nothing it runs imports a third-party
package first (its registry can hold entry points, but no code scans an entry-point group). So:

* from the shell, ``lit-overtok-lm-eval`` (``python -m lit_overtok.evaluation.lm_eval_cli``) is lm-eval's CLI with
  the name registered; every lm-eval flag and subcommand works unchanged:

      lit-overtok-lm-eval --model lit_overtok --model_args checkpoint=last.ckpt --tasks cfg_next_token_validity \\
          --include_path lit_overtok/evaluation/tasks/local --output_path out/

* from Python, ``register()`` makes ``lm_eval.simple_evaluate(model="lit_overtok", model_args="checkpoint=...")``
  work.

Model arguments: ``checkpoint`` (a training or inference checkpoint; required), ``tokenizer`` (a tokenizers JSON or
``grammar:<name>``; default: the one the checkpoint was trained with, and another one is refused unless
``allow_tokenizer_change=true``: ``checkpointing/tokenizer_binding.py``), ``max_batch_tokens``, ``max_length``,
``max_gen_toks``, ``seed``, ``precision`` (``32`` or ``bf16-mixed``); lm-eval's own ``--batch_size`` (a number, or
``auto`` = our default of 64 rows under the token budget) and ``--device`` (a CUDA device without CUDA means the CPU,
as for lm-eval's HF model). No argument is named like a task option (lm-eval merges model arguments into every
task's metadata).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Optional, Union

import torch

from lit_overtok.checkpointing.inference import load_transformer
from lit_overtok.evaluation.adapter import OverTokEvalLM
from lit_overtok.evaluation.tokenizers import load_tokenizer
from lit_overtok.errors import entry_point

MODEL_NAME = "lit_overtok"
DEFAULT_BATCH_SIZE = 64
PRECISIONS = ("32", "bf16-mixed")


def batch_size_from(value: Union[int, str, None]) -> int:
    """lm-eval passes ``--batch_size`` as given; 'auto' and 'auto:N' mean our default."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None


def device_from(value: Optional[str]) -> torch.device:
    """lm-eval's CLI passes device='cuda:0' unless told otherwise, GPU or not: without CUDA that means the CPU."""
    if value is not None and not (value.startswith("cuda") and not torch.cuda.is_available()):
        return torch.device(value)
    if value is not None:
        logging.getLogger(__name__).warning("device %s requested but CUDA is not available; using the CPU", value)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class OverTokCheckpointLM(OverTokEvalLM):
    """``OverTokEvalLM`` built from lm-eval's string arguments: a checkpoint path and a tokenizer spec."""

    def __init__(self, checkpoint: str, tokenizer: Optional[str] = None, batch_size: Union[int, str, None] = None,
                 max_batch_size: Optional[int] = None, device: Optional[str] = None, max_batch_tokens: int = 32768,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, seed: int = 1234,
                 precision: str = "32", allow_tokenizer_change: Union[bool, str] = False) -> None:
        del max_batch_size  # lm-eval's bound for its 'auto' search; our batches are bounded by max_batch_tokens
        if str(precision) not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        model, info = load_transformer(str(checkpoint))
        spec = info.tokenizer.resolve(tokenizer, str(allow_tokenizer_change).lower() in ("true", "1"),
                                      option="--model_args tokenizer")
        super().__init__(model.to(device_from(device)), load_tokenizer(spec), batch_size=batch_size_from(batch_size),
                         max_batch_tokens=int(max_batch_tokens), max_length=max_length, max_gen_toks=int(max_gen_toks),
                         seed=int(seed))
        self.precision, self.checkpoint = str(precision), str(checkpoint)

    def _autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        with self._autocast():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, **kwargs)

    def generate_until(self, requests, disable_tqdm: bool = False):
        with self._autocast():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        """Recorded by lm-eval in the results' ``config``."""
        return {"checkpoint": self.checkpoint, "tokenizer": self.tokenizer_name, "precision": self.precision}


def register() -> None:
    """Register ``lit_overtok`` as an lm-eval model name (idempotent)."""
    # lm-eval fills its registry with its own models only while the registry is empty (registry.get_model); they go
    # in first, or `--model hf` and the rest would stop resolving in this process once ours is there.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(OverTokCheckpointLM)


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's CLI (``lm_eval.__main__.cli_evaluate``) with our model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    evaluates = bool(args) and (args[0] == "run" or args[0] not in ("ls", "validate", "-h", "--help"))
    if evaluates and not any(a in ("--batch_size", "-b") or a.startswith("--batch_size=") for a in args):
        # lm-eval passes batch_size=1 unless told: one sequence per forward pass wastes our token-budget batching.
        args += ["--batch_size", "auto"]
    sys.argv = ["lit-overtok-lm-eval"] + args
    cli_evaluate()


run = entry_point(main)  # the console script lit-overtok-lm-eval: a missing checkpoint is one line, not a traceback

if __name__ == "__main__":
    run()
