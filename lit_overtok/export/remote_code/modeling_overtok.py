"""lit_overtok models in transformers (remote code): an OLMo-family backbone with Over-Encoding and/or a joint head.

Written into every exported folder that needs it; needs only torch and transformers >= 5 (tested with 5.24).

Over-Encoding (Huang et al., ICML 2025, Algorithm 1) replaces the token embedding by

    e_t = ( E(x_t) + W · concat_i T_i[ h_{g_i}(t) mod M_i ] + b ) / (1 + I)

over I hashed tables T_i of M_i rows (table i hashes the g_i-gram ending at t), where
``h_g(t) = x_t + x_{t-1}·V + ... + x_{t-g+1}·V^(g-1)`` with ids before the sequence start taken as 0 (and, when the
config names an ``eos_id``, ids at or before the last EOS preceding t too). All tables are stored as one weight,
``over_encoding.tables``, table i starting at row M_0 + ... + M_{i-1}; ``over_encoding.proj`` is W with bias b.
LongCat's N-gram Embedding is the same with options in the config: no bias b (``proj_bias``), the combination
(``combine``: "mean" as above, "unigram_full" E + S/(1 + I), "sqrt" dividing by sqrt(1 + I)), a factor ``scale`` on
e_t, and ``ignore_ids``: at those ids e_t = scale·E(x_t), and no n-gram reaches back across one (as across an EOS).

Because e_t needs the n-1 ids before t, a forward with a KV cache needs those ids too. ``generate`` hands them over
(``prepare_inputs_for_generation`` passes the whole sequence as ``history_ids``); a hand-written decoding loop either
passes ``history_ids`` (every id so far, the new ones last) or keeps reusing the cache object a previous forward of
this model returned (the model leaves the last ids on it). Left padding enters the n-gram history like any token.

Engram (DeepSeek's conditional memory; lit_overtok's ``nn/engram.py``) adds, before each block ℓ it names, y to the
hidden state h: from compressed ids x' (``compressed_ids[x]``, the pad id's before the start),
``mix_g(t) = XOR_{δ<g} x'_{t-δ}·μ_δ`` per order g, a row ``mix_g(t) mod p`` of each head's table (all heads in one
weight), e_t their concatenation, ``α_t = sigmoid(sign(s)·sqrt(max(|s|, 1e-6)))`` with
``s = RMSNorm(W_k e_t)·RMSNorm(h_t)/sqrt(D)``, ``v = α·W_v e``, ``y = v + SiLU(causal depthwise conv(RMSNorm(v)))``.
Decoding keeps the convolution's last inputs on the cache object (``overtok_engram_windows``) and reads the last
max_n - 1 ids as Over-Encoding does.

A joint head (``joint_head_n`` = n) scores all V^n next-n-token tuples; the logits returned are the log-probabilities
of the first token (the other n-1 summed out), which is what the training code predicts with.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoForCausalLM, FlexOlmoModel
from transformers.models.olmo2.modeling_olmo2 import Olmo2ForCausalLM, Olmo2Model
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM, OlmoeModel

from .configuration_overtok import OverTokFlexOlmoConfig, OverTokOlmo2Config, OverTokOlmoeConfig

_HISTORY_ATTRIBUTE = "overtok_recent_ids"  # where a cache keeps the last n-1 ids for the next decoding step
_WINDOWS_ATTRIBUTE = "overtok_engram_windows"  # where a cache keeps each Engram layer's last convolution inputs


def hashed_ngram_rows(ids_BT: torch.Tensor, vocab_size: int, orders: list[int], moduli: list[int],
                      eos_id: Optional[int] = None, delimiters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T, I) int64: for each position and table, the row ``h_g(t) mod M`` (within the table); histories stop at
    an EOS and at any id in ``delimiters``."""
    B, T = ids_BT.shape
    ids_BT = ids_BT.long()
    boundary_BT = None if eos_id is None else ids_BT == eos_id
    if delimiters is not None:
        boundary_BT = torch.isin(ids_BT, delimiters) if boundary_BT is None else boundary_BT | torch.isin(ids_BT, delimiters)
    if boundary_BT is not None:
        eos_BT = boundary_BT.long()
        segment_BT = eos_BT.cumsum(1) - eos_BT  # EOS tokens strictly before t; equal values: same document
    tables = []
    for order, modulus in zip(orders, moduli):
        row_BT = torch.zeros_like(ids_BT)
        for lag in range(order):
            kept = max(T - lag, 0)
            # x_{t-lag}, 0 where t-lag < 0 (and across an EOS).
            lagged_BT = torch.cat([ids_BT.new_zeros(B, T - kept), ids_BT[:, :kept]], dim=1)
            if boundary_BT is not None and lag > 0:
                lagged_segment_BT = torch.cat([segment_BT.new_full((B, T - kept), -1), segment_BT[:, :kept]], dim=1)
                lagged_BT = lagged_BT * (lagged_segment_BT == segment_BT)
            # Digit by digit, each term below V·M: exact in int64 whatever n is.
            row_BT = (row_BT + lagged_BT * pow(vocab_size, lag, modulus)) % modulus
        tables.append(row_BT)
    return torch.stack(tables, dim=-1)


