"""KV-cached generation (``nn.generation``) equals full recomputation for every model family, from any prompt length."""

import pytest
import torch

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.generation import generate
from lit_overtok.nn.heads import MultiTokenConfig
from lit_overtok.nn.transformer import Transformer

V = 13
OE = dict(m=40, n=3, k=2)
# Two Engram layers: the conv window (2 x 3 = 6 past inputs) is longer than the shortest prompts.
ENGRAM = dict(layers=[0, 1], max_n=3, table_size=[17, 23], heads=2, ngram_width=8, pad_id=2)
FAMILIES = {
    "dense": dict(),
    "oe": dict(over_encoding=OE),
    "oe_n5_reset_at_eos": dict(over_encoding=dict(m=41, n=5, k=1, reset_at_eos=True, eos_id=3)),
    # LongCat NE: ignored ids (3, 5, 6 of 13, frequent in these prompts and continuations) cut the n-gram history
    # that the cached steps' embeddings read.
    "ne_ignore_ids": dict(over_encoding=dict(m=40, n=5, k=1, flavor="longcat", combine="sqrt", scale=2.0,
                                             ignore_ids=[3, "5:7"])),
    "od_product": dict(multi_token=MultiTokenConfig(mode="od", n=3)),
    "od_joint": dict(multi_token=MultiTokenConfig(mode="joint", n=2)),
    "mtp_ds": dict(multi_token=MultiTokenConfig(mode="mtp_ds", n=2)),
    "ot": dict(over_encoding=OE, multi_token=MultiTokenConfig(mode="mtp_ds", n=2)),
    "moe": dict(preset="moe-tiny"),
    "moe_oe": dict(preset="moe-tiny", over_encoding=OE),
    "moe_ne": dict(preset="moe-tiny", over_encoding=dict(m=40, n=3, k=2, flavor="longcat", combine="unigram_full",
                                                         ignore_ids=[4])),
    "engram": dict(engram=ENGRAM),
    "engram_n4_kernel2": dict(engram=dict(ENGRAM, max_n=4, table_size=11, kernel_size=2, layers=[1])),
    "moe_engram": dict(preset="moe-tiny", engram=ENGRAM),
}


@pytest.mark.filterwarnings("ignore:MoE falls back to the per-expert loop")  # float64 has no grouped matmul on CPU
@pytest.mark.parametrize("prompt_len", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_greedy_generation_equals_step_by_step_recomputation(family, prompt_len):
    # A 1-token prompt (BOS, as cfg_generation and val/cfg_gen_acc start) is shorter than the n-gram order: the
    # Over-Encoding lookup must still return one position per token, or the cache is filled at the wrong places.
    options = {"preset": "tiny", **FAMILIES[family]}
    torch.manual_seed(0)
    # Float64 and a wide init: peaked logits whose argmax no rounding difference between the two paths can flip.
    model = Transformer(ModelConfig(vocab_size=V, init_std=0.3, **options)).double().eval()
    prompt_BT = torch.randint(0, V, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    cached = generate(model, prompt_BT, 12, temperature=0)
    ids_BT = prompt_BT
    for _ in range(12):
        ids_BT = torch.cat([ids_BT, model(ids_BT)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids_BT)
    assert ids_BT[:, prompt_len:].unique().numel() > 1  # the continuation is not a constant the bug could also give
    ignored = model.embed.ignored_ids if model.config.over_encoding is not None else []
    if ignored:  # the case this family is here for: an ignored id in the generated history
        assert torch.isin(ids_BT[:, :-1], torch.tensor(ignored)).any()
