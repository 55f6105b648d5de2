"""lit_overtok: a PyTorch Lightning template for Over-Tokenized Transformers (Huang et al., ICML 2025).

The package, room by room from the top (a room imports only the rooms below it; ``tests/test_layout.py``):

- ``cli/``: ``train.py``'s commands (fit, validate, test, generate, strip, export) and the config-key checks;
- ``studies/``: sweeps, reports, convergence speedups, reading a run's logs;
- ``training/``: the LightningModule (objective and metrics), callbacks, the lm-eval callback, the global batch,
  the run summary, the dashboards;
- ``evaluation/``, ``distributed/``: the lm-evaluation-harness adapter, its task files and checkpoint scoring; the
  DDP / FSDP2 strategies with row-sharded tables and the per-rank memory estimate;
- ``checkpointing/``: the file format and its checks, atomic writes, resuming, inference loading;
- ``data/``, ``optim/``, ``export/``: grammars and text shards with their data modules; AdamW groups, schedule and
  the sparse row optimizer; the Hugging Face export;
- ``nn/``: the network, one module per concept of the paper (``over_encoding``, ``over_decoding``, ``mtp``,
  ``moe``) beside the OLMo2 / OLMoE backbone's layers (``norms``, ``rotary``, ``attention``, ``block``,
  ``transformer``);
- the root's shared helpers: ``errors`` (one-line input errors, exit status 2) and ``configuration`` (YAML /
  checkpoint dicts into the dataclass configs, with errors naming the field).

docs/contributing.md has the map in full.

Shape legend. Tensor names carry their shape as a suffix (``x_BTD``); every module uses these letters:

    B batch            T positions (time)        D model width (d_model)   V vocabulary (padded where a table is)
    H attention heads  C head width (D / H)      c half a head width       L a shorter window of positions (MTP)
    N flattened tokens (B*T, or a chosen subset of positions)            F feed-forward / expert hidden width
    E experts          K experts per token (top-k)                        A token-expert assignments (N*K)
    I Over-Encoding tables                      R n-gram lags (0..n-1)    W slice width of an OE table
    J joint n-gram labels (V^n)                 Q lm-eval requests        M a subset selected inside a function
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


# Modules that moved into rooms keep their old names for configs, checkpoints and scripts written before the move
# (``class_path: lit_overtok.lightning_module.OverTokLM``): importing an old name gives the module at its new place.
MOVED_MODULES = {
    "lit_overtok.lightning_module": "lit_overtok.training.lightning_module",
    "lit_overtok.callbacks": "lit_overtok.training.callbacks",
    "lit_overtok.evaluation.callback": "lit_overtok.training.lm_eval_callback",
    "lit_overtok.run_checkpoint": "lit_overtok.checkpointing.run_checkpoint",
    "lit_overtok.checkpoints": "lit_overtok.checkpointing.inference",
    "lit_overtok.strategies": "lit_overtok.distributed.strategies",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name


sys.meta_path.append(_MovedModuleFinder())