class OverEncodingEmbedding(nn.Module):
    """The hashed n-gram part of Over-Encoding: all tables in one weight, one projection with bias."""

    def __init__(self, spec: dict, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = int(spec["vocab_size"])
        self.orders = [int(g) for g in spec["orders"]]
        self.moduli = [int(m) for m in spec["moduli"]]
        self.eos_id = spec.get("eos_id")
        self.ignore_ids = [int(i) for i in spec.get("ignore_ids") or []]
        self.combine, self.scale = spec.get("combine", "mean"), float(spec.get("scale", 1.0))
        self.offsets = [sum(self.moduli[:i]) for i in range(len(self.moduli))]
        width = int(spec["slice_width"])
        self.tables = nn.Embedding(sum(self.moduli), width)
        self.proj = nn.Linear(len(self.moduli) * width, hidden_size, bias=spec.get("proj_bias", True))

    @property
    def context(self) -> int:
        """Ids before t that the embedding of t reads."""
        return max(self.orders) - 1

    def forward(self, ids_BT: torch.Tensor, unigram_BTD: torch.Tensor) -> torch.Tensor:
        ignored = torch.tensor(self.ignore_ids, dtype=torch.long, device=ids_BT.device) if self.ignore_ids else None
        rows_BTI = hashed_ngram_rows(ids_BT, self.vocab_size, self.orders, self.moduli, self.eos_id, ignored)
        rows_BTI = rows_BTI + torch.tensor(self.offsets, dtype=torch.long, device=ids_BT.device)
        ngram_BTD = self.proj(self.tables(rows_BTI).flatten(2))
        contributions = 1 + len(self.moduli)
        if self.combine == "unigram_full":
            embeds_BTD = unigram_BTD + ngram_BTD / contributions
        elif self.combine == "sqrt":
            embeds_BTD = (unigram_BTD + ngram_BTD) / contributions**0.5
        else:
            embeds_BTD = (unigram_BTD + ngram_BTD) / contributions
        if ignored is not None:
            embeds_BTD = torch.where(torch.isin(ids_BT, ignored)[..., None], unigram_BTD, embeds_BTD)
        return embeds_BTD * self.scale if self.scale != 1.0 else embeds_BTD


class RMSNorm(nn.Module):
    """RMSNorm in fp32, as lit_overtok computes it (the gate and the convolution's norms of Engram)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class EngramLayer(nn.Module):
    """One Engram module; ``forward`` returns y, which the block's input adds."""

    def __init__(self, spec: dict, layer: int, hidden_size: int) -> None:
        super().__init__()
        self.max_n, self.heads = int(spec["max_n"]), int(spec["heads"])
        self.primes = [int(p) for p in spec["primes"][str(layer)]]
        self.multipliers = [int(m) for m in spec["multipliers"][str(layer)]]
        self.offsets = [sum(self.primes[:i]) for i in range(len(self.primes))]
        width = int(spec["head_width"]) * len(self.primes)
        eps = float(spec["norm_eps"])
        self.tables = nn.Embedding(sum(self.primes), int(spec["head_width"]))
        self.key_proj = nn.Linear(width, hidden_size, bias=False)
        self.value_proj = nn.Linear(width, hidden_size, bias=False)
        self.key_norm, self.query_norm, self.conv_norm = (RMSNorm(hidden_size, eps) for _ in range(3))
        kernel = int(spec["kernel_size"])
        self.context = (kernel - 1) * self.max_n
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel, dilation=self.max_n, groups=hidden_size, bias=False)

    def forward(self, h_BTD: torch.Tensor, compressed_BT: torch.Tensor, pad: int,
                window_BLD: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """y for the last T = h's positions of ``compressed_BT`` (earlier ids: their history), and the new window."""
        B, T, D = h_BTD.shape
        L = compressed_BT.shape[1]
        mix_BL = compressed_BT * self.multipliers[0]
        rows = []
        for lag in range(1, self.max_n):
            lagged_BL = torch.cat([compressed_BT.new_full((B, min(lag, L)), pad), compressed_BT[:, :max(L - lag, 0)]], 1)
            mix_BL = mix_BL ^ (lagged_BL * self.multipliers[lag])
            for head in range(self.heads):
                i = (lag - 1) * self.heads + head
                rows.append(mix_BL[:, L - T:] % self.primes[i] + self.offsets[i])
        e_BTE = self.tables(torch.stack(rows, -1)).flatten(2).to(h_BTD.dtype)
        s_BT = (self.key_norm(self.key_proj(e_BTE)) * self.query_norm(h_BTD)).sum(-1) / D**0.5
        v_BTD = torch.sigmoid(s_BT.sign() * s_BT.abs().clamp_min(1e-6).sqrt())[..., None] * self.value_proj(e_BTE)
        if window_BLD is None:
            window_BLD = v_BTD.new_zeros(B, self.context, D)
        padded_BLD = torch.cat([window_BLD.to(v_BTD.dtype), self.conv_norm(v_BTD)], 1)
        conv_BTD = self.conv(padded_BLD.transpose(1, 2)).transpose(1, 2)
        return v_BTD + F.silu(conv_BTD), padded_BLD[:, padded_BLD.shape[1] - self.context:]


class Engram(nn.Module):
    """Every Engram layer and the compressed-id map (from the config) they share."""

    def __init__(self, spec: dict, hidden_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(layer): EngramLayer(spec, layer, hidden_size) for layer in spec["layers"]})
        # A plain list, made a tensor per device when used: transformers builds models on the meta device and would
        # leave a buffer that no weight file fills uninitialised.
        self.compressed_ids = [int(i) for i in spec["compressed_ids"]]
        self.pad = self.compressed_ids[int(spec["pad_id"])]
        self.context = int(spec["max_n"]) - 1
        self._maps: dict[torch.device, torch.Tensor] = {}

    def compress(self, ids_BT: torch.Tensor) -> torch.Tensor:
        if ids_BT.device not in self._maps:
            self._maps[ids_BT.device] = torch.tensor(self.compressed_ids, dtype=torch.long, device=ids_BT.device)
        return self._maps[ids_BT.device][ids_BT]


