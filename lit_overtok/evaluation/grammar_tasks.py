"""Python hooks of the grammar task files (``tasks/local/cfg_*.yaml``): the paper's generation accuracy
(``cfg_generation``, docs/method.md §5) and next-token validity (``cfg_next_token_validity``).

lm-eval passes the task metadata to ``custom_dataset``; the keys read here are ``grammar`` (a packaged grammar name or
a grammar JSON path, default cfg3f) and ``cfg_num_docs`` (documents per task, default 256), drawn with a fixed seed,
so every evaluation of a run scores the same documents.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import datasets

from lit_overtok.data.grammar import Grammar
from lit_overtok.data.grammar_prefix import valid_next_tokens
from lit_overtok.evaluation.tokenizers import GrammarTokenizer

DEFAULT_GRAMMAR = "cfg3f"
DEFAULT_CFG_NUM_DOCS = 256
# Fixed seed: every evaluation (and every run) scores the same next-token documents.
_CFG_NEXT_TOKEN_SEED = 20250002


@functools.lru_cache(maxsize=8)
def cached_grammar(spec: str) -> Grammar:
    return Grammar.load(spec)


def cfg_generation_dataset(grammar: str = DEFAULT_GRAMMAR, cfg_num_docs: int = DEFAULT_CFG_NUM_DOCS,
                           **metadata: Any) -> datasets.DatasetDict:
    """``cfg_generation``: ``cfg_num_docs`` identical prompts (BOS); the model samples one sentence for each."""
    tokenizer = GrammarTokenizer(cached_grammar(str(grammar)))
    prompt = tokenizer.decode([tokenizer.bos_id])
    docs = [{"index": i, "prompt": prompt, "grammar": str(grammar)} for i in range(int(cfg_num_docs))]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def cfg_generation_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``acc`` = 1 when the sampled text (cut at EOS by the stop string) is a sentence of the grammar.

    A sample that never emitted EOS comes back whole and at most as long as the generation budget; the task asks
    for ``max_length + 1`` tokens, so such a sample is longer than any sentence and fails.
    """
    tokenizer = GrammarTokenizer(cached_grammar(doc["grammar"]))
    text = results[0]
    try:
        ids = tokenizer.encode(text)
    except ValueError:
        return {"acc": 0.0}
    return {"acc": float(tokenizer.grammar.accepts(ids))}


@functools.lru_cache(maxsize=8)
def _next_token_docs(spec: str, count: int) -> tuple[dict, ...]:
    grammar = cached_grammar(spec)
    tokenizer = GrammarTokenizer(grammar)
    choices = grammar.terminal_ids + (grammar.eos_id,)
    rng = random.Random(_CFG_NEXT_TOKEN_SEED)
    docs: list[dict] = []
    while len(docs) < count:
        sentence = grammar.sample(rng)
        cut = rng.randint(0, len(sentence))
        valid = valid_next_tokens(grammar, sentence[:cut])
        if set(grammar.terminal_ids) <= valid:
            continue  # every terminal may follow: nothing to get wrong but EOS
        docs.append({
            "index": len(docs),
            "prefix": tokenizer.decode([grammar.bos_id] + sentence[:cut]),
            "choices": [tokenizer.decode([token]) for token in choices],
            "valid": [i for i, token in enumerate(choices) if token in valid],
            "position": cut,
            "sentence_length": len(sentence),
        })
    return tuple(docs)


def cfg_next_token_dataset(grammar: str = DEFAULT_GRAMMAR, cfg_num_docs: int = DEFAULT_CFG_NUM_DOCS,
                           **metadata: Any) -> datasets.DatasetDict:
    """``cfg_next_token_validity``: prefixes of sampled sentences, cut at a uniform position (0..length), kept
    only where the grammar forbids at least one terminal next (in cfg3f about 40% of positions; elsewhere a model
    could only go wrong by ending early, and predicting the commonest terminal is right 98% of the time).

    Choices are the terminals and EOS; the gold set holds the valid next tokens (``valid_next_tokens``).
    """
    docs = [dict(doc) for doc in _next_token_docs(str(grammar), int(cfg_num_docs))]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def cfg_next_token_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """``acc``: the most likely choice is a valid next token; ``valid_mass``: the probability the model gives the
    valid choices, renormalised over the choices (terminals and EOS). Even at these prefixes one terminal is
    usually valid (always predicting cfg3f's commonest terminal scores ~0.9 acc), so ``valid_mass``, which a
    grammar-blind model keeps well below 1, is the finer signal.
    """
    logprobs = [logprob for logprob, _ in results]
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    best = max(range(len(logprobs)), key=logprobs.__getitem__)
    return {"acc": float(best in doc["valid"]),
            "valid_mass": sum(weights[i] for i in doc["valid"]) / sum(weights)}
