"""Activation checkpointing of the transformer blocks, torchtitan's per-block policy (``ModelConfig.activation_checkpointing``).

Each block's forward keeps only its input; backward reruns the block to get the activations it needs, trading one
more forward of the blocks for activation memory that no longer grows with the depth. Modules whose forward has side
effects beyond its output (the MoE router counts expert load and leaves its auxiliary losses for
``Transformer.loss``) ask ``is_recomputing()`` so that the rerun does not count or publish twice.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

_recomputing = False


def is_recomputing() -> bool:
    """True while backward reruns a checkpointed forward."""
    return _recomputing


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    global _recomputing
    previous, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = previous


def checkpointed(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)``, its activations recomputed in backward rather than stored."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _recomputation()))
