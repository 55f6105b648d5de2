"""Exported transformers checkpoints give our next-token logits (fp32), for every family the exporter maps.

Weights are drawn wider than the training init (std 0.1; norm gains and the OE bias away from their init) so that
the logits are O(1) and a mapping error (a transposed matrix, swapped norms, a missing bias) cannot hide. The MoE
residue (~6e-7) is summation order in transformers' expert loop; dense and OE paths are bit-identical.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lit_overtok.export.hf import ExportError, export_to_hf, REMOTE_CODE_FILES
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.heads import MultiTokenConfig
from lit_overtok.nn.over_encoding import OverEncodingConfig
from lit_overtok.nn.sharded_table import place_sharded_tables
from lit_overtok.nn.transformer import Transformer

TOLERANCE = 1e-5


def build(preset: str, vocab_size: int = 61, **fields) -> Transformer:
    torch.manual_seed(0)
    fields.setdefault("vocab_pad_multiple", 8)  # 61 -> 64 rows: the export must drop the padding
    model = Transformer(ModelConfig(preset=preset, vocab_size=vocab_size, init_std=0.1, **fields))
    place_sharded_tables(model)  # row-sharded tables, whole here (no process group)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    if model.engram is not None:  # a map that merges ids (pairs), as a tokenizer's does: the export must carry it
        model.engram.set_compressed_ids([i // 2 for i in range(vocab_size)])
    return model.eval()


OE = dict(over_encoding=OverEncodingConfig(m=97, n=3, k=2))
# LongCat's N-gram Embedding with every option away from Algorithm 1 (ids 3, 5 and 6 ignored).
NE = dict(over_encoding=OverEncodingConfig(m=96, n=3, k=2, flavor="longcat", combine="sqrt", scale=2.5,
                                           ignore_ids=[3, "5:7"]))
ENGRAM = dict(engram=dict(layers=[0, 1], table_size=[31, 37], heads=2, ngram_width=8, pad_id=2))
# OLMo2's blocks around OLMoE's experts (the MoE presets are OLMoE's pre-norm blocks): FlexOlmo.
FLEX = dict(block="reordered_norm", rope_theta=500_000.0, norm_eps=1e-6)
CASES = {
    # name: (builder kwargs, export kwargs, transformers class)
    "dense": (dict(preset="tiny"), {}, "Olmo2ForCausalLM"),
    "dense_tied": (dict(preset="tiny", tie_embeddings=True), {}, "Olmo2ForCausalLM"),
    "dense_od_heads_dropped": (dict(preset="tiny", multi_token=MultiTokenConfig(mode="od", n=3)), {}, "Olmo2ForCausalLM"),
    "dense_mtp_ds_dropped": (dict(preset="tiny", multi_token=MultiTokenConfig(mode="mtp_ds", n=2)), {}, "Olmo2ForCausalLM"),
    "moe_reordered_norm": (dict(preset="moe-tiny", **FLEX), {}, "FlexOlmoForCausalLM"),
    "moe_reordered_norm_fused": (dict(preset="moe-tiny", **FLEX), dict(expert_layout="fused"), "FlexOlmoForCausalLM"),
    # Renormalising the top-k scores scales a token's FFN output by one number, which a reordered (output) norm
    # removes; under pre-norm it matters, so that is where the mapping to norm_topk_prob is tested.
    "moe_pre_norm_olmoe_renormalized": (dict(preset="moe-tiny", moe=dict(renormalize=True)), {}, "OlmoeForCausalLM"),
    "moe_pre_norm_olmoe": (dict(preset="moe-tiny"), {}, "OlmoeForCausalLM"),
    "oe_dense": (dict(preset="tiny", tie_embeddings=True, **OE), {}, "OverTokOlmo2ForCausalLM"),
    "oe_moe_reordered_norm": (dict(preset="moe-tiny", **FLEX, over_encoding=OverEncodingConfig(m=101, n=5, k=1)), {},
                              "OverTokFlexOlmoForCausalLM"),
    "oe_moe_pre_norm_reset_at_eos": (
        dict(preset="moe-tiny", over_encoding=OverEncodingConfig(m=97, n=3, k=2, reset_at_eos=True, eos_id=3)),
        {}, "OverTokOlmoeForCausalLM"),
    "ne_dense": (dict(preset="tiny", tie_embeddings=True, **NE), {}, "OverTokOlmo2ForCausalLM"),
    "ne_moe_pre_norm_unigram_full": (
        dict(preset="moe-tiny", over_encoding=OverEncodingConfig(m=100, n=5, k=1, flavor="longcat", combine="unigram_full",
                                                                 ignore_ids=[3])), {}, "OverTokOlmoeForCausalLM"),
    "engram_dense": (dict(preset="tiny", **ENGRAM), {}, "OverTokOlmo2ForCausalLM"),
    # Row-sharded tables (a sharded run's checkpoint): the whole weight is exported, the coverage flags are not.
    "engram_sharded_dense": (dict(preset="tiny", engram={**ENGRAM["engram"], "sharded": True, "sparse": True}), {},
                             "OverTokOlmo2ForCausalLM"),
    "engram_n4_moe_pre_norm": (dict(preset="moe-tiny", engram=dict(layers=[1], max_n=4, table_size=23, kernel_size=2)),
                               {}, "OverTokOlmoeForCausalLM"),
    "engram_oe_moe_reordered_norm": (dict(preset="moe-tiny", **FLEX, **OE, **ENGRAM), {}, "OverTokFlexOlmoForCausalLM"),
    "joint_head": (dict(preset="tiny", vocab_size=7, vocab_pad_multiple=1, multi_token=MultiTokenConfig(mode="joint", n=2)),
                   {}, "OverTokOlmo2ForCausalLM"),
    "oe_exact_joint_head": (dict(preset="tiny", vocab_size=7, vocab_pad_multiple=1, multi_token=MultiTokenConfig(mode="joint", n=3),
                                 over_encoding=OverEncodingConfig(m=343, n=3, k=1)), {}, "OverTokOlmo2ForCausalLM"),
}


def load(path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_ours(name, tmp_path):
    build_kwargs, export_kwargs, class_name = CASES[name]
    ours = build(**build_kwargs)
    folder = export_to_hf(ours, tmp_path / name, **export_kwargs)
    config = json.loads((folder / "config.json").read_text())
    remote = "auto_map" in config
    theirs = load(folder, trust_remote_code=remote)
    assert type(theirs).__name__ == class_name
    V = ours.config.vocab_size
    ids_BT = torch.randint(0, V, (3, 24), generator=torch.Generator().manual_seed(2))
    if ours.config.over_encoding is not None and ours.config.over_encoding.reset_at_eos:
        ids_BT[:, [5, 6, 15]] = ours.config.over_encoding.eos_id
    if ours.config.over_encoding is not None and ours.config.over_encoding.ignore_ids:
        ids_BT[:, [0, 5, 6, 15]] = ours.config.over_encoding.ignored_token_ids()[-1]  # at the start, adjacent, alone
    with torch.no_grad():
        ours_BTV, theirs_BTV = ours(ids_BT), theirs(ids_BT).logits
    assert theirs_BTV.shape == ours_BTV.shape == (3, 24, V)
    delta = (ours_BTV.float() - theirs_BTV.float()).abs().max().item()
    print(f"\n{name:34s} {class_name:28s} max|logit| {ours_BTV.abs().max().item():7.3f}  max|Δlogit| {delta:.2e}")
    assert delta <= TOLERANCE


@pytest.mark.parametrize("memory", [OE, ENGRAM, {**OE, **ENGRAM}, NE], ids=["oe", "engram", "oe_engram", "ne"])
def test_oe_generation_with_kv_cache_equals_full_recomputation(tmp_path, memory):
    """transformers' generate() (KV cache) on an exported OE or Engram model takes the same greedy tokens as our model
    recomputing the whole sequence; a 1-token prompt (n-gram history shorter than n-1) included. Engram's
    convolution reads (4 - 1)·3 = 9 earlier positions: the cache must carry them. NE: with ignored ids in the
    prompt, whose cut of the n-gram history the cached steps must see."""
    ours = build("tiny", **memory)
    theirs = load(export_to_hf(ours, tmp_path / "oe"), trust_remote_code=True)
    for prompt_length in (1, 2, 5):
        prompt_BT = torch.randint(0, 61, (2, prompt_length), generator=torch.Generator().manual_seed(prompt_length))
        if memory is NE:
            prompt_BT[:, -1] = 5  # the first generated token's 2- and 3-grams start after it
        with torch.no_grad():
            generated_BT = theirs.generate(prompt_BT, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
            uncached_BT = theirs.generate(prompt_BT, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                          pad_token_id=0, use_cache=False)
            # Ours, recomputing from scratch at every step. Its prefix logits are read from a sequence of at least
            # n-1 tokens: before issue 11 item 1's fix, a T < n-1 input mis-shifted the n-gram ids.
            reference_BT = prompt_BT
            for _ in range(8):
                padded_BT = torch.cat([reference_BT, torch.zeros(2, 2, dtype=torch.long)], dim=1)
                next_B = ours(padded_BT)[:, reference_BT.shape[1] - 1].argmax(-1)
                reference_BT = torch.cat([reference_BT, next_B[:, None]], dim=1)
        assert torch.equal(generated_BT, uncached_BT)
        assert torch.equal(generated_BT, reference_BT)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_oe_sequences_shorter_than_the_ngram_order(n, tmp_path):
    """Every length T = 1..n+1 against ours read off a longer sequence (causal, so position t sees only ids <= t).
    The exported code handles T < n-1 directly (ours does once issue 11 item 1 lands)."""
    ours = build("tiny", over_encoding=OverEncodingConfig(m=97, n=n, k=1 if n != 3 else 2))
    theirs = load(export_to_hf(ours, tmp_path / f"oe{n}"), trust_remote_code=True)
    ids_BT = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        full_BTV = ours(ids_BT)
        for T in range(1, n + 2):
            assert (theirs(ids_BT[:, :T]).logits - full_BTV[:, :T]).abs().max().item() <= TOLERANCE, T


def test_oe_beam_search_with_cache_equals_without(tmp_path):
    """Beam search reorders the KV cache between steps; the n-gram history must follow (generate passes the
    reordered ids as history_ids)."""
    theirs = load(export_to_hf(build("tiny", **OE), tmp_path / "oe"), trust_remote_code=True)
    prompt_BT = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(4))
    settings = dict(max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(theirs.generate(prompt_BT, **settings), theirs.generate(prompt_BT, use_cache=False, **settings))


def test_the_parity_check_sees_the_block_type(tmp_path):
    """Negative control: a reordered-norm MoE's weights written as OLMoE (pre-norm) are far off, as issue 11 item 7
    found."""
    ours = build("moe-tiny", **FLEX)
    pre_norm_twin = Transformer(ModelConfig(preset="moe-tiny", vocab_size=61, vocab_pad_multiple=8, rope_theta=500_000.0,
                                            norm_eps=1e-6))
    pre_norm_twin.load_state_dict(ours.state_dict())
    theirs = load(export_to_hf(pre_norm_twin, tmp_path / "wrong"))
    ids_BT = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        delta = (ours(ids_BT) - theirs(ids_BT).logits).abs().max().item()
    print(f"\nreordered-norm MoE loaded as OlmoeForCausalLM (wrong block): max|Δlogit| {delta:.2f}")
    assert delta > 0.1


def test_bf16_export_loads_in_bf16(tmp_path):
    ours = build("moe-tiny", **dict(over_encoding=OverEncodingConfig(m=101, n=5, k=1)))
    theirs = load(export_to_hf(ours, tmp_path / "bf16", dtype=torch.bfloat16), trust_remote_code=True)
    assert theirs.dtype == torch.bfloat16
    ids_BT = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        delta = (ours(ids_BT) - theirs(ids_BT).logits.float()).abs().max().item()
    print(f"\nbf16 export (bf16 weights and compute) vs ours in fp32: max|Δlogit| {delta:.3f}")
    assert delta < 0.5  # bf16 rounding only; no layout error (those give O(1) differences)


@pytest.mark.parametrize("flavor", ["paper", "longcat"])
def test_oe_hand_written_decoding_loop_reuses_the_returned_cache(flavor, tmp_path):
    ignore = dict(ignore_ids=[7, 9]) if flavor == "longcat" else {}
    ours = build("moe-tiny", over_encoding=OverEncodingConfig(m=101, n=5, k=1, flavor=flavor, **ignore))
    theirs = load(export_to_hf(ours, tmp_path / "oe"), trust_remote_code=True)
    ids_BT = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    if ignore:
        ids_BT[0, [1, 6]], ids_BT[1, [4, 5]] = 7, 9  # inside the prefill, and within n-1 of later steps
    with torch.no_grad():
        full_BTV = ours(ids_BT)
        out = theirs(ids_BT[:, :2], use_cache=True)  # a prefill shorter than the n-gram order
        steps = [out.logits]
        for t in range(2, 12):
            out = theirs(ids_BT[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        stepwise_BTV = torch.cat(steps, dim=1)
        # The same through an explicit history_ids.
        out = theirs(ids_BT[:, :7], use_cache=True)
        tail = theirs(ids_BT[:, 7:8], cache=out.cache, use_cache=True, history_ids=ids_BT[:, :8]).logits
    assert (stepwise_BTV - full_BTV).abs().max().item() <= TOLERANCE
    assert (tail[:, 0] - full_BTV[:, 7]).abs().max().item() <= TOLERANCE
    with pytest.raises(ValueError, match="history_ids"):
        theirs(ids_BT[:, 7:8], cache=out.cache, use_cache=True, history_ids=ids_BT[:, :5])


def test_config_records_the_published_hyperparameters(tmp_path):
    ours = build("moe-tiny")
    config = json.loads((export_to_hf(ours, tmp_path / "x", eos_token_id=4) / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["rms_norm_eps"] == 1e-5
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert (config["num_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (4, 2, 16)
    assert config["norm_topk_prob"] is False and config["vocab_size"] == 61 and config["eos_token_id"] == 4


def test_unknown_tensors_and_unmappable_models_are_refused(tmp_path):
    with pytest.raises(ExportError, match="model_config.block"):
        export_to_hf(build("tiny", block="pre_norm"), tmp_path / "a")
    ours = build("tiny")
    ours.blocks[0].extra_scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ExportError, match="blocks.0.extra_scale"):
        export_to_hf(ours, tmp_path / "b")


def test_remote_code_is_self_contained(tmp_path):
    """The bundled files import torch and transformers only (plus each other): never lit_overtok."""
    folder = export_to_hf(build("tiny", **OE), tmp_path / "oe")
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((folder / name).read_text())
        modules = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                   for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for alias in node.names}
        roots = {(m or "").split(".")[0] for m in modules}
        assert roots <= {"__future__", "typing", "torch", "transformers", "configuration_overtok", ""}, (name, roots)
