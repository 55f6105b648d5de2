"""Engram (``nn.engram``) against a literal, per-position reading of its formulas (docs/engram.md; OE_FAMILY.md §2):
compressed ids, multipliers, primes, hash ids, gate values and outputs; and its place in the model."""

import math
import re
import unicodedata

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from lit_overtok.errors import InputError
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.engram import EngramConfig, layer_multipliers, table_size_for_budget
from lit_overtok.nn.token_compression import compressed_id_map
from lit_overtok.nn.transformer import Transformer

V = 13
INT64 = 2**64


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in token strings."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level(text: str) -> str:
    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in text.encode())


# Token texts: case, accent, width and whitespace variants of one word, whitespace-only tokens, a lone UTF-8 lead byte
# (decodes to U+FFFD), and a special token.
TEXTS = ["<eos>", "Hello", "hello", " hello", "héllo", "ＨＥＬＬＯ", "world", " ", "  ", "\t", "\n\n", "World ", "é", "e"]
LEAD_BYTE = byte_level("é")[0]  # the first byte of a two-byte character on its own


def small_byte_level_tokenizer() -> Tokenizer:
    tokens = [TEXTS[0]] + [byte_level(text) for text in TEXTS[1:]] + [LEAD_BYTE]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([TEXTS[0]])
    return tokenizer


