"""Whether a run may resume from a checkpoint: the same model, optimizer and data, checked before anything is written.

A resume continues one run: the checkpoint's weights, optimizer moments and learning-rate schedule state. A config
that differs from the checkpoint's would either not fit the weights (a new ``d_model``: a size-mismatch traceback
deep in Lightning) or be silently overridden by the restored state (a new ``optimizer.lr``: the restored param
groups keep the old rate while ``config.yaml`` records the new one). So ``refuse_changed_config`` stops such a resume
with one line naming the field and both values, before the run's folder is touched (no ``config.yaml``, no
``hparams.yaml``, no event file, no version folder):

* ``model_config`` (the architecture) and ``optimizer`` (rates, betas, decay, warmup, groups): refused. Fields that
  change how the same numbers are computed, not what they are (activation checkpointing,
  compiled blocks, chunked logits, row-sharded tables; ``MAY_CHANGE``), may change.
* The data: its tokenizer (``data.allow_tokenizer_change`` lets it change, as in the data module's own check) and
  its grammar. A change of data layout (``seq_len``, ``batch_size``, shards) is the data module's: it continues on
  a fresh stream with a warning naming what changed.
* ``trainer.max_steps``, the length of the warmup-cosine schedule, may change (training a run for longer): the
  schedule is recomputed for the new length and continues from the checkpoint's step, and ``schedule_change`` says
  so at start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from lit_overtok.checkpointing.files import load_verified
from lit_overtok.checkpointing.integrity import CheckpointError, is_sharded_checkpoint, verify_checkpoint

# How the same numbers are computed, not what they are; and the preset's name (its fields are compared resolved).
MAY_CHANGE = frozenset({"model_config.activation_checkpointing", "model_config.compile_blocks",
                        "model_config.loss_chunk_logits", "model_config.over_encoding.sharded", "model_config.preset"})
SCHEDULE_STEPS_KEY = "schedule_steps"  # OverTokLM saves the number of steps its schedule was built for


def resume_state(path: str) -> dict[str, Any]:
    """The checkpoint's non-tensor part (hyperparameters, data state) after verifying it: a file's dict (its tensors
    memory-mapped, not read) or a sharded folder's ``meta.pt``."""
    if is_sharded_checkpoint(path):
        verify_checkpoint(path)
        try:
            return torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=False)
        except Exception as error:
            raise CheckpointError(f"{path}/meta.pt cannot be read ({type(error).__name__})") from None
    return load_verified(path, mmap=True)


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}.{key}"))
        return flat or {prefix: {}}
    return {prefix: value}


def _differences(saved: dict[str, Any], now: dict[str, Any], section: str) -> list[tuple[str, Any, Any]]:
    # JSON round trip: tuples and lists, ints and floats as the checkpoint stores them
    old = _flat(json.loads(json.dumps(saved.get(section) or {})), section)
    new = _flat(json.loads(json.dumps(now.get(section) or {})), section)
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and key not in MAY_CHANGE]


def refuse_changed_config(path: str, checkpoint: dict[str, Any], model_hparams: dict[str, Any],
                          data_hparams: dict[str, Any]) -> None:
    """An ``InputError`` (one line) when the run's model, optimizer or grammar differs from the checkpoint's."""
    saved = checkpoint.get("hyper_parameters") or {}
    if "model_config" not in saved:
        raise CheckpointError(f"--ckpt_path {path} is not a lit_overtok training checkpoint (no model_config)")
    for section, consequence in (("model_config", "the checkpoint's weights are of that model"),
                                 ("optimizer", "the optimizer and its schedule continue from the checkpoint's state, "
                                               "which would override the change")):
        changed = _differences(saved, model_hparams, section)
        if changed:
            key, old, new = changed[0]
            more = f" (and {len(changed) - 1} more field(s))" if len(changed) > 1 else ""
            raise CheckpointError(f"cannot resume {path}: {key} is {old!r} in the checkpoint but {new!r} in this "
                                  f"run{more}; {consequence}. Resume with the checkpoint's value, or start a new run "
                                  "(another trainer.default_root_dir, no --ckpt_path)")
    saved_grammar = (checkpoint.get("datamodule_hyper_parameters") or {}).get("grammar")
    if saved_grammar is not None and data_hparams.get("grammar") not in (None, saved_grammar):
        raise CheckpointError(f"cannot resume {path}: data.grammar is {saved_grammar!r} in the checkpoint but "
                              f"{data_hparams['grammar']!r} in this run; the model's ids are that grammar's symbols")


def schedule_change(checkpoint: dict[str, Any], max_steps: Optional[int]) -> Optional[str]:
    """What happens to the learning-rate schedule when ``trainer.max_steps`` differs from the checkpoint's run."""
    saved = checkpoint.get(SCHEDULE_STEPS_KEY)
    if saved is None or max_steps is None or max_steps <= 0 or saved == max_steps:
        return None
    step = checkpoint.get("global_step", 0)
    return (f"trainer.max_steps is {max_steps}, the checkpoint's run had {saved}: the learning-rate schedule is "
            f"recomputed for {max_steps} steps and continues from step {step}")
