"""Where each shipped config runs: its token budget (max_steps × global batch × seq len), its training FLOPs
(``nn.counts.flops_per_token``, docs/method.md §4.11: lookups excluded), and from them the time it takes on this
project's 2-core CPU or on one H100. Writes ``docs/configs.md``; a test checks the file against this module, so
the table cannot drift from the configs.

    python -m lit_overtok.studies.config_table            # rewrite docs/configs.md
    python -m lit_overtok.studies.config_table --measure configs/default.yaml   # re-measure the CPU rate

The CPU figure is extrapolated from real training steps of the CPU-sized configs (``measure``: model FLOPs per
CPU-second of one thread, which on an idle machine is its wall-clock rate); it overstates the time of wider
models, whose matmuls use the CPU better. The GPU figure assumes ``H100_MFU`` of the H100's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from lit_overtok.configuration import config_from
from lit_overtok.data.grammar import Grammar
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.counts import flops_per_token
from lit_overtok.nn.transformer import Transformer

REPOSITORY = Path(__file__).resolve().parents[2]
FAMILIES = ("cfg", "wiki", "olmo2", "olmoe")
OUTPUT = REPOSITORY / "docs" / "configs.md"

# `python -m lit_overtok.studies.config_table --measure configs/default.yaml` and `... configs/wiki/wiki_small.yaml`
# (3 steps after a warm-up, one thread, fp32; CPU time, so the machine's load of ~9 does not count), 2026-12-07 on
# the shared 2-core machine: 35.5 and 34.2 GFLOP/s; the slower, wiki_small (its 8192-token softmax), is the rate used.
CPU_FLOPS = 34e9
H100_PEAK_FLOPS = 989e12  # dense bf16, H100 SXM
H100_MFU = 0.40
CPU_LIMIT_MINUTES = 120  # longer than this on 2 cores: a GPU config

# Vocabulary of each tokenizer the WebDataset configs name (the model's width depends on it and the shards that
# would say it are not in a clone); tests/studies/test_config_table.py checks them against the files when present.
VOCABULARIES = {"allenai_dolma2.json": 100_278, "allenai_eleuther-ai-gpt-neox-20b-pii-special.json": 50_280,
                "wiki_bpe8k": 8_192}


@dataclass(frozen=True)
class Plan:
    """One config's training run, as planned by its YAML (one device: global batch without ``global_batch`` is the
    per-device batch × ``trainer.accumulate_grad_batches``)."""

    path: Path
    model_config: ModelConfig
    seq_len: int
    per_device: int
    sequences_per_step: int
    max_steps: int
    flops_per_token: float

    @property
    def tokens(self) -> int:
        return self.max_steps * self.sequences_per_step * self.seq_len

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def cpu_minutes(self) -> float:
        return self.flops / CPU_FLOPS / 60

    @property
    def gpu_hours(self) -> float:
        return self.flops / (H100_PEAK_FLOPS * H100_MFU) / 3600


def _vocabulary(data: dict[str, Any]) -> int:
    if "grammar" in data or "train_shards" not in data:
        return Grammar.load(data.get("grammar", "cfg3f")).vocab_size
    source = data.get("tokenizer") or data["train_shards"]
    return VOCABULARIES[Path(source).name]


def plan(path: Path) -> Plan:
    config = yaml.safe_load(path.read_text())
    trainer, data = config.get("trainer", {}), config.get("data", {}).get("init_args", {})
    model = config.get("model", {}).get("init_args", {}).get("model_config") or {}
    model_config = config_from(ModelConfig, {**model, "vocab_size": _vocabulary(data)}, "model_config")
    seq_len, per_device = data["seq_len"], data["batch_size"]
    global_batch = config.get("global_batch") or {}
    sequences = global_batch.get("sequences") or (global_batch["tokens"] // seq_len if "tokens" in global_batch
                                                  else per_device * trainer.get("accumulate_grad_batches", 1))
    return Plan(path, model_config, seq_len, per_device, sequences, trainer["max_steps"],
                flops_per_token(model_config, seq_len))


def config_paths(root: Path = REPOSITORY / "configs") -> list[Path]:
    return [root / "default.yaml"] + [p for family in FAMILIES for p in sorted((root / family).glob("*.yaml"))]


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:,.0f} {unit}"
    return "< 2 min"


def _count(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"


def render(paths: Optional[list[Path]] = None) -> str:
    rows = []
    for path in paths or config_paths():
        p = plan(path)
        where = "CPU" if p.cpu_minutes <= CPU_LIMIT_MINUTES else "GPU"
        name = path.relative_to(REPOSITORY).as_posix() if path.is_relative_to(REPOSITORY) else path.name
        rows.append(f"| `{name}` | {p.max_steps:,} | {p.sequences_per_step:,} × {p.seq_len:,} | {_count(p.tokens)} | "
                    f"{_count(p.flops_per_token)} | {p.flops:.2e} | {_duration(p.cpu_minutes * 60)} | "
                    f"{_duration(p.gpu_hours * 3600)} | **{where}** |")
    return HEADER.format(cpu=CPU_FLOPS / 1e9, peak=H100_PEAK_FLOPS / 1e12, mfu=round(H100_MFU * 100),
                         limit=CPU_LIMIT_MINUTES) + "\n".join(rows) + "\n"


HEADER = """# Configs: what each one costs and where it runs

