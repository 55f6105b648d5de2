"""Over-Encoding: parity with a straightforward Algorithm 1, index arithmetic, causality, options, baseline identity."""

import glob
import itertools
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from torch import nn

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts, flops_per_token
from lit_overtok.nn.transformer import Transformer
from lit_overtok.optim.config import OptimizerConfig
from lit_overtok.optim.groups import parameter_groups
from lit_overtok.nn.over_encoding import hash_constants, ngram_table_indices, OverEncoding, OverEncodingConfig

V = 13


def oe_config(m=40, n=3, k=2, **options) -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=V, over_encoding=OverEncodingConfig(m=m, n=n, k=k, **options))


class ReferenceOverEncoding(nn.Module):
    """Algorithm 1 of the paper, written out literally: one embedding and one linear per table, a loop per order."""

    def __init__(self, vocab_size: int, d_model: int, m: int, n: int, k: int) -> None:
        super().__init__()
        self.V, self.m, self.n, self.k = vocab_size, m, n, k
        width = d_model // (k * (n - 1))
        self.wte = nn.Embedding(vocab_size, d_model)
        self.oe_embedders = nn.ModuleList(nn.Embedding(m + 2 * i, width) for i in range(k * (n - 1)))
        self.oe_projs = nn.ModuleList(nn.Linear(width, d_model) for _ in range(k * (n - 1)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for i in range(2, self.n + 1):
            # h_i(t) = x_t + x_{t-1}·V + ... + x_{t-i+1}·V^(i-1), one position at a time, ids before the start 0
            # (small V and n here: the plain formula cannot overflow).
            gram = torch.stack([sum(ids[:, t - r] * self.V**r for r in range(i) if t - r >= 0)
                                for t in range(ids.shape[1])], dim=1)
            for j in range(self.k):
                idx = (i - 2) * self.k + j
                x = x + self.oe_projs[idx](self.oe_embedders[idx](gram % (self.m + 2 * idx)))
        return x / (1 + self.k * (self.n - 1))


def fast_and_reference(m, n, k, sparse=False, d_model=32):
    torch.manual_seed(0)
    config = ModelConfig(preset="tiny", vocab_size=V, d_model=d_model,
                      over_encoding=OverEncodingConfig(m=m, n=n, k=k, sparse=sparse))
    fast = OverEncoding(config.over_encoding, config.vocab_size, config.padded_vocab_size, config.d_model).double()
    ref = ReferenceOverEncoding(V, config.d_model, m, n, k).double()
    width = config.d_model // (k * (n - 1))
    with torch.no_grad():
        fast.wte.weight.copy_(ref.wte.weight)
        for i, (table, proj) in enumerate(zip(ref.oe_embedders, ref.oe_projs)):
            fast.tables.weight[fast.offsets[i]: fast.offsets[i] + table.num_embeddings] = table.weight
            fast.proj.weight[:, i * width: (i + 1) * width] = proj.weight
        fast.proj.bias.copy_(sum(p.bias for p in ref.oe_projs))
    return fast, ref, width


@pytest.mark.parametrize("m,n,k,sparse", [(40, 3, 2, False), (23, 5, 1, False), (40, 3, 2, True), (8, 2, 4, False)])
def test_fast_module_equals_algorithm_1_forward_and_backward(m, n, k, sparse):
    fast, ref, width = fast_and_reference(m, n, k, sparse)
    ids_BT = torch.randint(0, V, (3, 11))
    target_BTD = torch.randn(3, 11, 32, dtype=torch.float64)
    out_fast, out_ref = fast(ids_BT), ref(ids_BT)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-12, atol=1e-12)
    (out_fast * target_BTD).sum().backward()
    (out_ref * target_BTD).sum().backward()
    torch.testing.assert_close(fast.wte.weight.grad, ref.wte.weight.grad)
    table_grad = fast.tables.weight.grad
    assert table_grad.is_sparse == sparse
    table_grad = table_grad.to_dense()
    for i, (table, proj) in enumerate(zip(ref.oe_embedders, ref.oe_projs)):
        rows = slice(fast.offsets[i], fast.offsets[i] + table.num_embeddings)
        torch.testing.assert_close(table_grad[rows], table.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast.proj.weight.grad[:, i * width: (i + 1) * width], proj.weight.grad)
        torch.testing.assert_close(fast.proj.bias.grad, proj.bias.grad)  # the summed bias feeds every slice
    assert table_grad.abs().sum() > 0


@pytest.mark.parametrize("n,T", [(n, T) for n in range(2, 6) for T in range(1, n + 2)])
def test_sequences_shorter_than_n_equal_algorithm_1(n, T):
    # A sequence shorter than the n-gram order (a 1-token prompt in generation) has only zeros before its start;
    # slicing ids[:, :T - r] with r > T once counted from the end and returned extra positions or raised.
    fast, ref, _ = fast_and_reference(23, n, 1, d_model=48)  # 48: divisible by k(n-1) for every n here
    ids_BT = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(n * 10 + T))
    target_BTD = torch.randn(2, T, 48, dtype=torch.float64)
    out_fast, out_ref = fast(ids_BT), ref(ids_BT)
    assert out_fast.shape == (2, T, 48)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-12, atol=1e-12)
    (out_fast * target_BTD).sum().backward()
    (out_ref * target_BTD).sum().backward()
    for i, table in enumerate(ref.oe_embedders):
        rows = slice(fast.offsets[i], fast.offsets[i] + table.num_embeddings)
        torch.testing.assert_close(fast.tables.weight.grad[rows], table.weight.grad, rtol=1e-12, atol=1e-12)


