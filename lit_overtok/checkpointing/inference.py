"""Checkpoints for inference: the network without Lightning, and the small inference checkpoint (``strip``).

A training checkpoint (Lightning's ``.ckpt``) holds the ``OverTokLM`` hyperparameters (``model_config``,
``optimizer``: plain dicts), its ``state_dict`` (the network under ``transformer.``), the optimizer's moments, the
schedulers, the loops' and callbacks' states, ``tokens_seen`` and the data module's hyperparameters (which name the
tokenizer). Generation and evaluation use only the next-token head (docs/method.md §2), so an *inference checkpoint*
keeps the config and weights of that model and drops the optimizer state and the training-only heads (Over-Decoding
heads and MTP-DS modules: ``multi_token.mode`` ``od`` / ``mtp_ds`` becomes ``none``; a ``joint`` head is the
next-token head and stays). It keeps the training checkpoint's layout, so ``evaluate.py``, ``generate``, ``export``,
the lm-eval model and ``OverTokLM.load_from_checkpoint`` read either kind; a text run's tokenizer record
(``tokenizer_binding``) stays in it, so every reader still finds the tokenizer the model was trained with. Every read is CRC-verified and every
write atomic (``checkpoint_files``).

    python train.py strip --checkpoint runs/x/version_0/checkpoints/last.ckpt --out model.ckpt

A sharded run writes a folder instead of a file (torch.distributed.checkpoint: ``*.distcp`` shards, ``.metadata``,
``meta.pt`` with the trainer state, ``checksums.json``; see ``strategies``), whatever its world size;
``read_checkpoint`` reads it in one process, after checking every file against the sizes and CRC-32s recorded when it
was saved (``integrity``). Its row-sharded tables come back whole, as a replicated run's would, so any model of the
same configuration (``sharded`` on or off) loads them. That needs the whole model in host memory (OE-12.8M at
d_model 1024: 53 GB of table weights), as evaluation at world size 1 does.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lit_overtok.checkpointing.files import CheckpointError, load_verified, save_atomically
from lit_overtok.checkpointing.tokenizer_binding import RECORD_KEY, TokenizerBinding
from lit_overtok.checkpointing.integrity import is_sharded_checkpoint, verify_checkpoint
from lit_overtok.configuration import config_from
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.sharded_table import place_sharded_tables
from lit_overtok.nn.transformer import Transformer

METADATA_NAME = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
PREFIX = "transformer."  # where OverTokLM keeps the network in its state_dict
TRAINING_ONLY_HEADS = ("od", "mtp_ds")
# What an inference checkpoint keeps of a training checkpoint (Lightning reads the version when loading).
_KEPT_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "tokens_seen", "datamodule_hyper_parameters",
              "datamodule_hparams_name", "hparams_name")


@dataclass
class CheckpointInfo:
    """What a checkpoint says besides the weights."""

    path: str
    global_step: Optional[int]
    tokens_seen: Optional[int]
    tokenizer: TokenizerBinding
    """The tokenizer the model was trained with (``tokenizer.resolve(given)``: the one to read it with)."""
    data: dict[str, Any] = field(default_factory=dict)
    """The data module's hyperparameters."""


