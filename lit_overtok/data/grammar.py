"""Synthetic context-free grammars from *Physics of Language Models: Part 1*.

The Over-Tokenized Transformer paper (Huang et al., ICML 2025, §3.1 and App. B.2) trains on
these grammars. The rule sets are the official ``cfg3*`` JSON files in ``grammars/`` (see
``grammars/ATTRIBUTION.md``). This module loads and validates a rule set, samples sentences
with the official procedure, and decides exact membership with a chart DP.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from threadpoolctl import ThreadpoolController

_SPECIAL_OFFSETS = {"eos": 1, "mask": 2, "sep": 3}
# Chart DP tuning, timed on cfg3f (L ~ 300) and cfg3j (L ~ 2000): below this band width a
# product is cheaper as vectorised diagonal steps than as many small matrix products.
_MAX_DIAGONAL_STEPS = 8
_MIN_BLOCK_ROWS = 32


class GrammarError(ValueError):
    """A grammar file or rule set is malformed."""


def packaged_grammars() -> tuple[str, ...]:
    """Names of the grammars shipped in ``lit_overtok/data/grammars``, e.g. ``"cfg3f"``."""
    files = _packaged_folder().iterdir()
    return tuple(sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json")))


def _packaged_folder():
    return resources.files("lit_overtok.data") / "grammars"


class _Compiled(NamedTuple):
    """Integer form of the rules. Terminal codes are their token ids 1..T; nonterminals follow."""

    start: int
    alternatives: list[tuple[tuple[int, ...], ...]]  # by code; () for terminals
    reversed_alternatives: list[tuple[tuple[int, ...], ...]]  # children reversed, for a stack
    order: tuple[int, ...]  # nonterminals reachable from start, children before parents
    bands: list[tuple[int, int]]  # by code: (shortest, longest) derivable length
    freed_after: dict[int, tuple[int, ...]]  # charts no longer needed once this one is built


@dataclass(frozen=True)
class Grammar:
    """A finite context-free grammar over the token ids ``1..T``.

    Token ids: terminal ``"k"`` is token ``k`` for ``k`` in ``1..T``. ``eos_id = T + 1``, as in the
    official release. The release reserves no BOS, so we use ``bos_id = 0``. ``T + 2`` (mask) and
    ``T + 3`` (sep) are reserved, so ``vocab_size = T + 4``. For cfg3f (T = 3): BOS 0,
    terminals 1-3, EOS 4, mask 5, sep 6, vocabulary size 7.

    ``rules`` maps each nonterminal to its alternatives, in the official order. Rule order has no
    effect on the distribution, but it does decide which sentence a given seed produces. The rules
    must not be recursive, so the language is finite.
    """

    name: str
    start: str
    terminals: tuple[str, ...]
    rules: dict[str, tuple[tuple[str, ...], ...]]

    def __post_init__(self) -> None:
        count = len(self.terminals)
        if count == 0 or sorted(self.terminals, key=_as_id) != [str(i) for i in range(1, count + 1)]:
            raise GrammarError(
                f"field 'terminals' must list the decimal token ids '1'..'{count}' once each, "
                f"got {list(self.terminals)}"
            )
        terminals = set(self.terminals)
        if self.start not in self.rules:
            kind = "a terminal" if self.start in terminals else "a symbol without rules"
            raise GrammarError(
                f"field 'start' is {self.start!r}, {kind}; "
                f"it must be one of the nonterminals {sorted(self.rules)}"
            )
        for symbol, alternatives in self.rules.items():
            if symbol in terminals:
                raise GrammarError(
                    f"field 'rules' gives rules for terminal {symbol!r}; only nonterminals may have rules"
                )
            if not alternatives:
                raise GrammarError(f"rules[{symbol!r}] is empty; give at least one alternative")
            for k, alternative in enumerate(alternatives):
                if not alternative:
                    raise GrammarError(
                        f"rules[{symbol!r}][{k}] is an empty alternative; each needs at least one symbol"
                    )
                for child in alternative:
                    if child not in terminals and child not in self.rules:
                        raise GrammarError(
                            f"rules[{symbol!r}][{k}] uses {child!r}, which is neither a terminal "
                            f"('1'..'{count}') nor a nonterminal with rules"
                        )
        _postorder(self.rules, [self.start, *self.rules])

    @classmethod
    def load(cls, name_or_path: str | Path) -> Grammar:
        """Load a packaged grammar by name (``"cfg3f"``) or a grammar JSON file by path."""
        path = Path(name_or_path)
        if isinstance(name_or_path, str) and path.parent == Path(".") and not path.suffix:
            names = packaged_grammars()
            if name_or_path not in names:
                raise GrammarError(
                    f"unknown grammar {name_or_path!r}; packaged grammars are {', '.join(names)}, "
                    "or pass the path of a grammar JSON file"
                )
            text = (_packaged_folder() / f"{name_or_path}.json").read_text()
            source = f"packaged grammar {name_or_path!r}"
        else:
            try:
                text = path.read_text()
            except OSError as err:
                raise GrammarError(
                    f"{path}: cannot read grammar file ({err.strerror}); expected a grammar JSON file"
                ) from None
            source = str(path)
        try:
            return _from_json(text, default_name=path.stem)
        except GrammarError as err:
            raise GrammarError(f"{source}: {err}") from None

    @functools.cached_property
    def _compiled(self) -> _Compiled:
        # Every nonterminal, children first; the nonterminals reachable from start are exactly
        # the prefix that ends at start, because the DFS visits start first.
        nonterminals = _postorder(self.rules, [self.start, *self.rules])
        reachable = nonterminals[: nonterminals.index(self.start) + 1]
        code = {t: int(t) for t in self.terminals}
        code.update({nt: len(self.terminals) + 1 + i for i, nt in enumerate(nonterminals)})
        size = len(self.terminals) + 1 + len(nonterminals)
        alternatives: list[tuple[tuple[int, ...], ...]] = [()] * size
        bands = [(1, 1)] * size
        for nt in nonterminals:
            alts = tuple(tuple(code[s] for s in alt) for alt in self.rules[nt])
            alternatives[code[nt]] = alts
            bands[code[nt]] = (
                min(sum(bands[c][0] for c in alt) for alt in alts),
                max(sum(bands[c][1] for c in alt) for alt in alts),
            )
        last_user: dict[int, int] = {}
        for nt in reachable:
            last_user.update((child, code[nt]) for alt in alternatives[code[nt]] for child in alt)
        freed_after: dict[int, list[int]] = {}
        for child, user in last_user.items():
            freed_after.setdefault(user, []).append(child)
        return _Compiled(
            start=code[self.start],
            alternatives=alternatives,
            reversed_alternatives=[tuple(alt[::-1] for alt in alts) for alts in alternatives],
            order=tuple(code[nt] for nt in reachable),
            bands=bands,
            freed_after={user: tuple(children) for user, children in freed_after.items()},
        )

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return len(self.terminals) + 1

    @property
    def vocab_size(self) -> int:
        return len(self.terminals) + 4

    @property
    def terminal_ids(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.terminals) + 1))

    @property
    def min_length(self) -> int:
        """Length of the shortest sentence."""
        return self._compiled.bands[self._compiled.start][0]

    @property
    def max_length(self) -> int:
        """Length of the longest sentence."""
        return self._compiled.bands[self._compiled.start][1]

    def sample(self, rng: random.Random) -> list[int]:
        """One sentence as terminal ids, without BOS/EOS, by the official procedure.

        Depth-first pre-order expansion: when a nonterminal is expanded it draws one
        ``rng.randint(0, k - 1)`` for its ``k`` alternatives, then its children are expanded left
        to right. The draw order matters: with ``random.Random(7711)`` this reproduces the
        official demo sentences.
        """
        compiled = self._compiled
        last_terminal = len(self.terminals)
        reversed_alternatives = compiled.reversed_alternatives
        randint = rng.randint
        sentence: list[int] = []
        emit = sentence.append
        stack = [compiled.start]
        pop, push = stack.pop, stack.extend
        while stack:
            symbol = pop()
            if symbol <= last_terminal:
                emit(symbol)
            else:
                alternatives = reversed_alternatives[symbol]
                # Children are pushed reversed so the leftmost is expanded (and draws) first.
                push(alternatives[randint(0, len(alternatives) - 1)])
        return sentence

    def accepts(self, tokens: Sequence[int]) -> bool:
        """Exact membership test: does the start symbol derive ``tokens``?

        The grammars are ambiguous, so this is a full chart DP rather than greedy matching. Each
        symbol S gets a 0/1 matrix R_S of shape (L+1, L+1) with R_S[i, j] = 1 iff S derives
        tokens[i:j]. Alternatives are chained by matrix products, and only the diagonal band
        allowed by S's length range is computed.
        """
        tokens_L = np.asarray(tokens)
        length = tokens_L.size
        if length == 0 or tokens_L.ndim != 1 or not np.issubdtype(tokens_L.dtype, np.integer):
            return False
        if not self.min_length <= length <= self.max_length:
            return False
        if tokens_L.min() < 1 or tokens_L.max() > len(self.terminals):
            return False
        # The DP runs many moderate matrix products. With more BLAS threads than idle cores the
        # OpenBLAS workers spin waiting for each other: up to 50x slower on a shared 2-core box.
        with _blas_controller().limit(limits=1, user_api="blas"):
            return self._chart_accepts(tokens_L)

    def _chart_accepts(self, tokens_L: np.ndarray) -> bool:
        compiled = self._compiled
        length = tokens_L.size
        size = length + 1
        spare: list[_Chart] = []

        def new_chart() -> _Chart:
            return spare.pop() if spare else _Chart(size)

        def release(chart: _Chart, band: tuple[int, int]) -> None:
            chart.skew[:, : band[1] + 1] = 0.0
            spare.append(chart)

        charts: dict[int, _Chart] = {}
        for terminal in self.terminal_ids:
            positions = np.flatnonzero(tokens_L == terminal)
            charts[terminal] = _Chart(size)
            charts[terminal].dense[positions, positions + 1] = 1.0
        for symbol in compiled.order:
            # Only R_start[0, L] is needed, so the start symbol computes row 0 alone.
            rows = 1 if symbol == compiled.start else size
            chart = new_chart()
            for alternative in compiled.alternatives[symbol]:
                if len(alternative) == 1:
                    np.maximum(chart.dense, charts[alternative[0]].dense, out=chart.dense)
                    continue
                span, band = charts[alternative[0]], compiled.bands[alternative[0]]
                for position, child in enumerate(alternative[1:], start=2):
                    out = chart if position == len(alternative) else new_chart()
                    _or_product(span, band, charts[child], compiled.bands[child], rows, out)
                    if position > 2:
                        release(span, band)
                    span = out
                    band = (band[0] + compiled.bands[child][0], band[1] + compiled.bands[child][1])
            charts[symbol] = chart
            for child in compiled.freed_after.get(symbol, ()):
                release(charts.pop(child), compiled.bands[child])
        return bool(charts[compiled.start].dense[0, length] > 0)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


class _Chart:
    """A 0/1 span chart R[i, j] over positions 0..L, with two views of one buffer.

    ``dense[i, j]`` is R[i, j]; ``skew[i, d]`` is R[i, i + d]. A skew entry with i + d > L
    falls in the (always zero) lower triangle of the next row or in the zero padding at the end,
    so reading it gives 0 and the products below only ever write 0 there.
    """

    def __init__(self, size: int) -> None:
        buffer = np.zeros(size * (size + 1), dtype=np.float32)
        self.dense = buffer[: size * size].reshape(size, size)
        self.skew = buffer.reshape(size, size + 1)


def _or_product(
    left: _Chart,
    left_band: tuple[int, int],
    right: _Chart,
    right_band: tuple[int, int],
    rows: int,
    out: _Chart,
) -> None:
    """OR the boolean product ``left @ right`` into ``out``, for the first ``rows`` rows.

    ``band = (lo, hi)`` means R[i, j] can be nonzero only for lo <= j - i <= hi, which makes the
    cost about L * width^2 rather than L^3. A narrow left band (the low levels) takes one
    vectorised step per left diagonal, which avoids many tiny matrix products; a wide one
    multiplies row blocks restricted to the columns the bands can reach.
    """
    size = out.dense.shape[0]
    (left_lo, left_hi), (right_lo, right_hi) = left_band, right_band
    if left_hi - left_lo + 1 <= _MAX_DIAGONAL_STEPS:
        for a in range(left_lo, left_hi + 1):
            b_hi = min(right_hi, size - 1 - a)
            if b_hi < right_lo:
                break
            count = min(rows, size - a)
            # out[i, i+a+b] |= left[i, i+a] & right[i+a, i+a+b], for every b at once.
            product_RW = left.skew[:count, a, None] * right.skew[a : a + count, right_lo : b_hi + 1]
            target_RW = out.skew[:count, a + right_lo : a + b_hi + 1]
            np.maximum(target_RW, product_RW, out=target_RW)
        return
    lo, hi = left_lo + right_lo, left_hi + right_hi
    block = max(_MIN_BLOCK_ROWS, left_hi - left_lo + 1)
    for r0 in range(0, min(rows, size - lo), block):
        r1 = min(r0 + block, rows)
        mid0, mid1 = r0 + left_lo, min(r1 - 1 + left_hi, size - 1) + 1
        col0, col1 = r0 + lo, min(r1 - 1 + hi, size - 1) + 1
        product_RC = left.dense[r0:r1, mid0:mid1] @ right.dense[mid0:mid1, col0:col1]
        # Counts of split points become 0/1 again so that later products cannot overflow.
        np.minimum(product_RC, 1.0, out=product_RC)
        target_RC = out.dense[r0:r1, col0:col1]
        np.maximum(target_RC, product_RC, out=target_RC)


def _postorder(rules: dict[str, Any], roots: Sequence[str]) -> list[str]:
    """Nonterminals reachable from ``roots``, each after its children (DFS post-order).

    Raises GrammarError on a cycle: the sampler would not terminate and the chart DP needs a
    bottom-up order.
    """
    order: list[str] = []
    finished: set[str] = set()
    for root in roots:
        if root in finished:
            continue
        path = [root]
        pending = [iter(_children(rules, root))]
        while pending:
            child = next(pending[-1], None)
            if child is None:
                pending.pop()
                finished.add(path[-1])
                order.append(path.pop())
            elif child in rules and child not in finished:
                if child in path:
                    cycle = " -> ".join([*path[path.index(child) :], child])
                    raise GrammarError(
                        f"field 'rules' is recursive ({cycle}); the grammar must be finite, with no rule cycles"
                    )
                path.append(child)
                pending.append(iter(_children(rules, child)))
    return order


def _children(rules: dict[str, Any], symbol: str) -> list[str]:
    return list(dict.fromkeys(child for alternative in rules[symbol] for child in alternative))


def _as_id(symbol: str) -> int:
    return int(symbol) if isinstance(symbol, str) and symbol.isdecimal() else -1


def _from_json(text: str, default_name: str) -> Grammar:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise GrammarError(f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise GrammarError(
            f"top level must be a JSON object with 'start', 'terminals' and 'rules', got {type(data).__name__}"
        )
    for field, meaning in (
        ("start", "the root nonterminal"),
        ("terminals", "a list of terminal ids"),
        ("rules", "nonterminal -> alternatives"),
    ):
        if field not in data:
            raise GrammarError(f"missing field {field!r} ({meaning})")
    start, terminals, rules = data["start"], data["terminals"], data["rules"]
    if not isinstance(start, str):
        raise GrammarError(f"field 'start' must be a string naming a nonterminal, got {start!r}")
    if not isinstance(terminals, list) or not all(isinstance(t, str) for t in terminals):
        raise GrammarError(f"field 'terminals' must be a list of strings '1'..'T', got {terminals!r}")
    if not isinstance(rules, dict):
        raise GrammarError(
            "field 'rules' must be an object mapping each nonterminal to a list of alternatives, "
            f"got {type(rules).__name__}"
        )
    for symbol, alternatives in rules.items():
        if not isinstance(alternatives, list) or not all(
            isinstance(alt, list) and all(isinstance(s, str) for s in alt) for alt in alternatives
        ):
            raise GrammarError(
                f"rules[{symbol!r}] must be a list of alternatives, each a list of symbol strings"
            )
    special = data.get("special_tokens", {})
    if not isinstance(special, dict):
        raise GrammarError("field 'special_tokens' must be an object like {'eos': T+1, 'mask': T+2}")
    for token, offset in _SPECIAL_OFFSETS.items():
        if token in special and special[token] != len(terminals) + offset:
            raise GrammarError(
                f"field 'special_tokens.{token}' is {special[token]!r}, but with {len(terminals)} terminals "
                f"it must be {len(terminals) + offset} (T+{offset})"
            )
    return Grammar(
        name=str(data.get("name", default_name)),
        start=start,
        terminals=tuple(sorted(terminals, key=_as_id)),
        rules={symbol: tuple(tuple(alt) for alt in alts) for symbol, alts in rules.items()},
    )
