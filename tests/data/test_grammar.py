"""Tests for lit_overtok.data.grammar: loading, official sampling, exact membership."""

from __future__ import annotations

import functools
import itertools
import json
import random
from pathlib import Path

import pytest

from lit_overtok.data import grammar as grammar_module
from lit_overtok.data.grammar import Grammar, GrammarError, packaged_grammars

ALL_GRAMMARS = ("cfg3b", "cfg3e1", "cfg3e2", "cfg3f", "cfg3g", "cfg3h", "cfg3i", "cfg3j", "cfg3k")
# Exact length ranges from the data README (computed there from the rules).
LENGTH_RANGES = {
    "cfg3b": (138, 432),
    "cfg3e1": (66, 557),
    "cfg3e2": (82, 645),
    "cfg3f": (64, 729),
    "cfg3g": (80, 729),
    "cfg3h": (97, 459),
    "cfg3i": (114, 564),
    "cfg3j": (128, 2052),
    "cfg3k": (132, 1458),
}


@functools.cache
def load(name: str) -> Grammar:
    return Grammar.load(name)


def write_grammar(tmp_path: Path, data: object, name: str = "g.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def reference_accepts(grammar: Grammar, tokens: list[int]) -> bool:
    """Independent top-down recogniser (memoised sets of end positions), slow but obviously right."""
    tokens = tuple(tokens)

    @functools.cache
    def ends(symbol: str, start: int) -> frozenset[int]:
        if symbol in grammar.terminals:
            matches = start < len(tokens) and tokens[start] == int(symbol)
            return frozenset([start + 1]) if matches else frozenset()
        result: set[int] = set()
        for alternative in grammar.rules[symbol]:
            positions = {start}
            for child in alternative:
                positions = set().union(*(ends(child, p) for p in positions))
            result |= positions
        return frozenset(result)

    return len(tokens) in ends(grammar.start, 0)


def test_packaged_grammars_are_the_nine_official_ones():
    assert packaged_grammars() == ALL_GRAMMARS


def test_token_ids_of_cfg3f():
    g = load("cfg3f")
    assert (g.bos_id, g.terminal_ids, g.eos_id, g.vocab_size) == (0, (1, 2, 3), 4, 7)
    assert g.name == "cfg3f" and g.start == "22"


@pytest.mark.parametrize("name", ALL_GRAMMARS)
def test_min_and_max_length_match_readme(name):
    g = load(name)
    assert (g.min_length, g.max_length) == LENGTH_RANGES[name]


@pytest.mark.parametrize(("name", "length"), [("cfg3f", 305), ("cfg3k", 625)])
def test_seed_7711_reproduces_official_demo_sentence(name, length):
    sentence = load(name).sample(random.Random(7711))
    assert len(sentence) == length
    assert load(name).accepts(sentence)


def test_official_demo_sentence_with_first_token_flipped_is_rejected():
    g = load("cfg3f")
    sentence = g.sample(random.Random(7711))
    assert sentence[0] == 3
    for replacement in (1, 2):
        assert not g.accepts([replacement, *sentence[1:]])


def test_sampler_draws_once_per_expansion_in_pre_order(tmp_path):
    g = Grammar.load(
        write_grammar(
            tmp_path,
            {
                "start": "S",
                "terminals": ["1", "2"],
                "rules": {"S": [["A", "B"], ["B"]], "A": [["1"], ["2"]], "B": [["1", "A"], ["2"]]},
            },
        )
    )

    class ScriptedRandom:
        def __init__(self, draws):
            self.draws, self.calls = list(draws), []

        def randint(self, low, high):
            self.calls.append((low, high))
            return self.draws.pop(0)

    rng = ScriptedRandom([0, 1, 0, 0])  # S->A B, A->2, B->1 A, A->1
    assert g.sample(rng) == [2, 1, 1]
    assert rng.calls == [(0, 1)] * 4 and not rng.draws


@pytest.mark.parametrize("name", ALL_GRAMMARS)
def test_samples_are_accepted(name):
    g = load(name)
    rng = random.Random(2024)
    count = 10 if name in ("cfg3j", "cfg3k") else 50
    for _ in range(count):
        sentence = g.sample(rng)
        assert set(sentence) <= set(g.terminal_ids)
        assert g.min_length <= len(sentence) <= g.max_length
        assert g.accepts(sentence)


def test_corrupted_sentences_are_mostly_rejected_and_match_reference():
    g = load("cfg3f")
    rng = random.Random(99)
    corruptions = []
    for k in range(100):
        sentence = g.sample(rng)
        position = rng.randrange(len(sentence))
        kind = k % 4
        if kind == 0:
            sentence[position] = rng.choice([t for t in g.terminal_ids if t != sentence[position]])
        elif kind == 1:
            del sentence[position]
        elif kind == 2:
            sentence.append(rng.choice(g.terminal_ids))
        else:
            sentence = sentence[: max(1, position)]
        corruptions.append(sentence)
    verdicts = [g.accepts(s) for s in corruptions]
    # A single edit can land on another sentence of the (ambiguous, dense) language, so exact
    # rejection is checked against an independent recogniser; the rate is only a sanity bound.
    assert verdicts == [reference_accepts(g, s) for s in corruptions]
    assert verdicts.count(False) >= 90


def test_accepts_rejects_malformed_input():
    g = load("cfg3f")
    sentence = g.sample(random.Random(5))
    assert not g.accepts([])
    assert not g.accepts([g.bos_id, *sentence])
    assert not g.accepts([*sentence, g.eos_id])
    assert not g.accepts([3] * 64)  # right length, wrong content
    assert not g.accepts([1] * 730)  # longer than any sentence
    assert g.accepts(tuple(sentence))


def test_ambiguous_grammar_needs_backtracking(tmp_path):
    # A's first alternative greedily eats "1 1", after which B cannot match the remaining "2";
    # the only parse takes A -> 1 and B -> 1 2.
    g = Grammar.load(
        write_grammar(
            tmp_path,
            {
                "start": "S",
                "terminals": ["1", "2"],
                "rules": {"S": [["A", "B"]], "A": [["1", "1"], ["1"]], "B": [["1", "2"]]},
            },
        )
    )
    assert g.accepts([1, 1, 2])
    assert g.accepts([1, 1, 1, 2])
    assert not g.accepts([1, 2])
    assert not g.accepts([1, 1, 1, 1, 2])


def _random_grammar(rng: random.Random) -> Grammar:
    """A random acyclic grammar with unit rules and alternatives of up to 4 symbols."""
    names = [f"N{i}" for i in range(5)]
    rules = {}
    for i, name in enumerate(names):
        pool = ["1", "2", *names[i + 1 :]]
        rules[name] = tuple(
            tuple(rng.choice(pool) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        )
    return Grammar(name="random", start="N0", terminals=("1", "2"), rules=rules)


def _language_up_to(grammar: Grammar, max_len: int) -> set[tuple[int, ...]]:
    @functools.cache
    def words(symbol: str) -> frozenset[tuple[int, ...]]:
        if symbol in grammar.terminals:
            return frozenset([(int(symbol),)])
        result: set[tuple[int, ...]] = set()
        for alternative in grammar.rules[symbol]:
            prefixes = {()}
            for child in alternative:
                prefixes = {p + w for p in prefixes for w in words(child) if len(p) + len(w) <= max_len}
            result |= prefixes
        return frozenset(result)

    return set(words(grammar.start))


@pytest.mark.parametrize("path", ["diagonal", "matmul"])
def test_accepts_matches_brute_force_on_random_grammars(monkeypatch, path):
    # Force one of the two product strategies; tiny blocks exercise the block boundaries.
    if path == "diagonal":
        monkeypatch.setattr(grammar_module, "_MAX_DIAGONAL_STEPS", 10**9)
    else:
        monkeypatch.setattr(grammar_module, "_MAX_DIAGONAL_STEPS", 0)
        monkeypatch.setattr(grammar_module, "_MIN_BLOCK_ROWS", 2)
    rng = random.Random(7)
    max_len = 6
    for _ in range(6):
        g = _random_grammar(rng)
        language = _language_up_to(g, max_len)
        for length in range(1, max_len + 1):
            for word in itertools.product((1, 2), repeat=length):
                assert g.accepts(list(word)) == (word in language), (g.rules, word)


# ---- loading errors: each names the file (or packaged name) and the offending field ----

VALID = {"start": "S", "terminals": ["1", "2"], "rules": {"S": [["A", "2"]], "A": [["1"], ["1", "1"]]}}


def _with(**changes):
    data = json.loads(json.dumps(VALID))
    data.update(changes)
    return data


ERROR_CASES = {
    "invalid_json": ('{"start": "S",', ["invalid JSON", "line 1"]),
    "not_object": ("[1, 2]", ["top level", "JSON object"]),
    "missing_start": ({k: v for k, v in VALID.items() if k != "start"}, ["missing field 'start'"]),
    "missing_terminals": ({k: v for k, v in VALID.items() if k != "terminals"}, ["missing field 'terminals'"]),
    "missing_rules": ({k: v for k, v in VALID.items() if k != "rules"}, ["missing field 'rules'"]),
    "rules_not_object": (_with(rules=[["1"]]), ["field 'rules'", "object"]),
    "alternatives_not_list": (_with(rules={"S": "1 2"}), ["rules['S']", "list of alternatives"]),
    "empty_alternative": (_with(rules={"S": [["1"], []]}), ["rules['S'][1]", "empty alternative"]),
    "no_alternatives": (_with(rules={"S": [["A"]], "A": []}), ["rules['A']", "at least one alternative"]),
    "unknown_symbol": (_with(rules={"S": [["1", "X"]]}), ["rules['S'][0]", "'X'", "neither a terminal"]),
    "terminals_not_ids": (_with(terminals=["a", "b"]), ["field 'terminals'", "'1'..'2'"]),
    "terminals_gap": (_with(terminals=["1", "3"]), ["field 'terminals'", "'1'..'2'"]),
    "terminal_with_rules": (_with(rules={"S": [["1"]], "1": [["2"]]}), ["terminal '1'"]),
    "start_without_rules": (_with(start="Z"), ["field 'start'", "'Z'", "['A', 'S']"]),
    "start_is_terminal": (_with(start="1"), ["field 'start'", "a terminal"]),
    "cycle": (
        _with(rules={"S": [["A"]], "A": [["1"], ["B", "2"]], "B": [["A"]]}),
        ["recursive", "A -> B -> A", "finite"],
    ),
    "self_loop": (_with(rules={"S": [["S", "1"], ["1"]]}), ["recursive", "S -> S"]),
    "wrong_eos": (_with(special_tokens={"eos": 4}), ["special_tokens.eos", "must be 3"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_grammar_errors_name_file_and_field(tmp_path, case):
    data, fragments = ERROR_CASES[case]
    path = write_grammar(tmp_path, data, name=f"{case}.json")
    with pytest.raises(GrammarError) as excinfo:
        Grammar.load(path)
    message = str(excinfo.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_valid_custom_grammar_loads(tmp_path):
    g = Grammar.load(write_grammar(tmp_path, _with(special_tokens={"eos": 3, "mask": 4, "sep": 5})))
    assert g.name == "g" and (g.min_length, g.max_length) == (2, 3) and g.vocab_size == 6
    assert g.accepts([1, 2]) and g.accepts([1, 1, 2]) and not g.accepts([2, 2])


def test_missing_file_error(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(GrammarError, match="nope.json.*cannot read"):
        Grammar.load(path)


def test_unknown_packaged_name_lists_valid_names():
    with pytest.raises(GrammarError) as excinfo:
        Grammar.load("cfg3z")
    message = str(excinfo.value)
    assert "'cfg3z'" in message and all(name in message for name in ALL_GRAMMARS)
