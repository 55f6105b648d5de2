"""Which tokens may come next after a prefix of a grammar sentence (the next-token-validity evaluation task).

For a prefix ``p`` of terminal ids, terminal ``a`` is a *valid next token* when ``p + [a]`` is a prefix of some
sentence of the grammar, and EOS is valid when ``p`` is itself a sentence. A model that has learned the grammar
puts its most likely next token in this set; the evaluation task built on it (``cfg_next_token_validity``) gives
small models a signal long before they generate whole sentences correctly (docs/method.md §5 measures only whole
sentences).

Exact, by span charts over the prefix (L = len(p), positions 0..L):

* ``spans[X][i, j] = 1`` iff X derives ``p[i:j]``;
* ``nexts[X][i, a] = 1`` iff X derives a string that starts with ``p[i:L] + [a]``.

For a terminal t: ``spans[t][i, i+1] = [p[i] == t]`` and ``nexts[t][L, t] = 1``. For X -> Y1 ... Yk,
X's string starts with ``p[i:L] + [a]`` iff for some m the children Y1..Y(m-1) derive exactly ``p[i:j]`` and Ym
derives a string starting with ``p[j:L] + [a]``; with ``reach`` the product of the first m-1 span charts this is
``reach @ nexts[Ym]``. The grammars are finite and non-recursive, so children are finished before parents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lit_overtok.data.grammar import _blas_controller, Grammar


def valid_next_tokens(grammar: Grammar, prefix: Sequence[int]) -> frozenset[int]:
    """Token ids (terminals and possibly EOS) that may follow ``prefix`` in some sentence of ``grammar``.

    ``prefix`` holds terminal ids only (no BOS). An empty result means ``prefix`` is not a prefix of any sentence.
    """
    prefix_L = np.asarray(prefix, dtype=np.int64).reshape(-1)
    count = len(grammar.terminals)
    if prefix_L.size and (prefix_L.min() < 1 or prefix_L.max() > count):
        raise ValueError(f"prefix must hold terminal ids 1..{count} of grammar {grammar.name!r}, got {list(prefix)}")
    if prefix_L.size >= grammar.max_length + 1:
        return frozenset()
    # Many small matrix products: more BLAS threads than idle cores only spin (see Grammar.accepts).
    with _blas_controller().limit(limits=1, user_api="blas"):
        return _PrefixCharts(grammar, prefix_L).valid_next()


class _PrefixCharts:
    def __init__(self, grammar: Grammar, prefix_L: np.ndarray) -> None:
        self.grammar = grammar
        self.length = length = prefix_L.size
        size, count = length + 1, len(grammar.terminals)
        self.spans: dict[str, np.ndarray] = {}
        self.nexts: dict[str, np.ndarray] = {}
        for terminal in grammar.terminals:
            token = int(terminal)
            spans_NN = np.zeros((size, size), dtype=np.float32)
            positions = np.flatnonzero(prefix_L == token)
            spans_NN[positions, positions + 1] = 1.0
            nexts_NA = np.zeros((size, count), dtype=np.float32)
            nexts_NA[length, token - 1] = 1.0
            self.spans[terminal], self.nexts[terminal] = spans_NN, nexts_NA

    def build(self, symbol: str, rows: slice) -> None:
        """Fill the charts of ``symbol`` (children first) for the given rows (all rows below the start symbol)."""
        if symbol in self.spans:
            return
        size, count = self.length + 1, len(self.grammar.terminals)
        spans_RN = np.zeros((size, size), dtype=np.float32)[rows]
        nexts_RA = np.zeros((size, count), dtype=np.float32)[rows]
        for alternative in self.grammar.rules[symbol]:
            reach_RN = None  # product of the span charts of the children so far; None = identity
            for child in alternative:
                self.build(child, slice(None))
                if reach_RN is None:
                    np.maximum(nexts_RA, self.nexts[child][rows], out=nexts_RA)
                    reach_RN = self.spans[child][rows]
                else:
                    np.maximum(nexts_RA, np.minimum(reach_RN @ self.nexts[child], 1.0), out=nexts_RA)
                    # Counts of split points become 0/1 again so that longer chains cannot overflow.
                    reach_RN = np.minimum(reach_RN @ self.spans[child], 1.0)
            np.maximum(spans_RN, reach_RN, out=spans_RN)
        self.spans[symbol], self.nexts[symbol] = spans_RN, nexts_RA

    def valid_next(self) -> frozenset[int]:
        start = self.grammar.start
        # Only row 0 of the start symbol is ever read, which makes the widest products vector-matrix ones.
        self.build(start, slice(0, 1))
        valid = {a + 1 for a in np.flatnonzero(self.nexts[start][0])}
        if self.length > 0 and self.spans[start][0, self.length] > 0:
            valid.add(self.grammar.eos_id)
        return frozenset(valid)