def _read_sharded(path: Path, optimizer_states: bool) -> dict[str, Any]:
    """A sharded run's folder as one dict, without a process group; optimizer states only when asked for."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    keys = None if optimizer_states else {"state_dict"}
    checkpoint: dict[str, Any] = {}
    _load_state_dict(checkpoint, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    if (path / METADATA_NAME).is_file():
        checkpoint.update(torch.load(path / METADATA_NAME, map_location="cpu", weights_only=False))
    return checkpoint


def read_checkpoint(path: Union[str, Path], optimizer_states: bool = False) -> dict[str, Any]:
    """The checkpoint dict: a file after its CRC check (``load_verified``) or a sharded run's folder (its optimizer
    states, twice the weights again, only when asked for); one clear error for a missing, damaged or truncated file,
    or one that is not a lit_overtok checkpoint."""
    if is_sharded_checkpoint(path):
        verify_checkpoint(path)  # every file against the checksums written when it was saved
        try:
            checkpoint = _read_sharded(Path(path), optimizer_states)
        except Exception as error:  # the files are as written, so this is a folder of another kind
            raise CheckpointError(f"{path} cannot be read as a sharded checkpoint ({type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:300]})") from None
    else:
        checkpoint = load_verified(path, mmap=True)
    if "state_dict" not in checkpoint or "model_config" not in (checkpoint.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path} is not a lit_overtok checkpoint (no hyper_parameters.model_config / state_dict)")
    return checkpoint


def checkpoint_info(checkpoint: dict[str, Any], path: Union[str, Path]) -> CheckpointInfo:
    return CheckpointInfo(str(path), checkpoint.get("global_step"), checkpoint.get("tokens_seen"),
                          TokenizerBinding.of_checkpoint(checkpoint, path),
                          dict(checkpoint.get("datamodule_hyper_parameters") or {}))


def network(checkpoint: dict[str, Any]) -> Transformer:
    """The ``Transformer`` a checkpoint dict describes, with its weights (strict: every tensor must fit)."""
    model = Transformer(config_from(ModelConfig, checkpoint["hyper_parameters"]["model_config"], "model_config"))
    place_sharded_tables(model, None)  # row-sharded tables start as meta placeholders: whole here (world size 1)
    model.load_state_dict({k[len(PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)})
    return model


def load_transformer(path: Union[str, Path]) -> tuple[Transformer, CheckpointInfo]:
    """The network of a training or inference checkpoint, in eval mode on the CPU, without Lightning."""
    checkpoint = read_checkpoint(path)
    return network(checkpoint).eval(), checkpoint_info(checkpoint, path)


def inference_checkpoint(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """``checkpoint`` without optimizer state and training-only heads (same layout; see the module docstring)."""
    hparams = copy.deepcopy(dict(checkpoint["hyper_parameters"]))
    multi_token = hparams["model_config"].get("multi_token") or {}
    drop_heads = multi_token.get("mode") in TRAINING_ONLY_HEADS
    if drop_heads:
        hparams["model_config"]["multi_token"] = None
    head_prefix = PREFIX + "multi_token_head."
    state_dict = {k: v for k, v in checkpoint["state_dict"].items() if not (drop_heads and k.startswith(head_prefix))}
    kept = {key: checkpoint[key] for key in _KEPT_KEYS if key in checkpoint}
    # The data module's state (where a text run records its tokenizer) is dropped: the record stays, on its own.
    record = TokenizerBinding.of_checkpoint(checkpoint, source).record()
    kept.update({RECORD_KEY: record} if record is not None else {})
    dropped = sorted(set(checkpoint) - set(kept) - {"hyper_parameters", "state_dict"})
    return {**kept, "hyper_parameters": hparams, "state_dict": state_dict,
            "inference_only": {"source": source, "dropped": dropped,
                               "dropped_heads": multi_token.get("mode") if drop_heads else None}}


def strip(source: Union[str, Path], out: Union[str, Path]) -> Path:
    """Write the inference checkpoint of ``source`` to ``out``; refuses to overwrite its own input."""
    source, out = Path(source), Path(out)
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the input checkpoint; write the inference checkpoint elsewhere")
    stripped = inference_checkpoint(read_checkpoint(source), str(source))
    network(stripped)  # it must load: a tensor the stripped config no longer expects fails here, not when served
    save_atomically(stripped, out)  # never a half-written file under the final name, and CRCs for the readers
    return out


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="train.py strip", description="Write a small inference checkpoint: the next-token model's weights and "
        "config, without optimizer state or Over-Decoding / MTP-DS heads.")
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="the inference checkpoint to write")
    args = parser.parse_args(argv)
    out = strip(args.checkpoint, args.out)
    before, after = Path(args.checkpoint).stat().st_size, out.stat().st_size
    print(f"wrote {out}: {after / 2**20:.2f} MiB (from {before / 2**20:.2f} MiB)")
    return out