def test_indices_by_hand():
    # V = 13, table 0 of order 2 and table 1 of order 3, moduli 40 and 42; ids 5, 7, 2.
    coef, moduli = hash_constants(V, [2, 3], [40, 42], torch.device("cpu"))
    index = ngram_table_indices(torch.tensor([[5, 7, 2]]), coef, moduli)
    assert index[0].tolist() == [[5 % 40, 5 % 42], [(7 + 5 * 13) % 40, (7 + 5 * 13) % 42],
                                 [(2 + 7 * 13) % 40, (2 + 7 * 13 + 5 * 169) % 42]]


@pytest.mark.parametrize("n,vocab,m", [(6, 200_000, 1_000_000_007), (5, 100_278, 12_800_001), (8, 50_280, 2**40 + 15)])
def test_no_overflow_for_large_n_and_vocabulary(n, vocab, m):
    k = 2
    oe = OverEncodingConfig(m=m, n=n, k=k)
    oe.validate(d_model=k * (n - 1) * 8, vocab_size=vocab)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab - 50, vocab, (2, 12), generator=generator)  # large ids: the worst case
    ids[0, 4] = 0
    coef, moduli = hash_constants(vocab, oe.table_orders(), oe.row_counts(), torch.device("cpu"))
    index = ngram_table_indices(ids, coef, moduli)
    for b, t in itertools.product(range(2), range(12)):
        for i, (order, rows) in enumerate(zip(oe.table_orders(), oe.row_counts())):
            gram = sum((ids[b, t - r].item() if t - r >= 0 else 0) * vocab**r for r in range(order))  # exact
            assert index[b, t, i].item() == gram % rows


