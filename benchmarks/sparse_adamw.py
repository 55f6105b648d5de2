"""The sparse tables' AdamW (``lit_overtok.optim.sparse_adamw``) against torch.optim.AdamW on dense gradients: how far
rows move under each row rule, the catch-up's one approximation, long-horizon numerics and cost (BENCHMARKS.md,
"Sparse AdamW").

    python benchmarks/sparse_adamw.py                 # ~1.5 minutes on one core
    python benchmarks/sparse_adamw.py --only-history --long 1000000   # the scalar history over 10^6 steps (~3 min)

1. movement: how far a row seen every P steps travels, sparse path / dense AdamW, lazy and adamw semantics;
2. catch-up: relative error of one catch-up's movement (identical state, a gap of s steps) against dense AdamW,
   for sqrt(v)/eps from 1e-2 to 1e5, three beta pairs (float64: the approximation alone);
3. run: 1000 steps of irregular rows (periods 1/3/10/100, random), warmup-cosine, weight decay 0.1, gradient entries
   log-uniform in [lo, hi]: max |sparse - dense| over the run's final weights, relative to the largest movement, in
   float64 and float32 (float32: dense AdamW's own rounding shows as well);
4. history: the per-row scalars (weight decay, the three series) at step N for rows last current at steps from
   N - 1 to 1, against direct float64 sums over the missed steps (lr 4e-4 warmup-cosine, weight decay 0.1);
5. cost: one step (catch-up of the looked-up rows + update) at several table sizes, lazy and adamw.
The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch

from lit_overtok.optim.schedule import warmup_cosine as schedule
from lit_overtok.optim.sparse_adamw import RowSparseAdamW

torch.set_num_threads(1)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    return schedule(step, warmup, total, 0.1)


def pair(table: torch.Tensor, semantics="adamw", schedule=None, **kw):
    sparse, dense = torch.nn.Parameter(table.clone()), torch.nn.Parameter(table.clone())
    opt, ref = RowSparseAdamW([sparse], row_semantics=semantics, **kw), torch.optim.AdamW([dense], **kw)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule or (lambda s: 1.0)) for o in (opt, ref)]
    return sparse, dense, opt, ref, scheds


def do_step(sparse, dense, opt, ref, scheds, rows, values):
    sparse.grad = torch.sparse_coo_tensor(rows[None], values, sparse.shape, check_invariants=True)
    grad = torch.zeros_like(dense)
    grad.index_add_(0, rows, values)
    dense.grad = grad
    opt.step()
    ref.step()
    for s in scheds:
        s.step()


def flushed(opt) -> torch.Tensor:
    opt = copy.deepcopy(opt)
    opt.flush()
    return opt.param_groups[0]["params"][0].detach()


def movement(period: int, semantics: str, betas, steps=1000) -> float:
    table = torch.zeros(2, 4, dtype=torch.float64)
    sparse, dense, opt, ref, scheds = pair(table, semantics, lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.0)
    for step in range(steps):
        rows = torch.tensor([0, 1]) if step % period == 0 else torch.tensor([1])
        do_step(sparse, dense, opt, ref, scheds, rows, torch.full((len(rows), 4), 1e-2, dtype=torch.float64))
    return (flushed(opt)[0].norm() / dense.detach()[0].norm()).item()


def catch_up_error(betas, gap: int, ratio: float) -> float:
    """Relative error of one catch-up over ``gap`` missed steps for a row whose sqrt(v) is ``ratio`` x eps."""
    eps, g = 1e-8, 1e-8 * ratio
    sparse, dense, opt, ref, scheds = pair(torch.zeros(2, 1, dtype=torch.float64), lr=1e-2, betas=betas, eps=eps,
                                           weight_decay=0.0)
    for step in range(100 + gap):
        rows = torch.tensor([0, 1]) if step < 100 else torch.tensor([1])
        do_step(sparse, dense, opt, ref, scheds, rows, torch.full((len(rows), 1), g, dtype=torch.float64))
    before = sparse.detach()[0].clone()
    return ((flushed(opt)[0] - before) / (dense.detach()[0] - before) - 1).item()


def run_error(dtype, lo: float, hi: float, betas, steps=1000, rows=48, width=8, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, width, generator=gen, dtype=dtype)
    sparse, dense, opt, ref, scheds = pair(table, lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.1,
                                           schedule=lambda s: warmup_cosine(s, 50, steps))
    period = torch.tensor([1, 3, 10, 100] * (rows // 4))[:rows]
    for step in range(steps):
        touched = ((step + torch.arange(rows) % 7) % period == 0) | (torch.rand(rows, generator=gen) < 0.03)
        idx = touched.nonzero().squeeze(1)
        shape = (len(idx), width)
        magnitude = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(shape, generator=gen,
                                                                                          dtype=torch.float64))
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        do_step(sparse, dense, opt, ref, scheds, idx, (magnitude * sign).to(dtype))
    err = (flushed(opt) - dense.detach()).abs().max().item()
    moved = (dense.detach() - table).abs().max().item()
    return {"max_abs_error": err, "max_movement": moved, "relative": err / moved}


def history_check(n_steps: int, seed=0) -> dict:
    """Scalars at step N from the optimizer's re-based history vs direct float64 sums over the missed steps."""
    beta1, beta2, eps, base_lr, wd = 0.9, 0.95, 1e-8, 4e-4, 0.1
    p = torch.nn.Parameter(torch.zeros(4, 1))
    opt = RowSparseAdamW([p], lr=base_lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    state = opt.state[p]
    opt._init_moments(p, state)
    opt._check_row_state(p, state, opt.param_groups[0])
    lrs = np.array([base_lr * warmup_cosine(s - 1, 2000, n_steps) for s in range(n_steps + 1)])
    start = time.perf_counter()
    for step in range(1, n_steps + 1):
        state["step"] += 1
        opt._record_step(state, step, float(lrs[step]), wd)
    seconds = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    since = np.unique(np.concatenate([n_steps - np.unique(np.round(np.logspace(0, math.log10(n_steps - 1), 60))),
                                      rng.integers(max(0, n_steps - 3000), n_steps, 40)]).astype(np.int64))
    got = opt._catch_up_scalars(state, torch.from_numpy(since), n_steps).numpy()
    worst = {"decay": 0.0, "m_-1": 0.0, "m_0": 0.0, "m_1": 0.0}
    steps = np.arange(n_steps + 1)
    bc1, bc2 = 1 - beta1 ** steps.astype(float), 1 - beta2 ** steps.astype(float)
    log_keep = np.log1p(-lrs * wd)
    for row, s0 in enumerate(since):
        j = np.arange(s0 + 1, n_steps + 1)
        d = (j - s0).astype(float)
        after = np.concatenate([np.cumsum(log_keep[j][::-1])[::-1][1:], [0.0]])  # sum over (j, N] of log(1 - lr wd)
        weight = np.exp(after)
        c0 = lrs[j] * np.sqrt(bc2[j]) / bc1[j] * (beta1 / math.sqrt(beta2)) ** d * weight
        m_neg = np.sum(lrs[j] / (eps * bc1[j]) * beta1**d * weight)
        m_0 = np.sum(c0)
        m_1 = np.sum(eps * lrs[j] * bc2[j] / bc1[j] * (beta1 / beta2) ** d * weight)
        decay = math.exp(np.sum(log_keep[j]))
        # The optimizer's scalars: decay, A, a, B, tau, beta1^s, beta2^s; rebuild M0 = A + B (Radau matches it).
        m_0_got = got[row, 1] + got[row, 3]
        worst["decay"] = max(worst["decay"], abs(got[row, 0] / decay - 1))
        worst["m_0"] = max(worst["m_0"], abs(m_0_got / m_0 - 1) if m_0 > 0 else 0.0)
        state_sums = _series(opt, state, s0, n_steps)
        worst["m_-1"] = max(worst["m_-1"], abs(state_sums[0] / m_neg - 1))
        worst["m_1"] = max(worst["m_1"], abs(state_sums[2] / m_1 - 1))
    return {"steps": n_steps, "record_step_us": seconds / n_steps * 1e6, "rows_checked": len(since),
            "max_relative_error": worst,
            "live_blocks": n_steps // int(state["row_meta"][3].item()) - int(state["row_meta"][4].item()) + 1,
            "history_bytes": state["row_history"].numel() * 8 + state["row_blocks"].numel() * 8}


def _series(opt, state, s0: int, step: int) -> list[float]:
    """M_-1, M_0, M_1 as the optimizer forms them (before the Radau step), for the history check."""
    meta, history, blocks = state["row_meta"], state["row_history"], state["row_blocks"]
    beta1, beta2, block = meta[0].item(), meta[1].item(), int(meta[3].item())
    ref = (s0 // block) * block
    base = math.exp(history[step, 0].item() - history[ref, 0].item())
    ratios = opt._ratios(beta1, beta2)
    sums = (blocks[s0 // block] - history[s0, 1:]) * base * ratios ** -(s0 - ref)
    return sums.tolist()


def cost(rows: int, semantics: str, width=64, touched=2048, steps=30) -> float:
    """Median seconds of catch_up(looked-up rows) + step() for a table of ``rows`` rows."""
    weight = torch.nn.Parameter(torch.randn(rows, width))
    opt = RowSparseAdamW([{"params": [weight], "weight_decay": 0.1}], lr=1e-3, row_semantics=semantics)
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 5):
        ids = torch.randint(0, rows, (touched,), generator=gen)
        grad = torch.sparse_coo_tensor(ids[None], torch.randn(touched, width, generator=gen), (rows, width))
        start = time.perf_counter()
        opt.catch_up(weight, ids)
        weight.grad = grad
        opt.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[5:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", type=int, default=200_000, help="steps of the scalar-history check")
    parser.add_argument("--only-history", action="store_true", help="run only the scalar-history check")
    args = parser.parse_args()
    out = {}
    if args.only_history:
        print(json.dumps({"history": history_check(args.long)}, default=str))
        return

    print("1. movement of a row seen every P steps, sparse / dense AdamW (constant gradient 1e-2, lr 1e-2, 1000 steps)")
    out["movement"] = {}
    for betas in [(0.9, 0.95), (0.9, 0.98)]:
        for period in (10, 100):
            r = {s: movement(period, s, betas) for s in ("lazy", "adamw")}
            out["movement"][f"{betas}/{period}"] = r
            print(f"   betas {betas} every {period:3d}: lazy {r['lazy']:.4f} ({1 / r['lazy']:.2f}x less)   "
                  f"adamw {r['adamw']:.6f}")

    print("2. one catch-up: relative error of its movement vs dense AdamW (float64), by sqrt(v)/eps and gap")
    out["catch_up"] = {}
    for betas in [(0.9, 0.95), (0.9, 0.98), (0.9, 0.999)]:
        for gap in (3, 30, 300):
            errs = {ratio: catch_up_error(betas, gap, ratio) for ratio in (1e-2, 1, 10, 100, 1e3, 1e5)}
            out["catch_up"][f"{betas}/{gap}"] = errs
            print(f"   betas {betas} gap {gap:4d}: " + "  ".join(f"{k:g}:{v:+.1e}" for k, v in errs.items()))

    print("3. 1000-step runs, irregular rows, warmup-cosine, wd 0.1: max |sparse - dense| / max movement")
    out["run"] = {}
    for lo, hi in [(1e-3, 1e-1), (1e-5, 1e-3), (1e-7, 1e-5), (1e-9, 1e-7)]:
        for betas in [(0.9, 0.95), (0.9, 0.98)]:
            for dtype in (torch.float64, torch.float32):
                r = run_error(dtype, lo, hi, betas)
                out["run"][f"{lo:g}-{hi:g}/{betas}/{dtype}"] = r
                print(f"   grads {lo:g}..{hi:g} betas {betas} {str(dtype):13s}: max abs err {r['max_abs_error']:.2e}"
                      f"  relative {r['relative']:.2e}")

    print(f"4. scalar history over {args.long} steps vs direct float64 sums")
    out["history"] = history_check(args.long)
    print("   ", out["history"])

    print("5. step cost (catch-up of 2048 looked-up rows + step), median ms")
    out["cost_ms"] = {}
    for rows in (10_000, 100_000, 400_000):
        r = {s: cost(rows, s) * 1e3 for s in ("lazy", "adamw")}
        out["cost_ms"][rows] = r
        print(f"   rows {rows:7d}: lazy {r['lazy']:.2f} ms  adamw {r['adamw']:.2f} ms")
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
