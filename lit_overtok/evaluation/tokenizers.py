"""Tokenizers for evaluation: text (a ``tokenizers`` JSON file) and grammar (one character per token id).

lm-eval speaks strings, so every model needs a string <-> id mapping. Text models use the tokenizer they were
trained with (``../shared/data/tokenizers/*``; the shard manifests record which). Grammar models see token ids
only, so ``GrammarTokenizer`` spells each id as one character:

    BOS ``^`` (id 0), terminals ``1``..``9`` then ``a``..``z`` (ids 1..T), EOS ``$`` (T+1), mask ``_`` (T+2),
    sep ``|`` (T+3)

so a cfg3f sentence reads ``^3121...$``. Every tokenizer here exposes ``encode``, ``decode``, ``eot_id`` (the id
that ends a document: the tokenizer's end-of-text, or the grammar's EOS), ``bos_id`` (None for text: lm-eval then
conditions an empty context on ``eot_id``) and ``vocab_size``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Optional, Union

from tokenizers import Tokenizer

from lit_overtok.data.grammar import Grammar

_TERMINAL_CHARS = string.digits[1:] + string.ascii_lowercase
_SPECIAL_CHARS = ("$", "_", "|")  # EOS, mask, sep: ids T+1, T+2, T+3


class TextTokenizer:
    """A ``tokenizers`` JSON file; ``eot_token`` names the end-of-text token (GPT-2 and NeoX: ``<|endoftext|>``)."""

    def __init__(self, path: Union[str, Path], eot_token: str = "<|endoftext|>") -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found; give the tokenizers JSON the model was trained with "
                "(e.g. ../shared/data/tokenizers/gpt2/tokenizer.json)"
            )
        self.name = str(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise ValueError(f"tokenizer file {path} is not a tokenizers JSON ({' '.join(str(error).split())}); "
                             "give the tokenizer.json the model was trained with") from None
        eot_id = self._tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise ValueError(f"tokenizer {path} has no token {eot_token!r}; pass its end-of-text token as eot_token")
        self.eot_id: int = eot_id
        self.bos_id: Optional[int] = None
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


class GrammarTokenizer:
    """One character per token id of a grammar (see the module docstring for the alphabet)."""

    def __init__(self, grammar: Union[Grammar, str, Path]) -> None:
        self.grammar = grammar if isinstance(grammar, Grammar) else Grammar.load(grammar)
        count = len(self.grammar.terminals)
        if count > len(_TERMINAL_CHARS):
            raise ValueError(
                f"grammar {self.grammar.name!r} has {count} terminals; GrammarTokenizer spells at most "
                f"{len(_TERMINAL_CHARS)}"
            )
        self.name = f"grammar:{self.grammar.name}"
        self.chars = "^" + _TERMINAL_CHARS[:count] + "".join(_SPECIAL_CHARS)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.eot_id: int = self.grammar.eos_id
        self.bos_id: Optional[int] = self.grammar.bos_id
        self.vocab_size: int = self.grammar.vocab_size

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the alphabet {self.chars!r} of {self.name}: a grammar model "
                "reads only its grammar's symbols (its tasks: cfg_generation, cfg_next_token_validity)"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save_tokenizers_json(self, path: Union[str, Path]) -> None:
        """This spelling as a ``tokenizers`` JSON file (one character per id), for tools that read only those
        (an exported Hugging Face model, lm-eval's ``--model hf``)."""
        from tokenizers import decoders, models, pre_tokenizers, Regex

        tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(self.chars)}, unk_token=self.chars[-1]))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        tokenizer.save(str(path))


EvalTokenizer = Union[TextTokenizer, GrammarTokenizer]


def load_tokenizer(spec: str) -> EvalTokenizer:
    """``grammar:<name or path>`` for a grammar model, else the path of a ``tokenizers`` JSON file (or its folder)."""
    if spec.startswith("grammar:"):
        return GrammarTokenizer(spec[len("grammar:"):])
    return TextTokenizer(spec)
