"""The mixture-of-experts feed-forward: fast path == loop path, dropless routing, auxiliary losses, router
gradients, parameter counts, presets, config errors and the expert load reaching TensorBoard."""

from __future__ import annotations

import dataclasses
import glob
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import parameter_counts, flops_per_token
from lit_overtok.nn.transformer import Transformer
from lit_overtok.nn.moe import MoEConfig, MoEFeedForward, pop_auxiliary_losses


def make_layer(backend: str = "auto", *, d_model: int = 32, num_experts: int = 8, top_k: int = 2,
               expert_d_ff: int = 24, renormalize: bool = False, seed: int = 0) -> MoEFeedForward:
    config = MoEConfig(num_experts=num_experts, top_k=top_k, expert_d_ff=expert_d_ff, renormalize=renormalize,
                    backend=backend)
    layer = MoEFeedForward(d_model, config, layer_idx=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return layer


def copy_of(layer: MoEFeedForward, backend: str) -> MoEFeedForward:
    twin = MoEFeedForward(layer.router.in_features, dataclasses.replace(layer.config, backend=backend), layer.layer_idx)
    twin.load_state_dict(layer.state_dict())
    return twin


def dense_reference(layer: MoEFeedForward, x_ND: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then each token keeps its top-k outputs weighted by the router (no dispatch)."""
    scores_NE = F.linear(x_ND.float(), layer.router.weight.float()).softmax(-1)
    weights_NK, ids_NK = scores_NE.topk(layer.top_k, dim=-1)
    if layer.config.renormalize:
        weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
    ex = layer.experts
    h_ENF = F.silu(torch.einsum("nd,edf->enf", x_ND, ex.w1_EDF)) * torch.einsum("nd,edf->enf", x_ND, ex.w3_EDF)
    y_END = torch.einsum("enf,efd->end", h_ENF, ex.w2_EFD)
    gate_NE = torch.zeros_like(scores_NE).scatter(1, ids_NK, weights_NK)
    return torch.einsum("ne,end->nd", gate_NE, y_END)


def assert_close_to_scale(actual, expected, tol, name=""):
    """Elementwise agreement within ``tol`` of the tensor's largest magnitude (sums of many terms round alike)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=name)


def run_with_grads(layer: MoEFeedForward, x_BTD: torch.Tensor, upstream_BTD: torch.Tensor):
    x_BTD = x_BTD.clone().requires_grad_(True)
    out_BTD = layer(x_BTD)
    (out_BTD.float() * upstream_BTD).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out_BTD, x_BTD.grad, grads


# ------------------------------------------------------------------------------------------ the two paths agree
def test_grouped_mm_path_equals_loop_path_forward_and_backward_fp32():
    torch.manual_seed(0)
    fast = make_layer("grouped_mm")
    loop = copy_of(fast, "loop")
    x_BTD, upstream_BTD = torch.randn(3, 21, 32), torch.randn(3, 21, 32)
    out_fast, gx_fast, g_fast = run_with_grads(fast, x_BTD, upstream_BTD)
    out_loop, gx_loop, g_loop = run_with_grads(loop, x_BTD, upstream_BTD)
    assert_close_to_scale(out_fast, out_loop, 1e-6)
    assert_close_to_scale(gx_fast, gx_loop, 1e-6)
    assert set(g_fast) == {"router.weight", "experts.w1_EDF", "experts.w3_EDF", "experts.w2_EFD"}
    for name in g_fast:
        assert_close_to_scale(g_fast[name], g_loop[name], 1e-6, name)
    # Both are the plain mixture computed without any dispatch.
    torch.testing.assert_close(out_loop.view(-1, 32), dense_reference(loop, x_BTD.view(-1, 32)), rtol=1e-5, atol=1e-6)


def test_grouped_mm_path_equals_loop_path_under_bf16_autocast():
    torch.manual_seed(0)
    fast = make_layer("grouped_mm")
    loop = copy_of(fast, "loop")
    x_BTD, upstream_BTD = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fast, gx_fast, g_fast = run_with_grads(fast, x_BTD, upstream_BTD)
        out_loop, gx_loop, g_loop = run_with_grads(loop, x_BTD, upstream_BTD)
        logits_NE = fast.route(x_BTD.view(-1, 32))[0]
    assert out_fast.dtype == out_loop.dtype == torch.bfloat16
    assert logits_NE.dtype == torch.float32  # the router stays in fp32 under autocast
    assert_close_to_scale(out_fast.float(), out_loop.float(), 1e-2)
    assert_close_to_scale(gx_fast, gx_loop, 1e-2)
    for name in g_fast:
        assert_close_to_scale(g_fast[name], g_loop[name], 1e-2, name)
    # And bf16 is close to the fp32 result, so the casts happen where they should.
    assert_close_to_scale(out_fast.float(), loop(x_BTD), 3e-2)


def test_auto_backend_uses_grouped_mm_here_and_falls_back_to_the_loop_for_unaligned_widths():
    layer = make_layer("auto")
    assert layer.backend_for(torch.zeros(1, 32)) == "grouped_mm"
    unaligned = make_layer("auto", expert_d_ff=6)  # 6 fp32 values = 24 bytes, not a multiple of 16
    x_BTD = torch.randn(2, 5, 32)
    with pytest.warns(UserWarning, match="falls back to the per-expert loop"):
        out_BTD = unaligned(x_BTD)
    torch.testing.assert_close(out_BTD, copy_of(unaligned, "loop")(x_BTD))
    forced = copy_of(unaligned, "grouped_mm")
    with pytest.raises(ValueError, match=r"model_config\.moe\.backend"):
        forced(x_BTD)


# ------------------------------------------------------------------------------------------------- dropless
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_every_token_reaches_its_k_experts_even_when_all_pick_the_same_ones(backend, renormalize):
    layer = make_layer(backend, renormalize=renormalize)
    with torch.no_grad():
        # Identical experts: each token's output is then (sum of its combine weights) × expert(x), so any token
        # that lost an expert (capacity, overflow) would show up as a smaller multiple.
        for w in layer.experts.parameters():
            w.copy_(w[0].expand_as(w))
        # Extreme imbalance: a huge router bias towards experts 0 and 1 via a constant input feature.
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[1, 0] = 50.0
    x_ND = torch.randn(40, 32)
    x_ND[:, 0] = 1.0
    out_ND = layer(x_ND.unsqueeze(0)).squeeze(0)
    _, scores_NE, weights_NK, ids_NK = layer.route(x_ND)
    assert set(ids_NK.flatten().tolist()) == {0, 1}  # every token picked the same two experts
    one_expert = layer.experts
    single_ND = (F.silu(x_ND @ one_expert.w1_EDF[0]) * (x_ND @ one_expert.w3_EDF[0])) @ one_expert.w2_EFD[0]
    torch.testing.assert_close(out_ND, weights_NK.sum(-1, keepdim=True) * single_ND, rtol=1e-5, atol=1e-6)
    expected_sum = torch.ones(40) if renormalize else scores_NE.topk(2).values.sum(-1)
    torch.testing.assert_close(weights_NK.sum(-1), expected_sum)
    torch.testing.assert_close(out_ND, dense_reference(layer, x_ND), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_a_tokens_output_does_not_depend_on_the_rest_of_the_batch(backend):
    # No capacity: tokens never compete for an expert, so routing a token alone or among 47 others is the same.
    layer = make_layer(backend).eval()
    x_BTD = torch.randn(3, 16, 32)
    together_BTD = layer(x_BTD)
    alone_BTD = torch.cat([layer(x_BTD[:, t:t + 1]) for t in range(16)], dim=1)
    torch.testing.assert_close(together_BTD, alone_BTD, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- auxiliary losses
def test_auxiliary_losses_equal_the_formulas_on_crafted_router_logits():
    # Router logits = rows of the router weight, by feeding one-hot inputs.
    E, K = 4, 2
    layer = make_layer("loop", d_model=8, num_experts=E, top_k=K, expert_d_ff=8).train()
    logits = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5], [0.5, -0.5, 1.5, 0.0]]
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :3] = torch.tensor(logits).T
    x_ND = torch.eye(8)[:3]
    layer(x_ND.unsqueeze(0))

    def softmax(row):
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]

    probs = [softmax(row) for row in logits]
    top = [sorted(range(E), key=lambda e: -p[e])[:K] for p in probs]
    f = [sum(e in t for t in top) / 3 for e in range(E)]
    p_mean = [sum(p[e] for p in probs) / 3 for e in range(E)]
    expected_lb = E / K * sum(fe * pe for fe, pe in zip(f, p_mean))
    expected_z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 3
    losses = layer.pending_aux_losses
    assert losses["moe_lb_loss"].item() == pytest.approx(expected_lb, rel=1e-6)
    assert losses["moe_z_loss"].item() == pytest.approx(expected_z, rel=1e-6)