def literal_key(tokenizer: Tokenizer, token_id: int) -> str:
    """OE_FAMILY.md §2.1 read literally, with Python's unicodedata."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" in text:
        return tokenizer.id_to_token(token_id)
    key = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    key = "".join(c for c in key if not unicodedata.combining(c)).lower()
    key = re.sub(r"[ \t\r\n]+", " ", key)
    key = " " if key == " " else key.strip()
    return key or text


def literal_compressed_ids(tokenizer: Tokenizer) -> list[int]:
    first: dict[str, int] = {}
    return [first.setdefault(literal_key(tokenizer, i), len(first)) for i in range(tokenizer.get_vocab_size())]


def test_compressed_ids_merge_case_accent_width_and_whitespace_variants():
    tokenizer = small_byte_level_tokenizer()
    ids = compressed_id_map(tokenizer, len(TEXTS) + 1)
    assert ids == literal_compressed_ids(tokenizer)
    by_text = dict(zip(TEXTS + ["lead byte"], ids))
    assert len({by_text[t] for t in ("Hello", "hello", " hello", "héllo", "ＨＥＬＬＯ")}) == 1
    assert len({by_text[t] for t in (" ", "  ", "\t", "\n\n")}) == 1
    assert by_text["World "] == by_text["world"] != by_text["hello"]
    assert by_text["é"] == by_text["e"]  # accents stripped
    assert by_text["lead byte"] not in (by_text["é"], by_text["e"])  # U+FFFD: keyed by its raw token string
    assert ids[0] == 0 and sorted(set(ids)) == list(range(max(ids) + 1))  # numbered by first occurrence


def test_compressed_ids_of_a_trained_bpe_equal_the_literal_reading(text_corpus):
    tokenizer = Tokenizer.from_file(str(text_corpus / "tokenizer.json"))
    ids = compressed_id_map(tokenizer, tokenizer.get_vocab_size() + 3)
    assert ids[:tokenizer.get_vocab_size()] == literal_compressed_ids(tokenizer)
    assert max(ids) + 1 < len(ids)  # the map does compress this vocabulary
    # Ids beyond the tokenizer's (a padded data vocabulary) keep one compressed id each.
    assert ids[-3:] == [max(ids[:-3]) + 1, max(ids[:-3]) + 2, max(ids[:-3]) + 3]


def literal_next_prime(start: int, used: set[int]) -> int:
    candidate = start + 1
    while any(candidate % d == 0 for d in range(2, math.isqrt(candidate) + 1)) or candidate < 2 or candidate in used:
        candidate += 1
    return candidate


def test_primes_are_distinct_across_the_whole_model():
    config = EngramConfig(layers=[0, 2], max_n=3, table_size=[10, 10], heads=2, ngram_width=4)
    # Layer 0, order 2: 11, 13; order 3 starts again at 10 but 11 and 13 are taken: 17, 19; layer 2 goes on.
    assert config.head_primes() == {0: [11, 13, 17, 19], 2: [23, 29, 31, 37]}
    config = EngramConfig(layers=[1, 3, 4], max_n=4, table_size=[100, 1000, 30], heads=3, ngram_width=6)
    used: set[int] = set()
    for layer in config.layers:
        expected = []
        for size in config.order_table_sizes():
            start = size - 1
            for _ in range(config.heads):
                start = literal_next_prime(start, used)
                used.add(start)
                expected.append(start)
        assert config.head_primes()[layer] == expected


def test_multipliers_follow_the_seed_rule():
    for seed, layer, compressed in ((0, 1, 129280), (7, 15, 8000), (3, 0, 1)):
        bound = max(1, (2**63 - 1) // compressed // 2)
        r = np.random.default_rng(seed + 10007 * layer).integers(0, bound, size=(3,), dtype=np.int64)
        multipliers = layer_multipliers(seed, layer, 3, compressed)
        assert multipliers == [2 * int(x) + 1 for x in r]
        assert all(m % 2 == 1 and m * (compressed - 1) < 2**63 for m in multipliers)


def engram_model(seed=0, **engram) -> Transformer:
    options = dict(layers=[0, 1], max_n=3, table_size=[17, 23], heads=2, ngram_width=8, seed=5, pad_id=3)
    options.update(engram)
    torch.manual_seed(seed)
    config = ModelConfig(preset="tiny", vocab_size=V, init_std=0.3, engram=EngramConfig(**options))
    return Transformer(config).double()


def literal_engram(model: Transformer, layer: int, h_BTD: torch.Tensor, ids_BT: torch.Tensor):
    """§2 steps 3-7, one position and one head at a time; returns (head ids, α, y), y the residual's addend."""
    module, config = model.engram.layers[str(layer)], model.config.engram
    compressed = model.engram.compressed_ids.tolist()
    mu = module.multipliers.tolist()
    primes = config.head_primes()[layer]
    width = config.head_width()
    D = h_BTD.shape[-1]
    B, T = ids_BT.shape
    table = module.tables.weight

    def wrap(value: int) -> int:  # int64 with wraparound
        return (value + 2**63) % INT64 - 2**63

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean() + model.config.norm_eps) * weight

    head_ids = torch.zeros(B, T, len(primes), dtype=torch.long)
    alpha = torch.zeros(B, T, dtype=torch.float64)
    v = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        x = [compressed[i] for i in ids_BT[b].tolist()]
        pad = compressed[config.pad_id]
        for t in range(T):
            pieces, head = [], 0
            for g in range(2, config.max_n + 1):
                mix = 0
                for delta in range(g):
                    token = x[t - delta] if t - delta >= 0 else pad
                    mix = wrap(mix ^ wrap(token * mu[delta]))
                for _ in range(config.heads):
                    p = primes[head]
                    head_ids[b, t, head] = mix % p
                    pieces.append(table[sum(primes[:head]) + mix % p])
                    head += 1
            e = torch.cat(pieces)
            assert e.shape == (config.ngram_width * (config.max_n - 1),) and pieces[0].shape == (width,)
            k = rms(module.key_proj.weight @ e, module.key_norm.weight)
            q = rms(h_BTD[b, t], module.query_norm.weight)
            s = float((k @ q).detach()) / math.sqrt(D)
            alpha[b, t] = 1 / (1 + math.exp(-math.copysign(math.sqrt(max(abs(s), 1e-6)), s)))
            v[b, t] = alpha[b, t] * (module.value_proj.weight @ e)
    y = torch.zeros_like(v)
    kernel = module.conv.weight[:, 0, :]  # (D, kernel_size)
    K = kernel.shape[1]
    for b in range(B):
        u = [rms(v[b, t], module.conv_norm.weight) for t in range(T)]
        for t in range(T):
            # Causal depthwise convolution, dilation max_n: tap j reads u_{t - (K-1-j)·max_n}, zero before the start.
            conv = sum(kernel[:, j] * u[t - (K - 1 - j) * config.max_n] for j in range(K) if t - (K - 1 - j) * config.max_n >= 0)
            y[b, t] = v[b, t] + torch.nn.functional.silu(torch.as_tensor(conv, dtype=torch.float64))
    return head_ids, alpha, y


