"""AdamW that also takes sparse row gradients: the optional sparse-update path for large Over-Encoding tables.

The paper does not describe its optimizer handling of the tables (PAPER.md §6, presumably plain AdamW). With dense
AdamW every step reads and writes all m·D table entries and their two moments, so its cost grows with m although a
batch touches only B·T·k(n-1) rows. This optimizer keeps AdamW (``torch.optim.AdamW``, unchanged) for every
parameter whose gradient is dense, and updates a parameter whose gradient is a sparse COO tensor (an
``nn.Embedding(sparse=True)``) only at the rows that gradient holds ("lazy" Adam, as ``torch.optim.SparseAdam``),
so Lightning still sees a single optimizer in automatic optimization.

How the lazy update differs from dense AdamW (for rows a step does not touch; touched rows get AdamW's formula):
- untouched rows do not move: dense AdamW keeps moving them by their decaying first moment (m_hat/sqrt(v_hat));
- their moments are not decayed, so when a row is touched again its old moments count more than under AdamW;
- decoupled weight decay is applied only to touched rows (dense AdamW shrinks every row every step), so a rarely
  seen row decays less; with the default weight decay 0 for the tables this makes no difference;
- the bias correction uses the table's step count (optimizer steps with a gradient), not the row's, like SparseAdam
  and TensorFlow's LazyAdam;
- on the first step, or for a row whose every past gradient was touched at every step, the result equals AdamW.
Memory is the same as AdamW's (dense moments), and the table needs no dense gradient buffer.

Gradient clipping: ``torch.nn.utils.clip_grad_norm_`` has no kernel for sparse gradients, so this optimizer offers
``clip_grad_norm_`` / ``clip_grad_value_`` over dense and sparse gradients together (the same global-norm rule), and
the LightningModule routes the Trainer's ``gradient_clip_val`` to them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class RowSparseAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` for dense gradients plus a lazy row-wise AdamW for sparse (embedding) gradients."""

    def _sparse_parameters(self) -> list[tuple[dict, torch.Tensor]]:
        return [(group, p) for group in self.param_groups for p in group["params"]
                if p.grad is not None and p.grad.is_sparse]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = self._sparse_parameters()
        grads = [p.grad for _, p in sparse]
        # AdamW skips parameters without a gradient: hide the sparse ones from it for its step.
        for _, p in sparse:
            p.grad = None
        try:
            super().step()
        finally:
            for (_, p), grad in zip(sparse, grads):
                p.grad = grad
        for group, p in sparse:
            self._lazy_update(group, p, p.grad)
        return loss

    def _lazy_update(self, group: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW's update (same operations as torch's single-tensor AdamW) on the rows the gradient holds."""
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("RowSparseAdamW: amsgrad and maximize are not supported for sparse gradients")
        grad = grad.coalesce()  # sums the contributions of a row looked up several times
        rows = grad.indices()[0]
        grad_rows = grad.values()
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        # index_select copies whole rows (several times faster than advanced indexing on CPU).
        exp_avg_rows = state["exp_avg"].index_select(0, rows).lerp_(grad_rows, 1 - beta1)
        exp_avg_sq_rows = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad_rows, grad_rows,
                                                                                        value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg_rows)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq_rows)
        param_rows = param.index_select(0, rows).mul_(1 - lr * weight_decay)
        step_size = lr / (1 - beta1**step)
        denom_rows = (exp_avg_sq_rows.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        param.index_copy_(0, rows, param_rows.addcdiv_(exp_avg_rows, denom_rows, value=-step_size))

    def _gradient_tensors(self) -> list[torch.Tensor]:
        """Every gradient as a dense tensor to clip in place: sparse ones are coalesced and give their values."""
        tensors = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    p.grad = p.grad.coalesce()  # a row's duplicates must be summed before its norm is taken
                    tensors.append(p.grad._values())
                else:
                    tensors.append(p.grad)
        return tensors

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so their global L2 norm is at most ``max_norm`` (torch's clip_grad_norm_ rule)."""
        tensors = self._gradient_tensors()
        if not tensors:
            return torch.tensor(0.0)
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for t in tensors:
            t.mul_(coef.to(t.device, t.dtype))
        return total_norm

    @torch.no_grad()
    def clip_grad_value_(self, clip_value: float) -> None:
        for t in self._gradient_tensors():
            t.clamp_(-clip_value, clip_value)
