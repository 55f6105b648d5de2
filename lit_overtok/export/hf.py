"""Our ``Transformer`` as a Hugging Face ``transformers`` checkpoint folder (config.json + model.safetensors).

| our model                                      | architecture              | trust_remote_code |
|------------------------------------------------|---------------------------|-------------------|
| dense, reordered-norm (OLMo2) blocks           | ``Olmo2ForCausalLM``      | no                |
| MoE, reordered-norm blocks                     | ``FlexOlmoForCausalLM``   | no                |
| MoE, pre-norm (OLMoE) blocks                   | ``OlmoeForCausalLM``      | no                |
| any of these + Over-Encoding or a joint head   | ``OverTok{Olmo2,FlexOlmo,Olmoe}ForCausalLM`` (``remote_code/``, copied into the folder) | yes |

Weight for weight our backbone is these classes' (transformers 5.24: ``modeling_olmo2.py`` reordered norm and
whole-projection QK-norm, ``modeling_flex_olmo.py`` the same around OLMoE's router and experts,
``modeling_olmoe.py`` pre-norm); the tests check that the exported logits equal ours. Training-only parts are
dropped: Over-Decoding heads, MTP-DS modules (``multi_token_head.*``) and Over-Encoding's coverage buffer. The
vocabulary is exported unpadded (``vocab_size`` = the tokenizer's): the padding rows of our tables, never targets,
disappear, so the logits equal ours column for column and ``generate`` can never sample a padding id.

Writing needs ``safetensors`` only (the config is plain JSON); loading needs ``transformers`` >= 5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.transformer import Transformer

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"  # package data, never imported here
REMOTE_CODE_FILES = ("configuration_overtok.py", "modeling_overtok.py")
EXPERT_LAYOUTS = ("per_expert", "fused")

# State-dict entries that never leave training: the training-only heads and Over-Encoding's coverage buffer.
_DROPPED_PREFIXES = ("multi_token_head.",)
_DROPPED_KEYS = ("embed.rows_touched", "embed.tables.rows_touched")  # row-sharded tables keep it in .tables

# (architecture, model_type) of the native transformers classes, by (has experts, ModelConfig.block).
_NATIVE = {
    (False, "reordered_norm"): ("Olmo2ForCausalLM", "olmo2"),
    (True, "reordered_norm"): ("FlexOlmoForCausalLM", "flex_olmo"),
    (True, "pre_norm"): ("OlmoeForCausalLM", "olmoe"),
}
# The remote-code twin of each native class: (config class, model class, model_type).
_REMOTE = {
    "olmo2": ("OverTokOlmo2Config", "OverTokOlmo2ForCausalLM", "overtok_olmo2"),
    "flex_olmo": ("OverTokFlexOlmoConfig", "OverTokFlexOlmoForCausalLM", "overtok_flex_olmo"),
    "olmoe": ("OverTokOlmoeConfig", "OverTokOlmoeForCausalLM", "overtok_olmoe"),
}
# Our block norms under transformers' names: reordered norm normalises each sublayer's output (OLMo2, FlexOlmo),
# pre-norm its input (OLMoE, whose FFN input norm is called post_attention_layernorm).
_NORM_NAMES = {
    "reordered_norm": {"attention_norm": "post_attention_layernorm", "feed_forward_norm": "post_feedforward_layernorm"},
    "pre_norm": {"attention_norm": "input_layernorm", "feed_forward_norm": "post_attention_layernorm"},
}


class ExportError(ValueError):
    """A model this exporter cannot express (the message says what and why)."""


def is_joint(config: ModelConfig) -> bool:
    return config.multi_token is not None and config.multi_token.mode == "joint"


def hf_config(config: ModelConfig, model_type: str, architecture: str) -> dict:
    """config.json of the native class; every value the class defaults differently from ours is written."""
    fields = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 5 reads rope_parameters, 4.x rope_theta: the same number. Their class defaults (1e-5 eps,
        # theta 10k for Olmo2 and OLMoE) are not ours, so both are always written.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(config.tie_embeddings),
        "initializer_range": config.init_std,
        "use_cache": True,
        "pad_token_id": None,  # transformers' defaults are OLMo's ids; export_to_hf sets ours from the tokenizer
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if config.moe is not None:
        fields.update({
            "intermediate_size": config.moe.expert_d_ff,
            "num_experts": config.moe.num_experts,
            "num_experts_per_tok": config.moe.top_k,
            "norm_topk_prob": bool(config.moe.renormalize),
            "router_aux_loss_coef": config.moe.lb_loss_weight,  # recorded only: auxiliary losses are training-only
            "output_router_logits": False,
        })
        if model_type == "olmoe":
            fields["clip_qkv"] = None
    else:
        fields["intermediate_size"] = config.d_ff
    return fields


def map_state_dict(model: Transformer, expert_layout: str = "per_expert") -> dict[str, torch.Tensor]:
    """Our tensors under transformers' names; an ``ExportError`` for any tensor it does not know where to put."""
    config, V = model.config, model.config.vocab_size
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return ours[name]

    out["model.embed_tokens.weight"] = take("embed.wte.weight")[:V]
    if config.over_encoding is not None:
        for name in ("tables.weight", "proj.weight", "proj.bias")[:3 if config.over_encoding.proj_bias else 2]:
            out[f"model.over_encoding.{name}"] = take(f"embed.{name}")
    if config.engram is not None:  # its map and multipliers go to config.json (``engram_fields``)
        # Row-sharded tables' coverage flags (``RowShardedEmbedding``) are training bookkeeping: not exported.
        used.update(name for name in ours if name.startswith("engram.") and (
            name == "engram.compressed_ids" or name.endswith((".multipliers", ".tables.rows_touched"))))
        for name in ours:
            if name.startswith("engram.") and name not in used:
                out[f"model.{name}"] = take(name)
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            out[f"{dst}self_attn.{proj}.weight"] = take(f"{src}attention.{proj}.weight")
        for our_norm, their_norm in _NORM_NAMES[config.block].items():
            out[f"{dst}{their_norm}.weight"] = take(f"{src}{our_norm}.weight")
        if config.moe is None:
            for our_name, their_name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{dst}mlp.{their_name}.weight"] = take(f"{src}feed_forward.{our_name}.weight")
            continue
        out[f"{dst}mlp.gate.weight"] = take(f"{src}feed_forward.router.weight")
        # Ours: x @ w1_EDF[e]. Theirs: F.linear(x, gate_up_proj[e]) with gate_up_proj[e] = [gate; up], (2F, D).
        w1_EDF = take(f"{src}feed_forward.experts.w1_EDF")
        w3_EDF = take(f"{src}feed_forward.experts.w3_EDF")
        w2_EFD = take(f"{src}feed_forward.experts.w2_EFD")
        if expert_layout == "fused":  # transformers 5's own parameters
            out[f"{dst}mlp.experts.gate_up_proj"] = torch.cat([w1_EDF, w3_EDF], dim=2).transpose(1, 2)
            out[f"{dst}mlp.experts.down_proj"] = w2_EFD.transpose(1, 2)
        else:  # one Linear per expert: the published OLMoE files, read by transformers 4 and 5 and by vLLM
            for e in range(config.moe.num_experts):
                out[f"{dst}mlp.experts.{e}.gate_proj.weight"] = w1_EDF[e].T
                out[f"{dst}mlp.experts.{e}.up_proj.weight"] = w3_EDF[e].T
                out[f"{dst}mlp.experts.{e}.down_proj.weight"] = w2_EFD[e].T
    out["model.norm.weight"] = take("norm.weight")
    if is_joint(config):
        out["lm_head.weight"] = take("lm_head.proj.weight")  # (V^n, D): the remote class marginalises it
    elif config.tie_embeddings:
        used.add("lm_head.proj.weight")  # embed.wte.weight itself; tie_word_embeddings restores it
    else:
        out["lm_head.weight"] = take("lm_head.proj.weight")[:V]
    left = [k for k in ours if k not in used and k not in _DROPPED_KEYS and not k.startswith(_DROPPED_PREFIXES)]
    if left:
        raise ExportError(f"the exporter does not know where these tensors go: {left}; extend map_state_dict")
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def export_to_hf(
    model: Transformer,
    out_dir: Union[str, Path],
    *,
    dtype: torch.dtype = torch.float32,
    expert_layout: str = "per_expert",
    eos_token_id: Optional[int] = None,
    bos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    tokenizer_file: Optional[Union[str, Path]] = None,
    eos_token: Optional[str] = None,
    bos_token: Optional[str] = None,
) -> Path:
    """Write ``model`` as a transformers checkpoint folder; returns the folder.

    Args:
        dtype: dtype of the saved weights (fp32 by default, our training dtype).
        expert_layout: 'per_expert' (``mlp.experts.<e>.{gate,up,down}_proj.weight``, the published OLMoE files;
            transformers 5 fuses them while loading) or 'fused' (``mlp.experts.gate_up_proj`` (E, 2F, D) and
            ``down_proj`` (E, D, F), what transformers 5 saves). Remote-code models are always fused.
        eos_token_id / bos_token_id / pad_token_id: written to config.json and generation_config.json.
        tokenizer_file: a ``tokenizers`` JSON shipped beside the weights, with a tokenizer_config.json naming
            ``eos_token`` and ``bos_token`` (default the same), so ``AutoTokenizer`` and lm-eval's ``--model hf``
            find it.
    """
    from safetensors.torch import save_file

    config = model.config
    if expert_layout not in EXPERT_LAYOUTS:
        raise ExportError(f"expert_layout {expert_layout!r} is not one of {EXPERT_LAYOUTS}")
    key = (config.moe is not None, config.block)
    if key not in _NATIVE:
        raise ExportError("model_config.block: a dense model with pre-norm blocks has no transformers class with "
                          "OLMo's QK-norm; only reordered_norm dense models (Olmo2) and MoE models export")
    architecture, model_type = _NATIVE[key]
    remote = config.over_encoding is not None or config.engram is not None or is_joint(config)
    fields = hf_config(config, model_type, architecture)
    fields.update(eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=pad_token_id)
    if remote:
        fields.update(remote_code_fields(config, model_type))
        # transformers converts per-expert files into its fused parameters only for the model types it lists
        # (conversion_mapping.py: olmoe, flex_olmo), not for remote ones, which would load with random experts.
        expert_layout = "fused"
    tensors = {k: v.to(dtype) for k, v in map_state_dict(model, expert_layout).items()}
    if config.engram is not None:
        fields["engram"] = engram_fields(model)
    fields["dtype"] = str(dtype).removeprefix("torch.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_json(out / "config.json", fields)
    generation = {"eos_token_id": eos_token_id, "bos_token_id": bos_token_id, "pad_token_id": pad_token_id}
    write_json(out / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    if remote:
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(REMOTE_CODE_DIR / name, out / name)
    if tokenizer_file is not None:
        if Path(tokenizer_file).resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tokenizer_file, out / "tokenizer.json")
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seq_len,
                            "clean_up_tokenization_spaces": False}
        if eos_token is not None:
            tokenizer_config.update(eos_token=eos_token, bos_token=bos_token or eos_token)
        write_json(out / "tokenizer_config.json", tokenizer_config)
    return out