@pytest.mark.parametrize("options", [dict(), dict(max_n=2, kernel_size=3, heads=1, table_size=19),
                                     dict(max_n=4, table_size=[7, 11, 13], heads=4, ngram_width=8, kernel_size=2)])
def test_every_step_equals_the_literal_reading(options):
    model = engram_model(**options)
    with torch.no_grad():  # a compressed map that merges ids, so the hash sees compressed ids
        model.engram.set_compressed_ids([0, 1, 2, 1, 3, 4, 0, 5, 6, 7, 5, 8, 9])
    generator = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, V, (2, 14), generator=generator)
    h_BTD = torch.randn(2, 14, model.config.d_model, dtype=torch.float64, generator=generator)
    for layer, module in model.engram.layers.items():
        compressed_BT, pad = model.engram.compress(ids_BT)
        head_ids, alpha, y = literal_engram(model, int(layer), h_BTD, ids_BT)
        rows = module.lookup_rows(compressed_BT, pad)
        assert torch.equal(rows - torch.tensor(module.offsets), head_ids)
        e_BTE = module.tables(rows).flatten(2)
        # RMSNorm runs in fp32 whatever the input dtype (``nn.norms``): agreement to fp32 rounding.
        torch.testing.assert_close(module.gate(e_BTE, h_BTD), alpha, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(module(h_BTD, compressed_BT, pad), y, rtol=1e-6, atol=1e-6)
    assert alpha.std() > 0.01  # the gate varies with position: the test would notice a constant


def test_the_model_adds_engram_before_its_blocks():
    model = engram_model(layers=[1])
    ids_BT = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    cos, sin = model.rotary(0, 9)
    x = model.embed(ids_BT)
    for i, block in enumerate(model.blocks):
        if i == 1:
            x = x + literal_engram(model, 1, x.detach(), ids_BT)[2]
        x = block(x, cos, sin)
    torch.testing.assert_close(model.hidden_states(ids_BT), model.norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_sequences_shorter_than_the_window(T):
    model = engram_model(max_n=4, table_size=11)
    ids_BT = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
    h_BTD = torch.randn(2, T, model.config.d_model, dtype=torch.float64)
    module = model.engram.layers["0"]
    compressed_BT, pad = model.engram.compress(ids_BT)
    torch.testing.assert_close(module(h_BTD, compressed_BT, pad), literal_engram(model, 0, h_BTD, ids_BT)[2],
                               rtol=1e-6, atol=1e-6)


def test_table_size_for_budget_matches_an_oe_arm():
    from lit_overtok.nn.over_encoding import OverEncodingConfig

    oe = OverEncodingConfig(m=131071, n=3, k=1)
    budget = sum(oe.row_counts()) * oe.slice_width(128)
    size = table_size_for_budget(budget, 1, max_n=3, heads=4, ngram_width=64)
    params = EngramConfig(layers=[1], table_size=size).table_parameters()
    assert params <= budget < EngramConfig(layers=[1], table_size=size + 1).table_parameters()
    assert abs(params - budget) / budget < 1e-3


def test_missing_map_is_a_clear_error_and_a_checkpoint_supplies_it(tmp_path):
    config = ModelConfig(preset="tiny", vocab_size=V, engram=EngramConfig(layers=[0], table_size=11,
                                                                       tokenizer=str(tmp_path / "absent.json")))
    model = Transformer(config)
    with pytest.raises(InputError, match="model_config.engram.tokenizer"):
        model(torch.zeros(1, 3, dtype=torch.long))
    trained = Transformer(config.replace(engram=EngramConfig(layers=[0], table_size=11)))
    model.load_state_dict(trained.state_dict())
    assert torch.equal(model(torch.arange(5)[None]), trained(torch.arange(5)[None]))


@pytest.mark.parametrize("field,value", [("layers", [2]), ("layers", [1, 0]), ("heads", 3), ("max_n", 1),
                                         ("table_size", [5]), ("pad_id", V)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(InputError, match=f"model_config.engram.{field}"):
        ModelConfig(preset="tiny", vocab_size=V, engram={"table_size": 11, field: value})


def test_counts_put_the_tables_with_the_embeddings_and_the_projections_in_the_flops():
    from lit_overtok.nn.counts import flops_per_token, parameter_counts

    engram = EngramConfig(layers=[0, 1], table_size=[17, 23], heads=2, ngram_width=8)
    plain = ModelConfig(preset="tiny", vocab_size=V)
    with_memory = plain.replace(engram=engram)
    tables = engram.table_parameters()
    assert tables == sum(p for primes in engram.head_primes().values() for p in primes) * 4
    D, E = plain.d_model, engram.memory_width()
    # Per layer: W_k and W_v (E -> D), three RMSNorm gains, a depthwise conv of kernel 4.
    other = len(engram.layers) * (2 * E * D + 3 * D + 4 * D)
    counts, base = parameter_counts(with_memory), parameter_counts(plain)
    assert counts.total - base.total == tables + other
    assert counts.embedding - base.embedding == tables and counts.active == counts.total
    assert flops_per_token(with_memory, 32) - flops_per_token(plain, 32) == 6 * other


def test_sharded_tables_at_world_size_one_train_as_the_whole_tables_holding_the_same_global_table():
    """``engram.sharded`` without a process group: one block of every row, drawn by row chunks (the rule that makes
    the global table the same at every world size), gives the outputs and table gradients of replicated tables
    holding that table; the counts are the whole tables either way."""
    from lit_overtok.nn.counts import parameter_counts
    from lit_overtok.nn.sharded_table import place_sharded_tables, RowShardedEmbedding, trunc_normal_rows_

    engram = EngramConfig(layers=[0, 1], table_size=[17, 23], heads=2, ngram_width=8, sparse=True, sharded=True)
    config = ModelConfig(preset="tiny", vocab_size=V, init_std=0.3, engram=engram)
    whole_config = config.replace(engram=EngramConfig(**{**engram.__dict__, "sharded": False}))
    assert parameter_counts(config) == parameter_counts(whole_config)
    sharded, whole = Transformer(config), Transformer(whole_config)
    place_sharded_tables(sharded)
    for name, layer in sharded.engram.layers.items():
        table = layer.tables
        assert isinstance(table, RowShardedEmbedding) and (table.world, table.weight.shape[0]) == (1, table.num_rows)
        drawn = torch.empty(table.num_rows, table.width)
        trunc_normal_rows_(drawn, 0, table.num_rows, 0.3, table.initial_draw[1])
        assert torch.equal(table.weight, drawn)
        whole.engram.layers[name].tables.weight.data.copy_(table.weight)
    whole_state = whole.state_dict()
    for key, value in sharded.state_dict().items():  # every other parameter is drawn by its name in either mode
        if not key.endswith("tables.rows_touched"):
            assert torch.equal(value, whole_state[key]), key
    ids_BT = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(4))
    losses = [model.loss(ids_BT, ids_BT.roll(-1, 1))[0] for model in (sharded, whole)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for loss in losses:
        loss.backward()
    for name, layer in sharded.engram.layers.items():
        grad, expected = layer.tables.weight.grad, whole.engram.layers[name].tables.weight.grad
        assert grad.is_sparse and expected.is_sparse
        torch.testing.assert_close(grad.to_dense(), expected.to_dense(), rtol=1e-6, atol=1e-7)
