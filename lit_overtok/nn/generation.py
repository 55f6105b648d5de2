"""Autoregressive sampling with a KV cache, from the next-token head only (over-decoding heads never generate)."""

from __future__ import annotations

from typing import Optional

import torch

from lit_overtok.nn.transformer import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt_BT: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Return prompt and continuation, (B, T + n) with n <= max_new_tokens.

    ``temperature=0`` is greedy decoding. Rows that emitted ``eos_id`` keep emitting it, and decoding stops early
    once every row has. Sampling draws from ``generator`` so evaluation does not disturb the training RNG.
    """
    B, T = prompt_BT.shape
    total = min(T + max_new_tokens, model.config.max_seq_len)
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(prompt_BT.device.type):
        dtype = torch.get_autocast_dtype(prompt_BT.device.type)
    caches = model.new_kv_caches(B, total, dtype, prompt_BT.device)
    ids_BT = prompt_BT
    done_B = torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    start = 0
    while ids_BT.shape[1] < total:
        logits_BV = model.lm_head(model.hidden_states(ids_BT, caches, start)[:, -1]).float()
        start = ids_BT.shape[1]
        if temperature == 0:
            next_B = logits_BV.argmax(-1)
        else:
            logits_BV = logits_BV / temperature
            if top_k is not None:
                kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
            next_B = torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(1)
        if eos_id is not None:
            next_B = torch.where(done_B, torch.full_like(next_B, eos_id), next_B)
            done_B |= next_B == eos_id
        ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
        if eos_id is not None and bool(done_B.all()):
            break
    return ids_BT
