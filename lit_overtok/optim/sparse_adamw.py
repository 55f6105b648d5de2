"""AdamW that also takes sparse row gradients, with AdamW's semantics at a per-step cost independent of the table size:
the optional sparse-update path for large Over-Encoding tables (``OverEncodingConfig.sparse``).

The paper does not describe how it optimizes the tables (docs/method.md §6; presumably plain AdamW). Dense AdamW reads and
writes all m·D table entries and both moments every step, although a batch touches only B·T·k(n-1) rows. Here dense
gradients go through ``torch.optim.AdamW`` unchanged, and a parameter with a sparse COO gradient (an
``nn.Embedding(sparse=True)``) is updated only at the rows that gradient holds: O(rows touched) per step, never
O(rows). ``row_semantics`` (``OptimizerConfig.sparse_row_semantics``) picks what the other rows do:

- ``"adamw"`` (default): they train as under dense AdamW. A row records the step its weight and moments are current
  to; when it is next needed (``catch_up(param, rows)``, called by a forward pre-hook on the embedding right before
  its lookup, and by ``step`` for the rows with a gradient) it gets in one go what dense AdamW did to it over the
  zero-gradient steps it missed: the moment decay beta^s, the decoupled weight decay prod(1 - lr_j wd) and the
  momentum steps lr_j m_hat_j / (sqrt(v_hat_j) + eps), with each missed step's scheduled lr and bias corrections.
  ``flush()`` catches every row up (run by ``state_dict()`` and by a state-dict pre-hook on the embedding, so saved
  weights and optimizer state are what dense AdamW would hold).
- ``"lazy"``: the previous rule ("lazy" Adam, as ``torch.optim.SparseAdam``): untouched rows and their moments stay
  frozen and decay reaches a row only when touched, so a row seen every 10 (100) steps moves 3.1x (6.7x) less than
  under AdamW (betas 0.9/0.95). Cheaper per touched row; not comparable with dense-AdamW runs.

Exact (up to float rounding): touched rows (AdamW's own operations, in torch's order); the moment decay; the weight
decay (per-step log(1 - lr wd) summed in float64); the momentum steps when eps = 0, or when a row missed at most 2
steps. Approximated: with eps > 0 the sum over missed steps j of w_j / (sqrt(v) + e_j) (e_j = eps times a growing
bias/decay factor) is not separable per entry; a two-node Gauss-Radau rule that matches three separable scalar
series replaces it. It never overshoots, is exact as sqrt(v)/eps -> infinity (to second order) and -> 0, and in the
worst case, sqrt(v) ~ eps, a catch-up moves 0.8% (betas 0.9/0.95) or 0.04% (0.9/0.98) less than under dense AdamW;
less than 4e-7 less once sqrt(v) > 1000 eps (gradient entries above ~5e-5 when last nonzero).

Derivation. For a row current to step s whose gradient is zero at steps s+1..t, torch's AdamW gives per entry
m_t = b1^(t-s) m_s, v_t = b2^(t-s) v_s and p_t = exp(L_t - L_s) p_s - m_s S(x), x = sqrt(v_s), with
L_j = sum_{i<=j} log(1 - lr_i wd) and S(x) = sum_j w_j / (x + e_j), w_j = lr_j sqrt(bc2_j)/bc1_j (b1/sqrt(b2))^(j-s)
exp(L_t - L_j), e_j = eps sqrt(bc2_j) b2^(-(j-s)/2) (bc = 1 - b^j). With nu_j = w_j / e_j the three moments
N0 = sum nu_j, N1 = sum nu_j e_j, N2 = sum nu_j e_j^2 are geometric series in (j - s) with ratios b1, b1/sqrt(b2),
b1/b2 (hence b1 < b2 is required) and per-step coefficients, so a row gets them in O(1) from prefix sums over the
steps; the Radau rule with the fixed node a = e_{s+1} and one free node tau integrates polynomials of degree <= 2 in
e exactly against nu, and f(e) = e/(x + e) has a positive third derivative, so the remainder is >= 0 (no
overshoot). The prefix sums are re-based every B steps (q^-B <= 1e4) so that differences of float64 sums keep ~11
digits at step 10^6 (measured: relative errors <= 1e-11). Per-row memory: an int32 "current to" step beside AdamW's
two moments; per step: 4 float64 scalars (32 bytes of history, on the CPU). Measurements: BENCHMARKS.md ("Sparse
AdamW").

Gradient clipping: ``torch.nn.utils.clip_grad_norm_`` has no kernel for sparse gradients, so this optimizer offers
``clip_grad_norm_`` / ``clip_grad_value_`` over dense and sparse gradients together (the same global-norm rule), and
the LightningModule routes the Trainer's ``gradient_clip_val`` to them. Data parallelism: flush on every rank at the
same points (Lightning's checkpointing runs the state-dict hooks on every rank). Limits: the history lives on the
CPU (on a GPU a catch-up syncs once per call); amsgrad and maximize are refused for sparse parameters; betas and eps
of a table cannot change mid-run; ``catch_up`` must only be given sparse tables.
"""