def test_indices_are_identical_in_another_process():
    oe = OverEncodingConfig(m=1_000_003, n=4, k=2)
    ids = torch.arange(40).view(2, 20) * 4_999 % 50_000
    coef, moduli = hash_constants(50_000, oe.table_orders(), oe.row_counts(), torch.device("cpu"))
    here = ngram_table_indices(ids, coef, moduli)
    code = (
        "import torch\nfrom lit_overtok.nn.over_encoding import hash_constants, ngram_table_indices, OverEncodingConfig\n"
        "oe = OverEncodingConfig(m=1_000_003, n=4, k=2)\nids = torch.arange(40).view(2, 20) * 4_999 % 50_000\n"
        "coef, moduli = hash_constants(50_000, oe.table_orders(), oe.row_counts(), torch.device('cpu'))\n"
        "print(ngram_table_indices(ids, coef, moduli).flatten().tolist())\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert eval(out.stdout) == here.flatten().tolist()


def test_exact_tables_when_m_covers_every_ngram():
    vocab, n = 5, 3
    oe = OverEncodingConfig(m=vocab**n, n=n, k=2)
    coef, moduli = hash_constants(vocab, oe.table_orders(), oe.row_counts(), torch.device("cpu"))
    # Every 3-gram of the vocabulary as the last three tokens of a row (first token fixed to 0 before them).
    grams = torch.tensor(list(itertools.product(range(vocab), repeat=n)))
    index = ngram_table_indices(grams, coef, moduli)[:, -1]
    for i, order in enumerate(oe.table_orders()):
        # Distinct g-grams get distinct rows: the row is the exact g-gram id.
        exact = sum(grams[:, n - 1 - r] * vocab**r for r in range(order))
        assert torch.equal(index[:, i], exact)
        assert index[:, i].unique().numel() == vocab**order
    # A table smaller than V^n must collide (so the check above can fail).
    coef, moduli = hash_constants(vocab, [3], [vocab**n - 2], torch.device("cpu"))
    assert ngram_table_indices(grams, coef, moduli)[:, -1].unique().numel() < vocab**n


@pytest.mark.parametrize("reset", [False, True])
def test_causality(reset):
    torch.manual_seed(0)
    model = Transformer(oe_config(reset_at_eos=reset, eos_id=3))
    ids_BT = torch.randint(0, V, (2, 20))
    ids_BT[:, 6] = 3
    changed_BT = ids_BT.clone()
    changed_BT[:, 12:] = torch.randint(0, V, (2, 8))
    before, after = model(ids_BT), model(changed_BT)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_reset_at_eos_makes_a_document_independent_of_the_previous_one():
    oe = OverEncodingConfig(m=1000, n=3, k=1)
    coef, moduli = hash_constants(V, oe.table_orders(), oe.row_counts(), torch.device("cpu"))
    eos = 3
    doc = [0, 5, 6, 7, eos]
    first = torch.tensor([[9, 8, eos] + doc])
    alone = torch.tensor([doc])
    with_reset = ngram_table_indices(first, coef, moduli, eos_id=eos)
    assert torch.equal(with_reset[:, 3:], ngram_table_indices(alone, coef, moduli))
    # The EOS itself still belongs to the document it closes.
    assert with_reset[0, 2].tolist() == [(eos + 8 * V) % 1000, (eos + 8 * V + 9 * V * V) % 1002]
    without = ngram_table_indices(first, coef, moduli)
    assert not torch.equal(without[:, 3:], ngram_table_indices(alone, coef, moduli))


def test_oe_off_is_bit_identical_to_the_baseline():
    torch.manual_seed(7)
    baseline = Transformer(ModelConfig(preset="tiny", vocab_size=V))
    torch.manual_seed(7)
    switched_off = Transformer(ModelConfig(**{**oe_config().__dict__, "over_encoding": None}))
    torch.manual_seed(7)
    with_oe = Transformer(oe_config())
    ids_BT = torch.randint(0, V, (2, 9))
    assert baseline.state_dict().keys() == switched_off.state_dict().keys()
    for name, value in baseline.state_dict().items():
        assert torch.equal(value, switched_off.state_dict()[name])
        # Adding OE changes no other parameter's initial value (per-name init), so runs compare like with like.
        assert torch.equal(value, with_oe.state_dict()[name]), name
    assert torch.equal(baseline(ids_BT), switched_off(ids_BT))


def test_tied_table_and_parameter_accounting():
    config = ModelConfig(preset="tiny", vocab_size=V, tie_embeddings=True, over_encoding=OverEncodingConfig(m=1000, n=3, k=2))
    model = Transformer(config)
    assert model.lm_head.proj.weight is model.embed.wte.weight
    counts, base = parameter_counts(config), parameter_counts(config.replace(over_encoding=None))
    d = config.d_model
    tables = sum(rows * d // 4 for rows in (1000, 1002, 1004, 1006))
    assert counts.embedding - base.embedding == tables  # OE-m: about m·D table parameters
    assert abs(tables - 1000 * d) / (1000 * d) < 0.01
    assert counts.non_embedding - base.non_embedding == d * d + d  # the projections are dense matmul weights
    assert flops_per_token(config, 16) - flops_per_token(config.replace(over_encoding=None), 16) == 6 * (d * d + d)


def test_tables_get_their_own_optimizer_group():
    model = Transformer(oe_config())
    groups = {g["name"]: g for g in parameter_groups(model, OptimizerConfig(groups={"over_encoding": {"lr_multiplier": 0.5}}))}
    assert [p is model.embed.tables.weight for p in groups["over_encoding"]["params"]] == [True]
    assert groups["over_encoding"]["lr_multiplier"] == 0.5 and groups["over_encoding"]["weight_decay"] == 0.0
    assert any(p is model.embed.proj.weight for p in groups["decay"]["params"])
    default = {g["name"]: g for g in parameter_groups(model, OptimizerConfig())}["over_encoding"]
    assert (default["lr_multiplier"], default["weight_decay"]) == (1.0, 0.0)  # as the baseline's embedding


def test_coverage_counts_rows_touched_in_training_only():
    model = Transformer(oe_config(m=1000, k=1))
    ids_BT = torch.zeros(1, 4, dtype=torch.long)
    model.eval()
    model(ids_BT)
    assert all(v == 0 for v in model.embed.training_metrics().values())
    model.train()
    model(ids_BT)  # all-zero ids: the 2-gram and 3-gram id is 0 everywhere, one row per table
    metrics = model.embed.training_metrics()
    assert set(metrics) == {"oe/coverage_2gram_0", "oe/coverage_3gram_0"}
    assert metrics["oe/coverage_2gram_0"].item() == pytest.approx(1 / 1000)
    assert metrics["oe/coverage_3gram_0"].item() == pytest.approx(1 / 1002)


@pytest.mark.parametrize("changes,message", [
    (dict(k=3), r"k·\(n-1\)"),
    (dict(m=0), r"model_config\.over_encoding\.m"),
    (dict(n=1), r"model_config\.over_encoding\.n"),
    (dict(k=-2), r"model_config\.over_encoding\.k"),
    (dict(reset_at_eos=True), r"model_config\.over_encoding\.eos_id"),
    (dict(eos_id=99), r"model_config\.over_encoding\.eos_id"),
    (dict(m=2**60), r"int64"),
    (dict(form="flat"), r"model_config\.over_encoding\.form"),
    (dict(form="single", k=2), r"model_config\.over_encoding\.k must be 1"),
])
def test_bad_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        oe_config(**changes)


def test_warning_when_m_shares_a_factor_with_the_vocabulary():
    with pytest.warns(UserWarning, match="shares the factor 13"):
        oe_config(m=13 * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oe_config(m=41)  # moduli 41, 43, 45, 47: coprime with 13
        oe_config(m=13**3, n=3, k=2)  # exact tables (m >= V^n) never collide, so no warning
        OverEncodingConfig(m=50, n=2, k=1).validate(8, vocab_size=12)  # gcd 2, but 25 rows per token >= V
    with pytest.warns(UserWarning, match="reaches only 5 of its rows"):
        OverEncodingConfig(m=20, n=2, k=1).validate(8, vocab_size=12)  # gcd 4: 5 rows per token < V


def test_unknown_over_encoding_field_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model_config\.over_encoding: .*'mm'"):
        ModelConfig(preset="tiny", vocab_size=V, over_encoding={"mm": 10})


def test_config_round_trips_through_a_plain_dict():
    import dataclasses
    config = oe_config(reset_at_eos=True, eos_id=3, sparse=True)
    again = ModelConfig(**dataclasses.asdict(config))
    assert again == config and isinstance(again.over_encoding, OverEncodingConfig)


@pytest.mark.parametrize("path", sorted(glob.glob("configs/cfg/cfg3f_*.yaml") + glob.glob("configs/olmo2/olmo2_*.yaml")))
def test_experiment_configs_build_with_the_papers_table_sizes(path):
    with open(path) as f:
        model_args = yaml.safe_load(f)["model"]["init_args"]["model_config"]
    vocabularies = (100_278, 50_280) if "olmo2" in path else (7,)  # dolma2 / OLMo-1 tokenizers; cfg3f
    for vocab in vocabularies:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no structured-collision warning for the shipped tables
            config = ModelConfig(**model_args, vocab_size=vocab)
        oe = config.over_encoding
        if oe is None:
            continue
        tables = parameter_counts(config).embedding - parameter_counts(config.replace(over_encoding=None)).embedding
        if oe.form == "single":
            tables += config.padded_vocab_size * config.d_model  # it replaces the 1-gram input table
        assert tables == sum(oe.row_counts()) * oe.slice_width(config.d_model)
        if "olmo2" in path:
            assert abs(tables - oe.m * config.d_model) / (oe.m * config.d_model) < 1e-4  # OE-m = m x d_model
            assert round(oe.m / 1e5) / 10 in (1.2, 12.8) and oe.n == 3
            assert oe.slice_width(config.d_model) == (384 if config.d_model == 768 else 256)
        else:
            assert oe.m >= vocab**oe.n  # exact n-gram encoding


# ------------------------------------------------------------------------- the single form (n-gram encoding)
def single_config(vocab=7, m=7**3, n=3, **options) -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=vocab, tie_embeddings=False,
                       over_encoding=OverEncodingConfig(m=m, n=n, k=1, form="single", **options))


def test_single_form_is_one_table_over_the_exact_ngram_ids():
    # The CFG study's n-gram encoding model with cfg3f's 7 ids: position t reads row x_t + 7·x_(t-1) + 49·x_(t-2)
    # of ONE 343-row table of width d_model, ids before the start being 0 (Algorithm 1); nothing else.
    torch.manual_seed(0)
    config = single_config()
    embed = OverEncoding(config.over_encoding, config.vocab_size, config.padded_vocab_size, config.d_model).double()
    assert embed.wte is None and embed.proj is None
    assert [p.shape for p in embed.parameters()] == [(343, config.d_model)]
    ids_BT = torch.tensor([[2, 4, 0, 6, 1, 3, 5], [0, 0, 1, 2, 3, 1, 1]])
    padded_BT = torch.cat([torch.zeros(2, 2, dtype=torch.long), ids_BT], dim=1)
    for b, t in itertools.product(range(2), range(7)):
        row = padded_BT[b, t + 2] + 7 * padded_BT[b, t + 1] + 49 * padded_BT[b, t]
        assert torch.equal(embed(ids_BT)[b, t], embed.tables.weight[row]), (b, t)
    # Exact: the 343 3-grams get 343 different rows.
    grams = torch.tensor(list(itertools.product(range(7), repeat=3)))
    assert embed.lookup_rows(grams)[:, -1, 0].unique().numel() == 343
    target_BTD = torch.randn(2, 7, config.d_model, dtype=torch.float64)
    (embed(ids_BT) * target_BTD).sum().backward()
    touched = embed.tables.weight.grad.abs().sum(1).nonzero().flatten()
    assert touched.tolist() == sorted(set(embed.lookup_rows(ids_BT).flatten().tolist()))


def test_single_form_refuses_a_tied_head():
    # cfg-small ties its embeddings; the single form has no 1-gram table to tie to.
    with pytest.raises(ValueError, match=r"model_config\.tie_embeddings: false"):
        ModelConfig(preset="cfg-small", vocab_size=7, over_encoding=OverEncodingConfig(m=343, form="single"))


def test_single_form_model_trains_with_an_untied_head_and_counts_its_table():
    config = single_config()
    model = Transformer(config)
    assert model.lm_head.proj.weight is not model.embed.tables.weight
    counts, untied = parameter_counts(config), parameter_counts(config.replace(over_encoding=None))
    assert counts.embedding - untied.embedding == (343 - 7) * config.d_model  # the n-gram table replaces the 1-gram one
    assert counts.non_embedding == untied.non_embedding
    assert flops_per_token(config, 16) == flops_per_token(config.replace(over_encoding=None), 16)  # lookups are free
    assert model.embed.parameter_metrics() == {"over_encoding_tables": 343 * config.d_model, "over_encoding_projection": 0}
    ids_BT = torch.randint(0, 7, (2, 12))
    loss, _ = model.loss(ids_BT[:, :-1], ids_BT[:, 1:])
    loss.backward()
    assert model.embed.tables.weight.grad.abs().sum() > 0
    assert set(model.embed.training_metrics()) == {"oe/coverage_3gram_0"}
    groups = {g["name"]: g for g in parameter_groups(model, OptimizerConfig())}
    assert [p is model.embed.tables.weight for p in groups["over_encoding"]["params"]] == [True]


def test_single_form_hashes_when_m_is_smaller_than_v_to_the_n():
    config = single_config(vocab=V, m=101, n=2)
    embed = OverEncoding(config.over_encoding, config.vocab_size, config.padded_vocab_size, config.d_model)
    ids_BT = torch.tensor([[5, 7, 2]])
    assert embed.lookup_rows(ids_BT)[0, :, 0].tolist() == [5, (7 + 5 * V) % 101, (2 + 7 * V) % 101]



# ------------------------------------------------------------- LongCat N-gram Embedding (NE) options and flavor
def literal_embedding(ids_BT, embed: OverEncoding, oe: OverEncodingConfig, d_model: int) -> torch.Tensor:
    """OE_FAMILY.md §1 read literally, one position at a time: rows int(r·V + 2i + 1) (``longcat``) or m + 2i,
    g-gram ids from the ids since the last ignored id before t (0 before it), one projection per table, the chosen
    combination, the amplification scale; an ignored position gets scale·E(x_t) alone."""
    V, N, width = embed.vocab_size, oe.n_tables, oe.slice_width(d_model)
    rows = [oe.m + 2 * i + (1 if oe.row_rule == "longcat" else 0) for i in range(N)]
    orders = [2 + i // oe.k for i in range(N)]
    ignored = set(oe.ignored_token_ids())
    out = []
    for b in range(ids_BT.shape[0]):
        seq = ids_BT[b].tolist()
        for t, x in enumerate(seq):
            unigram = embed.wte.weight[x]
            if x in ignored:
                out.append(oe.scale * unigram)
                continue
            start = max([s + 1 for s in range(t) if seq[s] in ignored], default=0)
            ngram = 0
            for i, (g, M) in enumerate(zip(orders, rows)):
                h = sum(seq[t - r] * V**r for r in range(g) if t - r >= start)
                row = embed.tables.weight[sum(rows[:i]) + h % M]
                ngram = ngram + embed.proj.weight[:, i * width:(i + 1) * width] @ row
                if oe.proj_bias:
                    ngram = ngram + embed.proj.bias / N  # the fused bias is the sum of the N tables' biases
            e = {"mean": (unigram + ngram) / (1 + N), "unigram_full": unigram + ngram / (1 + N),
                 "sqrt": (unigram + ngram) / math.sqrt(1 + N)}[oe.combine]
            out.append(oe.scale * e)
    return torch.stack(out).view(*ids_BT.shape, d_model)


NE_CASES = {
    "longcat": dict(flavor="longcat"),
    "longcat_sparse_k3": dict(flavor="longcat", k=3, sparse=True),
    "unigram_full": dict(flavor="longcat", combine="unigram_full"),
    "sqrt": dict(flavor="longcat", combine="sqrt", n=4, k=1),
    "scale": dict(flavor="longcat", scale=3.5),
    "ignore_ids": dict(flavor="longcat", ignore_ids=[3, "5:7"], n=4, k=1),
    "paper_with_ne_options": dict(combine="sqrt", scale=0.5, ignore_ids=[4], proj_bias=True),
    "paper": dict(),
}


@pytest.mark.parametrize("case", NE_CASES)
def test_ne_options_equal_a_literal_per_position_reading(case):
    options = {"m": 40, "n": 3, "k": 2, **NE_CASES[case]}
    torch.manual_seed(0)
    config = ModelConfig(preset="tiny", vocab_size=V, d_model=24, over_encoding=OverEncodingConfig(**options))
    oe = config.over_encoding
    embed = OverEncoding(oe, V, config.padded_vocab_size, config.d_model).double()
    with torch.no_grad():
        for p in embed.parameters():
            p.normal_()  # biases too, which start at zero
    ids_BT = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    ids_BT[0, [0, 4, 5, 9]] = torch.tensor([3, 5, 3, 6])  # ignored ids at the start, adjacent, and mid-sequence
    target_BTD = torch.randn(3, 12, config.d_model, dtype=torch.float64)
    fast, literal = embed(ids_BT), literal_embedding(ids_BT, embed, oe, config.d_model)
    torch.testing.assert_close(fast, literal, rtol=1e-12, atol=1e-12)
    params = [p for p in embed.parameters()]
    grads_fast = torch.autograd.grad((fast * target_BTD).sum(), params)
    grads_literal = torch.autograd.grad((literal * target_BTD).sum(), params)
    for p, g_fast, g_literal in zip(params, grads_fast, grads_literal):
        torch.testing.assert_close(g_fast.to_dense(), g_literal, rtol=1e-12, atol=1e-12)
    assert (embed.proj.bias is not None) == oe.proj_bias


def test_longcat_flavor_sets_the_options_and_explicit_fields_win():
    longcat = OverEncodingConfig(m=40, flavor="longcat")
    assert (longcat.row_rule, longcat.proj_bias, longcat.combine, longcat.scale) == ("longcat", False, "mean", 1.0)
    assert longcat.row_counts() == [41, 43] and longcat.family == "ne"
    paper = OverEncodingConfig(m=40)
    assert (paper.row_rule, paper.proj_bias, paper.combine, paper.scale, paper.ignore_ids) == ("paper", True, "mean", 1.0, [])
    assert paper.row_counts() == [40, 42] and paper.family == "oe"
    assert OverEncodingConfig(m=40, flavor="longcat", combine="sqrt", proj_bias=True).proj_bias is True
    assert OverEncodingConfig(m=40, ignore_ids=[1, "4:7", "9:10"]).ignored_token_ids() == [1, 4, 5, 6, 9]


def test_longcat_row_rule_matches_released_sizes():
    from lit_overtok.nn.table_budget import longcat_m
    # OE_FAMILY.md §1: r = 59.604, V = 163,840 gives 9,765,520 rows for table 0: int(r·V + 2i + 1).
    r, vocab = 59.604, 163_840
    oe = OverEncodingConfig(m=longcat_m(r, vocab), n=3, k=2, flavor="longcat")
    assert oe.row_counts() == [int(r * vocab + 2 * i + 1) for i in range(4)]
    assert oe.row_counts()[0] == 9_765_520


def test_ignored_ids_delimit_the_history_like_a_sequence_start():
    oe = OverEncodingConfig(m=1000, n=3, k=1, flavor="longcat", ignore_ids=[3])
    config = ModelConfig(preset="tiny", vocab_size=V, over_encoding=oe)
    embed = OverEncoding(oe, V, config.padded_vocab_size, config.d_model)
    doc = [5, 6, 7, 8]
    after = embed(torch.tensor([[9, 8, 3] + doc]))
    alone = embed(torch.tensor([doc]))
    torch.testing.assert_close(after[:, 3:], alone, rtol=0, atol=0)
    torch.testing.assert_close(after[0, 2], embed.wte.weight[3], rtol=0, atol=0)  # the ignored position: E(x_t)
    assert not torch.equal(embed(torch.tensor([[9, 8, 4] + doc]))[:, 3:], alone)  # 4 is not ignored: no cut


@pytest.mark.parametrize("changes,message", [
    (dict(flavor="meituan"), r"model_config\.over_encoding\.flavor"),
    (dict(combine="max"), r"combine must be one of"),
    (dict(scale=0.0), r"model_config\.over_encoding\.scale"),
    (dict(ignore_ids=["4-7"]), r"model_config\.over_encoding\.ignore_ids: '4-7'"),
    (dict(ignore_ids=[V]), r"model_config\.over_encoding\.ignore_ids: 13 is not a token id"),
    (dict(ignore_ids=["-2:1"]), r"model_config\.over_encoding\.ignore_ids: -2 is not a token id"),
    (dict(ignore_ids=[True]), r"model_config\.over_encoding\.ignore_ids: True"),
    (dict(form="single", k=1, ignore_ids=[2]), r"ignore_ids needs form 'hierarchical'"),
])
def test_bad_ne_settings_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        oe_config(**changes)