Generated by `python -m lit_overtok.studies.config_table` from the YAML files (a test fails when this file and the
configs disagree). **Token budget** = `trainer.max_steps` × global batch (sequences per optimizer step) × sequence
length. **Training FLOPs** = budget × FLOPs per token (`lit_overtok/nn/counts.py` `flops_per_token`: 6 × the weights a
token multiplies by, the unembedding included, plus attention; table lookups are free).

- **CPU**: extrapolated from a few measured training steps of the CPU-sized configs on the project's 2-core machine,
  {cpu:.1f} GFLOP/s of model FLOPs (one thread, fp32; re-measure with `--measure`); wider models use the CPU better,
  so their CPU figure is an upper bound. Evaluations and start-up are not included.
- **H100**: at {mfu}% MFU of the dense bf16 peak ({peak:.0f} TFLOP/s), one GPU; divide by the number of GPUs. A
  small model (the cfg-small and moe-small presets, d_model 128) reaches far less than that on a GPU: read its figure
  as a lower bound.
- **Where**: CPU when the CPU estimate is at most {limit} minutes, else GPU. A GPU config still starts on a CPU for a
  look (e.g. `--trainer.max_steps 20 --global_batch.sequences 4 --data.batch_size 4 --data.num_workers 0`).

| config | max steps | global batch × seq len | token budget | FLOPs/token | training FLOPs | CPU (2 cores) | 1 × H100 | where |
|---|---|---|---|---|---|---|---|---|
"""


def measure(path: Path, steps: int = 3) -> float:
    """Model FLOPs per CPU-second of ``steps`` training steps (after one warm-up) of ``path``'s model and batch."""
    p = plan(path)
    torch.manual_seed(0)
    model = Transformer(p.model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids_BT = torch.randint(0, p.model_config.vocab_size, (p.per_device, p.seq_len))
    seconds = 0.0
    for step in range(steps + 1):
        started = time.process_time()
        loss, _ = model.loss(ids_BT, ids_BT)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds += (time.process_time() - started) if step else 0.0
    return steps * ids_BT.numel() * p.flops_per_token / seconds


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", nargs="+", metavar="CONFIG", help="print the CPU model FLOP/s of these configs")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the table (default: docs/configs.md)")
    args = parser.parse_args(argv)
    if args.measure:
        torch.set_num_threads(1)
        for path in args.measure:
            print(f"{path}: {measure(Path(path)) / 1e9:.2f} GFLOP/s per CPU-second")
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
