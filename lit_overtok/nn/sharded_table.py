"""Row-sharded lookup table with all-to-all lookups: the paper's "tensor parallelism for the OE layer" (docs/method.md §6).

Over-Encoding's hashed tables (OE-12.8M: 13-26B parameters) do not fit one GPU, so each rank of a process group owns
one contiguous block of the rows (``row_bounds``: ``torch.chunk``'s split, which is DTensor's ``Shard(0)``; blocks
may be uneven or empty) and holds only that block as its parameter, so weights and optimizer moments are 1/world
per rank. A lookup deduplicates the rank's ids, sends each to its owner and receives the rows back; backward sends
the (locally summed) row gradients to their owners, which turn them into a sparse COO gradient of their block.
Collectives per forward: 3 all-to-alls (split sizes, a world-long int64 vector; ids; rows); per backward: 1 (row
gradients). At world size 1 a lookup is a plain ``F.embedding``. Engram's tables (``engram.sharded``) are the same
module: the owner builds a meta placeholder and passes its initialisation on (``draw_rows``), and
``place_sharded_tables`` materializes every such table of a model, whichever family owns it.

Why a hand-written all-to-all rather than torch's DTensor row-wise embedding or TorchRec (checked on torch 2.13):
- DTensor's ``Shard(0)`` embedding wants the ids *replicated*: under data parallelism every rank's ids differ, so
  they would be all-gathered (world·N per rank), looked up with masking and world·N·W partial rows reduce-scattered,
  about ``world`` times the all-to-all's traffic and without deduplication; given ``Shard(0)`` ids it replicates the
  weight instead (FSDP's all-gather: the out-of-memory the paper avoids);
- its backward gives a dense, replicated gradient of the whole table shape, and ``sparse=True`` has no DTensor rule
  (NotImplementedError), so the owner could not update only the touched rows;
- TorchRec's row-wise sharding with FBGEMM's fused optimizers is the production GPU path, but its wheels (1.9.2 /
  fbgemm-gpu-cpu 1.9.0) do not load against torch 2.13 here, and it brings its own optimizer;
- ``all_to_all_single`` with uneven and empty splits is all this needs, and gloo and NCCL both have it.
DTensor is used for what it is good at: ``state_dict()`` shows the blocks as ``Shard(0)`` DTensors of the global
shape, so torch.distributed.checkpoint (Lightning's sharded checkpoints) saves each rank's block without a gather
and reshards on load at any world size, 1 included.

Every rank of the group must make the same lookups in the same order (each is a collective): training and
validation do, with equal batch counts per rank; rank-dependent loops (sampling until EOS, lm-eval requests) must
run at world size 1 from a checkpoint.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lit_overtok.nn.collectives import all_reduce_, group_rank_and_size

STATE_KEYS = ("weight", "rows_touched")  # the module's row-shaped tensors, as named in its state dict
INIT_CHUNK_ROWS = 1 << 16


def row_bounds(num_rows: int, world: int) -> list[int]:
    """Block starts of every rank plus the end: rank r owns rows ``[b[r], b[r+1])`` (``torch.chunk``/DTensor split)."""
    chunk = -(-num_rows // world) if num_rows else 0
    return [min(num_rows, chunk * r) for r in range(world)] + [num_rows]


@torch.no_grad()
def trunc_normal_rows_(block: torch.Tensor, row_start: int, num_rows: int, std: float, seed: int,
                       chunk_rows: int = INIT_CHUNK_ROWS) -> None:
    """Fill ``block`` = rows ``[row_start, row_start + len(block))`` of a (num_rows, W) table with truncated
    normal(0, std) values cut at 3 std, drawn per chunk of ``chunk_rows`` global rows from a generator seeded by
    (seed, chunk): the whole table is the same whichever blocks it is cut into (replicated or sharded, any world).
    Drawn on the CPU and copied, so a block placed on a GPU gets the values a CPU-built table has."""
    row_end = row_start + block.shape[0]
    if row_end <= row_start:
        return
    for chunk in range(row_start // chunk_rows, (row_end - 1) // chunk_rows + 1):
        lo, hi = chunk * chunk_rows, min(num_rows, (chunk + 1) * chunk_rows)
        generator = torch.Generator().manual_seed(seed + zlib.crc32(f"rows{chunk}".encode()))
        values = torch.empty(hi - lo, *block.shape[1:], dtype=block.dtype)
        nn.init.trunc_normal_(values, 0.0, std, -3 * std, 3 * std, generator=generator)
        a, b = max(lo, row_start), min(hi, row_end)
        block[a - row_start: b - row_start] = values[a - lo: b - lo]


@dataclass
class CommStats:
    """Bytes this rank sent to (and received from) *other* ranks, per kind, summed over calls since ``reset()``."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, sent: int, received: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + sent
        self.received[kind] = self.received.get(kind, 0) + received

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()