def remote_code_fields(config: ModelConfig, model_type: str) -> dict:
    """config.json entries of the remote-code classes: their names, the Over-Encoding hash and the joint head."""
    config_class, model_class, remote_type = _REMOTE[model_type]
    fields: dict = {
        "architectures": [model_class],
        "model_type": remote_type,
        "auto_map": {"AutoConfig": f"configuration_overtok.{config_class}",
                     "AutoModelForCausalLM": f"modeling_overtok.{model_class}"},
    }
    if config.over_encoding is not None:
        oe = config.over_encoding
        fields["over_encoding"] = {
            "vocab_size": config.vocab_size, "orders": oe.table_orders(), "moduli": oe.row_counts(),
            "slice_width": oe.slice_width(config.d_model), "eos_id": oe.eos_id if oe.reset_at_eos else None,
            # LongCat NE's options (docs/oe_family.md); Algorithm 1's values are the remote code's defaults.
            "proj_bias": oe.proj_bias, "combine": oe.combine, "scale": oe.scale, "ignore_ids": oe.ignored_token_ids(),
        }
    if is_joint(config):
        fields["joint_head_n"] = config.multi_token.n
    return fields


def engram_fields(model: Transformer) -> dict:
    """config.json's ``engram``: its shape and the integers it hashes with (compressed ids, primes, multipliers)."""
    engram, config = model.engram, model.config
    return {
        "layers": list(engram.config.layers), "max_n": engram.config.max_n, "heads": engram.config.heads,
        "head_width": engram.config.head_width(), "kernel_size": engram.config.kernel_size, "norm_eps": config.norm_eps,
        "pad_id": engram.config.pad_id, "compressed_ids": engram.compressed_ids.tolist(),
        "primes": {str(layer): primes for layer, primes in engram.config.head_primes().items()},
        "multipliers": {name: layer.multipliers.tolist() for name, layer in engram.layers.items()},
    }


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