class JointMarginalHead(nn.Linear):
    """V^n joint next-n-token logits reduced to the first token's log-probabilities (fp32)."""

    def __init__(self, hidden_size: int, vocab_size: int, n: int) -> None:
        super().__init__(hidden_size, vocab_size**n, bias=False)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        joint = super().forward(hidden).float().log_softmax(-1)
        return joint.unflatten(-1, (self.vocab_size, -1)).logsumexp(-1)


class _OverTokModelMixin:
    """The backbone's base model with the input embedding replaced by Over-Encoding (when configured)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.over_encoding = OverEncodingEmbedding(config.over_encoding, config.hidden_size) if config.over_encoding else None
        self.engram = Engram(config.engram, config.hidden_size) if getattr(config, "engram", None) else None
        self._engram_input = None  # (ids with their history, cache) of the forward in progress
        if self.engram is not None:
            for name in self.engram.layers:
                self.layers[int(name)].register_forward_pre_hook(self._engram_hook(name), with_kwargs=True)
        self.post_init()

    @property
    def _history_context(self) -> int:
        """Ids before the new ones that the input embedding or Engram reads."""
        return max(self.over_encoding.context if self.over_encoding is not None else 0,
                   self.engram.context if self.engram is not None else 0)

    def _engram_hook(self, name: str):
        def add_memory(layer: nn.Module, args: tuple, kwargs: dict):
            ids_BT, cache = self._engram_input
            h_BTD = args[0] if args else kwargs["hidden_states"]
            engram = self.engram
            windows = getattr(cache, _WINDOWS_ATTRIBUTE, None) if cache is not None else None
            y_BTD, window_BLD = engram.layers[name](h_BTD, engram.compress(ids_BT), engram.pad,
                                                    None if windows is None else windows.get(name))
            if cache is not None:
                if windows is None:
                    windows = {}
                    setattr(cache, _WINDOWS_ATTRIBUTE, windows)
                windows[name] = window_BLD
            if args:
                return (h_BTD + y_BTD, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h_BTD + y_BTD}
        return add_memory

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, history_ids=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (self.over_encoding is not None or self.engram is not None) and input_ids is not None:
            if self.engram is not None and inputs_embeds is not None:
                raise ValueError("Engram reads the token ids: pass input_ids, not inputs_embeds")
            if use_cache is None:
                use_cache = self.config.use_cache
            if use_cache and cache is None:
                cache = DynamicCache(config=self.config)
            if cache is not None and cache.get_seq_length() == 0 and hasattr(cache, _WINDOWS_ATTRIBUTE):
                delattr(cache, _WINDOWS_ATTRIBUTE)  # a cache reused for a new sequence
            ids_BT = self._with_history(input_ids, cache, history_ids)
            if self.over_encoding is not None and inputs_embeds is None:
                inputs_embeds = self.over_encoding(ids_BT, self.embed_tokens(ids_BT))[:, -input_ids.shape[1]:]
            elif inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            input_ids = None
            self._engram_input = ids_BT, cache
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        finally:
            self._engram_input = None

    def _with_history(self, input_ids: torch.Tensor, cache, history_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The new ids after the (up to) ``_history_context`` ids before them; the cache keeps them for the next step."""
        T = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        context = self._history_context
        if past == 0:
            earlier = input_ids[:, :0]
        elif history_ids is not None:
            if history_ids.shape[1] != past + T:
                raise ValueError(f"history_ids has {history_ids.shape[1]} ids; with {past} cached positions and "
                                 f"{T} new ones it must hold all {past + T} ids of the sequence")
            earlier = history_ids[:, :past][:, -context:] if context else history_ids[:, :0]
        elif getattr(cache, _HISTORY_ATTRIBUTE, None) is not None:
            earlier = getattr(cache, _HISTORY_ATTRIBUTE)
        else:
            raise ValueError("Over-Encoding and Engram need the ids before the new ones: pass history_ids (all ids so "
                             "far), or the cache object this model returned")
        # Fewer than `context` earlier ids happens only near the sequence start, where zeros are right.
        ids_BT = torch.cat([earlier.to(input_ids.device), input_ids], dim=1)
        if cache is not None:
            setattr(cache, _HISTORY_ATTRIBUTE, ids_BT[:, ids_BT.shape[1] - min(context, ids_BT.shape[1]):])
        return ids_BT


