"""Configurations of lit_overtok models exported to transformers (remote code; needs transformers >= 5).

Each is the configuration of its OLMo-family backbone plus three optional fields:

- ``over_encoding``: Over-Encoding of the input (Huang et al., ICML 2025, Algorithm 1), a dict with
  ``vocab_size`` (V of the n-gram hash), ``orders`` (the n-gram order g of each hashed table), ``moduli`` (the rows of
  each table, which are also its hash moduli), ``slice_width`` (columns of every table) and ``eos_id`` (None, or the
  token at which n-gram histories stop: they never reach back across it); LongCat's N-gram Embedding adds
  ``proj_bias`` (default true), ``combine`` ("mean", "unigram_full" or "sqrt"), ``scale`` (default 1) and
  ``ignore_ids`` (ids that get the word embedding alone and stop n-gram histories like an EOS);
- ``engram``: DeepSeek's Engram memory before some blocks, a dict with ``layers``, ``max_n``, ``heads``,
  ``head_width``, ``kernel_size``, ``norm_eps``, ``pad_id``, ``compressed_ids`` (the compressed id of every token
  id), ``primes`` and ``multipliers`` (per layer, keyed by its index as a string);
- ``joint_head_n``: None, or n for a joint next-n-token head whose first-token marginal gives the logits.
"""

from __future__ import annotations

from typing import Optional

from transformers.models.flex_olmo.configuration_flex_olmo import FlexOlmoConfig
from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig


class OverTokOlmo2Config(Olmo2Config):
    model_type = "overtok_olmo2"
    over_encoding: Optional[dict] = None
    engram: Optional[dict] = None
    joint_head_n: Optional[int] = None


class OverTokFlexOlmoConfig(FlexOlmoConfig):
    model_type = "overtok_flex_olmo"
    over_encoding: Optional[dict] = None
    engram: Optional[dict] = None
    joint_head_n: Optional[int] = None


class OverTokOlmoeConfig(OlmoeConfig):
    model_type = "overtok_olmoe"
    over_encoding: Optional[dict] = None
    engram: Optional[dict] = None
    joint_head_n: Optional[int] = None
