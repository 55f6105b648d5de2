"""Over-Decoding (App. C) and the joint n-gram decoding of the CFG study: exactness, masking, inference isolation."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts, flops_per_token
from lit_overtok.nn.generation import generate
from lit_overtok.nn.heads import MultiTokenConfig, NextTokenHead
from lit_overtok.nn.losses import IGNORE_INDEX
from lit_overtok.nn.transformer import Transformer
from lit_overtok.nn.losses import future_labels, token_nll
from lit_overtok.nn.over_decoding import JointNGramHead, OverDecodingHeads

V = 5  # cfg3f: BOS, three terminals, EOS


def tiny(multi_token=None, **overrides) -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=V, multi_token=multi_token, **overrides)


def labels_with_padding(B=3, T=9, seed=0):
    """Random labels whose last row ends in padding, as validation rows do."""
    generator = torch.Generator().manual_seed(seed)
    labels_BT = torch.randint(0, V, (B, T), generator=generator)
    labels_BT[-1, -3:] = IGNORE_INDEX
    return labels_BT


def test_future_labels_shift_by_j_minus_1_and_mask_the_window_end():
    labels_BT = torch.tensor([[1, 2, 3, 4, IGNORE_INDEX]])
    X = IGNORE_INDEX
    assert future_labels(labels_BT, 1).tolist() == [[1, 2, 3, 4, X]]
    assert future_labels(labels_BT, 2).tolist() == [[2, 3, 4, X, X]]
    assert future_labels(labels_BT, 3).tolist() == [[3, 4, X, X, X]]
    assert future_labels(labels_BT, 7).tolist() == [[X] * 5]


def test_od_loss_is_the_weighted_mean_of_per_head_cross_entropies_over_valid_positions():
    torch.manual_seed(0)
    config = tiny(MultiTokenConfig(mode="od", n=3, loss_weights=[0.5, 0.25], low_rank=4))
    heads = OverDecodingHeads(config.multi_token, config.d_model, config.vocab_size, config.padded_vocab_size)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.5)
    hidden_BTD = torch.randn(3, 9, config.d_model)
    labels_BT = labels_with_padding()
    total, parts = heads.loss(hidden_BTD, None, labels_BT)
    # Straightforward reference: loop over positions, keep those whose j-ahead token is inside the window.
    expected_total = 0.0
    for j, (head, weight) in enumerate(zip(heads.heads, [0.5, 0.25]), start=2):
        W_dD, E_Vd = head.down.weight, head.table.proj.weight
        nlls = []
        for b in range(3):
            for t in range(9):
                s = t + j - 1
                if s < 9 and labels_BT[b, s] != IGNORE_INDEX:
                    logits_V = E_Vd @ (W_dD @ hidden_BTD[b, t])
                    nlls.append(-logits_V.log_softmax(-1)[labels_BT[b, s]])
        ce_j = torch.stack(nlls).mean()
        torch.testing.assert_close(parts[f"loss_next{j}"], ce_j)
        expected_total = expected_total + weight * ce_j
    torch.testing.assert_close(total, expected_total)


def test_od_heads_get_no_signal_from_positions_past_the_window_or_at_padding():
    torch.manual_seed(0)
    config = tiny(MultiTokenConfig(mode="od", n=3))
    heads = OverDecodingHeads(config.multi_token, config.d_model, config.vocab_size, config.padded_vocab_size)
    hidden_BTD = torch.randn(3, 9, config.d_model, requires_grad=True)
    labels_BT = labels_with_padding()
    for j, nll_BT in enumerate(heads.per_position_nll(hidden_BTD, labels_BT), start=2):
        (grad_BTD,) = torch.autograd.grad(nll_BT.sum(), hidden_BTD)
        has_target_BT = future_labels(labels_BT, j) != IGNORE_INDEX
        assert not has_target_BT[:, -(j - 1):].any()  # the last j-1 positions of every row
        assert not has_target_BT[-1, -(j - 1) - 3:].any()  # ... and those looking into the padding
        touched_BT = grad_BTD.abs().sum(-1) > 0
        assert torch.equal(touched_BT, has_target_BT)
        assert torch.all(nll_BT[~has_target_BT] == 0)


def product_form_and_joint_heads(n=3, D=8, seed=0):
    """Head 1 (the model's next-token head), OD heads 2..n with lambda = 1, and a joint head whose V^n table is
    E~(z_1..z_n) = sum_j E_j(z_j): the parameterization of App. C."""
    torch.manual_seed(seed)
    config = ModelConfig(preset=None, n_layer=1, d_model=D, n_head=2, d_ff=8, max_seq_len=64, tie_embeddings=False,
                      vocab_pad_multiple=1, vocab_size=V, multi_token=MultiTokenConfig(mode="od", n=n, loss_weights=[1.0] * (n - 1)))
    head1 = NextTokenHead(config.d_model, config.vocab_size, config.padded_vocab_size)
    od = OverDecodingHeads(config.multi_token, config.d_model, config.vocab_size, config.padded_vocab_size)
    joint = JointNGramHead(config.d_model, config.vocab_size, n)
    tables = [head1.proj.weight] + [h.table.proj.weight for h in od.heads]
    with torch.no_grad():
        for E_VD in tables:
            E_VD.normal_(std=1.0)
        E_joint = torch.zeros([V] * n + [D])
        for j, E_VD in enumerate(tables):
            shape = [1] * n + [D]
            shape[j] = V
            E_joint = E_joint + E_VD.view(shape)  # broadcast E_j(z_j) along every other token
        joint.proj.weight.copy_(E_joint.view(V ** n, D))
    return head1, od, joint


@pytest.mark.parametrize("n", [2, 3])
def test_product_decomposition_loss_equals_the_joint_cross_entropy(n):
    """App. C: with E~ = sum_j E_j the V^n-way softmax factorizes, so CE_joint = sum_j CE_j at every position,
    also at the window end and at padding, where the joint scores the known prefix and the product masks heads."""
    head1, od, joint = product_form_and_joint_heads(n)
    hidden_BTD = torch.randn(3, 9, 8)
    labels_BT = labels_with_padding()
    product_BT = token_nll(head1(hidden_BTD), labels_BT) + sum(od.per_position_nll(hidden_BTD, labels_BT))
    joint_nll_BT, marginal_nlls = joint.per_position_nll(hidden_BTD, labels_BT)
    torch.testing.assert_close(joint_nll_BT, product_BT, rtol=1e-5, atol=1e-5)
    assert (product_BT > 0).sum() == (labels_BT != IGNORE_INDEX).sum()
    # The marginal of each token is that head's own softmax, so inference from the joint head (first-token
    # marginal) equals head 1 and the per-token losses the joint mode logs are the product form's CE_j.
    torch.testing.assert_close(joint(hidden_BTD), head1(hidden_BTD).log_softmax(-1), rtol=1e-5, atol=1e-5)
    for marginal_BT, head_BT in zip(marginal_nlls[1:], od.per_position_nll(hidden_BTD, labels_BT)):
        torch.testing.assert_close(marginal_BT, head_BT, rtol=1e-5, atol=1e-5)


def test_joint_head_scores_the_joint_label_and_marginalizes_past_the_window():
    torch.manual_seed(0)
    config = tiny(MultiTokenConfig(mode="joint", n=3))
    head = JointNGramHead(config.d_model, config.vocab_size, 3)
    torch.nn.init.normal_(head.proj.weight)
    hidden_BTD = torch.randn(2, 6, config.d_model)
    labels_BT = labels_with_padding(B=2, T=6)
    joint_nll_BT, _ = head.per_position_nll(hidden_BTD, labels_BT)
    weight_ND = head.proj.weight.detach()
    for b in range(2):
        for t in range(6):
            p_VVV = (weight_ND @ hidden_BTD[b, t]).softmax(-1).view(V, V, V)
            known = []
            for s in range(t, 6):
                if labels_BT[b, s] == IGNORE_INDEX or len(known) == 3:
                    break
                known.append(int(labels_BT[b, s]))
            # p(z_1..z_k): sum the joint over the tokens past the window or padding.
            expected = -math.log(p_VVV[tuple(known)].sum()) if known else 0.0
            assert joint_nll_BT[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_joint_mode_trains_on_the_joint_cross_entropy_and_predicts_the_first_token_marginal():
    torch.manual_seed(0)
    model = Transformer(tiny(MultiTokenConfig(mode="joint", n=3), tie_embeddings=False))
    torch.nn.init.normal_(model.lm_head.proj.weight)
    ids_BT = torch.randint(0, V, (3, 9))
    labels_BT = labels_with_padding()
    total, parts = model.loss(ids_BT, labels_BT)
    hidden_BTD = model.hidden_states(ids_BT)
    joint_nll_BT, _ = model.lm_head.per_position_nll(hidden_BTD, labels_BT)
    torch.testing.assert_close(total, joint_nll_BT.sum() / (labels_BT != IGNORE_INDEX).sum())
    torch.testing.assert_close(parts["loss_joint"], total.detach())
    assert set(parts) == {"loss_next1", "loss_joint", "loss_next2", "loss_next3"}
    # forward: log p(z_1) = log sum_{z_2,z_3} p(z_1, z_2, z_3), a normalized V-way distribution.
    p_BTVVV = F.softmax(model.lm_head.proj(hidden_BTD), -1).view(3, 9, V, V, V)
    torch.testing.assert_close(model(ids_BT).exp(), p_BTVVV.sum((-1, -2)))


@pytest.mark.parametrize("multi_token", [
    MultiTokenConfig(mode="od", n=3),
    MultiTokenConfig(mode="od", n=2, low_rank=8),
    MultiTokenConfig(mode="mtp_ds", n=3),
])
def test_generation_and_evaluation_use_only_the_next_token_head(multi_token):
    """Same seed: the backbone and next-token head are identical with or without the multi-token head (init is
    seeded per parameter name), whatever the head's weights; and inference never calls it."""
    torch.manual_seed(0)
    plain = Transformer(tiny())
    torch.manual_seed(0)
    with_head = Transformer(tiny(multi_token))
    with torch.no_grad():
        for p in with_head.multi_token_head.parameters():
            p.normal_(std=3.0)

    def fail(*args):
        raise AssertionError("a multi-token head module ran during inference")

    for module in with_head.multi_token_head.modules():
        module.register_forward_pre_hook(fail)
    ids_BT = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(with_head(ids_BT), plain(ids_BT), rtol=0, atol=0)
    prompt_BT = torch.zeros(4, 1, dtype=torch.long)
    for temperature in (0.0, 1.0):
        outputs = [generate(m, prompt_BT, 20, temperature=temperature, eos_id=V - 1,
                            generator=torch.Generator().manual_seed(3)) for m in (plain, with_head)]
        assert torch.equal(*outputs)
    # Training does run it (so the hooks above are live).
    with pytest.raises(AssertionError, match="multi-token head"):
        with_head.loss(ids_BT, ids_BT.roll(-1, 1))


def test_od_tables_count_as_embedding_and_add_their_flops():
    base = ModelConfig(preset="cfg-small", vocab_size=50_000, tie_embeddings=False)
    od = base.replace(multi_token=MultiTokenConfig(mode="od", n=3))
    low = base.replace(multi_token=MultiTokenConfig(mode="od", n=3, low_rank=32))
    b, o, lo = parameter_counts(base), parameter_counts(od), parameter_counts(low)
    D, Vp = base.d_model, base.padded_vocab_size
    assert o.embedding - b.embedding == 2 * Vp * D and o.non_embedding == b.non_embedding
    assert lo.embedding - b.embedding == 2 * Vp * 32 and lo.non_embedding - b.non_embedding == 2 * D * 32
    assert flops_per_token(od, 256) - flops_per_token(base, 256) == pytest.approx(6 * 2 * Vp * D)
    assert flops_per_token(low, 256) - flops_per_token(base, 256) == pytest.approx(6 * 2 * (Vp * 32 + D * 32))


def test_multi_token_config_round_trips_through_checkpoint_dicts():
    config = tiny(MultiTokenConfig(mode="od", n=3, loss_weights=[0.2, 0.1], low_rank=8))
    rebuilt = ModelConfig(**dataclasses.asdict(config))
    assert rebuilt == config and isinstance(rebuilt.multi_token, MultiTokenConfig)
    assert MultiTokenConfig(mode="mtp_ds").head_weights == [0.1]


@pytest.mark.parametrize("multi_token,overrides,field", [
    (dict(mode="nextn"), {}, "model_config.multi_token.mode"),
    (dict(mode="od", n=1), {}, "model_config.multi_token.n"),
    (dict(mode="od", n=3, loss_weights=[0.1]), {}, "model_config.multi_token.loss_weights"),
    (dict(mode="od", loss_weights=[-0.1]), {}, "model_config.multi_token.loss_weights"),
    (dict(mode="joint", loss_weights=[1.0]), {}, "model_config.multi_token.loss_weights"),
    (dict(mode="mtp_ds", low_rank=8), {}, "model_config.multi_token.low_rank"),
    (dict(mode="od", low_rank=64), {}, "model_config.multi_token.low_rank"),
    (dict(mode="joint"), dict(tie_embeddings=True), "model_config.tie_embeddings"),
    (dict(mode="joint", n=2), dict(vocab_size=50_000), "mode 'od'"),
])
def test_bad_multi_token_config_names_the_field(multi_token, overrides, field):
    base = dict(preset="tiny", vocab_size=V, multi_token=multi_token)
    base.update(overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig(**base)