def test_balanced_routing_has_load_balancing_loss_one():
    layer = make_layer("loop", num_experts=4, top_k=2)
    logits_NE = torch.zeros(8, 4)  # uniform probabilities
    counts_E = torch.tensor([4, 4, 4, 4])  # each expert gets 8·2/4 assignments
    losses = layer.auxiliary_losses(logits_NE, logits_NE.softmax(-1), counts_E)
    assert losses["moe_lb_loss"].item() == pytest.approx(1.0)
    assert losses["moe_z_loss"].item() == pytest.approx(math.log(4) ** 2)


def test_aux_losses_join_the_objective_averaged_over_layers_only_in_training():
    torch.manual_seed(0)
    config = ModelConfig(preset="moe-tiny", vocab_size=13, moe={"lb_loss_weight": 0.5, "z_loss_weight": 0.25})
    model = Transformer(config).train()
    ids_BT = torch.randint(0, 13, (2, 9))
    total, parts = model.loss(ids_BT, ids_BT.roll(-1, 1))
    layers = [b.feed_forward for b in model.blocks]
    assert all(m.pending_aux_losses is None for m in layers)  # collected exactly once
    model(ids_BT)  # a bare training forward stashes the losses without collecting them
    per_layer = [m.pending_aux_losses for m in layers]
    expected = sum(0.5 * p["moe_lb_loss"] + 0.25 * p["moe_z_loss"] for p in per_layer) / 2
    aux, aux_parts = pop_auxiliary_losses(model)
    torch.testing.assert_close(aux, expected)
    mean_lb = (per_layer[0]["moe_lb_loss"] + per_layer[1]["moe_lb_loss"]) / 2
    torch.testing.assert_close(aux_parts["moe_lb_loss"], mean_lb)
    torch.testing.assert_close(total, parts["loss_next1"] + 0.5 * parts["moe_lb_loss"] + 0.25 * parts["moe_z_loss"])
    model.eval()
    _, eval_parts = model.loss(ids_BT, ids_BT.roll(-1, 1))
    model.train()
    with torch.no_grad():
        _, no_grad_parts = model.loss(ids_BT, ids_BT.roll(-1, 1))
    assert set(eval_parts) == set(no_grad_parts) == {"loss_next1"}


