"""The network: an OLMo2 / OLMoE-style decoder with the paper's input and output vocabulary extensions.

One module per concept, read in the order of a forward pass:

- ``config`` (``ModelConfig``) and ``presets`` (the paper's model sizes);
- ``embedding``: the input-embedding seam, the plain table or ``over_encoding`` (Over-Encoding, paper §3.2, App. A);
- ``norms``, ``rotary``, ``attention`` (with the KV cache), ``feed_forward`` (dense SwiGLU or ``moe``), ``block``;
- ``engram``: DeepSeek's Engram memory, added to the hidden state before chosen blocks (``docs/engram.md``), over
  the compressed ids of ``token_compression``;
- ``transformer``: embedding -> blocks -> final norm -> ``heads`` (next token) [+ ``over_decoding`` (App. C) or
  ``mtp`` (MTP-DS, with Over-Encoding the paper's OT)], and its training loss (``losses``; by chunks of positions
  without full logits: ``chunked_loss``); ``recompute``: activation checkpointing of the blocks;
- ``counts`` (parameter counts and FLOPs per token), ``generation`` (KV-cached sampling), ``hooks`` (what a module
  may publish to the training loop).

Shape letters follow the legend in ``lit_overtok/__init__.py``.
"""
