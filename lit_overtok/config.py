"""Model configuration: one dataclass for the backbone plus named presets after the paper's models.

The paper (PAPER.md §3) trains OLMo2-style dense models (151M, 400M, 1B) and GPT-2-sized models on the
cfg3f grammar (2.4M, 85M). It does not publish the OLMo2 shapes; ours are chosen so that the
*non-embedding* parameter count hits the name (the usual scaling-law convention, and the only one that
does not depend on the vocabulary, which Over-Encoding changes by orders of magnitude):

| preset      | layers | d_model | heads | d_ff  | non-embedding params |
|-------------|--------|---------|-------|-------|----------------------|
| olmo2-151m  | 16     | 768     | 12    | 3072  | 151.0M               |
| olmo2-400m  | 24     | 1024    | 16    | 4096  | 402.7M               |
| olmo2-1b    | 16     | 2048    | 16    | 8192  | 1074.0M (= OLMo2-1B) |
| cfg-small   | 12     | 128     | 2     | 344   | 2.37M  (paper: 2.4M) |
| cfg-large   | 12     | 768     | 12    | 2048  | 84.9M  (paper: 85M)  |
| tiny        | 2      | 32      | 2     | 64    | tests only           |

Every OLMo2 preset uses d_ff = 4·d_model (as OLMo2-1B does), so a layer holds 16·d² weights.

Mixture-of-experts presets (OLMoE recipe, PAPER.md §3.3; the preset's ``moe`` fills ``ModelConfig.moe``). Counts are
with the OLMoE vocabulary, 50,280 padded to 50,304, and two untied tables, as OLMoE's "1.3B active / 6.9B total":

| preset      | layers | d_model | heads | experts | top-k | expert d_ff | active / total params                 |
|-------------|--------|---------|-------|---------|-------|-------------|---------------------------------------|
| olmoe-1b-7b | 16     | 2048    | 16    | 64      | 8     | 1024        | 1.282B / 6.919B (= OLMoE-1B-7B)       |
| olmoe-1.3b  | 15     | 1024    | 16    | 96      | 8     | 256         | 261.8M / 1.300B (paper: 260M / 1.3B)  |
| moe-small   | 12     | 128     | 2     | 8       | 2     | 176         | 2.43M / 7.29M (cfg3f; = cfg-small active) |
| moe-tiny    | 2      | 32      | 2     | 4       | 2     | 16          | tests only                            |

olmoe-1.3b: the paper publishes only 260M active / 1.3B total and (through its 51M embedding count) d_model 1024.
The two 50,304 × 1024 tables take 103M, so the blocks must hold 157M active of 1.197B in all, a total-to-active
ratio of 7.6; OLMoE-1B-7B's own layer shape (64 experts of width d/2, top-8) has 6.2 at any depth (11 layers give
288M / 1.26B). We keep OLMoE's top-8 routing and fine-grained experts and choose 15 layers of 96 experts of width
d/4 = 256 (15 layers of 48 experts of width 512 with top-4 would hit the counts as closely). [UNCONFIRMED] The
paper's own forward cost for its OLMoE-1.3B, 0.5409 GFLOPs/token (§4.11), fits 13 OLMoE-style layers (64 × 512,
top-8; 219M active non-embedding weights) instead, i.e. 322M active / 1.47B total: its counts and its FLOPs
disagree, and we match the counts. (For olmoe-1b-7b, ``flops_per_token`` gives 2.3580 forward GFLOPs against
the paper's 2.3578.) In every MoE preset d_ff = top_k · expert_d_ff: the dense model with the same active weights
(MoE blocks ignore it).

Any preset field can be overridden: a field left ``None`` takes the preset's value, and a field given
explicitly wins. Vocabulary size normally comes from the data module (the CLI links it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from lit_overtok.heads import MultiTokenConfig
from lit_overtok.moe import MoEConfig, resolve_moe_config
from lit_overtok.over_encoding import OverEncodingConfig

# Shape fields a preset may fill. ``None`` in a ModelConfig means "take it from the preset".
PRESETS: dict[str, dict] = {
    "olmo2-151m": dict(n_layer=16, d_model=768, n_head=12, d_ff=3072, max_seq_len=4096,
                       tie_embeddings=False, vocab_pad_multiple=128),
    "olmo2-400m": dict(n_layer=24, d_model=1024, n_head=16, d_ff=4096, max_seq_len=4096,
                       tie_embeddings=False, vocab_pad_multiple=128),
    "olmo2-1b": dict(n_layer=16, d_model=2048, n_head=16, d_ff=8192, max_seq_len=4096,
                     tie_embeddings=False, vocab_pad_multiple=128),
    # GPT-2-like: tied embeddings, SwiGLU width 8d/3 so the MLP matches GPT-2's 8d² weights.
    "cfg-small": dict(n_layer=12, d_model=128, n_head=2, d_ff=344, max_seq_len=1024,
                      tie_embeddings=True, vocab_pad_multiple=1),
    "cfg-large": dict(n_layer=12, d_model=768, n_head=12, d_ff=2048, max_seq_len=1024,
                      tie_embeddings=True, vocab_pad_multiple=1),
    "tiny": dict(n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=256,
                 tie_embeddings=False, vocab_pad_multiple=1),
    # Mixture of experts (OLMoE recipe; see the second table above): ``moe`` fills ModelConfig.moe.
    "olmoe-1b-7b": dict(n_layer=16, d_model=2048, n_head=16, d_ff=8192, max_seq_len=4096,
                        tie_embeddings=False, vocab_pad_multiple=128,
                        moe=dict(num_experts=64, top_k=8, expert_d_ff=1024)),
    "olmoe-1.3b": dict(n_layer=15, d_model=1024, n_head=16, d_ff=2048, max_seq_len=4096,
                       tie_embeddings=False, vocab_pad_multiple=128,
                       moe=dict(num_experts=96, top_k=8, expert_d_ff=256)),
    "moe-small": dict(n_layer=12, d_model=128, n_head=2, d_ff=352, max_seq_len=1024,
                      tie_embeddings=True, vocab_pad_multiple=1,
                      moe=dict(num_experts=8, top_k=2, expert_d_ff=176)),
    "moe-tiny": dict(n_layer=2, d_model=32, n_head=2, d_ff=32, max_seq_len=256,
                     tie_embeddings=False, vocab_pad_multiple=1,
                     moe=dict(num_experts=4, top_k=2, expert_d_ff=16)),
}

_PRESET_FIELDS = ("n_layer", "d_model", "n_head", "d_ff", "max_seq_len", "tie_embeddings", "vocab_pad_multiple")


@dataclass
class ModelConfig:
    """A decoder-only transformer in the OLMo2 recipe, with pluggable input embedding and output heads."""

    preset: Optional[str] = "cfg-small"
    """Named shape to start from (see PRESETS); explicit fields override it. None: give every shape field."""
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
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    over_encoding: Optional[OverEncodingConfig] = None
    """Hashed n-gram input embeddings (Over-Encoding, paper §3.2); None = the plain 1-gram table."""
    moe: Optional[MoEConfig] = None
    """Mixture-of-experts feed-forward in every block (None: dense, unless the preset has experts)."""
    multi_token: Optional[MultiTokenConfig] = None
    """Training-only prediction of further tokens: Over-Decoding, joint n-gram decoding or MTP-DS (heads.py)."""

    def __post_init__(self) -> None:
        if isinstance(self.multi_token, dict):  # hparams come back from checkpoints as plain dicts
            self.multi_token = MultiTokenConfig(**self.multi_token)
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(
                    f"model.preset: unknown preset {self.preset!r}; valid presets are {sorted(PRESETS)} "
                    "(or null with every shape field given)"
                )
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        self.moe = resolve_moe_config(self.moe, PRESETS[self.preset].get("moe") if self.preset is not None else None)
        missing = [name for name in _PRESET_FIELDS if getattr(self, name) is None]
        if missing:
            raise ValueError(f"model: fields {missing} are unset; give them or choose a preset from {sorted(PRESETS)}")
        for name in ("n_layer", "d_model", "n_head", "d_ff", "max_seq_len", "vocab_pad_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be a positive integer, got {self.vocab_size}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}; "
                f"choose a head count among the divisors of {self.d_model}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"model: head width d_model/n_head={self.head_dim} must be even for RoPE")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.init_std, model.norm_eps and model.rope_theta must be positive")
        if isinstance(self.over_encoding, dict):  # hparams come back from checkpoints as plain dicts
            try:
                self.over_encoding = OverEncodingConfig(**self.over_encoding)
            except TypeError as error:
                fields = "m, n, k, reset_at_eos, eos_id, sparse"
                raise ValueError(f"model.over_encoding: {error} (fields: {fields})") from None
        if self.over_encoding is not None:
            self.over_encoding.validate(self.d_model, self.vocab_size)
        if self.multi_token is not None:
            self.multi_token.check_model(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is unset: link it from the data module or give it in the config")
        multiple = self.vocab_pad_multiple
        return (self.vocab_size + multiple - 1) // multiple * multiple

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (presets are re-applied only to fields left None)."""
        return dataclasses.replace(self, **changes)

    def parameter_counts(self) -> "ParameterCounts":
        """Counts from a meta-device instance of the model, so they are exact and cost no memory."""
        import torch

        from lit_overtok.model import Transformer

        with torch.device("meta"):
            model = Transformer(self)
        return model.parameter_counts()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·(weights a token multiplies by) + the attention score/value matmuls.

        Lookups cost no FLOPs, so the 1-gram and Over-Encoding tables are excluded (PAPER.md §4.11); the output
        unembedding is a matmul and counts whether tied or not.
        """
        counts = self.parameter_counts()
        matmul_params = counts.active_non_embedding + self.padded_vocab_size * self.d_model
        attention = 6 * self.n_layer * self.d_model * seq_len  # 2 matmuls × causal half × fwd+bwd(3) × 2 FLOP/MAC
        heads = self.multi_token.extra_flops_per_token(self, seq_len) if self.multi_token is not None else 0.0
        return 6.0 * matmul_params + attention + heads


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int
    """Parameters of lookup tables (the 1-gram table and any Over-Encoding tables)."""
    non_embedding: int
    active: int
    """Parameters used per token: for mixture-of-experts only the routed experts count."""
    active_non_embedding: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
