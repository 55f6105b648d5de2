"""The lm-eval adapter: log-probabilities and greedy flags equal a direct forward computation, rolling windows,
generation, a task whose answers are known exactly, and the same results from two gloo ranks as from one."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance

from lit_overtok.nn.config import ModelConfig
from lit_overtok.evaluation.runner import task_scores, TaskSuite
from lit_overtok.evaluation.tokenizers import GrammarTokenizer, TextTokenizer
from lit_overtok.evaluation.adapter import OverTokEvalLM
from lit_overtok.evaluation.grammar_tasks import cfg_generation_dataset
from lit_overtok.nn.transformer import Transformer
from tests.fixtures import TEXT_VOCAB

ENGRAM = {"layers": [0, 1], "table_size": 31, "heads": 2, "ngram_width": 8}


def tiny_model(vocab_size: int = 7, **overrides) -> Transformer:
    torch.manual_seed(0)
    # A large init spreads the predictions, so scores differ clearly between choices.
    return Transformer(ModelConfig(preset="tiny", vocab_size=vocab_size, init_std=0.5, **overrides)).eval()


def reference(model: Transformer, context: list[int], continuation: list[int], window: int) -> tuple[float, bool]:
    """Straightforward scoring: one unpadded forward over the left-truncated window, full log-softmax."""
    ids = (context + continuation)[-(window + 1):]
    with torch.no_grad():
        logprobs_TV = torch.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1)
    scored_KV = logprobs_TV[-len(continuation):]
    target_K = torch.tensor(continuation)
    total = scored_KV.gather(1, target_K[:, None]).sum().item()
    return total, bool((scored_KV.argmax(-1) == target_K).all())


def instance(request_type: str, args: tuple) -> Instance:
    return Instance(request_type=request_type, doc={}, arguments=args, idx=0)


# LongCat's N-gram Embedding with ids 1 and 4 ignored (they cut the n-gram history inside the scored windows).
NE = {"m": 40, "n": 3, "k": 2, "flavor": "longcat", "combine": "unigram_full", "ignore_ids": [1, "4:5"]}


@pytest.mark.parametrize("loss_chunk_logits, memory", [(None, {}), (3 * 7, {}), (None, {"engram": ENGRAM}),
                                                       (3 * 7, {"over_encoding": NE})],
                         ids=["one_chunk", "chunks_of_3_positions", "engram", "ne_chunks_of_3_positions"])
def test_loglikelihood_tokens_equal_a_direct_forward_with_truncation_dedup_and_batching(loss_chunk_logits, memory):
    model = tiny_model(loss_chunk_logits=loss_chunk_logits, **memory)
    rng = random.Random(0)
    requests = []
    for _ in range(12):
        context = [rng.randrange(7) for _ in range(rng.randint(1, 30))]  # up to 30 > the 16-token window
        requests.append((None, context, [rng.randrange(7) for _ in range(rng.randint(1, 4))]))
    shared = [rng.randrange(7) for _ in range(9)]  # short enough that the window does not cut it
    requests += [(None, shared, [token]) for token in range(7)]  # one-token choices share one forward pass
    greedy = []
    for _ in range(3):  # the model's own greedy continuation must be flagged greedy
        greedy.append(int(model(torch.tensor([shared + greedy]))[0, -1].argmax()))
    requests.append((None, shared, greedy))
    lm = OverTokEvalLM(model, GrammarTokenizer("cfg3f"), batch_size=3, max_batch_tokens=40, max_length=16, progress=False)
    got = lm._loglikelihood_tokens(requests)
    for (_, context, continuation), (total, is_greedy) in zip(requests, got):
        expected_total, expected_greedy = reference(model, context, continuation, window=16)
        assert total == pytest.approx(expected_total, abs=1e-4)
        assert is_greedy == expected_greedy
    assert got[-1][1] is True
    assert sum(flag for _, flag in got[-8:-1]) == 1  # exactly one of the seven one-token choices is the argmax


def test_loglikelihood_from_strings_conditions_an_empty_context_on_bos():
    model = tiny_model()
    tokenizer = GrammarTokenizer("cfg3f")
    lm = OverTokEvalLM(model, tokenizer, progress=False)
    got = lm.loglikelihood([instance("loglikelihood", ("^312", "21$")), instance("loglikelihood", ("", "3121"))])
    assert got[0][0] == pytest.approx(reference(model, tokenizer.encode("^312"), tokenizer.encode("21$"), 256)[0], abs=1e-5)
    assert got[1][0] == pytest.approx(reference(model, [tokenizer.bos_id], tokenizer.encode("3121"), 256)[0], abs=1e-5)


def test_loglikelihood_rolling_scores_every_token_once_over_disjoint_windows():
    model = tiny_model()
    tokenizer = GrammarTokenizer("cfg3f")
    rng = random.Random(1)
    text = "".join(rng.choice("123") for _ in range(45))
    ids = tokenizer.encode(text)
    short = OverTokEvalLM(model, tokenizer, progress=False)
    assert short.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])[0] == pytest.approx(
        reference(model, [tokenizer.bos_id], ids, 256)[0], abs=1e-4)
    windowed = OverTokEvalLM(model, tokenizer, max_length=16, progress=False)
    windows = list(map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
        token_list=ids, prefix_token=tokenizer.bos_id, max_seq_len=16, context_len=1)))
    assert sum(len(continuation) for _, continuation in windows) == len(ids)
    expected = sum(reference(model, context, continuation, 16)[0] for context, continuation in windows)
    assert windowed.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])[0] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("memory", [{}, {"over_encoding": {"m": 41, "n": 3, "k": 2}}, {"engram": ENGRAM},
                                    {"over_encoding": NE}], ids=["plain", "oe", "engram", "ne"])
def test_generate_until_greedy_matches_an_uncached_argmax_loop_and_cuts_at_stops(memory):
    model = tiny_model(**memory)
    tokenizer = GrammarTokenizer("cfg3f")
    lm = OverTokEvalLM(model, tokenizer, batch_size=2, progress=False)
    # cfg_generation's prompt is BOS alone: one token, shorter than an Over-Encoding model's n-gram order.
    prompt = cfg_generation_dataset(cfg_num_docs=1)["validation"][0]["prompt"]
    assert len(lm.tok_encode(prompt)) == 1
    contexts = [prompt, "^31", "^1", "^2212", "^33"]
    texts = lm.generate_until([instance("generate_until", (c, {"until": [], "max_gen_toks": 12})) for c in contexts])
    for context, text in zip(contexts, texts):
        ids = tokenizer.encode(context)
        for _ in range(12):
            next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
            if next_id == tokenizer.eot_id:
                break
            ids.append(next_id)
        expected = tokenizer.decode(ids[len(tokenizer.encode(context)):])
        assert text == expected
        stop = expected[3] if len(expected) > 4 else None
        if stop is not None:
            cut = lm.generate_until([instance("generate_until", (context, {"until": [stop], "max_gen_toks": 12}))])[0]
            assert cut == expected.split(stop)[0]


def test_sampled_generation_is_reproducible_for_a_seed():
    model = tiny_model()
    kwargs = {"do_sample": True, "temperature": 1.0, "max_gen_toks": 30, "until": []}
    requests = [instance("generate_until", ("^", dict(kwargs))) for _ in range(4)]
    first = OverTokEvalLM(model, GrammarTokenizer("cfg3f"), seed=3, progress=False).generate_until(requests)
    again = OverTokEvalLM(model, GrammarTokenizer("cfg3f"), seed=3, progress=False).generate_until(requests)
    other = OverTokEvalLM(model, GrammarTokenizer("cfg3f"), seed=4, progress=False).generate_until(requests)
    assert first == again and first != other
    with pytest.raises(ValueError, match="unsupported generation kwargs"):
        OverTokEvalLM(model, GrammarTokenizer("cfg3f"), progress=False).generate_until(
            [instance("generate_until", ("^", {"top_p": 0.9}))])


def test_rejects_a_tokenizer_larger_than_the_model_vocabulary(text_tokenizer):
    with pytest.raises(ValueError, match=f"tokenizer .* has {TEXT_VOCAB} tokens"):
        OverTokEvalLM(tiny_model(), TextTokenizer(text_tokenizer))


# ------------------------------------------------------------------------------------ a task with known answers
QUESTIONS = ["Which is a colour?", "What do bees make?", "Where is the sun?", "What is ice?", "Who wrote it?",
             "How many legs?"]
CHOICES = [["red", "table", "seven"], ["honey", "rocks", "glass windows"], ["sky", "sea", "under the bed"],
           ["frozen water", "hot", "a dog"], ["nobody", "a famous author", "me"], ["two", "four", "none at all"]]


def arc_scores(model: Transformer, tokenizer: TextTokenizer) -> list[list[float]]:
    """Each choice's log-probability computed directly, tokenised as lm-eval does (jointly, then split)."""
    scores = []
    for question, choices in zip(QUESTIONS, CHOICES):
        context = f"Question: {question}\nAnswer:"
        row = []
        for choice in choices:
            whole, head = tokenizer.encode(context + " " + choice), tokenizer.encode(context)
            row.append(reference(model, head, whole[len(head):], model.config.max_seq_len)[0])
        scores.append(row)
    return scores


