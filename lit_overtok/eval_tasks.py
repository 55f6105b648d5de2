"""Python hooks of our lm-eval task files (``evaluation/tasks``): local data, HellaSwag's preprocessing, MMLU-Var's
prompt variants and the grammar tasks.

lm-eval calls a task's ``custom_dataset`` with the task metadata (``TaskManager(metadata=...)``, or
``lm_eval --metadata``) plus its ``dataset_kwargs``; the keys we read are

* ``data_dir``: the folder holding ``<folder>/<split>.jsonl`` (default ``DEFAULT_DATA_DIR``, ``../shared/data``
  beside the repository);
* ``grammar``: a packaged grammar name or a grammar JSON path (default ``cfg3f``);
* ``cfg_num_docs``: documents per grammar task (default 256), drawn with a fixed seed, so every evaluation of a
  run sees the same ones.

MMLU-Var (PAPER.md §4.12) follows OLMo's in-loop evaluator (allenai/OLMo ``olmo/eval/downstream.py``, class
``MMLU`` with ``prompt_variations=1``): every validation question is asked in 7 prompt variants, each a document
of its own, in this order: no prefix; the instruction ``"The following are multiple choice questions (with
answers) about {subject}:\\n\\n"``; the instruction followed by the subject's first k dev questions (k = 1..5),
each written ``"Question: {question}\\nAnswer: {answer text}\\n\\n"``. The question itself is
``"Question: {question}\\nAnswer:"`` and the choices are the answer texts after a space. OLMo's score is its
``len_norm`` accuracy (log-likelihood divided by the answer's character count), which is lm-eval's ``acc_norm``;
the task's accuracy is the mean over all question-variant documents, i.e. the mean over the 7 variants.
Differences from OLMo: lm-eval tokenises context and continuation jointly (OLMo separately), and OLMo reports four
category tasks (``mmlu_{stem,humanities,social_sciences,other}_var``) whose combination into one number the paper
does not state [UNCONFIRMED]; we report one number over all 57 subjects (weighted by questions).
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import weakref
from pathlib import Path
from typing import Any, Optional

import datasets

from lit_overtok.data.grammar import Grammar
from lit_overtok.data.grammar_prefix import valid_next_tokens
from lit_overtok.eval_tokenizers import GrammarTokenizer

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_GRAMMAR = "cfg3f"
DEFAULT_CFG_NUM_DOCS = 256
# Fixed seeds: every evaluation (and every run) scores the same grammar documents.
_CFG_GENERATION_SEED = 20250001
_CFG_NEXT_TOKEN_SEED = 20250002

MMLU_INSTRUCTION = "The following are multiple choice questions (with answers) about {subject}:\n\n"
MMLU_VARIANT_SHOTS = (None, 0, 1, 2, 3, 4, 5)  # None: no prefix; k: instruction + k dev shots


# ----------------------------------------------------------------------------------------------- local JSONL
@functools.lru_cache(maxsize=16)
def _read_jsonl(path: Path, mtime_ns: int) -> tuple[dict, ...]:
    with path.open(encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def read_split(data_dir: Optional[str], folder: str, split: str) -> list[dict]:
    """Rows of ``<data_dir>/<folder>/<split>.jsonl``; a missing file is an error that says what to provide."""
    path = Path(data_dir or DEFAULT_DATA_DIR) / folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"offline task data {path} is missing: provide the {folder} {split} split as JSONL in the schema of "
            f"lm-eval's {folder} task (one JSON object per line), or point data_dir (evaluate.py --data-dir, "
            "LMEvalCallback(data_dir=...), lm_eval --metadata '{\"data_dir\": ...}') at a folder that has it"
        )
    return [dict(row) for row in _read_jsonl(path, path.stat().st_mtime_ns)]


def local_jsonl(folder: str, splits: list[str], data_dir: Optional[str] = None, subject: Optional[str] = None,
                **metadata: Any) -> datasets.DatasetDict:
    """``custom_dataset`` hook: the given splits of ``<data_dir>/<folder>/``, optionally one MMLU subject."""
    out = {}
    for split in splits:
        rows = read_split(data_dir, folder, split)
        if subject is not None:
            rows = [row for row in rows if row["subject"] == subject]
            if not rows:
                raise ValueError(f"{folder}/{split}.jsonl has no rows of subject {subject!r}")
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


# ------------------------------------------------------------------------------------------------ HellaSwag
def _hellaswag_clean(text: str) -> str:
    # The WikiHow part of HellaSwag carries "[title]"-style markup; lm-eval's hellaswag task removes it this way.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's HellaSwag preprocessing: ``query`` = "activity: ctx_a Ctx_b", cleaned ``choices``, int ``gold``.

    lm-eval calls this on the same split every time it reads the documents; the result is kept per split.
    """
    if dataset not in _hellaswag_processed:
        docs = []
        for doc in dataset:
            context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
            docs.append({
                **doc,
                "query": _hellaswag_clean(doc["activity_label"] + ": " + context),
                "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
                "gold": int(doc["label"]),
            })
        _hellaswag_processed[dataset] = datasets.Dataset.from_list(docs)
    return _hellaswag_processed[dataset]


_hellaswag_processed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------- MMLU-Var
def mmlu_var_docs(questions: list[dict], dev: list[dict]) -> list[dict]:
    """The 7 prompt variants of every question, question-major (see the module docstring)."""
    shots_by_subject: dict[str, list[dict]] = {}
    for row in dev:
        shots_by_subject.setdefault(row["subject"], []).append(row)
    docs = []
    for question in questions:
        subject = question["subject"]
        shots = shots_by_subject.get(subject, [])
        for variant, count in enumerate(MMLU_VARIANT_SHOTS):
            prefix = ""
            if count is not None:
                if count > len(shots):
                    raise ValueError(f"mmlu dev split has {len(shots)} questions of subject {subject!r}; MMLU-Var needs 5")
                prefix = MMLU_INSTRUCTION.format(subject=subject.replace("_", " "))
                prefix += "".join(_mmlu_question(shot) + " " + shot["choices"][shot["answer"]] + "\n\n"
                                  for shot in shots[:count])
            docs.append({"query": prefix + _mmlu_question(question), "choices": list(question["choices"]),
                         "answer": question["answer"], "subject": subject, "variant": variant})
    return docs


def _mmlu_question(row: dict) -> str:
    return "Question: " + row["question"].strip() + "\nAnswer:"


def mmlu_var_dataset(data_dir: Optional[str] = None, **metadata: Any) -> datasets.DatasetDict:
    """``custom_dataset`` hook of ``mmlu_var``: the expanded validation questions (dev supplies the shots)."""
    docs = mmlu_var_docs(read_split(data_dir, "mmlu", "validation"), read_split(data_dir, "mmlu", "dev"))
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


# --------------------------------------------------------------------------------------------- grammar tasks
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