@pytest.mark.parametrize("which", ["task", "moe_lb_loss", "moe_z_loss"])
def test_router_gradients_flow_from_the_task_and_from_each_aux_loss(which):
    torch.manual_seed(0)
    layer = make_layer("grouped_mm").train()
    out_BTD = layer(torch.randn(2, 10, 32))
    loss = out_BTD.square().mean() if which == "task" else layer.pending_aux_losses[which]
    loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_training_lowers_the_load_balancing_loss_of_a_skewed_router():
    torch.manual_seed(0)
    layer = make_layer("grouped_mm").train()
    with torch.no_grad():
        layer.router.weight[0] += 1.0  # expert 0 is favoured by most inputs
    optimizer = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    x_BTD = torch.randn(4, 16, 32)
    history = []
    for _ in range(30):
        layer(x_BTD)
        loss = layer.pending_aux_losses["moe_lb_loss"]
        history.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert history[-1] < history[0] - 0.1


# ------------------------------------------------------------------------------------------------ observability
def test_training_metrics_report_the_load_since_the_last_read():
    layer = make_layer("loop", num_experts=4, top_k=2).train()
    x_BTD = torch.randn(2, 6, 32)
    layer(x_BTD)
    layer(x_BTD)
    ids_NK = layer.route(x_BTD.view(-1, 32))[3]
    counts_E = torch.bincount(ids_NK.flatten(), minlength=4).double() * 2
    load_E = counts_E / 24  # 24 tokens in the window
    metrics = layer.training_metrics()
    assert metrics["moe/layer00/load_max"].item() == pytest.approx(load_E.max().item())
    assert metrics["moe/layer00/load_min"].item() == pytest.approx(load_E.min().item())
    assert metrics["moe/layer00/load_max_over_min"].item() == pytest.approx(
        (counts_E.max() / counts_E.min().clamp(min=1)).item())
    assert sum(metrics[f"moe/layer00/load_expert{e}"].item() for e in range(4)) == pytest.approx(2.0)
    assert layer.training_metrics() == {}  # the window restarted
    layer.eval()
    layer(x_BTD)
    assert layer.training_metrics() == {}  # validation and generation do not count


