"""lm-evaluation-harness adapter: any of our models (dense, MoE, Over-Encoding, Over-Decoding) as an lm-eval ``LM``.

``OverTokEvalLM`` subclasses lm-eval's ``TemplateLM`` (``lm_eval/api/model.py``), so lm-eval's own task definitions,
prompts and metrics score our checkpoints unchanged. Only the next-token head is used (docs/method.md §2: over-decoding
heads never produce tokens).

* ``loglikelihood``: requests are tokenised by ``TemplateLM`` (context and continuation encoded jointly, as lm-eval
  does), deduplicated by input (the choices of a one-token multiple-choice question share one forward pass),
  sorted longest first and batched under a token budget with right padding (causal attention and causal n-gram
  lookups make padding after a sequence invisible to it; a batch is closed before padding exceeds 10% of it).
  Contexts longer than the model are left-truncated as lm-eval's HF model does. The head runs only at
  continuation positions, which skips most of the unembedding.
  Returns the exact sum of continuation token log-probabilities (fp32 log-softmax) and whether every continuation
  token is the argmax.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model's context length, summed per document.
* ``generate_until``: ``lit_overtok.nn.generation.generate`` (KV cache, next-token head) on batches of equal-length
  contexts; greedy unless the request samples (``do_sample``/``temperature``), cut at the first stop string, the
  tokenizer's end-of-text always being one (as lm-eval's HF model does). On CPU it decodes on one thread.
* Distributed: ``rank``, ``world_size``, ``all_gather``, ``gather_object`` and ``barrier`` use ``torch.distributed``
  when it is initialised, so lm-eval shards documents across ranks and gathers the metrics on rank 0. The model
  runs locally on each rank (the raw module, not a DDP wrapper); ranks run the same number of loglikelihood forward
  passes (shorter ranks add one-token passes), so a model whose forward itself communicates stays in lockstep.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.distributed as dist
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from lit_overtok.evaluation.tokenizers import EvalTokenizer
from lit_overtok.nn.chunked_loss import positions_per_chunk
from lit_overtok.nn.generation import generate
from lit_overtok.nn.transformer import Transformer

_GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k"}
# Logits are materialised at most this many floats at a time (1 GiB in fp32), or the model's
# ``loss_chunk_logits`` when it sets one (the budget its training loss keeps to).
_MAX_LOGIT_ELEMENTS = 2**28
# A batch takes no row that would make more than this fraction of its padded tokens padding.
_MAX_PADDING = 0.1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device):
    """Decode steps are many tiny ops: on CPU, intra-op threads synchronising at every op cost more than they save
    (measured 10x slower with 2 threads on 2 shared cores, cfg-small); GPUs are unaffected."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Evaluation mode for the duration of a call, then whatever mode the caller had (e.g. training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class OverTokEvalLM(TemplateLM):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: EvalTokenizer,
        *,
        batch_size: int = 64,
        max_batch_tokens: int = 32768,
        max_length: Optional[int] = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        progress: bool = True,
    ) -> None:
        """
        Args:
            model: a ``Transformer`` or a module holding one as ``.transformer`` (``OverTokLM``).
            tokenizer: ``TextTokenizer`` or ``GrammarTokenizer`` (``lit_overtok.evaluation.tokenizers``).
            batch_size: most sequences per forward pass.
            max_batch_tokens: most padded tokens per loglikelihood forward pass (rows x longest row).
            max_length: context window; default the model's ``max_seq_len``.
            max_gen_toks: generation length when a request does not give ``max_gen_toks``.
            seed: seeds the sampler at the start of every ``generate_until`` call (reproducible samples).
            progress: show progress bars (rank 0 only).
        """
        super().__init__()
        transformer = model if isinstance(model, Transformer) else getattr(model, "transformer", None)
        if not isinstance(transformer, Transformer):
            raise TypeError(f"model must be a lit_overtok Transformer or hold one as .transformer, got {type(model).__name__}")
        if tokenizer.vocab_size > transformer.config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                f"{transformer.config.vocab_size}; evaluate with the tokenizer the model was trained with"
            )
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens), ("max_gen_toks", max_gen_toks)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.transformer, self.tokenizer_ = transformer, tokenizer
        self.batch_size, self.max_batch_tokens, self.max_gen_toks = batch_size, max_batch_tokens, max_gen_toks
        self.max_length = max_length or transformer.config.max_seq_len
        if not 1 <= self.max_length <= transformer.config.max_seq_len:
            raise ValueError(f"max_length must be in 1..model.max_seq_len={transformer.config.max_seq_len}, got {max_length}")
        self.seed, self.progress = seed, progress

    # ------------------------------------------------------------------------------------- lm-eval plumbing
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def rank(self) -> int:
        return dist.get_rank() if _distributed() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if _distributed() else 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if not _distributed():
            return tensor
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
        if not _distributed():
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if _distributed():
            dist.barrier()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eot_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context is conditioned on BOS where the vocabulary has one (grammars), else on end-of-text.
        return self.tokenizer_.eot_id if self.tokenizer_.bos_id is None else self.tokenizer_.bos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_.name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def _bar(self, total: int, desc: str, disable_tqdm: bool) -> tqdm:
        return tqdm(total=total, desc=desc, disable=disable_tqdm or not self.progress or self.rank != 0)

    # ------------------------------------------------------------------------------------ loglikelihood
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``(key, context_ids, continuation_ids)`` triples; returns ``(logprob sum, is_greedy)``."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        by_input: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens does not fit the context window of "
                    f"{self.max_length}; it cannot be scored"
                )
            # Left-truncate to the window; the model predicts every token of the last window but the first.
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            by_input[tuple(whole[:-1])].append((index, list(continuation)))
        batches: list[list[tuple[int, ...]]] = []
        for ids in sorted(by_input, key=len, reverse=True):
            batch = batches[-1] if batches else None
            # Sorted longest first, so the first row of a batch sets its padded length.
            padded = (len(batch) + 1) * len(batch[0]) if batch else 0
            if (batch is None or len(batch) >= self.batch_size or padded > self.max_batch_tokens
                    or padded - sum(map(len, batch)) - len(ids) > _MAX_PADDING * padded):
                batches.append([ids])
            else:
                batch.append(ids)
        extra_passes = self._lockstep_passes(len(batches))
        bar = self._bar(len(requests), "loglikelihood", disable_tqdm)
        with _eval_mode(self.transformer):
            for batch in batches:
                for index, result in self._score_batch(batch, by_input):
                    results[index] = result
                    if requests[index][0] is not None:  # lm-eval's response cache (--use_cache), keyed by the strings
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
                bar.update(sum(len(by_input[ids]) for ids in batch))
            for _ in range(extra_passes):
                self.transformer.hidden_states(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        bar.close()
        return results  # type: ignore[return-value]

    def _lockstep_passes(self, own_passes: int) -> int:
        """How many extra forward passes this rank runs so that every rank runs as many as the busiest."""
        if self.world_size == 1:
            return 0
        passes = torch.tensor([own_passes], device=self.device)
        dist.all_reduce(passes, op=dist.ReduceOp.MAX)
        return int(passes.item()) - own_passes

    def _score_batch(self, batch: list[tuple[int, ...]], by_input: dict) -> list[tuple[int, tuple[float, bool]]]:
        device = self.device
        ids_BT = torch.zeros(len(batch), len(batch[0]), dtype=torch.long, device=device)
        rows, positions = [], []
        request_index, request_pair, request_target, request_of_token = [], [], [], []
        for b, ids in enumerate(batch):
            ids_BT[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            needed = max(len(continuation) for _, continuation in by_input[ids])
            first = len(rows)
            # The logits at the last `needed` positions of this row predict the continuation tokens.
            rows += [b] * needed
            positions += range(len(ids) - needed, len(ids))
            for index, continuation in by_input[ids]:
                start = first + needed - len(continuation)
                request_pair += range(start, start + len(continuation))
                request_target += continuation
                request_of_token += [len(request_index)] * len(continuation)
                request_index.append(index)
        hidden_ND = self.transformer.hidden_states(ids_BT)[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
        pair_N = torch.tensor(request_pair, device=device)
        target_N = torch.tensor(request_target, device=device)
        token_logprob_N = torch.empty(len(request_pair), dtype=torch.float32, device=device)
        token_greedy_N = torch.empty(len(request_pair), dtype=torch.bool, device=device)
        config = self.transformer.config
        chunk = positions_per_chunk(config.loss_chunk_logits or _MAX_LOGIT_ELEMENTS, config.vocab_size)
        for start in range(0, hidden_ND.shape[0], chunk):
            logits_NV = self.transformer.lm_head(hidden_ND[start:start + chunk]).float()
            logprobs_NV = torch.log_softmax(logits_NV, dim=-1)
            greedy_N = logits_NV.argmax(dim=-1)
            in_chunk = (pair_N >= start) & (pair_N < start + chunk)
            local_M = pair_N[in_chunk] - start
            token_logprob_N[in_chunk] = logprobs_NV[local_M, target_N[in_chunk]]
            token_greedy_N[in_chunk] = greedy_N[local_M] == target_N[in_chunk]
        owner_N = torch.tensor(request_of_token, device=device)
        count = len(request_index)
        sums_Q = torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, owner_N, token_logprob_N.double())
        misses_Q = torch.zeros(count, dtype=torch.long, device=device).index_add_(0, owner_N, (~token_greedy_N).long())
        return [(index, (float(s), bool(m == 0))) for index, s, m in zip(request_index, sums_Q.tolist(), misses_Q.tolist())]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for owner, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        eot_text = self.tokenizer_.decode([self.eot_token_id])
        groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = defaultdict(list)
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            until, settings = self._generation_settings(gen_kwargs, eot_text)
            context_ids = self.tok_encode(context) if context else [self.prefix_token_id]
            # Leave room for the generation, as lm-eval's HF model does (at least one context token stays).
            context_ids = context_ids[-max(1, self.max_length - settings[0]):]
            groups[(len(context_ids), settings)].append((index, context_ids, until))
        results: list[str] = [""] * len(requests)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        bar = self._bar(len(requests), "generate_until", disable_tqdm)
        with _eval_mode(self.transformer), _single_thread_on_cpu(self.device):
            for (length, (max_new, temperature, top_k)), members in groups.items():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    prompt_BT = torch.tensor([ids for _, ids, _ in chunk], dtype=torch.long, device=self.device)
                    out_BT = generate(self.transformer, prompt_BT, max_new, temperature=temperature, top_k=top_k,
                                      eos_id=self.eot_token_id, generator=generator)
                    for (index, _, until), row in zip(chunk, out_BT[:, length:].tolist()):
                        if self.eot_token_id in row:
                            row = row[: row.index(self.eot_token_id)]
                        text = self.tokenizer_.decode(row)
                        for stop in until:
                            text = text.split(stop)[0]
                        results[index] = text
                        self.cache_hook.add_partial("generate_until", requests[index].args, text)
                    bar.update(len(chunk))
        bar.close()
        return results

    def _generation_settings(self, gen_kwargs: dict, eot_text: str) -> tuple[list[str], tuple[int, float, Optional[int]]]:
        """(stop strings, (max new tokens, temperature with 0 = greedy, top_k)) from lm-eval's generation kwargs."""
        unknown = set(gen_kwargs) - _GENERATION_KEYS
        if unknown:
            raise ValueError(f"unsupported generation kwargs {sorted(unknown)}; supported: {sorted(_GENERATION_KEYS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if eot_text not in until:
            until.append(eot_text)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.get("do_sample", float(gen_kwargs.get("temperature", 0.0)) > 0))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if do_sample else 0.0
        if do_sample and temperature <= 0:
            raise ValueError(f"do_sample needs a positive temperature, got {temperature}")
        top_k = gen_kwargs.get("top_k")
        return until, (max_new, temperature, None if top_k is None else int(top_k))