def write_known_answer_arc(data_dir: Path, scores: list[list[float]]) -> tuple[float, float]:
    """ARC-Easy-format documents whose gold is the model's argmax for even documents and another choice for odd
    ones; returns the acc and acc_norm lm-eval must report."""
    rows, acc, acc_norm = [], 0, 0
    for i, (question, choices, row) in enumerate(zip(QUESTIONS, CHOICES, scores)):
        best = max(range(len(choices)), key=row.__getitem__)
        gold = best if i % 2 == 0 else (best + 1) % len(choices)
        best_norm = max(range(len(choices)), key=lambda k: row[k] / len(choices[k]))
        acc, acc_norm = acc + (best == gold), acc_norm + (best_norm == gold)
        rows.append({"id": f"q{i}", "question": question, "answerKey": "ABC"[gold],
                     "choices": {"text": choices, "label": ["A", "B", "C"]}})
    (data_dir / "arc_easy").mkdir(parents=True)
    for split in ("train", "validation"):
        (data_dir / "arc_easy" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return acc / len(rows), acc_norm / len(rows)


def text_model() -> Transformer:
    return tiny_model(vocab_size=TEXT_VOCAB)


def test_offline_task_accuracy_is_exactly_the_known_answer(tmp_path, text_tokenizer):
    model, tokenizer = text_model(), TextTokenizer(text_tokenizer)
    expected_acc, expected_norm = write_known_answer_arc(tmp_path, arc_scores(model, tokenizer))
    assert expected_acc == 0.5
    results = TaskSuite(["arc_easy"], data_dir=tmp_path).evaluate(OverTokEvalLM(model, tokenizer, progress=False))
    assert task_scores(results, ["arc_easy"])["arc_easy"] == {"acc": expected_acc, "acc_norm": expected_norm}


def _distributed_worker(rank: int, world_size: int, port: int, data_dir: str, out_dir: str, tokenizer: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        suite = TaskSuite(["arc_easy"], data_dir=data_dir)
        model = text_model()
        lm = OverTokEvalLM(model, TextTokenizer(tokenizer), batch_size=1, progress=False)
        assert (lm.rank, lm.world_size) == (rank, world_size)
        arc = suite.evaluate(lm)
        grammar = TaskSuite(["cfg_generation"], cfg_num_docs=5).evaluate(
            OverTokEvalLM(tiny_model(max_seq_len=1024), GrammarTokenizer("cfg3f"), progress=False))
        if rank == 0:
            Path(out_dir, "scores.json").write_text(json.dumps([task_scores(arc, ["arc_easy"]),
                                                                task_scores(grammar, ["cfg_generation"]),
                                                                grammar["n-samples"]]))
        else:
            assert arc is None and grammar is None
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_shard_the_documents_and_agree_with_one_process(tmp_path, text_tokenizer):
    scores = arc_scores(text_model(), TextTokenizer(text_tokenizer))
    expected_acc, expected_norm = write_known_answer_arc(tmp_path, scores)
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_distributed_worker, args=(2, port, str(tmp_path), str(tmp_path), str(text_tokenizer)), nprocs=2,
                       start_method="spawn")
    arc, grammar, counts = json.loads((tmp_path / "scores.json").read_text())
    assert arc["arc_easy"] == {"acc": expected_acc, "acc_norm": expected_norm}
    assert set(grammar["cfg_generation"]) == {"acc"}
    assert counts["cfg_generation"] == {"original": 5, "effective": 5}
