"""Cross-entropy without the full logits: the output projection and the loss computed over chunks of positions.

The plain path materialises fp32 logits of batch × seq × vocab for every head, and keeps them (and the log-softmax)
for backward: at OLMo2's vocabulary (100,278), seq 4096 and 8 sequences that is 13 GB per head. Here each chunk of
positions runs ``head -> per-position NLL`` under ``torch.utils.checkpoint``: the forward keeps only the chunk's
hidden states and its NLL (one float per position), and backward recomputes one chunk's logits at a time, so the
peak holds one chunk's logits instead of the whole batch's: the memory effect of Liger's and OLMo-core's fused
linear cross-entropy, which compute each chunk's gradient in the forward instead; here a chunk's projection runs
twice, forward and backward. The heads use it when ``ModelConfig.loss_chunk_logits`` is set.

Equal to the plain path up to float summation order (the mean is a sum over chunks; the weight gradient accumulates
chunk by chunk), not bit for bit: hence an option, off by default.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lit_overtok.nn.losses import IGNORE_INDEX, masked_mean, mean_cross_entropy, token_nll

Outputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]


def positions_per_chunk(max_logits: int, row_width: int) -> int:
    """How many positions fit a chunk of at most ``max_logits`` logits, each position ``row_width`` wide."""
    return max(1, max_logits // row_width)


def over_position_chunks(fn: Callable[..., Outputs], chunk: int, *inputs_BT_: torch.Tensor) -> Outputs:
    """``fn`` applied to chunks of at most ``chunk`` positions, recomputed in backward, outputs put back to (B, T, ...).

    Every input is (B, T, ...); ``fn`` sees each chunk as a batch of one sequence, (1, n, ...), and returns one
    tensor, or a tuple of tensors, shaped (1, n, ...). One chunk's intermediates are alive at a time, in forward and
    in backward.
    """
    B, T = inputs_BT_[0].shape[:2]
    # ``split`` (not slicing): its backward concatenates the chunk gradients once instead of adding N-sized zeros.
    pieces = zip(*(x.flatten(0, 1)[None].split(chunk, dim=1) for x in inputs_BT_))
    chunk_outputs = [checkpoint(fn, *piece, use_reentrant=False) for piece in pieces]
    if isinstance(chunk_outputs[0], torch.Tensor):
        return torch.cat(chunk_outputs, dim=1).view(B, T, *chunk_outputs[0].shape[2:])
    return tuple(torch.cat(parts, dim=1).view(B, T, *parts[0].shape[2:]) for parts in zip(*chunk_outputs))


def head_token_nll(head: nn.Module, chunk: Optional[int], hidden_BTD: torch.Tensor, target_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (B, T) in fp32 of the logits ``head(hidden)`` at every position, zero where the target is
    IGNORE_INDEX; by chunks of positions unless ``chunk`` is None."""
    if chunk is None:
        return token_nll(head(hidden_BTD), target_BT)
    return over_position_chunks(lambda h_BTD, y_BT: token_nll(head(h_BTD), y_BT), chunk, hidden_BTD, target_BT)


def head_mean_loss(head: nn.Module, chunk: Optional[int], hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` over the positions with a label; by chunks unless ``chunk`` is None."""
    if chunk is None:  # the plain path, kept as it was: golden loss curves pin it bit for bit
        return mean_cross_entropy(head(hidden_BTD), labels_BT)
    return masked_mean(head_token_nll(head, chunk, hidden_BTD, labels_BT), labels_BT != IGNORE_INDEX)
