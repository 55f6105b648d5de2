"""Named model shapes after the paper's models (docs/method.md §3).

The paper (docs/method.md §3) trains OLMo2-style dense models (151M, 400M, 1B) and GPT-2-sized models on the
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

Every OLMo2 preset uses d_ff = 4·d_model (as OLMo2-1B does), so a layer holds 16·d² weights. All of them (the cfg
presets too) are OLMo2 blocks: reordered norm (``block: reordered_norm``), RoPE theta 500,000, RMSNorm eps 1e-6.

Mixture-of-experts presets (OLMoE recipe, docs/method.md §3.3; the preset's ``moe`` fills ``ModelConfig.moe``). All of them
are OLMoE blocks as published: pre-norm (``block: pre_norm``), QK-norm, RoPE theta 10,000, RMSNorm eps 1e-5. The
reordered-norm MoE (OLMo2 blocks with OLMoE experts, Hugging Face's FlexOlmo) stays available: give
``block: reordered_norm`` (with ``rope_theta: 500000`` and ``norm_eps: 1e-6`` for OLMo2's values). MoE checkpoints
saved before the MoE presets became OLMoE blocks store theta and eps but no ``block``: load them with
``block: reordered_norm`` added to their ``model_config``. Counts are
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

A ``ModelConfig`` field left ``None`` takes its preset's value; a field given explicitly wins.
"""

from __future__ import annotations

# The two backbones of the paper (docs/method.md §3.2, §3.3), as published: OLMo2's reordered norm with RoPE theta 500,000
# and RMSNorm eps 1e-6 (OLMo-2 configs, e.g. allenai/OLMo configs/official-0425/OLMo2-1B-stage1.yaml), and OLMoE's
# pre-norm with theta 10,000 and eps 1e-5 (allenai/OLMoE configs/OLMoE-1B-7B-0924.yml: no norm_after, OLMo's
# defaults for rope_theta and layer_norm_eps; Hugging Face OlmoeConfig / OLMoE-1B-7B-0924 config.json agree).
OLMO2 = dict(block="reordered_norm", rope_theta=500_000.0, norm_eps=1e-6)
OLMOE = dict(block="pre_norm", rope_theta=10_000.0, norm_eps=1e-5)

# Fields a preset fills. ``None`` in a ModelConfig means "take it from the preset".
PRESETS: dict[str, dict] = {
    "olmo2-151m": dict(n_layer=16, d_model=768, n_head=12, d_ff=3072, max_seq_len=4096,
                       tie_embeddings=False, vocab_pad_multiple=128, **OLMO2),
    "olmo2-400m": dict(n_layer=24, d_model=1024, n_head=16, d_ff=4096, max_seq_len=4096,
                       tie_embeddings=False, vocab_pad_multiple=128, **OLMO2),
    "olmo2-1b": dict(n_layer=16, d_model=2048, n_head=16, d_ff=8192, max_seq_len=4096,
                     tie_embeddings=False, vocab_pad_multiple=128, **OLMO2),
    # GPT-2-like: tied embeddings, SwiGLU width 8d/3 so the MLP matches GPT-2's 8d² weights; the OLMo2 backbone.
    "cfg-small": dict(n_layer=12, d_model=128, n_head=2, d_ff=344, max_seq_len=1024,
                      tie_embeddings=True, vocab_pad_multiple=1, **OLMO2),
    "cfg-large": dict(n_layer=12, d_model=768, n_head=12, d_ff=2048, max_seq_len=1024,
                      tie_embeddings=True, vocab_pad_multiple=1, **OLMO2),
    "tiny": dict(n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=256,
                 tie_embeddings=False, vocab_pad_multiple=1, **OLMO2),
    # Mixture of experts (OLMoE recipe; see the second table above): ``moe`` fills ModelConfig.moe.
    "olmoe-1b-7b": dict(n_layer=16, d_model=2048, n_head=16, d_ff=8192, max_seq_len=4096,
                        tie_embeddings=False, vocab_pad_multiple=128, **OLMOE,
                        moe=dict(num_experts=64, top_k=8, expert_d_ff=1024)),
    "olmoe-1.3b": dict(n_layer=15, d_model=1024, n_head=16, d_ff=2048, max_seq_len=4096,
                       tie_embeddings=False, vocab_pad_multiple=128, **OLMOE,
                       moe=dict(num_experts=96, top_k=8, expert_d_ff=256)),
    "moe-small": dict(n_layer=12, d_model=128, n_head=2, d_ff=352, max_seq_len=1024,
                      tie_embeddings=True, vocab_pad_multiple=1, **OLMOE,
                      moe=dict(num_experts=8, top_k=2, expert_d_ff=176)),
    "moe-tiny": dict(n_layer=2, d_model=32, n_head=2, d_ff=32, max_seq_len=256,
                     tie_embeddings=False, vocab_pad_multiple=1, **OLMOE,
                     moe=dict(num_experts=4, top_k=2, expert_d_ff=16)),
}

PRESET_FIELDS = ("n_layer", "d_model", "n_head", "d_ff", "max_seq_len", "tie_embeddings", "vocab_pad_multiple")
"""Shape fields every model needs: from the preset or given. The backbone fields (``OLMO2``'s keys) that neither
gives take OLMo2's values."""