def test_layer_tags_sort_in_layer_order():
    tags = []
    for layer_idx in (10, 2):
        layer = MoEFeedForward(32, MoEConfig(num_experts=4, top_k=2, expert_d_ff=8), layer_idx=layer_idx).train()
        layer(torch.randn(1, 4, 32))
        tags += [tag.split("/")[1] for tag in layer.training_metrics()]
    assert sorted(set(tags)) == ["layer02", "layer10"]  # as TensorBoard lists them: by name


def test_many_experts_log_only_the_extremes():
    layer = make_layer("loop", num_experts=64, top_k=8).train()
    layer(torch.randn(1, 8, 32))
    expected = [f"moe/layer00/{k}" for k in ("load_max", "load_max_over_min", "load_min")]
    assert sorted(layer.training_metrics()) == expected


def test_expert_load_and_aux_losses_reach_tensorboard(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_overtok.data.cfg_datamodule import CFGDataModule
    from lit_overtok.training.lightning_module import OverTokLM

    dm = CFGDataModule(seq_len=32, batch_size=2, val_sentences=4)
    module = OverTokLM(ModelConfig(preset="moe-tiny"), vocab_size=dm.vocab_size)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, log_every_n_steps=2, limit_val_batches=0,
                         logger=TensorBoardLogger(tmp_path, name=""), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    events = EventAccumulator(str(tmp_path / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for layer in (0, 1):
        assert {f"train/moe/layer{layer:02d}/load_max_over_min", f"train/moe/layer{layer:02d}/load_expert3"} <= tags
    assert {"train/moe_lb_loss", "train/moe_z_loss", "train/loss_next1", "train/loss"} <= tags
    assert all(e.value >= 1.0 for e in events.Scalars("train/moe/layer00/load_max_over_min"))


# ------------------------------------------------------------------------------------ parameter counts, presets
def test_active_parameters_count_k_of_e_experts():
    config = ModelConfig(preset="moe-tiny", vocab_size=13)
    model = Transformer(config)
    counts = parameter_counts(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    E, K, D, Fe = 4, 2, 32, 16
    assert counts.total - counts.active == config.n_layer * (E - K) * 3 * D * Fe
    assert counts.active_non_embedding == counts.active - counts.embedding
    dense = parameter_counts(ModelConfig(preset="tiny", vocab_size=13, d_ff=K * Fe))
    router = config.n_layer * D * E
    assert counts.active == dense.active + router  # same active weights as the dense SwiGLU of width K·F


@pytest.mark.parametrize("preset,active,total", [
    ("olmoe-1b-7b", 1.3e9, 6.9e9),   # OLMoE-1B-7B: 1.3B active / 6.9B total
    ("olmoe-1.3b", 260e6, 1.3e9),    # the paper's OLMoE-1.3B (docs/method.md §3.3)
])
def test_olmoe_presets_hit_the_published_counts(preset, active, total):
    config = ModelConfig(preset=preset, vocab_size=50_280)
    assert config.padded_vocab_size == 50_304
    counts = parameter_counts(config)
    assert abs(counts.active / active - 1) < 0.03
    assert abs(counts.total / total - 1) < 0.03


def test_olmoe_7b_forward_flops_match_the_paper():
    # docs/method.md §4.11: 2.3578 forward GFLOPs per token for the OLMoE-7B baseline (no attention term there).
    config = ModelConfig(preset="olmoe-1b-7b", vocab_size=50_280)
    assert flops_per_token(config, seq_len=0) / 3 == pytest.approx(2.3578e9, rel=1e-3)


def test_small_moe_preset_has_the_active_size_of_cfg_small():
    small = parameter_counts(ModelConfig(preset="moe-small", vocab_size=7))
    dense = parameter_counts(ModelConfig(preset="cfg-small", vocab_size=7))
    assert abs(small.active / dense.active - 1) < 0.03
    assert small.total > 2.5 * small.active


# --------------------------------------------------------------------------------------------------- config
def test_moe_fields_override_the_preset_and_survive_the_hparams_round_trip():
    config = ModelConfig(preset="moe-small", vocab_size=7, moe={"backend": "loop", "top_k": 1})
    assert (config.moe.num_experts, config.moe.top_k, config.moe.expert_d_ff, config.moe.backend) == (8, 1, 176, "loop")
    assert ModelConfig(**dataclasses.asdict(config)) == config
    given = ModelConfig(preset="cfg-small", vocab_size=7, moe=MoEConfig(num_experts=4, top_k=1, expert_d_ff=64))
    assert given.moe.num_experts == 4 and ModelConfig(**dataclasses.asdict(given)) == given
    assert ModelConfig(preset="cfg-small", vocab_size=7).moe is None


@pytest.mark.parametrize("moe,field", [
    ({"top_k": 9}, "model_config.moe.top_k"),
    ({"num_experts": 0}, "model_config.moe.num_experts"),
    ({"expert_d_ff": -1}, "model_config.moe.expert_d_ff"),
    ({"lb_loss_weight": -0.1}, "model_config.moe.lb_loss_weight"),
    ({"backend": "cuda"}, "model_config.moe.backend"),
    ({"experts": 8}, "model_config.moe"),
])
def test_bad_moe_config_names_the_field(moe, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig(preset="moe-small", vocab_size=7, moe=moe)


def test_moe_on_a_dense_preset_takes_the_expert_width_from_it_or_names_the_field():
    # The MoE presets' rule: top_k experts of width d_ff / top_k hold the dense model's active weights (cfg-small: 344).
    added = ModelConfig(preset="cfg-small", vocab_size=7, moe={"num_experts": 8, "top_k": 2})
    assert (added.moe.num_experts, added.moe.top_k, added.moe.expert_d_ff) == (8, 2, 172)
    assert parameter_counts(added).active_non_embedding == parameter_counts(
        ModelConfig(preset="cfg-small", vocab_size=7)).active_non_embedding + 12 * 8 * 128  # + the routers
    with pytest.raises(ValueError, match=r"d_ff / top_k = 344 / 3.*give model_config\.moe\.expert_d_ff"):
        ModelConfig(preset="cfg-small", vocab_size=7, moe={"num_experts": 8, "top_k": 3})
    with pytest.raises(ValueError, match=r"model_config\.moe\.num_experts', 'model_config\.moe\.top_k'\] are unset"):
        ModelConfig(preset="cfg-small", vocab_size=7, moe={})


@pytest.mark.parametrize("path", sorted(glob.glob("configs/olmoe/*.yaml") + glob.glob("configs/cfg/*moe*.yaml")))
def test_moe_experiment_configs_build_with_the_published_counts(path):
    with open(path) as f:
        experiment = yaml.safe_load(f)
    model_args = experiment["model"]["init_args"]["model_config"]
    vocab = 50_280 if "olmoe" in path else 5  # the OLMoE tokenizer; cfg3f
    config = ModelConfig(**model_args, vocab_size=vocab)
    assert config.moe is not None
    # The backbone's counts, without the Over-Encoding tables or training-only heads the paper counts apart.
    counts = parameter_counts(dataclasses.replace(config, **{name: None for name in ("over_encoding", "multi_token")
                                         if name in model_args}))
    if "olmoe_1.3b" in path:
        assert abs(counts.active / 260e6 - 1) < 0.03 and abs(counts.total / 1.3e9 - 1) < 0.03
    elif "olmoe_7b" in path:
        assert abs(counts.active / 1.3e9 - 1) < 0.03 and abs(counts.total / 6.9e9 - 1) < 0.03
    if "olmoe" in path:
        assert experiment["trainer"]["precision"] == "bf16-mixed" and experiment["trainer"]["gradient_clip_val"] == 1.0
        optimizer = experiment["model"]["init_args"]["optimizer"]
        assert (optimizer["lr"], optimizer["betas"], optimizer["weight_decay"], optimizer["min_lr_ratio"]) == (
            4e-4, [0.9, 0.95], 0.1, 0.1)
        oe = getattr(config, "over_encoding", None)
        if "oe12.8m" in path or "ot12.8m" in path:
            assert (oe.n, round(oe.m / 1e5) / 10, oe.slice_width(config.d_model)) == (3, 12.8, 256)
