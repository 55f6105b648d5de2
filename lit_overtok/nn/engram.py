"""DeepSeek's Engram ("conditional memory", arXiv 2601.07372): a hashed n-gram memory read by a module inserted
before chosen transformer blocks, gated by the hidden state entering the block (``docs/engram.md``).

Before block ℓ (one of ``layers``), from compressed ids x' (``token_compression``; the compressed pad id before the
sequence start):

    mix_g(t) = (x'_t·μ_0) XOR (x'_{t-1}·μ_1) XOR … XOR (x'_{t-g+1}·μ_{g-1})        g = 2..max_n, int64
    e_t      = concat over orders g and heads h of  E[offset_{g,h} + mix_g(t) mod p_{g,h}]   (width ngram_width·(max_n-1))
    α_t      = sigmoid(sign(s)·sqrt(max(|s|, 1e-6))),   s = RMSNorm(W_k e_t) · RMSNorm(h_t) / sqrt(D)
    v_t      = α_t · W_v e_t
    y        = v + SiLU(DepthwiseCausalConv1d(RMSNorm(v)))     kernel ``kernel_size``, dilation max_n, no bias
    block input = h + y

Multipliers μ_δ = 2r_δ + 1 with r drawn by ``numpy.random.default_rng(seed + 10007·ℓ).integers(0, B, max_n)``,
B = max(1, ⌊(2^63 - 1) / V'⌋ // 2) (so x'·μ < 2^63: no product overflows); every head of the whole model has its own
prime p (``head_primes``). The tables are one weight with per-head row offsets (one gather), as Over-Encoding's;
``sharded`` splits its rows over the data-parallel ranks (``nn.sharded_table.RowShardedEmbedding``, the module
Over-Encoding's sharded tables use). As there, replicated tables are drawn as every other parameter (a generator
seeded by the name) and sharded ones chunk by chunk of rows, the same global table at every world size.

Config keys (``model_config.engram``; final): ``layers``, ``max_n``, ``table_size``, ``heads``, ``ngram_width``,
``kernel_size``, ``seed``, ``pad_id``, ``tokenizer``, ``sparse``, ``sharded`` (see ``EngramConfig``).
``table_size_for_budget`` sizes an arm to a table-parameter budget (equal parameters with an OE-m arm).

Decoding: the hashes need the last max_n - 1 ids (the model always passes the whole id sequence, so they are read
from it) and the convolution its last (kernel_size - 1)·max_n inputs, kept in ``EngramCache`` beside the KV cache.

Choices where the sources are silent or differ, marked [UNCONFIRMED] at the code: W_k and W_v without bias (the
demo's ``nn.Linear`` has one; OE_FAMILY.md §2 says none), all three RMSNorms with the model's ``norm_eps`` and a
learnable weight, every weight drawn as the model's others (truncated normal, ``init_std``; the demo keeps torch's
defaults), the pad id 0 by default (as Over-Encoding's Algorithm 1 puts 0 before the start), the identity map
without a tokenizer (synthetic grammars, whose symbols are not text), only ``hc_mult`` = 1 (no hyper-connections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.errors import InputError
from lit_overtok.nn import hooks
from lit_overtok.nn.norms import RMSNorm
from lit_overtok.nn.sharded_table import RowShardedEmbedding
from lit_overtok.nn.token_compression import compressed_id_map_of_file

SEED_STRIDE = 10007  # seed + 10007·ℓ: the demo's per-layer seed rule
GATE_FLOOR = 1e-6


@dataclass
class EngramConfig:
    """Where Engram reads its memory and how large the memory is (``model_config.engram``)."""

    layers: list[int] = field(default_factory=lambda: [1])
    """Block indices Engram is inserted before (each gets its own tables, multipliers and primes); the demo uses
    two of 30 (1 and 15). Strictly increasing, each below n_layer."""
    max_n: int = 3
    """Largest n-gram order: orders 2..max_n are hashed (the demo's ``max_ngram_size``)."""
    table_size: Union[int, list[int]] = 131071
    """Rows per head table of each order (one int for every order, or one per order 2..max_n; the demo's
    ``engram_vocab_size``): each head gets the next unused prime at or above it."""
    heads: int = 4
    """Hash heads per order (``n_head_per_ngram``), each its own prime modulus and table."""
    ngram_width: int = 64
    """Width of one order's concatenated heads (``n_embed_per_ngram``); a head's table is ngram_width / heads wide and
    e_t is ngram_width·(max_n - 1) wide."""
    kernel_size: int = 4
    """Taps of the depthwise causal convolution (dilation max_n)."""
    seed: int = 0
    """Seeds the multipliers: layer ℓ draws from numpy ``default_rng(seed + 10007·ℓ)``."""
    pad_id: int = 0
    """Token id hashed before the sequence start (compressed like any id). [UNCONFIRMED] 0, as Algorithm 1 of
    Over-Encoding; the demo uses its tokenizer's id 2."""
    tokenizer: Optional[str] = None
    """A ``tokenizers`` JSON file (the data's: ``<shards>/tokenizer.json``) to build the compressed ids from. None:
    every id is its own compressed id (synthetic grammars). A checkpoint carries the map, so loading one needs no file."""
    sparse: bool = False
    """Sparse row gradients for the tables (``RowSparseAdamW``, AdamW row semantics), as ``over_encoding.sparse``."""
    sharded: bool = False
    """Split the tables' rows over the data-parallel ranks (each rank holds 1/world of every table and of its
    optimizer state; lookups move by all-to-all), as ``over_encoding.sharded`` and by the same module
    (``nn.sharded_table``). Needs the ShardedDDPStrategy or FSDP2Strategy of ``lit_overtok.distributed.strategies`` at
    world size > 1 (sharded checkpoints). Off: every rank holds the whole tables. From the same initial table the two
    train alike to float rounding, but each mode draws that table its own way (see the module docstring)."""

    def orders(self) -> list[int]:
        return list(range(2, self.max_n + 1))

    def order_table_sizes(self) -> list[int]:
        sizes = self.table_size
        return list(sizes) if isinstance(sizes, (list, tuple)) else [sizes] * (self.max_n - 1)

    def head_width(self) -> int:
        return self.ngram_width // self.heads

    def memory_width(self) -> int:
        """Width of e_t: every order's heads concatenated."""
        return self.ngram_width * (self.max_n - 1)

    def head_primes(self) -> dict[int, list[int]]:
        """Prime modulus of every head, per layer (in the order of ``orders()`` then heads): for each layer in order,
        each order, each head, the next prime above ``start`` not used before in the model (start = table_size - 1
        for an order's first head, then the previous prime)."""
        used: set[int] = set()
        primes: dict[int, list[int]] = {}
        for layer in self.layers:
            primes[layer] = []
            for size in self.order_table_sizes():
                start = size - 1
                for _ in range(self.heads):
                    start = next_unused_prime(start, used)
                    used.add(start)
                    primes[layer].append(start)
        return primes

    def table_parameters(self) -> int:
        """Parameters of every Engram table of the model (rows × head width over all heads and layers)."""
        return sum(sum(p) for p in self.head_primes().values()) * self.head_width()

    def validate(self, n_layer: int, vocab_size: Optional[int]) -> None:
        """Raise InputError naming the field for impossible settings."""
        for name in ("max_n", "heads", "ngram_width", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"model_config.engram.{name} must be a positive integer, got {value!r}")
        if self.max_n < 2:
            raise InputError(f"model_config.engram.max_n must be >= 2 (n-grams of order 2..max_n), got {self.max_n}")
        if self.ngram_width % self.heads:
            raise InputError(f"model_config.engram.heads={self.heads} does not divide ngram_width={self.ngram_width}; "
                             "each head's table is ngram_width / heads wide")
        sizes = self.order_table_sizes()
        if len(sizes) != self.max_n - 1 or any(not isinstance(s, int) or s < 2 for s in sizes):
            raise InputError(f"model_config.engram.table_size must be an integer >= 2 or a list of {self.max_n - 1} of "
                             f"them (orders 2..{self.max_n}), got {self.table_size!r}")
        layers = list(self.layers)
        if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n_layer:
            raise InputError(f"model_config.engram.layers must be strictly increasing block indices in [0, {n_layer}), "
                             f"got {layers}")
        if vocab_size is not None and not 0 <= self.pad_id < vocab_size:
            raise InputError(f"model_config.engram.pad_id={self.pad_id} is not a token id in [0, {vocab_size})")


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3·10^24."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unused_prime(start: int, used: set[int]) -> int:
    """The smallest prime above ``start`` that is not in ``used``."""
    candidate = start + 1
    while not is_prime(candidate) or candidate in used:
        candidate += 1
    return candidate


def layer_multipliers(seed: int, layer: int, max_n: int, compressed_vocab_size: int) -> list[int]:
    """Odd multipliers μ_0..μ_{max_n-1} of one layer (the demo's seed rule; module docstring)."""
    bound = max(1, (2**63 - 1) // compressed_vocab_size // 2)
    r = np.random.default_rng(seed + SEED_STRIDE * layer).integers(0, bound, size=(max_n,), dtype=np.int64)
    return [2 * int(value) + 1 for value in r]


def table_size_for_budget(budget: int, n_engram_layers: int, max_n: int = 3, heads: int = 4,
                          ngram_width: int = 64) -> int:
    """The largest ``table_size`` (one for every order) whose Engram tables hold at most ``budget`` parameters, e.g.
    an OE-m arm's ``sum(OverEncodingConfig.row_counts()) × slice width``: its primes are found, so the result is exact."""
    def total(size: int) -> int:
        return EngramConfig(layers=list(range(n_engram_layers)), max_n=max_n, table_size=size, heads=heads,
                            ngram_width=ngram_width).table_parameters()

    low = 2
    high = max(low, budget // (n_engram_layers * (max_n - 1) * ngram_width))  # primes >= size: total(high) >= budget
    if total(low) > budget:
        raise InputError(f"a table budget of {budget} parameters cannot hold {n_engram_layers}·{max_n - 1}·{heads} "
                         f"Engram heads of width {ngram_width // heads}")
    while low < high:  # largest size with total(size) <= budget (total grows with size)
        middle = (low + high + 1) // 2
        low, high = (middle, high) if total(middle) <= budget else (low, middle - 1)
    return low


def ngram_mixes(compressed_BT: torch.Tensor, multipliers_R: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """(B, T) XOR mixes of orders 2..R (R = len(multipliers)), compressed pad before the sequence start."""
    T = compressed_BT.shape[1]
    mix_BT = compressed_BT * multipliers_R[0]
    mixes = []
    for r in range(1, multipliers_R.shape[0]):
        lagged_BT = F.pad(compressed_BT, (r, 0), value=pad)[:, :T]  # pad first, then cut: r may exceed T
        mix_BT = mix_BT ^ (lagged_BT * multipliers_R[r])
        mixes.append(mix_BT)
    return mixes


@dataclass
class EngramCache:
    """Decoding state of one Engram layer: the convolution's last (kernel_size - 1)·dilation inputs (zeros before
    the sequence start, as the convolution's padding)."""

    window_BLD: torch.Tensor


class EngramLayer(nn.Module):
    """One Engram module: hashes, multi-head lookup, gate, value, short convolution; returns y (the caller adds h)."""

    def __init__(self, config: EngramConfig, layer: int, primes: list[int], d_model: int, norm_eps: float) -> None:
        super().__init__()
        self.layer, self.max_n, self.heads, self.sharded = layer, config.max_n, config.heads, config.sharded
        self.moduli = primes
        self.offsets = [sum(primes[:i]) for i in range(len(primes))]
        if config.sharded:
            # A placeholder without memory until the process group exists (``place_sharded_tables``).
            self.tables = RowShardedEmbedding(sum(primes), config.head_width(), sparse=config.sparse, device="meta")
        else:
            self.tables = nn.Embedding(sum(primes), config.head_width(), sparse=config.sparse)
        self.tables.optimizer_group = "engram"  # its own optimizer group (``nn.hooks``); a lookup table, no FLOPs
        self.tables.memory_family = "engram"  # counted per memory family (``parameter_counts``' memory_tables)
        width = config.memory_width()
        self.key_proj = nn.Linear(width, d_model, bias=False)  # [UNCONFIRMED] no bias (module docstring)
        self.value_proj = nn.Linear(width, d_model, bias=False)
        self.key_norm = RMSNorm(d_model, norm_eps)
        self.query_norm = RMSNorm(d_model, norm_eps)
        self.conv_norm = RMSNorm(d_model, norm_eps)
        self.dilation = config.max_n
        self.context = (config.kernel_size - 1) * config.max_n  # past conv inputs a position reads
        self.conv = nn.Conv1d(d_model, d_model, config.kernel_size, dilation=config.max_n, groups=d_model, bias=False)
        # Set from the compressed vocabulary when the map is built, or loaded with a checkpoint.
        self.register_buffer("multipliers", torch.zeros(config.max_n, dtype=torch.long))
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def init_own_parameters(self, std: float, seed: int) -> list[nn.Parameter]:
        """Sharded: the tables draw their rows chunk by chunk, as Over-Encoding's (the same global table at any world
        size). Replicated: none, the model draws them as any other parameter."""
        return self.tables.draw_rows(std, seed) if self.sharded else []

    def lookup_rows(self, compressed_BT: torch.Tensor, pad: int, start: int = 0) -> torch.Tensor:
        """(B, T - start, heads·(max_n - 1)) rows of the combined table for positions start.. (order-major)."""
        device = compressed_BT.device
        if device not in self._constants:
            self._constants[device] = (torch.tensor(self.moduli, dtype=torch.long, device=device),
                                       torch.tensor(self.offsets, dtype=torch.long, device=device))
        moduli_M, offsets_M = self._constants[device]
        # The n-gram "cache": positions from start need only the max_n - 1 ids before start.
        first = max(0, start - (self.max_n - 1))
        mixes = ngram_mixes(compressed_BT[:, first:], self.multipliers, pad)
        mix_BTM = torch.stack(mixes, -1).repeat_interleave(self.heads, -1)[:, start - first:]
        return mix_BTM % moduli_M + offsets_M

    def gate(self, e_BTE: torch.Tensor, h_BTD: torch.Tensor) -> torch.Tensor:
        """(B, T) α_t: how much of the memory the hidden state lets in (a signed square root keeps it soft)."""
        s_BT = (self.key_norm(self.key_proj(e_BTE)) * self.query_norm(h_BTD)).sum(-1) / math.sqrt(h_BTD.shape[-1])
        return torch.sigmoid(s_BT.sign() * s_BT.abs().clamp_min(GATE_FLOOR).sqrt())

    def forward(self, h_BTD: torch.Tensor, compressed_BT: torch.Tensor, pad: int, start: int = 0,
                cache: Optional[EngramCache] = None) -> torch.Tensor:
        rows_BTM = self.lookup_rows(compressed_BT, pad, start)
        # A module call, not F.embedding: the sparse optimizer's forward pre-hook catches up exactly these rows.
        e_BTE = self.tables(rows_BTM).flatten(2).to(h_BTD.dtype)
        v_BTD = self.gate(e_BTE, h_BTD)[..., None] * self.value_proj(e_BTE)
        u_BTD = self.conv_norm(v_BTD)
        if cache is None:
            padded_BLD = F.pad(u_BTD, (0, 0, self.context, 0))
        else:
            padded_BLD = torch.cat([cache.window_BLD.to(u_BTD.dtype), u_BTD], 1)
            cache.window_BLD = padded_BLD[:, padded_BLD.shape[1] - self.context:]
        conv_BTD = self.conv(padded_BLD.transpose(1, 2)).transpose(1, 2)
        return v_BTD + F.silu(conv_BTD)


class Engram(nn.Module):
    """Every Engram layer of a model and the compressed-id map they share (``compressed_ids``, a buffer)."""

    def __init__(self, config: EngramConfig, vocab_size: int, d_model: int, norm_eps: float) -> None:
        super().__init__()
        self.config = config
        primes = config.head_primes()
        self.layers = nn.ModuleDict({str(layer): EngramLayer(config, layer, primes[layer], d_model, norm_eps)
                                     for layer in config.layers})
        # -1 = not built: no tokenizer file here and no checkpoint loaded yet (checked at forward).
        self.register_buffer("compressed_ids", torch.full((vocab_size,), -1, dtype=torch.long))
        if config.tokenizer is None:
            self.set_compressed_ids(list(range(vocab_size)))
        elif Path(config.tokenizer).is_file():
            self.set_compressed_ids(list(compressed_id_map_of_file(config.tokenizer, vocab_size)))

    def set_compressed_ids(self, ids: list[int]) -> None:
        """Install a compressed-id map and the multipliers it implies (they depend on V')."""
        if self.compressed_ids.is_meta:
            return
        self.compressed_ids.copy_(torch.tensor(ids, dtype=torch.long))
        for layer in self.layers.values():
            layer.multipliers.copy_(torch.tensor(
                layer_multipliers(self.config.seed, layer.layer, self.config.max_n, max(ids) + 1), dtype=torch.long))

    def compress(self, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Compressed ids of a batch and the compressed pad id."""
        if self.compressed_ids[0] < 0:
            raise InputError(f"model_config.engram.tokenizer: {self.config.tokenizer} does not exist and no checkpoint "
                             "gave the compressed-id map; give the tokenizers JSON file the data was made with")
        return self.compressed_ids[input_ids_BT], int(self.compressed_ids[self.config.pad_id])

    def new_cache(self, batch_size: int, d_model: int, dtype: torch.dtype, device: torch.device) -> dict[int, EngramCache]:
        return {int(name): EngramCache(torch.zeros(batch_size, layer.context, d_model, dtype=dtype, device=device))
                for name, layer in self.layers.items()}

    def parameter_metrics(self) -> dict[str, int]:
        """Engram's own parameter counts, logged once beside the backbone's (``nn.hooks``)."""
        tables = sum(hooks.global_numel(layer.tables.weight) for layer in self.layers.values())  # whole, if sharded
        return {"engram_tables": tables, "engram_other": sum(hooks.global_numel(p) for p in self.parameters()) - tables}
