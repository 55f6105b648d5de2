"""The model's configuration dataclass, ``ModelConfig``: one run's architecture, a preset plus explicit fields.

A field left ``None`` takes the preset's value and a field given explicitly wins. The vocabulary size normally comes
from the data module (the CLI links it). The sub-configs sit beside the modules they build: ``over_encoding``
(``OverEncodingConfig``), ``engram`` (``EngramConfig``), ``moe`` (``MoEConfig``), ``heads`` (``MultiTokenConfig``). Parameter counts and FLOPs per
token are in ``counts`` (they build the model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from lit_overtok.configuration import config_from
from lit_overtok.nn.engram import EngramConfig
from lit_overtok.nn.heads import MultiTokenConfig
from lit_overtok.nn.moe import MoEConfig, resolve_moe_config
from lit_overtok.nn.over_encoding import OverEncodingConfig
from lit_overtok.nn.presets import OLMO2, PRESET_FIELDS, PRESETS

BLOCKS = ("reordered_norm", "pre_norm")


@dataclass
class ModelConfig:
    """A decoder-only transformer in the OLMo2 (dense) or OLMoE (MoE) recipe, with pluggable input embedding and
    output heads."""

    preset: Optional[str] = "cfg-small"
    """Named shape to start from (see ``lit_overtok.nn.presets``); explicit fields override it. None: give every
    shape field."""
    vocab_size: Optional[int] = None
    """Tokenizer vocabulary V (ids 0..V-1). Normally linked from the data module."""
    n_layer: Optional[int] = None
    d_model: Optional[int] = None
    n_head: Optional[int] = None
    d_ff: Optional[int] = None
    """Hidden width of the dense SwiGLU feed-forward (unused when ``moe`` is set)."""
    max_seq_len: Optional[int] = None
    """Longest sequence the RoPE cache covers."""
    tie_embeddings: Optional[bool] = None
    """Share the 1-gram input table with the output head."""
    vocab_pad_multiple: Optional[int] = None
    """Round the embedding/head rows up to this multiple (GPU efficiency); the extra rows are never targets."""
    block: Optional[str] = None
    """Norm placement in each block (``nn.block``): 'reordered_norm' (OLMo2: ``h = x + norm(attn(x))``; the dense
    presets) or 'pre_norm' (OLMoE: ``h = x + attn(norm(x))``; the MoE presets). None: the preset's, else OLMo2's."""
    rope_theta: Optional[float] = None
    """RoPE base: 500,000 in OLMo2, 10,000 in OLMoE. None: the preset's, else OLMo2's."""
    norm_eps: Optional[float] = None
    """RMSNorm epsilon, QK-norm included: 1e-6 in OLMo2, 1e-5 in OLMoE. None: the preset's, else OLMo2's."""
    init_std: float = 0.02
    over_encoding: Optional[OverEncodingConfig] = None
    """Hashed n-gram input embeddings (Over-Encoding, paper §3.2); None = the plain 1-gram table."""
    engram: Optional[EngramConfig] = None
    """DeepSeek's Engram: a hashed n-gram memory added to the hidden state before chosen blocks (``nn.engram``)."""
    moe: Optional[MoEConfig] = None
    """Mixture-of-experts feed-forward in every block (None: dense, unless the preset has experts)."""
    multi_token: Optional[MultiTokenConfig] = None
    """Training-only prediction of further tokens: Over-Decoding, joint n-gram decoding or MTP-DS (``nn.heads``)."""
    loss_chunk_logits: Optional[int] = None
    """Cross-entropy without full logits (``nn.chunked_loss``): every head computes its projection and loss over
    chunks of positions holding at most this many logits (e.g. 8388608 = 32 MiB in fp32), recomputed in backward, so
    the loss's memory no longer grows with batch × seq × vocab. None: the plain path (all logits at once). Equal up
    to float summation order."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them (``nn.recompute``): one more forward
    of the blocks per step; gradients equal the plain run's."""
    compile_blocks: bool = False
    """``torch.compile`` each transformer block on its own (as torchtitan does; inductor, on CPU with the system C++
    compiler); the embedding, the heads and the loss stay eager. Output equals eager up to float rounding."""

    def __post_init__(self) -> None:
        if self.multi_token is not None:
            self.multi_token = config_from(MultiTokenConfig, self.multi_token, "model_config.multi_token")
        if self.over_encoding is not None:
            self.over_encoding = config_from(OverEncodingConfig, self.over_encoding, "model_config.over_encoding")
        if self.engram is not None:
            self.engram = config_from(EngramConfig, self.engram, "model_config.engram")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(
                    f"model_config.preset: unknown preset {self.preset!r}; valid presets are {sorted(PRESETS)} "
                    "(or null with every shape field given)"
                )
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        for name, value in OLMO2.items():  # a config without a preset gets the OLMo2 backbone unless it says otherwise
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.moe = resolve_moe_config(self.moe, PRESETS[self.preset].get("moe") if self.preset is not None else None,
                                      self.d_ff)
        missing = [name for name in PRESET_FIELDS if getattr(self, name) is None]
        if missing:
            raise ValueError(f"model_config: fields {missing} are unset; give them or choose a preset from {sorted(PRESETS)}")
        for name in ("n_layer", "d_model", "n_head", "d_ff", "max_seq_len", "vocab_pad_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model_config.{name} must be a positive integer, got {getattr(self, name)}")
        if self.block not in BLOCKS:
            raise ValueError(f"model_config.block: unknown block {self.block!r}; valid blocks are {list(BLOCKS)}")
        if self.loss_chunk_logits is not None and self.loss_chunk_logits <= 0:
            raise ValueError(f"model_config.loss_chunk_logits must be a positive number of logits per chunk (or null for "
                             f"the plain path), got {self.loss_chunk_logits}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"model_config.vocab_size must be a positive integer, got {self.vocab_size}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"model_config.n_head={self.n_head} does not divide model_config.d_model={self.d_model}; "
                f"choose a head count among the divisors of {self.d_model}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"model_config: head width d_model/n_head={self.head_dim} must be even for RoPE")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model_config.init_std, model_config.norm_eps and model_config.rope_theta must be positive")
        if self.over_encoding is not None:
            self.over_encoding.validate(self.d_model, self.vocab_size, self.tie_embeddings)
        if self.engram is not None:
            self.engram.validate(self.n_layer, self.vocab_size)
        if self.multi_token is not None:
            self.multi_token.check_model(self.d_model, self.vocab_size, self.tie_embeddings)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model_config.vocab_size is unset: link it from the data module or give it in the config")
        multiple = self.vocab_pad_multiple
        return (self.vocab_size + multiple - 1) // multiple * multiple

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (presets are re-applied only to fields left None)."""
        return dataclasses.replace(self, **changes)