@dataclass
class _Route:
    """Where one lookup's ids went: computed without autograd, reused by the row exchange and its backward."""

    inverse_N: torch.Tensor  # position of each looked-up id among the rank's sorted unique ids
    send_counts: list[int]  # unique ids this rank sent to each owner (the owners' order = sorted id order)
    recv_counts: list[int]  # ids each rank asked this owner for
    recv_local_R: torch.Tensor  # the asked-for rows, as indices into this rank's block


class RowShardedEmbedding(nn.Module):
    """``nn.Embedding(num_rows, width)`` whose rows are split over ``group``; ``forward(global_ids) -> rows``.

    Args:
        num_rows, width: the global table's shape (every rank passes the same numbers).
        group: the process group the rows are sharded over; None = the default group (world size 1 without one).
        sparse: the weight's gradient is a coalesced sparse COO tensor of the local block (for the row optimizer);
            dense (zeros except the touched rows) when False.
        grad_reduction: "mean" divides the gathered row gradients by the group size, as DDP and FSDP do to every
            other gradient, so the table trains as one process on the concatenated batch; "sum" keeps the sum.
        comm_dtype: dtype of the rows in flight; torch.bfloat16 halves the forward traffic and is exact when a
            bf16-autocast matmul consumes the rows. None = the weight's dtype.
        device, dtype: of the block; device "meta" builds a placeholder that must be replaced before a lookup.
    """

    counts_as_embedding = True  # a lookup table (``nn.hooks``): counted with the embeddings, no FLOPs

    def __init__(self, num_rows: int, width: int, group: Optional[dist.ProcessGroup] = None, sparse: bool = True,
                 grad_reduction: str = "mean", comm_dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
        self.num_rows, self.width = num_rows, width
        self.sparse, self.grad_reduction, self.comm_dtype = sparse, grad_reduction, comm_dtype
        self._allocate(group, device, dtype)
        self.initial_draw = (0.02, 0)  # (std, seed) given by ``draw_rows``, reused when ``place`` allocates anew
        self.stats = CommStats()
        # Called as fn(weight, local_rows) right before the owner reads rows it serves (an optimizer's row catch-up).
        self.before_serving: list[Callable[[torch.Tensor, torch.Tensor], None]] = []
        self.register_state_dict_post_hook(_blocks_as_dtensors)
        self.register_load_state_dict_pre_hook(_blocks_from_any_layout)

    def _allocate(self, group: Optional[dist.ProcessGroup], device: Optional[torch.device],
                  dtype: Optional[torch.dtype]) -> None:
        """This rank's (uninitialised) block of the rows over ``group``, and its coverage flags."""
        self.group = group
        self.rank, self.world = group_rank_and_size(group)
        self.bounds = row_bounds(self.num_rows, self.world)
        self.row_start, self.row_end = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.weight = nn.Parameter(torch.empty(self.row_end - self.row_start, self.width, device=device, dtype=dtype))
        # Marks the block for whoever must leave it alone (DDP's all-reduce, fully_shard) or count it whole
        # (``nn.hooks.global_shape``).
        self.weight.global_shape = (self.num_rows, self.width)
        # Rows of this block looked up (by any rank) in training so far: the owner's share of OE coverage.
        self.register_buffer("rows_touched", torch.zeros(self.weight.shape[0], dtype=torch.bool, device=device))
        self._mesh = None

    def _apply(self, fn, recurse: bool = True):
        # A meta placeholder stays one through .to()/.cpu()/.float(): moving it would allocate the whole table.
        return self if self.weight.is_meta else super()._apply(fn, recurse)

    # ------------------------------------------------------------------------------------------------ tools
    def reset_parameters(self, std: float = 0.02, seed: int = 0) -> None:
        """``trunc_normal_rows_`` on this block: every world size (1 included) gets the same global table."""
        trunc_normal_rows_(self.weight.data, self.row_start, self.num_rows, std, seed)

    def draw_rows(self, std: float, seed: int) -> list[nn.Parameter]:
        """The owner's ``init_own_parameters`` (``nn.hooks``; Over-Encoding's, Engram's: one rule for both): the block
        is drawn by row chunks, not as other parameters are, so the global table does not depend on the world size;
        a placeholder remembers (std, seed) for ``place``. Returns the parameters it drew."""
        self.initial_draw = (std, seed)
        if not self.weight.is_meta:
            self.reset_parameters(std, seed)
        return [self.weight]

    def place(self, group: Optional[dist.ProcessGroup]) -> None:
        """Materialize this rank's block over ``group`` (None: the default group, or the whole table without a
        process group), drawn as ``draw_rows`` said, on the current default device (Lightning's
        ``configure_model`` runs under the root device); a no-op when the table is already placed there. Every rank
        of the group must call it."""
        rank, world = group_rank_and_size(group)
        if not self.weight.is_meta and (self.group, self.rank, self.world) == (group, rank, world):
            return
        self._allocate(group, None, self.weight.dtype)
        self.reset_parameters(*self.initial_draw)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole table on every rank (all-gather): for tests and small tables only, it is O(num_rows) memory."""
        if self.world == 1:
            return self.weight.detach().clone()
        chunk = self.bounds[1] - self.bounds[0]
        padded = self.weight.new_zeros(chunk, self.width)
        padded[: self.weight.shape[0]] = self.weight
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[: self.bounds[r + 1] - self.bounds[r]] for r, g in enumerate(gathered)])

    def as_global(self, block: torch.Tensor) -> torch.Tensor:
        """A tensor of this rank's block rows as a ``Shard(0)`` DTensor of the global shape, sharing its storage
        (so DCP loads into the block in place); the block itself at world size 1."""
        if self.world == 1:
            return block
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            group = self.group if self.group is not None else dist.group.WORLD
            self._mesh = DeviceMesh.from_group(group, self.weight.device.type)
        shape = torch.Size((self.num_rows, *block.shape[1:]))
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(block, self._mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)

    def as_block(self, value: torch.Tensor) -> torch.Tensor:
        """The inverse of ``as_global`` for a value loaded from anywhere: a Shard(0) DTensor over this group gives
        its local block; a full table (a replicated model's, or a gathered checkpoint) gives this rank's rows."""
        from torch.distributed.tensor import DTensor, Shard

        if isinstance(value, DTensor):
            if tuple(value.placements) == (Shard(0),) and value.device_mesh.size() == self.world:
                return value.to_local()
            value = value.full_tensor()  # another layout: rare, costs a gather
        if value.shape[0] == self.num_rows:
            return value[self.row_start: self.row_end]
        raise ValueError(f"RowShardedEmbedding: cannot take a tensor of shape {tuple(value.shape)} for rows "
                         f"[{self.row_start}, {self.row_end}) of {self.num_rows}")

    def touched_counts(self, table_offsets: Sequence[int], table_rows: Sequence[int]) -> torch.Tensor:
        """Rows of each (sub)table looked up in training so far, over the whole group: all-reduce SUM of the
        owners' disjoint counts, so it is exact. Divide by ``table_rows`` for OE coverage."""
        counts = torch.zeros(len(table_rows), dtype=torch.float64, device=self.rows_touched.device)
        for i, (offset, rows) in enumerate(zip(table_offsets, table_rows)):
            a, b = max(offset, self.row_start), min(offset + rows, self.row_end)
            if b > a:
                counts[i] = self.rows_touched[a - self.row_start: b - self.row_start].count_nonzero()
        return all_reduce_(counts, "sum", self.group)

    # ------------------------------------------------------------------------------------------------- lookup
    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.weight.is_meta:
            raise RuntimeError("RowShardedEmbedding is a meta-device placeholder: materialize it first "
                               "(OverTokLM.configure_model does, or lit_overtok.nn.sharded_table.place_sharded_tables)")
        if self.world == 1:
            self._serve(rows.flatten())
            return F.embedding(rows, self.weight, sparse=self.sparse)
        route = self._route(rows.flatten())
        self._serve(route.recv_local_R)
        unique_rows_UW = _ExchangeRows.apply(self.weight, route, self)
        # Gathering the unique rows back to every position: autograd sums duplicates' gradients (index_add).
        return unique_rows_UW.index_select(0, route.inverse_N).view(*rows.shape, self.width)

    def _serve(self, local_rows: torch.Tensor) -> None:
        """Bookkeeping of the rows this owner is about to read: coverage (training only) and ``before_serving``."""
        if self.training:
            with torch.no_grad():
                self.rows_touched[local_rows] = True
        for hook in self.before_serving:
            hook(self.weight, local_rows)

    @torch.no_grad()
    def _route(self, ids_N: torch.Tensor) -> _Route:
        ids_N = ids_N.long()
        unique_U, inverse_N = torch.unique(ids_N, sorted=True, return_inverse=True)
        bounds = torch.tensor(self.bounds, device=ids_N.device)
        # Owner of each id, -1 below 0 and world at/after num_rows; sorted ids make each owner's ids contiguous.
        owner_U = torch.bucketize(unique_U, bounds, right=True) - 1
        counts = torch.bincount(owner_U + 1, minlength=self.world + 2).tolist()  # the one host sync of the route
        if counts[0] or counts[-1]:
            raise IndexError(f"RowShardedEmbedding: {counts[0] + counts[-1]} ids outside [0, {self.num_rows})")
        send_counts = counts[1:-1]
        recv_counts_W = torch.empty(self.world, dtype=torch.long, device=ids_N.device)
        self._all_to_all("split_sizes", recv_counts_W, torch.tensor(send_counts, device=ids_N.device),
                         [1] * self.world, [1] * self.world)
        recv_counts = recv_counts_W.tolist()
        recv_ids_R = torch.empty(sum(recv_counts), dtype=torch.long, device=ids_N.device)
        self._all_to_all("ids", recv_ids_R, unique_U, recv_counts, send_counts)
        return _Route(inverse_N, send_counts, recv_counts, recv_ids_R - self.row_start)

    def _all_to_all(self, kind: str, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
                    in_splits: list[int]) -> None:
        row_bytes = inp.element_size() * math.prod(inp.shape[1:])
        self.stats.add(kind, (sum(in_splits) - in_splits[self.rank]) * row_bytes,
                       (sum(out_splits) - out_splits[self.rank]) * row_bytes)
        dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.group)

    def extra_repr(self) -> str:
        return (f"num_rows={self.num_rows}, width={self.width}, rows=[{self.row_start}, {self.row_end}) of rank "
                f"{self.rank}/{self.world}, sparse={self.sparse}")


def place_sharded_tables(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Materialize every row-sharded table of ``model`` over ``group``, whichever module owns it (Over-Encoding's,
    Engram's; ``RowShardedEmbedding.place``). Without Lightning (which does it in ``OverTokLM.configure_model``),
    call this once the process group exists."""
    for module in model.modules():
        if isinstance(module, RowShardedEmbedding):
            module.place(group)


def _blocks_as_dtensors(table: RowShardedEmbedding, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in STATE_KEYS:
        if prefix + key in state_dict:
            state_dict[prefix + key] = table.as_global(state_dict[prefix + key])


def _blocks_from_any_layout(table: RowShardedEmbedding, state_dict: dict, prefix: str, *args) -> None:
    for key in STATE_KEYS:
        if prefix + key in state_dict:
            state_dict[prefix + key] = table.as_block(state_dict[prefix + key])


class _ExchangeRows(torch.autograd.Function):
    """Owners send the asked-for rows back; backward sends each row's gradient to its owner (one all-to-all each)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, route: _Route, table: RowShardedEmbedding) -> torch.Tensor:
        wire = table.comm_dtype or weight.dtype
        rows_RW = weight.index_select(0, route.recv_local_R).to(wire)
        unique_rows_UW = rows_RW.new_empty(sum(route.send_counts), weight.shape[1])
        table._all_to_all("rows", unique_rows_UW, rows_RW, route.send_counts, route.recv_counts)
        ctx.route, ctx.table = route, table
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return unique_rows_UW.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_UW: torch.Tensor):
        route, table = ctx.route, ctx.table
        grad_UW = grad_UW.to(ctx.weight_dtype).contiguous()
        grad_RW = grad_UW.new_empty(sum(route.recv_counts), grad_UW.shape[1])
        table._all_to_all("row_grads", grad_RW, grad_UW, route.recv_counts, route.send_counts)
        if table.grad_reduction == "mean":
            grad_RW = grad_RW / table.world
        # Every rank returns a gradient, empty when nobody asked for its rows, so every rank's row optimizer steps
        # its block at every step (the step count stays the same on all ranks).
        if table.sparse:
            # Several ranks may ask for the same row: coalesce sums them, so the optimizer sees each row once.
            grad_weight = torch.sparse_coo_tensor(route.recv_local_R[None], grad_RW, ctx.weight_shape).coalesce()
        else:
            grad_weight = grad_RW.new_zeros(ctx.weight_shape).index_add_(0, route.recv_local_R, grad_RW)
        return grad_weight, None, None


def expected_bytes_per_step(table_rows: Sequence[int], width: int, world: int, lookups_per_table: int,
                            row_bytes: int = 4, id_bytes: int = 8) -> dict[str, float]:
    """Analytic bytes all ranks together send to other ranks in one forward + backward, for tables laid out one after
    another in one sharded weight, each looked up ``lookups_per_table`` times per rank at uniformly random rows
    (hashed n-grams): E[unique rows of a table of M rows after n draws] = M·(1 - (1 - 1/M)^n). A unique id owned by
    another rank costs id_bytes out, a row back and a row gradient out: id_bytes + 2·width·row_bytes."""
    bounds = row_bounds(sum(table_rows), world)
    off_rank = 0.0  # expected unique ids that all ranks together send to another owner
    offset = 0
    for rows in table_rows:
        unique = rows * -math.expm1(lookups_per_table * math.log1p(-1.0 / rows))
        for r in range(world):
            own = max(0, min(offset + rows, bounds[r + 1]) - max(offset, bounds[r]))
            off_rank += unique * (1.0 - own / rows)
        offset += rows
    result = {"split_sizes": float(world * (world - 1) * 8), "ids": off_rank * id_bytes,
              "rows": off_rank * width * row_bytes, "row_grads": off_rank * width * row_bytes}
    result["total"] = sum(result.values())
    return result
