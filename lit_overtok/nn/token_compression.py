"""Engram's compressed token ids: a surjective map of a tokenizer's ids onto fewer ids that merge tokens whose text
differs only by case, accents, Unicode form or whitespace (``docs/engram.md`` §1; DeepSeek's ``CompressedTokenizer``).

For each id: decode it alone; a text holding U+FFFD (a partial UTF-8 byte sequence of a byte-level BPE) is keyed by
the raw token string; otherwise by its normal form (NFKC, NFD, accents stripped, lowercase, every run of spaces,
tabs and newlines one space, stripped; a token of whitespace only keeps one space; an empty result keeps the text).
Ids with equal keys share one compressed id, numbered by first occurrence in id order. Built from a ``tokenizers``
JSON file, offline; the model stores the map as a buffer, so scoring and generation use the map training used.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers

from lit_overtok.errors import InputError

_SENTINEL = "\ue000"  # a private-use character: marks a whitespace-only token so Strip leaves it one space


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def compressed_id_map(tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    """Compressed id of every id in [0, vocab_size). Ids the tokenizer does not have (a vocabulary the data padded
    beyond it) each get a compressed id of their own, after the tokenizer's."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise InputError(f"model_config.engram.tokenizer has {size} ids but model_config.vocab_size is {vocab_size}; "
                         "use the tokenizer the data was made with")
    normalizer = _normalizer()
    compressed: dict[str, int] = {}
    ids: list[int] = []
    for token_id in range(size):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.id_to_token(token_id)
        else:
            key = normalizer.normalize_str(text) or text
        ids.append(compressed.setdefault(key, len(compressed)))
    return ids + list(range(len(compressed), len(compressed) + vocab_size - size))


@functools.lru_cache(maxsize=4)
def compressed_id_map_of_file(path: str, vocab_size: int) -> tuple[int, ...]:
    """``compressed_id_map`` of a tokenizers JSON file (cached: meta-device builds for counts repeat it)."""
    if not Path(path).is_file():
        raise InputError(f"model_config.engram.tokenizer: {path} does not exist; give the tokenizers JSON file the data "
                         "was made with (prepared shards keep it as tokenizer.json beside manifest.json)")
    return tuple(compressed_id_map(Tokenizer.from_file(path), vocab_size))