class _OverTokCausalLMMixin:
    """Swaps in the Over-Encoding base model and the joint head; hands the whole sequence to each decoding step."""

    overtok_model_class: type  # the family's Over-Encoding base model

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.over_encoding or getattr(config, "engram", None):
            self.model = self.overtok_model_class(config)
        if config.joint_head_n:
            self.lm_head = JointMarginalHead(config.hidden_size, config.vocab_size, config.joint_head_n)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if self.config.over_encoding or getattr(self.config, "engram", None):
            model_inputs["history_ids"] = input_ids
        return model_inputs


class OverTokOlmo2Model(_OverTokModelMixin, Olmo2Model):
    config_class = OverTokOlmo2Config


class OverTokOlmo2ForCausalLM(_OverTokCausalLMMixin, Olmo2ForCausalLM):
    config_class = OverTokOlmo2Config
    overtok_model_class = OverTokOlmo2Model


class OverTokFlexOlmoModel(_OverTokModelMixin, FlexOlmoModel):
    config_class = OverTokFlexOlmoConfig


class OverTokFlexOlmoForCausalLM(_OverTokCausalLMMixin, FlexOlmoForCausalLM):
    config_class = OverTokFlexOlmoConfig
    overtok_model_class = OverTokFlexOlmoModel


class OverTokOlmoeModel(_OverTokModelMixin, OlmoeModel):
    config_class = OverTokOlmoeConfig


class OverTokOlmoeForCausalLM(_OverTokCausalLMMixin, OlmoeForCausalLM):
    config_class = OverTokOlmoeConfig
    overtok_model_class = OverTokOlmoeModel
