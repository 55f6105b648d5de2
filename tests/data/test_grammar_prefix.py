"""Tests for lit_overtok.data.grammar_prefix: valid next tokens, against brute force over a whole language."""

from __future__ import annotations

import itertools
import random

import pytest

from lit_overtok.data.grammar import Grammar
from lit_overtok.data.grammar_prefix import valid_next_tokens

# An ambiguous toy grammar whose language is small enough to list.
TOY = Grammar(
    name="toy", start="S", terminals=("1", "2", "3"),
    rules={"S": (("A", "B"), ("B", "A", "A"), ("A", "A")), "A": (("1", "2"), ("3",), ("B", "1")),
           "B": (("2",), ("1", "3", "3"))},
)


def language(grammar: Grammar) -> set[tuple[int, ...]]:
    def expand(symbol: str) -> list[tuple[int, ...]]:
        if symbol in grammar.terminals:
            return [(int(symbol),)]
        return [sum(parts, ()) for alt in grammar.rules[symbol] for parts in itertools.product(*map(expand, alt))]

    return set(expand(grammar.start))


def test_matches_brute_force_on_every_prefix_and_some_dead_ends():
    sentences = language(TOY)
    prefixes = {s[:t] for s in sentences for t in range(len(s) + 1)}
    probes = prefixes | {p + (a,) for p in prefixes for a in (1, 2, 3)}  # includes prefixes of no sentence
    assert len(probes) > len(prefixes)
    for prefix in probes:
        expected = {a for a in (1, 2, 3) if any(s[: len(prefix) + 1] == prefix + (a,) for s in sentences)}
        if prefix in sentences:
            expected.add(TOY.eos_id)
        assert valid_next_tokens(TOY, prefix) == expected, prefix


def test_cfg3f_the_true_next_token_is_always_valid_and_eos_only_at_the_end():
    grammar = Grammar.load("cfg3f")
    rng = random.Random(5)
    for _ in range(6):
        sentence = grammar.sample(rng)
        cut = rng.randint(0, len(sentence))
        valid = valid_next_tokens(grammar, sentence[:cut])
        assert (sentence[cut] if cut < len(sentence) else grammar.eos_id) in valid
        assert (grammar.eos_id in valid) == grammar.accepts(sentence[:cut])


def test_rejects_non_terminal_ids():
    with pytest.raises(ValueError, match="terminal ids 1..3"):
        valid_next_tokens(TOY, [1, 4])
