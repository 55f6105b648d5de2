"""Mixture-of-experts feed-forward in the OLMoE recipe (docs/method.md §3.3; the router and
losses as in OLMo-core's ``nn/moe``, the stacked expert weights as in torchtitan's ``models/common/moe.py``).

Features:
- a linear router without bias, computed in fp32 even under autocast; softmax scores; top-k experts per token.
  OLMoE does not renormalise the k selected scores; ``renormalize=True`` makes them sum to 1;
- dropless routing: every token reaches its k experts, no capacity factor, no token is ever dropped;
- SwiGLU experts with stacked weights ``w1_EDF``, ``w3_EDF``, ``w2_EFD``;
- two execution paths with the same result: a fast one (tokens sorted by expert, three grouped matmuls over
  per-expert offsets) and a per-expert loop, which is the reference and the fallback where torch's grouped matmul
  is missing or cannot take the shapes;
- auxiliary losses as OLMoE trains with them: load balancing ``(E/K)·Σ_e f_e·p_e`` (1.0 when perfectly balanced)
  and router z-loss ``mean_n logsumexp(logits_n)²``. Each layer stashes its losses during a training forward and
  ``Transformer.loss`` collects them with ``pop_auxiliary_losses``: averaged over MoE layers, as megablocks (which
  trained OLMoE) and OLMo-core do, weighted, and added to the objective, so Lightning's loss scaling (gradient
  accumulation, fp16 GradScaler) applies to them like any loss term;
- expert load for TensorBoard through ``training_metrics()`` (a ``nn.hooks`` hook), counted over all ranks.

Shapes follow the package legend (``lit_overtok/__init__.py``): N tokens (batch x time, flattened), K experts per
token, A = N·K token-expert assignments, E experts, D model width, F expert hidden width.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.configuration import config_from
from lit_overtok.nn.recompute import is_recomputing
from lit_overtok.nn.collectives import all_reduce_

Backend = Literal["auto", "grouped_mm", "loop"]
_BACKENDS = ("auto", "grouped_mm", "loop")
_SHAPE_FIELDS = ("num_experts", "top_k", "expert_d_ff")
# Per-expert load scalars are logged only up to this many experts; beyond it, the per-layer extremes tell the story.
_MAX_EXPERTS_LOGGED_ONE_BY_ONE = 8

# Public in recent torch; private (CUDA only) in 2.8; absent before. None means the loop path is the only one.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class MoEConfig:
    """Routed SwiGLU experts in place of the dense feed-forward of every block."""

    num_experts: Optional[int] = None
    """E, experts per layer. None: from the preset."""
    top_k: Optional[int] = None
    """K, experts each token is sent to. None: from the preset."""
    expert_d_ff: Optional[int] = None
    """Hidden width of each expert's SwiGLU. None: from the preset."""
    renormalize: bool = False
    """Rescale the k selected scores to sum to 1 (OLMoE does not)."""
    lb_loss_weight: float = 0.01
    """Weight of the load-balancing loss (OLMoE: 0.01)."""
    z_loss_weight: float = 0.001
    """Weight of the router z-loss (OLMoE: 0.001)."""
    backend: Backend = "auto"
    """'grouped_mm' (fast), 'loop' (reference) or 'auto': grouped_mm where torch runs it for the shapes, else loop."""

    def __post_init__(self) -> None:
        for name in _SHAPE_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"model_config.moe.{name} must be a positive integer, got {value!r}")
        if self.num_experts is not None and self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(
                f"model_config.moe.top_k={self.top_k} exceeds model_config.moe.num_experts={self.num_experts}; "
                "a token can visit each expert at most once"
            )
        for name in ("lb_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model_config.moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"model_config.moe.backend must be one of {list(_BACKENDS)}, got {self.backend!r}")


def resolve_moe_config(value, preset_moe: Optional[dict], d_ff: Optional[int] = None) -> Optional[MoEConfig]:
    """``model_config.moe`` as given (None, a dict from YAML/hparams, or a MoEConfig), completed from the preset's ``moe``.

    As with the backbone, a shape field left None takes the preset's value and an explicit one wins. Experts added
    to a dense model (no ``moe`` in its preset) get ``expert_d_ff = d_ff / top_k`` when unset, the MoE presets' rule:
    the same active feed-forward weights per token as the dense model they replace.
    """
    if value is None and preset_moe is None:
        return None
    value = config_from(MoEConfig, {} if value is None else value, "model_config.moe")
    filled = {name: preset_moe[name] for name in _SHAPE_FIELDS
              if preset_moe is not None and name in preset_moe and getattr(value, name) is None}
    value = dataclasses.replace(value, **filled)
    if value.expert_d_ff is None and value.top_k is not None and d_ff is not None and d_ff % value.top_k == 0:
        value = dataclasses.replace(value, expert_d_ff=d_ff // value.top_k)
    derivable = value.top_k is None and d_ff is not None  # the width follows once top_k is given
    missing = [f"model_config.moe.{name}" for name in _SHAPE_FIELDS
               if getattr(value, name) is None and not (name == "expert_d_ff" and derivable)]
    if missing:
        width = (f" (expert_d_ff defaults to d_ff / top_k = {d_ff} / {value.top_k}, which is not whole: give "
                 "model_config.moe.expert_d_ff)" if value.top_k is not None and d_ff is not None else "")
        raise ValueError(f"{missing} are unset{width}; give them (e.g. num_experts: 8, top_k: 2), or choose a preset "
                         "with experts (e.g. 'moe-small')")
    return value


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build runs grouped matmul on this device and dtype (probed once, on a tiny problem)."""
    if _grouped_mm is None:
        return False
    try:
        with torch.no_grad():
            a = torch.ones(8, 8, device=device, dtype=dtype)
            b = torch.ones(2, 8, 8, device=device, dtype=dtype)
            out = _grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
        return bool((out == 8).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _rows_aligned(widths: tuple[int, ...], itemsize: int) -> bool:
    # Grouped-matmul kernels need every row stride to be a multiple of 16 bytes.
    return all(width * itemsize % 16 == 0 for width in widths)


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts ``w2(silu(w1 x) * w3 x)`` with stacked weights, applied to each token's k experts."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1_EDF.to(dtype), self.w3_EDF.to(dtype), self.w2_EFD.to(dtype)

    def forward_grouped(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                        counts_E: torch.Tensor) -> torch.Tensor:
        """Sort the N·K assignments by expert, run all experts as grouped matmuls, combine each token's k outputs."""
        N, K = ids_NK.shape
        w1_EDF, w3_EDF, w2_EFD = self._weights(x_ND.dtype)
        order_A = ids_NK.flatten().argsort(stable=True)  # assignment a = n·K + slot, grouped by expert
        offsets_E = counts_E.cumsum(0).to(torch.int32)  # end row of each expert's group
        x_AD = x_ND[order_A // K]
        h_AF = F.silu(_grouped_mm(x_AD, w1_EDF, offs=offsets_E)) * _grouped_mm(x_AD, w3_EDF, offs=offsets_E)
        y_AD = _grouped_mm(h_AF, w2_EFD, offs=offsets_E)
        inverse_A = torch.empty_like(order_A)
        inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        y_NKD = y_AD[inverse_A].view(N, K, -1)
        # Elementwise, not a batched (1×K)·(K×D) matmul: N tiny matmuls are slow on CPU. The sum over the k
        # experts accumulates in fp32 for bf16 inputs too.
        return (y_NKD * weights_NK.unsqueeze(-1).to(y_NKD.dtype)).sum(dim=1)

    def forward_loop(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        """Reference: for each expert, gather its tokens, run its SwiGLU, add the weighted result back."""
        w1_EDF, w3_EDF, w2_EFD = self._weights(x_ND.dtype)
        out_ND = torch.zeros_like(x_ND)
        for e in range(w1_EDF.shape[0]):
            token_M, slot_M = (ids_NK == e).nonzero(as_tuple=True)
            if token_M.numel() == 0:
                continue
            x_MD = x_ND[token_M]
            y_MD = (F.silu(x_MD @ w1_EDF[e]) * (x_MD @ w3_EDF[e])) @ w2_EFD[e]
            out_ND = out_ND.index_add(0, token_M, y_MD * weights_NK[token_M, slot_M, None].to(y_MD.dtype))
        return out_ND


class MoEFeedForward(nn.Module):
    """Router + dropless top-k dispatch to SwiGLU experts; a drop-in for the dense SwiGLU of a block."""

    def __init__(self, d_model: int, config: MoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.router = nn.Linear(d_model, config.num_experts, bias=False)
        self.experts = SwiGLUExperts(config.num_experts, d_model, config.expert_d_ff)
        # Assignments per expert since training_metrics() last read them (a float64 count, exact to 2^53).
        self.register_buffer("load_counts_E", torch.zeros(config.num_experts, dtype=torch.float64), persistent=False)
        self.pending_aux_losses: Optional[dict[str, torch.Tensor]] = None

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 router logits and scores (N, E), the selected experts' combine weights (N, K) and ids (N, K)."""
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.router.weight.float())
        scores_NE = logits_NE.softmax(dim=-1)
        weights_NK, ids_NK = scores_NE.topk(self.top_k, dim=-1)
        if self.config.renormalize:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return logits_NE, scores_NE, weights_NK, ids_NK

    def auxiliary_losses(self, logits_NE: torch.Tensor, scores_NE: torch.Tensor,
                         counts_E: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted load-balancing loss and router z-loss of one layer on one batch (fp32)."""
        N = logits_NE.shape[0]
        f_E = counts_E.float() / N  # fraction of tokens routed to each expert (sums to K); not differentiable
        p_E = scores_NE.mean(dim=0)  # mean router probability of each expert (sums to 1)
        return {
            "moe_lb_loss": self.num_experts / self.top_k * (f_E * p_E).sum(),
            "moe_z_loss": torch.logsumexp(logits_NE, dim=-1).square().mean(),
        }

    def backend_for(self, x_ND: torch.Tensor) -> str:
        backend = self.config.backend
        if backend == "loop":
            return "loop"
        widths = (x_ND.shape[-1], self.experts.w1_EDF.shape[-1])
        if grouped_mm_runs(x_ND.device, x_ND.dtype) and _rows_aligned(widths, x_ND.element_size()):
            return "grouped_mm"
        reason = (f"torch {torch.__version__} has no grouped matmul for {x_ND.dtype} on {x_ND.device.type}"
                  if not grouped_mm_runs(x_ND.device, x_ND.dtype) else
                  f"d_model={widths[0]} and expert_d_ff={widths[1]} must be multiples of "
                  f"{16 // x_ND.element_size()} for {x_ND.dtype}")
        if backend == "grouped_mm":
            raise ValueError(f"model_config.moe.backend='grouped_mm' cannot run here: {reason}; use 'auto' or 'loop'")
        warnings.warn(f"MoE falls back to the per-expert loop: {reason}")
        return "loop"

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE, scores_NE, weights_NK, ids_NK = self.route(x_ND)  # from the un-cast (fp32 residual) input
        if torch.is_autocast_enabled(x_ND.device.type):
            # The experts run in the autocast dtype, as a dense nn.Linear would; the casts are explicit because
            # grouped matmul is not on autocast's list.
            x_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        counts_E = torch.bincount(ids_NK.flatten(), minlength=self.num_experts)
        if self.training:
            # A checkpointed rerun in backward (``nn.recompute``) must run the same ops, but its counts and losses
            # were already taken in the forward.
            aux_losses = self.auxiliary_losses(logits_NE, scores_NE, counts_E) if torch.is_grad_enabled() else None
            if not is_recomputing():
                self.load_counts_E += counts_E
                if aux_losses is not None:
                    self.pending_aux_losses = aux_losses
        if self.backend_for(x_ND) == "grouped_mm":
            out_ND = self.experts.forward_grouped(x_ND, ids_NK, weights_NK, counts_E)
        else:
            out_ND = self.experts.forward_loop(x_ND, ids_NK, weights_NK)
        return out_ND.view(B, T, D)

    def inactive_parameter_count(self) -> int:
        """Expert weights a token does not use: E-K of the E experts."""
        per_expert = sum(p[0].numel() for p in self.experts.parameters())
        return (self.num_experts - self.top_k) * per_expert

    def training_metrics(self) -> dict[str, torch.Tensor]:
        """Expert load since the last call, over all ranks: f_e, the fraction of tokens routed to expert e
        (balanced: K/E), from the per-expert assignment counts all-reduced with SUM (exact global load; averaging
        per-rank fractions would weigh ranks, not tokens). A collective: every rank calls it at the same steps.

        ``load_max`` / ``load_min`` are the extremes over experts and ``load_max_over_min`` their ratio (an expert
        that received nothing counts as one assignment, so the ratio stays finite and still flags it).
        """
        counts_E = all_reduce_(self.load_counts_E.clone(), "sum")
        self.load_counts_E.zero_()
        routed = counts_E.sum()
        if routed == 0:
            return {}
        load_E = (counts_E * self.top_k / routed).float()
        prefix = f"moe/layer{self.layer_idx:02d}/"  # zero-padded: dashboards sort layer02 before layer10
        metrics = {
            prefix + "load_max": load_E.max(),
            prefix + "load_min": load_E.min(),
            prefix + "load_max_over_min": (counts_E.max() / counts_E.min().clamp(min=1)).float(),
        }
        if self.num_experts <= _MAX_EXPERTS_LOGGED_ONE_BY_ONE:
            metrics.update({prefix + f"load_expert{e}": load_E[e] for e in range(self.num_experts)})
        return metrics


def pop_auxiliary_losses(model: nn.Module) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """The weighted auxiliary loss of the MoE layers' last training forward, and its unweighted parts for logging.

    Each part is averaged over the layers; the stash is cleared, so a forward's losses are counted once.
    Returns ``(None, {})`` when no layer ran a training forward with gradients.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.pending_aux_losses is not None]
    if not layers:
        return None, {}
    total = sum(m.config.lb_loss_weight * m.pending_aux_losses["moe_lb_loss"]
                + m.config.z_loss_weight * m.pending_aux_losses["moe_z_loss"] for m in layers) / len(layers)
    parts = {name: torch.stack([m.pending_aux_losses[name] for m in layers]).mean().detach()
             for name in ("moe_lb_loss", "moe_z_loss")}
    for m in layers:
        m.pending_aux_losses = None
    return total, parts
