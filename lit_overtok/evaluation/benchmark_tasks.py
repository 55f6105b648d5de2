"""Python hooks of the benchmark task files (``lit_overtok/evaluation/tasks``): local JSONL data, HellaSwag's
preprocessing and MMLU-Var's prompt variants. The grammar tasks' hooks are in ``grammar_tasks``.

lm-eval calls a task's ``custom_dataset`` with the task metadata (``TaskManager(metadata=...)``, or
``lm_eval --metadata``) plus its ``dataset_kwargs``; the key read here is ``data_dir``: the folder holding
``<folder>/<split>.jsonl`` (found by ``lit_overtok.data.locations.data_dir``: that key, else ``$LIT_OVERTOK_DATA``,
else ``../shared/data`` beside a source checkout).

MMLU-Var (docs/method.md §4.12) follows OLMo's in-loop evaluator (allenai/OLMo ``olmo/eval/downstream.py``, class
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
import re
import weakref
from pathlib import Path
from typing import Any, Optional

import datasets

from lit_overtok.data.locations import data_dir as find_data_dir


MMLU_INSTRUCTION = "The following are multiple choice questions (with answers) about {subject}:\n\n"
MMLU_VARIANT_SHOTS = (None, 0, 1, 2, 3, 4, 5)  # None: no prefix; k: instruction + k dev shots


# ----------------------------------------------------------------------------------------------- local JSONL
@functools.lru_cache(maxsize=16)
def _read_jsonl(path: Path, mtime_ns: int) -> tuple[dict, ...]:
    with path.open(encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def read_split(data_dir: Optional[str], folder: str, split: str) -> list[dict]:
    """Rows of ``<data_dir>/<folder>/<split>.jsonl``; a missing file is an error that says what to provide."""
    path = find_data_dir(data_dir, needed_for=f"the {folder} {split} split") / folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"offline task data {path} is missing: provide the {folder} {split} split as JSONL in the schema of "
            f"lm-eval's {folder} task (one JSON object per line), or point data_dir (evaluate.py --data-dir, "
            "LMEvalCallback(data_dir=...), lm_eval --metadata '{\"data_dir\": ...}', or LIT_OVERTOK_DATA) at a folder "
            "that has it"
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
