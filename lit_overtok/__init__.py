"""lit_overtok: a PyTorch Lightning template for Over-Tokenized Transformers (Huang et al., ICML 2025).

The package, read top down (imports flow one way: Lightning pieces -> ``evaluation`` / ``data`` -> ``nn``):

- ``cli``, ``lightning_module``, ``callbacks``, ``run_summary``, ``optim/``: the Lightning pieces (entry point, training
  objective and metrics, throughput, the end-of-run summary, AdamW groups / schedule / the sparse row optimizer);
- ``evaluation/``: lm-evaluation-harness adapter, task files (package data) and their hooks, runner, callback;
- ``data/``: synthetic grammars, text preparation into WebDataset shards, the data modules;
- ``nn/``: the network, one module per concept of the paper (``over_encoding``, ``over_decoding``, ``mtp``,
  ``moe``) beside the OLMo2 backbone's layers (``norms``, ``rotary``, ``attention``, ``block``, ``transformer``);
- ``configuration``: turning YAML / checkpoint dicts into the dataclass configs, with errors naming the field.

Shape legend. Tensor names carry their shape as a suffix (``x_BTD``); every module uses these letters:

    B batch            T positions (time)        D model width (d_model)   V vocabulary (padded where a table is)
    H attention heads  C head width (D / H)      c half a head width       L a shorter window of positions (MTP)
    N flattened tokens (B*T, or a chosen subset of positions)            F feed-forward / expert hidden width
    E experts          K experts per token (top-k)                        A token-expert assignments (N*K)
    I Over-Encoding tables                      R n-gram lags (0..n-1)    W slice width of an OE table
    J joint n-gram labels (V^n)                 Q lm-eval requests        M a subset selected inside a function
"""

__version__ = "0.1.0"
