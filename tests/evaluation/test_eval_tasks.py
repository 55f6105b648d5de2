"""Our offline task files against lm-eval's official ones on the same documents; MMLU-Var's variants; the grammar
tasks; missing data; fixed subsets."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import lm_eval
import pytest
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from lit_overtok.data.grammar import Grammar
from lit_overtok.evaluation.runner import expand_task_names, TaskSuite
from lit_overtok.evaluation.benchmark_tasks import mmlu_var_docs
from lit_overtok.evaluation.grammar_tasks import cfg_generation_results, cfg_next_token_results
from tests.fixtures import mmlu_questions, mmlu_subjects, rows, write_split as write

OFFICIAL = Path(lm_eval.__file__).parent / "tasks"


def official_task(yaml_path: Path, splits: dict[str, list[dict]], num_fewshot: int) -> ConfigurableTask:
    """lm-eval's own task file, its data swapped for the given documents (nothing downloads)."""
    config = load_yaml(yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    task = ConfigurableTask(config=config)
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    return task


def requests(task) -> list[tuple]:
    task.build_all_requests(rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.args) for i in task.instances]


def targets(task) -> list:
    return [task.doc_to_target(doc) for doc in task.eval_docs]


@pytest.mark.parametrize("name,official,folder,eval_split,shots", [
    ("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag", "validation", 0),
    ("arc_easy", "arc/arc_easy.yaml", "arc_easy", "test", 1),
    ("arc_challenge", "arc/arc_challenge.yaml", "arc_challenge", "test", 2),
    ("piqa", "piqa/piqa.yaml", "piqa", "validation", 0),
])
def test_offline_prompts_choices_and_gold_equal_lm_evals_official_task(tmp_path, name, official, folder, eval_split, shots):
    docs = rows(folder, "validation", 12)
    train = rows(folder, "train", 6) if folder.startswith("arc") else docs
    write(tmp_path, folder, "validation", docs)
    if folder.startswith("arc"):
        write(tmp_path, folder, "train", train)
    # The official ARC task scores its test split; offline we score validation, so feed it the same documents.
    theirs = official_task(OFFICIAL / official, {eval_split: docs, "validation": docs, "train": train}, shots)
    ours = TaskSuite([name], data_dir=tmp_path, num_fewshot=shots).task_dict["tasks"][name]
    assert requests(ours) == requests(theirs)
    assert targets(ours) == targets(theirs)
    assert len(ours.instances) == sum(len(theirs.doc_to_choice(d)) for d in theirs.eval_docs)


def test_offline_mmlu_continuation_equals_every_official_subject_task_with_first_n_shots(tmp_path):
    subjects = mmlu_subjects()
    assert len(subjects) == 57
    picked = {s: mmlu_questions(s, "validation", 1) for s in subjects}
    dev = [row for s in subjects for row in mmlu_questions(s, "dev", 5)]
    write(tmp_path, "mmlu", "validation", [r for s in subjects for r in picked[s]])
    write(tmp_path, "mmlu", "dev", dev)
    suite = TaskSuite(["mmlu_continuation"], data_dir=tmp_path, num_fewshot=2)
    assert len(suite.task_dict["tasks"]) == 57
    for subject in subjects:
        name = f"mmlu_{subject}_continuation"
        theirs = official_task(OFFICIAL / "mmlu" / "continuation" / f"mmlu_{subject}.yaml",
                               {"test": picked[subject], "dev": [r for r in dev if r["subject"] == subject]}, 2)
        ours = suite.task_dict["tasks"][name]
        assert requests(ours) == requests(theirs), subject
        assert targets(ours) == targets(theirs), subject


def test_mmlu_var_asks_each_question_in_olmos_seven_prompt_variants():
    question = {"question": " What is 2+2? ", "subject": "elementary_mathematics", "choices": ["3", "4"], "answer": 1}
    dev = [{"question": f"Q{i}", "subject": "elementary_mathematics", "choices": ["a", "b"], "answer": i % 2}
           for i in range(5)]
    docs = mmlu_var_docs([question], dev)
    assert [d["variant"] for d in docs] == list(range(7))
    assert docs[0]["query"] == "Question: What is 2+2?\nAnswer:"
    header = "The following are multiple choice questions (with answers) about elementary mathematics:\n\n"
    assert docs[1]["query"] == header + "Question: What is 2+2?\nAnswer:"
    assert docs[3]["query"] == header + "Question: Q0\nAnswer: a\n\nQuestion: Q1\nAnswer: b\n\nQuestion: What is 2+2?\nAnswer:"
    assert docs[6]["query"].count("Question:") == 6
    assert all(d["choices"] == ["3", "4"] and d["answer"] == 1 for d in docs)


