"""Token ids for ``prepare``: documents encoded in worker processes, long ones in bounded memory.

A ``tokenizers`` encoding costs about 175 bytes per character (ids, offsets, token strings, masks), so one 17.5 MB
document took 3 GB. A document longer than ``LONG_DOCUMENT_CHARS`` is therefore cut into pieces of about
``PIECE_CHARS`` that are encoded one group at a time; only their ids are kept (2 or 4 bytes per token).

The cuts change no id: a cut is placed where the tokenizer's own pre-tokenizer starts a new pre-token (BPE merges
never cross pre-tokens), between two ASCII characters the first of which is not whitespace (so no Unicode
normalization composes across it and no whitespace-stripping added token reaches across it), and away from any
added token's text. That holds for tokenizers whose normalizer is a Unicode normal form (or none) and whose
pre-tokenizers split by local rules (byte-level with its regex, ``Split`` without look-behind, whitespace, digits,
punctuation): GPT-2, GPT-NeoX, OLMo's, and the BPE ``prepare`` trains. Other tokenizers (a prefix-adding
``Metaspace``, no pre-tokenizer at all) encode long documents whole, as before.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

LONG_DOCUMENT_CHARS = 1 << 18
PIECE_CHARS = 1 << 16
# Characters past a cut that the pre-tokenizer sees, so that its look-ahead is the same as in the whole text.
LOOKAHEAD_CHARS = 256
_LOCAL_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
_LOCAL_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Whitespace", "WhitespaceSplit", "Punctuation"}


def vocabulary_size(tokenizer: Tokenizer) -> int:
    """One more than the largest id, counting added tokens (some files have ids beyond get_vocab_size())."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def can_cut(tokenizer_json: dict) -> bool:
    """Whether long documents can be encoded in pieces with exactly the ids of the whole (see the module doc)."""

    def local(part: Optional[dict], allowed: set[str], optional: bool) -> bool:
        if part is None:
            return optional
        if part["type"] == "Sequence":
            return all(local(p, allowed, False) for p in part.get("normalizers", part.get("pretokenizers", [])))
        if part["type"] == "ByteLevel" and part.get("add_prefix_space"):
            return False
        if part["type"] == "Split" and "(?<" in json.dumps(part.get("pattern")):
            return False
        return part["type"] in allowed

    return (local(tokenizer_json.get("normalizer"), _LOCAL_NORMALIZERS, True)
            and local(tokenizer_json.get("pre_tokenizer"), _LOCAL_PRE_TOKENIZERS, False))


def cut_points(text: str, tokenizer: Tokenizer, added: list[str], piece_chars: int = PIECE_CHARS) -> list[int]:
    """Positions at which ``text`` (already normalized) can be cut without changing its encoding."""
    cuts, start = [], 0
    while len(text) - start > piece_chars:
        window = text[start:start + piece_chars + LOOKAHEAD_CHARS]
        spans = tokenizer.pre_tokenizer.pre_tokenize_str(window)
        cut = next((start + s for _, (s, _e) in reversed(spans)
                    if 0 < s <= piece_chars and _safe_cut(text, start + s, added)), None)
        if cut is None:  # one pre-token longer than a piece: the rest is encoded whole
            break
        cuts.append(cut)
        start = cut
    return cuts


def _safe_cut(text: str, at: int, added: list[str]) -> bool:
    before, after = text[at - 1], text[at]
    if not (before.isascii() and after.isascii()) or before.isspace():
        return False
    return not any(token in text[max(0, at - len(token) + 1):at + len(token) - 1] for token in added)


# ----------------------------------------------------------------------------------------- worker processes
_worker_state: dict = {}


def init_encoder(tokenizer_json: str, eos_id: int, dtype: str, single_threaded: bool) -> None:
    if single_threaded:
        # One process per core already; the tokenizer's own thread pool would only oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker_state.update(tokenizer=tokenizer, eos_id=eos_id, dtype=np.dtype(dtype),
                         cut=can_cut(json.loads(tokenizer_json)),
                         added=[t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content])


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens of the chunk, each document's length), every document followed by EOS."""
    state = _worker_state
    ids: list[np.ndarray] = []
    short: list[int] = []  # positions of the documents encoded together in one batch
    for position, text in enumerate(texts):
        if len(text) > LONG_DOCUMENT_CHARS and state["cut"]:
            ids.append(_encode_long(text))
        else:
            ids.append(None)
            short.append(position)
    for position, encoding in zip(short, state["tokenizer"].encode_batch([texts[p] for p in short],
                                                                          add_special_tokens=False)):
        ids[position] = np.asarray(encoding.ids, dtype=state["dtype"])
    eos = np.array([state["eos_id"]], dtype=state["dtype"])
    lengths = np.fromiter((len(d) + 1 for d in ids), dtype=np.int64, count=len(ids))
    tokens = np.concatenate(list(itertools.chain.from_iterable((d, eos) for d in ids))) if ids else eos[:0]
    return tokens, lengths


def _encode_long(text: str) -> np.ndarray:
    state, tokenizer = _worker_state, _worker_state["tokenizer"]
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)  # idempotent forms only (can_cut), so encoding it again is a no-op
    bounds = [0, *cut_points(text, tokenizer, state["added"]), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    ids: list[np.ndarray] = []
    group_size = max(1, LONG_DOCUMENT_CHARS // PIECE_CHARS)  # a group encodes about as much text as a short document
    for first in range(0, len(pieces), group_size):
        for encoding in tokenizer.encode_batch(pieces[first:first + group_size], add_special_tokens=False):
            ids.append(np.asarray(encoding.ids, dtype=state["dtype"]))
    return np.concatenate(ids) if ids else np.zeros(0, dtype=state["dtype"])


def _init_worker(parent: int, *initargs) -> None:
    _die_with_parent(parent)
    init_encoder(*initargs)


def _die_with_parent(parent: int) -> None:
    """End this worker when ``parent`` dies, even by SIGKILL (which runs no cleanup): on Linux the kernel sends it
    SIGKILL then (``prctl(PR_SET_PDEATHSIG)``). Without it a killed ``prepare`` left its workers running, each holding
    its memory and the caller's pipes (and, through them, multiprocessing's resource tracker)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def ordered_map(chunks: Iterator[list[str]], workers: int, initargs: tuple) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``encode`` over the chunks, results in input order, at most 2 × workers chunks in flight."""
    if workers == 1:
        init_encoder(*initargs, single_threaded=False)
        yield from map(encode, chunks)
        return
    # spawn, not fork: the parent may have run the tokenizer's thread pool (BPE training), which fork would copy.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(os.getpid(), *initargs, True)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(encode, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
