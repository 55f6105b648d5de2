"""RowShardedEmbedding on 2 and 3 gloo ranks equals one nn.Embedding over the same global table and global batch:
rows, gradients (sparse and dense), coverage, bytes moved, world-invariant init, bf16 rows in flight, and its
state dict as Shard(0) DTensors that any world size loads."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lit_overtok.nn.sharded_table import expected_bytes_per_step, row_bounds, RowShardedEmbedding, trunc_normal_rows_
from tests.distributed.harness import run_ranks

W = 8


def _full_table(rows: int, seed: int = 7) -> torch.Tensor:
    table = torch.empty(rows, W)
    trunc_normal_rows_(table, 0, rows, std=0.5, seed=seed, chunk_rows=5)
    return table


def _uneven_batches(world: int, rows: int) -> list[torch.Tensor]:
    """Rank 0: random ids with repeats; rank 1: only its own rows (it sends nothing); rank 2: no ids at all."""
    g = torch.Generator().manual_seed(1)
    bounds = row_bounds(rows, world)
    batches = [torch.cat([torch.randint(0, rows, (3, 5), generator=g), torch.tensor([[0, 0, rows - 1, rows - 1, 1]])])]
    batches.append(torch.randint(bounds[1], max(bounds[2], bounds[1] + 1), (2, 5), generator=g).clamp(max=rows - 1))
    batches += [torch.empty(0, 5, dtype=torch.long)] * (world - 2)
    return batches


def _check_parity(rank: int, world: int, rows: int, sparse: bool) -> None:
    full = _full_table(rows)
    table = RowShardedEmbedding(rows, W, sparse=sparse, grad_reduction="sum").train()
    trunc_normal_rows_(table.weight.data, table.row_start, rows, std=0.5, seed=7, chunk_rows=5)
    assert_close(table.weight.detach(), full[table.row_start: table.row_end], rtol=0, atol=0)  # world-invariant init
    batches = _uneven_batches(world, rows)
    g = torch.Generator().manual_seed(2)
    coefs = [torch.randn(*b.shape, W, generator=g) for b in batches]
    out = table(batches[rank])
    (out * coefs[rank]).sum().backward()

    reference = nn.Embedding(rows, W, sparse=sparse)
    reference.weight.data.copy_(full)
    ref_outs = [reference(b) for b in batches]
    sum((o * c).sum() for o, c in zip(ref_outs, coefs)).backward()
    assert out.shape == (*batches[rank].shape, W)
    assert_close(out, ref_outs[rank], rtol=0, atol=0)
    grad = table.weight.grad
    assert grad.is_sparse == sparse
    ref_grad = reference.weight.grad.to_dense()
    assert_close(grad.to_dense(), ref_grad[table.row_start: table.row_end])

    # Coverage: the owner marks every row of its block any rank looked up; the counts sum over ranks exactly.
    looked_up = torch.cat([b.flatten() for b in batches]).unique()
    mine = looked_up[(looked_up >= table.row_start) & (looked_up < table.row_end)] - table.row_start
    assert table.rows_touched.nonzero().flatten().tolist() == mine.tolist()
    assert table.touched_counts([0, 10], [10, rows - 10]).tolist() == [
        float((looked_up < 10).sum()), float((looked_up >= 10).sum())]

    # Bytes: each distinct id owned elsewhere goes out once (deduplicated), and its row comes back once.
    def asked(r: int, lo: int, hi: int) -> int:
        ids = batches[r].unique()
        return int(((ids >= lo) & (ids < hi)).sum())
    off_rank = len(batches[rank].unique()) - asked(rank, table.row_start, table.row_end)
    asked_of_me = sum(asked(r, table.row_start, table.row_end) for r in range(world) if r != rank)
    assert table.stats.sent["ids"] == 8 * off_rank
    assert table.stats.sent["rows"] == 4 * W * asked_of_me
    assert table.stats.sent["row_grads"] == 4 * W * off_rank


def _check_state_dict(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    full = _full_table(23)
    table = RowShardedEmbedding(23, W)
    table.load_state_dict({"weight": full, "rows_touched": torch.arange(23) % 3 == 0})  # a full (replicated) table
    assert_close(table.weight.detach(), full[table.row_start: table.row_end], rtol=0, atol=0)
    state = table.state_dict()
    assert isinstance(state["weight"], DTensor) and state["weight"].shape == (23, W)
    assert_close(state["weight"].full_tensor(), full, rtol=0, atol=0)
    assert state["rows_touched"].full_tensor().tolist() == (torch.arange(23) % 3 == 0).tolist()
    other = RowShardedEmbedding(23, W)
    other.load_state_dict(state)  # a Shard(0) DTensor of the same group: the local block, in place
    assert_close(other.full_weight(), full, rtol=0, atol=0)


def _check_bf16_rows_in_flight(rank: int, world: int) -> None:
    full = _full_table(29)
    ids = torch.randint(0, 29, (4, 6), generator=torch.Generator().manual_seed(10 + rank))
    proj = nn.Linear(W, 16)
    outputs = []
    for wire in (None, torch.bfloat16):
        table = RowShardedEmbedding(29, W, comm_dtype=wire).train()
        table.load_state_dict({"weight": full}, strict=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows_BTW = table(ids)
            y = proj(rows_BTW)
        assert table.weight.dtype == torch.float32 and rows_BTW.dtype == torch.float32
        y.float().square().sum().backward()
        outputs.append((y.detach(), table.weight.grad.to_dense()))
        proj.zero_grad()
    # Rows in flight as bf16 are exact when a bf16-autocast matmul consumes them: same output, same gradient.
    assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def _worker_2(rank: int, world: int) -> None:
    _check_parity(rank, world, 37, sparse=True)  # 19 + 18 rows
    _check_state_dict(rank, world)
    _check_bf16_rows_in_flight(rank, world)


def _worker_3(rank: int, world: int) -> None:
    _check_parity(rank, world, 37, sparse=True)  # 13 + 13 + 11 rows
    _check_parity(rank, world, 37, sparse=False)
    _check_parity(rank, world, 4, sparse=True)  # 2 + 2 + 0: an empty block
    _check_state_dict(rank, world)


def test_two_ranks_match_one_table() -> None:
    run_ranks(2, _worker_2)


def test_three_ranks_with_uneven_and_empty_blocks_match_one_table() -> None:
    run_ranks(3, _worker_3)


def test_world_size_one_is_a_plain_embedding_and_init_does_not_depend_on_the_split() -> None:
    table = RowShardedEmbedding(37, W, sparse=True)
    table.reset_parameters(std=0.5, seed=3)
    reference = nn.Embedding(37, W, sparse=True)
    trunc_normal_rows_(reference.weight.data, 0, 37, std=0.5, seed=3)
    ids = torch.randint(0, 37, (3, 4))
    assert_close(table(ids), reference(ids), rtol=0, atol=0)
    halves = [torch.empty(b - a, W) for a, b in zip(row_bounds(37, 2), row_bounds(37, 2)[1:])]
    for half, start in zip(halves, row_bounds(37, 2)):
        trunc_normal_rows_(half, start, 37, std=0.5, seed=3)
    assert_close(torch.cat(halves), table.weight.detach(), rtol=0, atol=0)
    assert table.stats.bytes_sent == 0


def test_analytic_bytes_count_unique_ids_owned_elsewhere() -> None:
    # Two ranks, one table of 4 rows, 1 lookup: E[unique] = 1, owned elsewhere with probability 1/2, summed over
    # both ranks: 1 id of 8 bytes + a row and its gradient of 2·4·W bytes; split sizes: 2·1·8 bytes.
    expected = expected_bytes_per_step([4], W, 2, 1)
    assert expected["ids"] == pytest.approx(8.0)
    assert expected["rows"] == expected["row_grads"] == pytest.approx(4.0 * W)
    assert expected["total"] == pytest.approx(16 + 8 + 8 * W)