from __future__ import annotations

import math
import weakref
from itertools import chain
from typing import Callable, Optional

import torch
from torch import nn

ROW_SEMANTICS = ("adamw", "lazy")
_ROW_KEYS = ("row_step", "row_history", "row_blocks", "row_meta")
# Block prefix sums are re-based every B steps so that q^-(s0 - R) <= _SPAN for every series ratio q: a difference
# of two float64 prefix sums then loses at most ~log10(_SPAN / (1 - q)) digits (about 1e-11 relative).
_SPAN = 1e4
# A block's running sums stop being updated once their next terms fall below this, relative (float64 eps is 1e-16).
_RETIRE = 1e-24
_FLUSH_CHUNK = 1 << 16


class RowSparseAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` for dense gradients plus a row-wise AdamW (``row_semantics``) for sparse gradients."""

    def __init__(self, params, *args, row_semantics: str = "adamw", **kwargs) -> None:
        if row_semantics not in ROW_SEMANTICS:
            raise ValueError(f"row_semantics must be one of {ROW_SEMANTICS}, got {row_semantics!r}")
        super().__init__(params, *args, **kwargs)
        self.row_semantics = row_semantics

    def __getstate__(self):  # torch's keeps only defaults, state and groups (copy.deepcopy, pickling)
        return {**super().__getstate__(), "row_semantics": self.row_semantics}

    def __setstate__(self, state) -> None:
        row_semantics = state.pop("row_semantics", "adamw")
        super().__setstate__(state)
        self.row_semantics = row_semantics

    # ------------------------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def catch_up(self, param: torch.Tensor, rows: torch.Tensor) -> None:
        """Bring ``param``'s ``rows`` (any shape, duplicates allowed) to the current step, as dense AdamW has them.

        Call it before a lookup reads those rows; a no-op for rows already current, before the first step, for a
        parameter this optimizer does not hold, and under ``row_semantics="lazy"``.
        """
        if self.row_semantics == "lazy":
            return
        # Validation runs under inference mode, but the state must stay normal tensors (inference_mode(False) turns
        # grad mode back on, hence no_grad inside it).
        with torch.inference_mode(False), torch.no_grad():
            state = self._row_state(param)
            if state is None:
                return
            rows = rows.reshape(-1).to(device=param.device, dtype=torch.long).unique()
            self._catch_up(param, state, rows)

    @torch.no_grad()
    def flush(self, param: Optional[torch.Tensor] = None) -> None:
        """Catch up every row (of ``param``, or of every sparse parameter): O(rows), for saving and evaluation.

        Under data parallelism call it on every rank at the same point, so replicas stay identical.
        """
        if self.row_semantics == "lazy":
            return
        params = [param] if param is not None else [p for g in self.param_groups for p in g["params"]
                                                    if "row_step" in self.state.get(p, {})]
        with torch.inference_mode(False), torch.no_grad():
            for p in params:
                state = self._row_state(p)
                if state is None:
                    continue
                stale = (state["row_step"] < int(state["step"].item())).nonzero().squeeze(1)
                for rows in stale.split(_FLUSH_CHUNK):
                    self._catch_up(p, state, rows)

    def register_catch_up_hooks(self, model: nn.Module) -> list:
        """Hook every ``nn.Embedding(sparse=True)`` of ``model`` whose weight this optimizer holds.

        A forward pre-hook catches up the rows about to be looked up (so a forward reads dense AdamW's values, in
        training, validation and generation alike); a state-dict pre-hook flushes the table, so ``model.state_dict()``
        (checkpoints, exports) holds dense AdamW's weights. Hooks an earlier optimizer put on the same table are
        removed: its row state no longer describes the weights once this one steps. Returns the handles.
        """
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        ref = weakref.ref(self)
        handles = []
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.sparse and id(module.weight) in owned:
                for handle in getattr(module, "_row_catch_up_handles", ()):
                    handle.remove()
                module._row_catch_up_handles = [
                    module.register_forward_pre_hook(_catch_up_before_lookup(ref), with_kwargs=True),
                    module.register_state_dict_pre_hook(_flush_before_state_dict(ref))]
                handles.extend(module._row_catch_up_handles)
        return handles

    def state_dict(self):
        """The optimizer state after ``flush()``: every row current, so it matches weights saved at the same time."""
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        # torch casts every floating-parameter state tensor to the parameter's dtype and device; the per-row steps
        # (int32) and the scalar history (float64, on the CPU) must keep theirs. They are kept as the other load
        # pre-hooks leave them (a row-sharded table's turns the whole table's row steps into this rank's block),
        # by a pre-hook appended after those, in parameter order.
        saved: list[dict] = []

        def keep_row_state(optimizer, loaded: dict) -> None:
            states = (loaded["state"].get(pid, {}) for g in loaded["param_groups"] for pid in g["params"])
            saved.extend({k: s[k] for k in _ROW_KEYS if k in s} for s in states)

        handle = self.register_load_state_dict_pre_hook(keep_row_state)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for kept, p in zip(saved, params):
            if not kept:
                continue
            state = self.state[p]
            if self.row_semantics == "lazy":  # lazy semantics keep no row state (weights were saved flushed)
                for key in _ROW_KEYS:
                    state.pop(key, None)
                continue
            state["row_step"] = kept["row_step"].to(device=p.device, dtype=torch.int32, copy=True)
            for key in ("row_history", "row_blocks", "row_meta"):
                state[key] = kept[key].to(device="cpu", dtype=torch.float64, copy=True)

    # ------------------------------------------------------------------------------------------------------- step
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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse and "row_step" in self.state.get(p, {}):
                    raise RuntimeError("RowSparseAdamW: a parameter with row state got a dense gradient; a table "
                                       "must keep sparse gradients for the whole run")
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
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("RowSparseAdamW: amsgrad and maximize are not supported for sparse gradients")
            if self.row_semantics == "lazy":
                self._lazy_update(group, p, p.grad)
            else:
                self._adamw_update(group, p, p.grad)
        return loss

    def _lazy_update(self, group: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW's update (same operations as torch's single-tensor AdamW) on the rows the gradient holds."""
        grad = grad.coalesce()  # sums the contributions of a row looked up several times
        rows = grad.indices()[0]
        state = self.state[param]
        if not state:
            self._init_moments(param, state)
        state["step"] += 1
        self._adam_rows(group, param, state, rows, grad.values(), state["step"].item())

    def _adamw_update(self, group: dict, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Catch the touched rows up to the last step, record this step's scalars, then AdamW on the touched rows."""
        grad = grad.coalesce()
        rows = grad.indices()[0]
        state = self.state[param]
        if not state:
            self._init_moments(param, state)
        self._check_row_state(param, state, group)
        self._catch_up(param, state, rows)  # normally done already by the lookup's pre-hook
        state["step"] += 1
        step = int(state["step"].item())
        self._record_step(state, step, group["lr"], group["weight_decay"])
        self._adam_rows(group, param, state, rows, grad.values(), float(step))
        state["row_step"].index_fill_(0, rows, step)

    @staticmethod
    def _init_moments(param: torch.Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    @staticmethod
    def _adam_rows(group: dict, param: torch.Tensor, state: dict, rows: torch.Tensor, grad_rows: torch.Tensor,
                   step: float) -> None:
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

    # ------------------------------------------------------------------------------------- row state and history
    # Per sparse parameter (all in the state dict):
    #   row_step    (rows,) int32: the step each row's weight and moments are current to;
    #   row_history (>= steps+1, 4) float64: per step j, L_j = sum_{i<=j} log(1 - lr_i wd) and the three series'
    #               prefix sums within j's block, P_k(j) = sum_{R<i<=j} c_k,i q_k^(i-R) exp(L_R - L_i),
    #               R = B floor(j/B);
    #   row_blocks  (>= blocks, 3) float64: each block's P_k at the current step (frozen once converged);
    #   row_meta    [beta1, beta2, eps, B, first block still updated].
    # Series k = -1, 0, 1 (N0, N1, N2 of the module docstring): ratios q = beta1, beta1/sqrt(beta2), beta1/beta2;
    #   coefficients c_-1 = lr/(eps bc1), c_0 = lr sqrt(bc2)/bc1, c_1 = eps lr bc2/bc1, with bc = 1 - beta^j.

    def _group_of(self, param: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("parameter not held by this optimizer")

    def _row_state(self, param: torch.Tensor) -> Optional[dict]:
        state = self.state.get(param)
        if not state:
            return None  # no step yet: every row is current
        if "row_step" not in state:
            self._check_row_state(param, state, self._group_of(param))
        return state

    def _check_row_state(self, param: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        if "row_step" in state:
            meta = state["row_meta"]
            if (meta[0].item(), meta[1].item(), meta[2].item()) != (beta1, beta2, eps):
                raise ValueError("RowSparseAdamW: betas and eps of a sparse parameter cannot change during a run")
            return
        if not 0.0 <= beta1 < beta2 < 1.0:
            raise ValueError(f"row_semantics='adamw' needs 0 <= beta1 < beta2 < 1, got betas {(beta1, beta2)}")
        # First use, or state from dense AdamW or the lazy rule (a resumed run): every row is current now; the
        # history before now is that of zero-lr steps, which no row reads.
        step = int(state["step"].item())
        block = _block_size(beta1)
        state["row_step"] = torch.full((param.shape[0],), step, dtype=torch.int32, device=param.device)
        state["row_history"] = torch.zeros(max(64, 2 * (step + 1)), 4, dtype=torch.float64)
        state["row_blocks"] = torch.zeros(max(8, 2 * (step // block + 1)), 3, dtype=torch.float64)
        state["row_meta"] = torch.tensor([beta1, beta2, eps, block, step // block], dtype=torch.float64)

    @staticmethod
    def _ratios(beta1: float, beta2: float) -> torch.Tensor:
        return torch.tensor([beta1, beta1 / math.sqrt(beta2), beta1 / beta2], dtype=torch.float64)

    def _record_step(self, state: dict, step: int, lr: float, weight_decay: float) -> None:
        """Append step ``step``'s scalars: O(1) amortised (a few live blocks), independent of the rows."""
        lr, weight_decay = float(lr), float(weight_decay)
        meta = state["row_meta"]
        beta1, beta2, eps, block, live = meta.tolist()
        block, live = int(block), int(live)
        first, current = live, step // block
        history = state["row_history"] = _with_capacity(state["row_history"], step + 1)
        blocks = state["row_blocks"] = _with_capacity(state["row_blocks"], current + 1)
        if lr * weight_decay >= 1:
            raise ValueError(f"lr * weight_decay must be < 1 (got {lr * weight_decay})")
        log_decay = history[step - 1, 0].item() + math.log1p(-lr * weight_decay)
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        coef = (lr / (eps * bc1) if eps > 0 else 0.0, lr * math.sqrt(bc2) / bc1, eps * lr * bc2 / bc1)
        ratios = (beta1, beta1 / math.sqrt(beta2), beta1 / beta2)
        # Blocks whose reference step R is before this step take its term c_k q_k^(step - R) exp(L_R - L_step).
        last = current if step % block else current - 1
        sums = blocks[live: last + 1].tolist()
        log_refs = history[live * block: last * block + 1: block, 0].tolist()
        for i, (row, log_ref) in enumerate(zip(sums, log_refs)):
            growth, gap = math.exp(log_ref - log_decay), step - (live + i) * block
            sums[i] = [s + c * q**gap * growth for s, c, q in zip(row, coef, ratios)]
        if sums:
            blocks[live: last + 1] = torch.tensor(sums, dtype=torch.float64)
        if step % block == 0:
            blocks[current] = 0.0  # a new block: its sums start at its reference step
        current_sums = sums[-1] if step % block else [0.0, 0.0, 0.0]
        history[step] = torch.tensor([log_decay, *current_sums], dtype=torch.float64)
        while live < current:  # converged blocks stop taking terms
            gap = step - live * block - block
            if ratios[2] ** gap * math.exp(log_refs[live - first] - log_decay) >= _RETIRE:
                break
            live += 1
        meta[4] = live

    def _catch_up_scalars(self, state: dict, since: torch.Tensor, step: int) -> torch.Tensor:
        """(n, 7) float64 per-row scalars for rows current to ``since`` (int64, CPU) to reach ``step``:
        weight factor, Radau weights and nodes (A, a, B, tau), first and second moment factors."""
        meta, history, blocks = state["row_meta"], state["row_history"], state["row_blocks"]
        beta1, beta2, eps, block = meta[0].item(), meta[1].item(), meta[2].item(), int(meta[3].item())
        refs = torch.div(since, block, rounding_mode="floor")
        ref_steps = refs * block
        log_now = history[step, 0]
        decay = torch.exp(log_now - history[since, 0])
        base = torch.exp(log_now - history[ref_steps, 0])
        # M_k = sum over missed steps j of c_k,j q_k^(j - since) exp(L_step - L_j), from the block's re-based sums.
        offset = (since - ref_steps).to(torch.float64)
        rebase = base[:, None] * self._ratios(beta1, beta2)[None, :] ** -offset[:, None]
        sums = (blocks[refs] - history[since, 1:]) * rebase
        m_neg, m_0, m_1 = sums.clamp_min(0.0).unbind(1)
        missed = (step - since).to(torch.float64)
        first, second = beta1**missed, beta2**missed
        if eps > 0:
            # Radau rule for nu_j = w_j / e_j over the nodes e_j, one node fixed at the smallest e (the first missed
            # step): nu-moments N0, N1, N2 = m_neg, m_0, m_1.
            node_a = eps * torch.sqrt(1 - beta2 ** (since + 1).to(torch.float64)) / math.sqrt(beta2)
            n1 = m_0 - node_a * m_neg
            n2 = m_1 - 2 * node_a * m_0 + node_a**2 * m_neg
            two = (n1 > 1e-9 * m_0) & (n2 > 1e-9 * m_1)
            weight_tau = torch.where(two, n1**2 / torch.where(two, n2, 1.0), 0.0)
            node_tau = torch.where(two, node_a + n2 / torch.where(two, n1, 1.0), node_a)
            weight_a = (m_neg - weight_tau).clamp_min(0.0)
            big_a, big_b = weight_a * node_a, weight_tau * node_tau
        else:  # no eps: sum_j w_j / sqrt(v) exactly
            big_a, node_a = m_0, torch.zeros_like(m_0)
            big_b, node_tau = torch.zeros_like(m_0), torch.ones_like(m_0)
        return torch.stack([decay, big_a, node_a, big_b, node_tau, first, second], dim=1)

    def _catch_up(self, param: torch.Tensor, state: dict, rows: torch.Tensor) -> None:
        """Catch up unique ``rows``: reads and writes those rows only (O(rows x width))."""
        step = int(state["step"].item())
        since = state["row_step"].index_select(0, rows)
        stale = since < step
        rows, since = rows[stale], since[stale]
        if rows.numel() == 0:
            return
        compute = torch.promote_types(param.dtype, torch.float32)
        scalars = self._catch_up_scalars(state, since.to("cpu", torch.long), step).to(param.device, compute)
        decay, big_a, node_a, big_b, node_tau, first, second = scalars[:, :, None].unbind(1)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        m_rows = exp_avg.index_select(0, rows).to(compute)
        v_rows = exp_avg_sq.index_select(0, rows).to(compute)
        root = v_rows.sqrt()
        movement = (big_a / (root + node_a)).add_(big_b / (root + node_tau)).mul_(m_rows)
        if state["row_meta"][2].item() == 0:  # eps = 0: rows never touched have m = v = 0, 0/0
            movement = torch.where(m_rows == 0, 0.0, movement)
        p_rows = param.index_select(0, rows).to(compute).mul_(decay).sub_(movement)
        param.index_copy_(0, rows, p_rows.to(param.dtype))
        exp_avg.index_copy_(0, rows, m_rows.mul_(first).to(exp_avg.dtype))
        exp_avg_sq.index_copy_(0, rows, v_rows.mul_(second).to(exp_avg_sq.dtype))
        state["row_step"].index_fill_(0, rows, step)

    # --------------------------------------------------------------------------------------------------- clipping
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


def _block_size(beta1: float) -> int:
    """Steps per re-based block: q^-B <= _SPAN for the fastest-decaying series (q = beta1)."""
    if beta1 <= 0.0:
        return 1
    return max(1, min(4096, int(math.log(_SPAN) / -math.log(beta1))))


def _with_capacity(table: torch.Tensor, rows: int) -> torch.Tensor:
    """``table`` with at least ``rows`` rows, doubling (amortised O(1) per appended row)."""
    if table.shape[0] >= rows:
        return table
    grown = table.new_zeros(max(rows, 2 * table.shape[0]), table.shape[1])
    grown[: table.shape[0]] = table
    return grown


def _catch_up_before_lookup(ref: "weakref.ReferenceType[RowSparseAdamW]"):
    def hook(module: nn.Embedding, args: tuple, kwargs: dict) -> None:
        optimizer = ref()
        if optimizer is not None:
            optimizer.catch_up(module.weight, args[0] if args else kwargs["input"])
    return hook


def _flush_before_state_dict(ref: "weakref.ReferenceType[RowSparseAdamW]"):
    def hook(module: nn.Embedding, prefix: str, keep_vars: bool) -> None:
        optimizer = ref()
        if optimizer is not None:
            optimizer.flush(module.weight)
    return hook
