"""Parameter counts and training FLOPs per token of a configuration, from a meta-device build (exact, no memory).

Lookups cost no FLOPs, so the 1-gram and Over-Encoding tables are excluded from the FLOPs (docs/method.md §4.11: OE adds
only its projections, 2·D² per token); the output unembedding is a matmul and counts whether tied or not. Engram
(``nn.engram``) adds its key and value projections and its depthwise convolution (each weight used once per token);
its gate's dot product (D per token) is left out, as the norms' products are.
"""

from __future__ import annotations

import torch

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.transformer import ParameterCounts, Transformer


def parameter_counts(config: ModelConfig) -> ParameterCounts:
    with torch.device("meta"):
        model = Transformer(config)
    return model.parameter_counts()


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·(weights a token multiplies by) + the attention score/value matmuls."""
    counts = parameter_counts(config)
    matmul_params = counts.active_non_embedding + config.padded_vocab_size * config.d_model
    attention = 6 * config.n_layer * config.d_model * seq_len  # 2 matmuls × causal half × fwd+bwd(3) × 2 FLOP/MAC
    heads = 0.0
    if config.multi_token is not None:
        heads = config.multi_token.extra_flops_per_token(config.vocab_size, config.padded_vocab_size, config.d_model, seq_len)
    return 6.0 * matmul_params + attention + heads