def test_mmlu_var_task_scores_answer_texts_after_a_space(tmp_path):
    write(tmp_path, "mmlu", "validation", rows("mmlu", "validation", 2))
    write(tmp_path, "mmlu", "dev", mmlu_questions("abstract_algebra", "dev", 5))
    task = TaskSuite(["mmlu_var"], data_dir=tmp_path).task_dict["tasks"]["mmlu_var"]
    assert len(task.eval_docs) == 14
    (context, continuation) = requests(task)[0][2]
    first = rows("mmlu", "validation", 1)[0]
    assert context == "Question: " + first["question"].strip() + "\nAnswer:"
    assert continuation == " " + first["choices"][0]


def test_a_missing_data_file_names_the_file_and_how_to_provide_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"piqa/validation.jsonl is missing: provide the piqa validation split.*data_dir"):
        TaskSuite(["piqa"], data_dir=tmp_path)


def test_unknown_task_names_are_refused_with_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['hellaswagg'\]; available: .*hellaswag"):
        TaskSuite(["hellaswagg"])
    assert expand_task_names(["paper", "piqa", "grammar"]) == [
        "mmlu_var", "hellaswag", "arc_challenge", "arc_easy", "piqa", "cfg_generation", "cfg_next_token_validity"]


def test_grammar_tasks_docs_and_generation_metric():
    suite = TaskSuite(["grammar"], cfg_num_docs=6)
    generation = suite.task_dict["tasks"]["cfg_generation"]
    assert generation.config.generation_kwargs["max_gen_toks"] == Grammar.load("cfg3f").max_length + 1
    assert [generation.doc_to_text(d) for d in generation.eval_docs] == ["^"] * 6
    validity = suite.task_dict["tasks"]["cfg_next_token_validity"]
    for doc in validity.eval_docs:
        assert doc["prefix"].startswith("^") and doc["choices"] == ["1", "2", "3", "$"] and doc["valid"]
        assert not {0, 1, 2} <= set(doc["valid"])  # only prefixes where the grammar forbids some terminal
    doc = {"valid": [0, 3]}
    result = cfg_next_token_results(doc, [(math.log(0.1), False), (math.log(0.6), True), (math.log(0.2), False),
                                          (math.log(0.1), False)])
    assert result["acc"] == 0.0 and result["valid_mass"] == pytest.approx(0.2)
    doc = generation.eval_docs[0]
    sentence = "".join(map(str, Grammar.load("cfg3f").sample(__import__("random").Random(0))))
    assert cfg_generation_results(doc, [sentence]) == {"acc": 1.0}
    assert cfg_generation_results(doc, [sentence[:-1]]) == {"acc": 0.0}
    assert cfg_generation_results(doc, [sentence + "^"]) == {"acc": 0.0}


def test_fixed_subsets_are_stable_and_spread_over_a_groups_tasks(tmp_path):
    subjects = mmlu_subjects()
    # Every subject (a group needs all its tasks): the first three with 20 questions, the others one each.
    uneven = [row for i, s in enumerate(subjects) for row in mmlu_questions(s, "validation", 20 if i < 3 else 1)]
    write(tmp_path, "mmlu", "validation", uneven)
    write(tmp_path, "mmlu", "dev", [row for s in subjects for row in mmlu_questions(s, "dev", 5)])
    write(tmp_path, "piqa", "validation", rows("piqa", "validation"))
    suite = TaskSuite(["piqa", "mmlu_continuation"], data_dir=tmp_path)
    limits = {"piqa": 10, "mmlu_continuation": 10}
    first, again = suite.fixed_samples(limits), suite.fixed_samples(limits)
    assert first == again and len(first["piqa"]) == 10 and first != suite.fixed_samples(limits, seed=1)
    mmlu = {k: v for k, v in first.items() if k != "piqa"}
    assert len(mmlu) == 57 and all(len(ids) >= 1 for ids in mmlu.values())
    sizes = suite.leaf_sizes()
    largest = max(mmlu, key=sizes.get)
    assert len(mmlu[largest]) > 1  # the subsets follow the subjects' sizes
    subset = TaskSuite(["piqa"], data_dir=tmp_path, subset=10).task_dict["tasks"]["piqa"]
    assert [d["goal"] for d in subset.eval_docs] == [rows("piqa", "validation")[i]["goal"] for i in first["piqa"]]
    # Sizes per task: the grammar tasks are drawn at the largest size, then each is cut to its own.
    grammar = TaskSuite(["grammar"], subset={"cfg_generation": 3, "cfg_next_token_validity": 5}).task_dict["tasks"]
    assert len(grammar["cfg_generation"].eval_docs) == 3 and len(grammar["cfg_next_token_validity"].eval_docs) == 5
    with pytest.raises(ValueError, match="subset names task 'hellaswag'"):
        TaskSuite(["grammar"], subset={"hellaswag": 3})
