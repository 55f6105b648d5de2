"""Over-Encoding (OE): hashed hierarchical n-gram input embeddings (docs/method.md §1; the paper's §3.2 and App. A).

The embedding of position t is Algorithm 1 of the paper:

    e(x_t) = [ E_1(x_t) + sum_{g=2..n} sum_{j=0..k-1} W_i · E_i( h_g(t) mod (m + 2·i) ) + b_i ] / (1 + k(n-1))

with table index ``i = (g-2)·k + j``, the g-gram id ``h_g(t) = x_t + x_{t-1}·V + … + x_{t-g+1}·V^(g-1)`` (the current
token is the least significant digit; ids before the sequence start are 0), tables ``E_i`` of ``m + 2i`` rows and
``D / (k(n-1))`` columns, and projections ``W_i`` from that slice width to D with a bias (Algorithm 1's
``nn.Linear`` defaults). "OE-m" has about m·D table parameters.

How it is made fast (same result, see the parity tests):
- every table lives in ONE weight with per-table row offsets, so a forward does one gather;
- the k(n-1) projections are one (D, D) matmul over the concatenated slices (its weight is the concatenation of
  the W_i along their input axis, its bias the sum of the b_i);
- ``h_g mod M`` is accumulated digit by digit as ``(a + x·(V^r mod M)) mod M`` in int64, so no order n and no
  vocabulary overflows (it only needs V·M < 2^62); no Python ``hash`` anywhere, so indices are the same in every
  process and on every machine.

Two input forms (``form``), the two of the paper's synthetic-grammar study (§3.1, App. B.2; docs/method.md §5):

- ``hierarchical`` (default): Algorithm 1 above, the 1-gram table plus hashed 2..n-gram tables. It is exact (every
  g-gram its own row) when m >= V^n; ``configs/cfg/cfg3f_*_oe.yaml`` use m = 343 = 7^3 for cfg3f.
- ``single``: the paper's "n-gram encoding" model, ONE table of m rows and width D looked up at ``h_n(t) mod m``,
  nothing else: no 1-gram table, no projection, no average (exact n-gram ids when m >= V^n, which its study uses;
  a smaller m hashes them). Ids before the sequence start are 0, as in Algorithm 1, so both forms see the same
  n-gram ids and differ only in their parameterisation (App. B.2 (a): the hierarchy wins). Without a 1-gram table
  there is nothing to tie the output head to, so this form needs ``tie_embeddings: false``: the head gets its own
  V-row table. [UNCONFIRMED] The paper's GPT-2 ties its embeddings, and the paper does not say how its n-gram
  encoding model's 1-gram output table was set up; an untied 1-gram head is the only way to keep the output 1-gram.

LongCat's N-gram Embedding (NE; Liu et al. 2026, ``docs/oe_family.md``) is this module with options, not a copy:
``flavor: longcat`` sets rows int(r·V + 2i + 1) (``row_rule``; m = int(r·V)), projections without bias
(``proj_bias``), and keeps the mean; ``combine`` picks the mean, E(x_t) + S/(1 + N) or (E(x_t) + S)/sqrt(1 + N);
``scale`` multiplies the whole embedding (LongCat's "embedding amplification"); ``ignore_ids`` bypass the tables
(their position gets scale·E(x_t)) and cut the n-gram history as an EOS does with ``reset_at_eos``. The default
``flavor: paper`` is Algorithm 1 exactly (the golden curves are unchanged). The tables then count as family "ne"
(``nn.counts``, ``nn.table_budget``).

Options beyond the paper: ``reset_at_eos`` (the paper is silent on packed documents, so off by default) zeroes the
n-gram history that reaches back across an EOS, as at a sequence start; ``sparse`` produces sparse row gradients
for the tables, which ``lit_overtok.optim.sparse_adamw.RowSparseAdamW`` updates at the touched rows only, catching a
row up on the steps it missed when it is next read (AdamW's semantics; see there); ``sharded`` splits the tables'
rows over the data-parallel ranks with all-to-all lookups (the paper's "tensor parallelism for the OE layer",
docs/method.md §6; ``nn.sharded_table``).

Initialisation differs by mode. Replicated tables (the default) are drawn as every other parameter is
(``Transformer.init_weights``: one generator seeded by the parameter's name), the historical draw, so runs published
with earlier code reproduce bit for bit. Sharded tables are drawn chunk by chunk of rows
(``RowShardedEmbedding.draw_rows``), so every world size, 1 included, starts from the same global table; a
replicated and a sharded run of one seed therefore start from different tables (equal in distribution).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lit_overtok.nn.collectives import all_reduce_
from lit_overtok.nn.sharded_table import RowShardedEmbedding

_INDEX_BOUND = 2**62  # keeps x·(V^r mod M) + a < 2^63 with room to spare
INPUT_FORMS = ("hierarchical", "single")
COMBINATIONS = ("mean", "unigram_full", "sqrt")
# The options each flavor sets (docs/oe_family.md): Algorithm 1, and LongCat's N-gram Embedding as SGLang runs it.
FLAVORS = {
    "paper": dict(row_rule="paper", proj_bias=True, combine="mean", scale=1.0, ignore_ids=[]),
    "longcat": dict(row_rule="longcat", proj_bias=False, combine="mean", scale=1.0, ignore_ids=[]),
}


@dataclass
class OverEncodingConfig:
    """Shape and options of the Over-Encoding input embedding ("OE-m" in the paper)."""

    m: int
    """Rows of the first hashed table; table i has m + 2i rows. OE-m holds about m × d_model table parameters.
    ``single`` form: the rows of its one table (exact n-gram ids when m >= V^n)."""
    n: int = 3
    """Largest n-gram order; orders 2..n each get k tables (the paper's default is 3). ``single``: the order of
    its one table."""
    k: int = 1
    """Slices per order: the slice width is d_model / (k(n-1)); the paper picks k so that it is 256. Must be 1 in
    the ``single`` form."""
    form: Literal["hierarchical", "single"] = "hierarchical"
    """``hierarchical``: Algorithm 1 (1-gram table + hashed 2..n-gram tables, projected and averaged).
    ``single``: the CFG study's n-gram encoding model, one m-row table of width d_model over n-gram ids and no
    1-gram table (needs ``tie_embeddings: false``)."""
    reset_at_eos: bool = False
    """Zero the n-gram history that crosses an EOS (packed documents). The paper is silent; off reproduces it."""
    eos_id: Optional[int] = None
    """The document separator, required with reset_at_eos."""
    sparse: bool = False
    """Sparse row gradients for the tables and a touched-rows-only AdamW for them, so per-step cost does not grow
    with m; it trains like dense AdamW (``optimizer.sparse_row_semantics``). Dense gradients and plain AdamW (the
    paper's presumed setup) when False."""
    sharded: bool = False
    """Split the tables' rows over the data-parallel ranks (each rank holds 1/world of every table and of its
    optimizer state; lookups move by all-to-all), for tables too large for one device (OE-12.8M). Needs the
    ShardedDDPStrategy or FSDP2Strategy of ``lit_overtok.distributed.strategies`` at world size > 1 (sharded checkpoints).
    Off: every rank holds the whole tables. From the same initial table the two train alike to float rounding,
    but each mode draws that table its own way (see the module docstring)."""

    flavor: Literal["paper", "longcat"] = "paper"
    """Sets the five options below together (each given explicitly wins): ``paper`` is Algorithm 1 (rows m + 2i,
    projections with bias, the mean over 1 + N, scale 1, no ignored ids); ``longcat`` is LongCat's N-gram Embedding
    (NE; ``docs/oe_family.md``): rows m + 2i + 1, projections without bias, the mean (SGLang's variant), scale 1."""
    row_rule: Optional[Literal["paper", "longcat"]] = None
    """Rows of table i: ``paper`` m + 2i; ``longcat`` int(r·V + 2i + 1) = m + 2i + 1 with m = int(r·V) (LongCat's
    ``oe_vocab_size_ratio`` r; ``nn.table_budget.longcat_m`` turns r into m)."""
    proj_bias: Optional[bool] = None
    """Bias on the slice projections (Algorithm 1's ``nn.Linear`` default); LongCat's ``post_projs`` have none."""
    combine: Optional[Literal["mean", "unigram_full", "sqrt"]] = None
    """How E(x_t) and the projected n-gram sum S_t (N = k(n-1) tables) combine: ``mean`` (E + S)/(1 + N)
    (Algorithm 1, SGLang's LongCat); ``unigram_full`` E + S/(1 + N) (the word embedding at full scale, mlx-lm's
    LongCat-Flash-Lite); ``sqrt`` (E + S)/sqrt(1 + N) (LongCat's ``ngram_fix_normalize_factor``; [UNCONFIRMED] that
    it divides the whole sum, as the mean does: OE_FAMILY.md only says "instead of (1 + N)")."""
    scale: Optional[float] = None
    """Embedding amplification: the whole input embedding is multiplied by this (1: none). [UNCONFIRMED] the sources
    name "a scale factor or normalization on the NE output" without its place; we scale e_t, ignored positions too."""
    ignore_ids: Optional[list[Union[int, str]]] = None
    """Token ids (ints, or "start:end" ranges, end excluded: LongCat's ``oe_ignore_tokens``) that bypass the n-gram
    tables (their embedding is scale·E(x_t)) and delimit the history: no n-gram reaches back across one."""

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"model_config.over_encoding.flavor: unknown flavor {self.flavor!r}; valid flavors are "
                             f"{sorted(FLAVORS)}")
        for name, value in FLAVORS[self.flavor].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def family(self) -> str:
        """The memory family its tables count under (``nn.counts``): 'ne' for the LongCat flavor, else 'oe'."""
        return "ne" if self.flavor == "longcat" else "oe"

    def ignored_token_ids(self) -> list[int]:
        """``ignore_ids`` with every "start:end" range expanded, sorted."""
        ids: set[int] = set()
        for item in self.ignore_ids:
            if isinstance(item, str):
                start, sep, end = item.partition(":")
                try:
                    ids.update(range(int(start), int(end)))
                except ValueError:
                    sep = ""
                if not sep:
                    raise ValueError(f"model_config.over_encoding.ignore_ids: {item!r} is neither a token id nor a "
                                     "'start:end' range of ids")
            elif isinstance(item, int) and not isinstance(item, bool):
                ids.add(item)
            else:
                raise ValueError(f"model_config.over_encoding.ignore_ids: {item!r} is neither a token id nor a "
                                 "'start:end' range of ids")
        return sorted(ids)

    @property
    def n_tables(self) -> int:
        return 1 if self.form == "single" else self.k * (self.n - 1)

    def table_orders(self) -> list[int]:
        """The n-gram order g of each table, in table order i = (g-2)·k + j (``single``: [n])."""
        if self.form == "single":
            return [self.n]
        return [2 + i // self.k for i in range(self.n_tables)]

    def row_counts(self) -> list[int]:
        """Rows (= hash modulus) of each table: m + 2i (m + 2i + 1 by LongCat's rule), so that the k slices of one
        order collide differently."""
        extra = 1 if self.row_rule == "longcat" else 0  # LongCat: int(r·V + 2i + 1)
        return [self.m + 2 * i + extra for i in range(self.n_tables)]

    def slice_width(self, d_model: int) -> int:
        return d_model // self.n_tables

    def validate(self, d_model: int, vocab_size: Optional[int], tie_embeddings: bool = False) -> None:
        """Raise ValueError naming the field for impossible settings; warn about structured hash collisions.

        Checks needing the vocabulary are skipped while it is unknown (it is linked from the data module later).
        """
        for name in ("m", "n", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model_config.over_encoding.{name} must be a positive integer, got {value!r}")
        if self.n < 2:
            raise ValueError(f"model_config.over_encoding.n must be >= 2 (n-grams of order 2..n), got {self.n}")
        if self.form not in INPUT_FORMS:
            raise ValueError(f"model_config.over_encoding.form: unknown form {self.form!r}; valid forms are {list(INPUT_FORMS)}")
        if self.form == "single" and self.k != 1:
            raise ValueError(f"model_config.over_encoding.k must be 1 with form 'single' (one table of width d_model), "
                             f"got {self.k}")
        if self.form == "single" and tie_embeddings:
            raise ValueError("model_config.over_encoding.form='single' has no 1-gram input table for the output head to "
                             "share; set model_config.tie_embeddings: false (the head then has its own V-row table)")
        if d_model % self.n_tables != 0:
            raise ValueError(
                f"model_config.over_encoding: d_model={d_model} is not divisible by k·(n-1)={self.k}·{self.n - 1}="
                f"{self.n_tables}; choose k and n so that k·(n-1) divides d_model (the slice width is d_model/(k(n-1)))"
            )
        if self.reset_at_eos and self.eos_id is None:
            raise ValueError("model_config.over_encoding.eos_id must be given when model_config.over_encoding.reset_at_eos is true")
        if self.combine not in COMBINATIONS or self.row_rule not in FLAVORS:
            raise ValueError(f"model_config.over_encoding: combine must be one of {list(COMBINATIONS)} and row_rule one "
                             f"of {sorted(FLAVORS)}, got {self.combine!r} and {self.row_rule!r}")
        if not self.scale > 0:
            raise ValueError(f"model_config.over_encoding.scale must be positive, got {self.scale!r}")
        ignored = self.ignored_token_ids()
        if self.form == "single" and ignored:
            raise ValueError("model_config.over_encoding.ignore_ids needs form 'hierarchical' (an ignored id falls back "
                             "to the 1-gram table, which the single form lacks)")
        if vocab_size is None:
            return
        if ignored and not 0 <= ignored[0] <= ignored[-1] < vocab_size:
            raise ValueError(f"model_config.over_encoding.ignore_ids: {ignored[0] if ignored[0] < 0 else ignored[-1]} "
                             f"is not a token id in [0, {vocab_size})")
        if self.eos_id is not None and not 0 <= self.eos_id < vocab_size:
            raise ValueError(f"model_config.over_encoding.eos_id={self.eos_id} is not a token id in [0, {vocab_size})")
        if vocab_size * max(self.row_counts()) >= _INDEX_BOUND:
            raise ValueError(
                f"model_config.over_encoding.m={self.m} is too large for int64 index arithmetic with vocab_size={vocab_size} "
                f"(needs V·(m + 2(k(n-1)-1)) < 2^62)"
            )
        for i, (order, rows) in enumerate(zip(self.table_orders(), self.row_counts())):
            if rows >= vocab_size**order:
                continue  # exact table: every g-gram has its own row, no collisions at all
            # Rows M sharing c = gcd(M, V) with V: x_t + V·h mod M reaches only M/c rows for a given current token,
            # and the collisions among its histories repeat identically for every x_t (docs/method.md §4.6: m = 64V loses
            # most of the gain). We warn when M is a multiple of V (what the paper names) or when M/c < V: a token
            # cannot even give each of its V possible predecessors its own row. Small factors of a large table pass
            # (the paper's m = 12.8M shares 40 with V = 50,280: 320k rows per token). Our rule; the paper says "coprime".
            shared = math.gcd(rows, vocab_size)
            if rows % vocab_size == 0 or (shared > 1 and rows // shared < vocab_size):
                warnings.warn(
                    f"model_config.over_encoding.m: table {i} ({order}-gram) has {rows} rows, which shares the factor {shared} "
                    f"with vocab_size={vocab_size}, so each current token reaches only {rows // shared} of its rows and "
                    "its n-grams collide in a structured way (docs/method.md §4.6: m = 64V loses most of the gain). Prefer an "
                    "m coprime with V, e.g. an odd or prime m.",
                    stacklevel=2,
                )


def hash_constants(vocab_size: int, orders: list[int], moduli: list[int],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``coef_IR[i, r] = V^r mod moduli[i]`` for lags r below table i's order (0 beyond it), and ``moduli_I``.

    Computed exactly with Python integers, so they are right for any n and V.
    """
    n = max(orders)
    coef_IR = torch.tensor([[pow(vocab_size, r, M) if r < g else 0 for r in range(n)] for g, M in zip(orders, moduli)],
                           dtype=torch.long, device=device)
    return coef_IR, torch.tensor(moduli, dtype=torch.long, device=device)


def ngram_table_indices(input_ids_BT: torch.Tensor, coef_IR: torch.Tensor, moduli_I: torch.Tensor,
                        eos_id: Optional[int] = None, delimiters_K: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T, I) int64: row of table i for every position, ``h_g(t) mod moduli_I[i]`` (constants from hash_constants).

    ``h_g(t) = sum_{r<g} x_{t-r}·V^r`` with x = 0 before the sequence start, and, when ``eos_id`` is given, also for
    positions at or before the last EOS preceding t (the history does not cross a document boundary); ids in
    ``delimiters_K`` (NE's ignored ids) cut the history the same way. Each step adds x·(V^r mod M) < V·M to a residue
    below M, so int64 never overflows while V·M < 2^62.
    """
    B, T = input_ids_BT.shape
    ids_BT = input_ids_BT.long()
    boundary_BT = None if eos_id is None else ids_BT == eos_id
    if delimiters_K is not None:
        delimits_BT = torch.isin(ids_BT, delimiters_K)
        boundary_BT = delimits_BT if boundary_BT is None else boundary_BT | delimits_BT
    if boundary_BT is not None:
        is_boundary_BT = boundary_BT.long()
        documents_BT = is_boundary_BT.cumsum(1) - is_boundary_BT  # boundaries strictly before t: same value = same document
    index_BTI = torch.zeros(B, T, coef_IR.shape[0], dtype=torch.long, device=ids_BT.device)
    for r in range(coef_IR.shape[1]):
        # x_{t-r}, 0 before the start. Pad first, then cut: ``ids[:, :T-r]`` would count from the end when r > T.
        lagged_BT = F.pad(ids_BT, (r, 0))[:, :T]
        if boundary_BT is not None and r > 0:
            same_document_BT = F.pad(documents_BT, (r, 0))[:, :T] == documents_BT
            lagged_BT = lagged_BT * same_document_BT
        index_BTI = (index_BTI + lagged_BT[..., None] * coef_IR[:, r]) % moduli_I
    return index_BTI


class OverEncoding(nn.Module):
    """The OE input embedding; ``wte`` is the ordinary 1-gram table (tied to the output head when configured).

    In the ``single`` form ``wte`` and ``proj`` are None: the one n-gram table's row is the embedding.
    """

    def __init__(self, oe: OverEncodingConfig, vocab_size: int, padded_vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.orders, self.moduli = oe.table_orders(), oe.row_counts()
        self.k = oe.k
        self.eos_id = oe.eos_id if oe.reset_at_eos else None
        self.ignored_ids = oe.ignored_token_ids()
        self.combine, self.scale = oe.combine, oe.scale
        hierarchical = oe.form == "hierarchical"
        self.wte = nn.Embedding(padded_vocab_size, d_model) if hierarchical else None
        # All hashed tables in one weight (one gather); table i starts at row offsets[i].
        self.offsets = [sum(self.moduli[:i]) for i in range(len(self.moduli))]
        self.sparse, self.sharded = oe.sparse, oe.sharded
        self.width = oe.slice_width(d_model)
        if oe.sharded:
            # A placeholder without memory: the real blocks need the process group (``place_sharded_tables``), and
            # the whole table of a paper-scale run would not fit in one process anyway.
            self.tables = RowShardedEmbedding(sum(self.moduli), self.width, sparse=oe.sparse, device="meta")
        else:
            self.tables = nn.Embedding(sum(self.moduli), self.width, sparse=oe.sparse)
            # Rows looked up in training so far (persistent, so a resumed run keeps counting). One byte per row is
            # under 1% of a row's weight and Adam state even at slice width 32. (A sharded table keeps its own.)
            self.register_buffer("rows_touched", torch.zeros(sum(self.moduli), dtype=torch.bool))
        # Tables get their own optimizer group (``hooks.optimizer_group``) and count as embedding parameters.
        self.tables.optimizer_group = "over_encoding"
        self.tables.memory_family = oe.family  # parameter_counts reports the tables per family
        # The k(n-1) slice projections of Algorithm 1 as one matmul: (D, D) weight, bias = sum of their biases.
        self.proj = nn.Linear(oe.n_tables * self.width, d_model, bias=oe.proj_bias) if hierarchical else None
        # A checkpoint of the other mode names the coverage buffer differently: take either.
        self.register_load_state_dict_pre_hook(_coverage_key_of_this_mode)
        # Small index constants, built once per device (not buffers: a meta-device build must not lose them).
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _device_constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._constants:
            coef_IR, moduli_I = hash_constants(self.vocab_size, self.orders, self.moduli, device)
            self._constants[device] = (coef_IR, moduli_I, torch.tensor(self.offsets, dtype=torch.long, device=device),
                                       torch.tensor(self.ignored_ids, dtype=torch.long, device=device))
        return self._constants[device]

    def lookup_rows(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """(B, T, I) rows of the combined weight that each position looks up."""
        coef_IR, moduli_I, offsets_I, ignored_K = self._device_constants(input_ids_BT.device)
        delimiters_K = ignored_K if self.ignored_ids else None
        return ngram_table_indices(input_ids_BT, coef_IR, moduli_I, self.eos_id, delimiters_K) + offsets_I

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        rows_BTI = self.lookup_rows(input_ids_BT)
        ignored_BT = torch.isin(input_ids_BT, self._device_constants(input_ids_BT.device)[3]) if self.ignored_ids else None
        if self.training and not self.sharded:
            with torch.no_grad():
                # An ignored position reads rows it never uses (its output is E(x_t) alone): not coverage.
                self.rows_touched[(rows_BTI if ignored_BT is None else rows_BTI[~ignored_BT]).flatten()] = True
        # A module call, not F.embedding: the sparse optimizer's forward pre-hook catches up exactly these rows.
        slices_BTIW = self.tables(rows_BTI)
        if self.proj is None:  # single form: the n-gram's own row, nothing to combine
            return slices_BTIW[:, :, 0]
        oe_BTD = self.proj(slices_BTIW.flatten(2))
        wte_BTD = self.wte(input_ids_BT)
        contributions = 1 + len(self.moduli)
        if self.combine == "mean":  # Algorithm 1 averages the 1 + k(n-1) contributions
            embedded_BTD = (wte_BTD + oe_BTD) / contributions
        elif self.combine == "unigram_full":
            embedded_BTD = wte_BTD + oe_BTD / contributions
        else:  # "sqrt"
            embedded_BTD = (wte_BTD + oe_BTD) / math.sqrt(contributions)
        if ignored_BT is not None:
            # [UNCONFIRMED] OE_FAMILY.md leaves open what an ignored id's own position gets; we give it E(x_t) alone
            # at full scale (no n-gram term, no division), as the plain model would: "bypass the tables" read literally.
            embedded_BTD = torch.where(ignored_BT[..., None], wte_BTD, embedded_BTD)
        if self.scale != 1.0:
            embedded_BTD = embedded_BTD * self.scale
        return embedded_BTD

    def init_own_parameters(self, std: float, seed: int) -> list[nn.Parameter]:
        """Sharded: the tables draw their rows chunk by chunk (the same global table at any world size).
        Replicated: none, the model draws the tables as any other parameter (the historical values)."""
        return self.tables.draw_rows(std, seed) if self.sharded else []

    def training_metrics(self) -> dict[str, torch.Tensor]:
        """Fraction of each table's rows looked up in training so far, over all ranks: sharded, the all-reduce SUM
        of the owners' disjoint counts; replicated, the all-reduce MAX (a logical OR) of every rank's flags. Both
        are exact, and both are collectives: every rank calls this at the same steps."""
        if self.sharded:
            counts_I = self.tables.touched_counts(self.offsets, self.moduli)
        else:
            touched = all_reduce_(self.rows_touched.to(torch.uint8), "max")
            counts_I = torch.stack([touched[offset: offset + rows].count_nonzero()
                                    for offset, rows in zip(self.offsets, self.moduli)])
        return {f"oe/coverage_{self.orders[i]}gram_{i % self.k}": counts_I[i].float() / rows
                for i, rows in enumerate(self.moduli)}

    def parameter_metrics(self) -> dict[str, int]:
        """OE's own parameter counts (whole tables, also when sharded), logged once beside the backbone's."""
        return {"over_encoding_tables": sum(self.moduli) * self.width,
                "over_encoding_projection": 0 if self.proj is None else sum(p.numel() for p in self.proj.parameters())}


def _coverage_key_of_this_mode(module: OverEncoding, state_dict: dict, prefix: str, *args) -> None:
    ours, other = ("tables.rows_touched", "rows_touched") if module.sharded else ("rows_touched", "tables.rows_touched")
    if prefix + other in state_dict and prefix + ours not in state_dict:
        state_dict[prefix + ours] = state_dict.pop(prefix + other)

