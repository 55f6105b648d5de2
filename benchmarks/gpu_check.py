"""GPU check: the CUDA-only figures of the project in one run of a few minutes, summarised as JSON (issue 13).

    bash benchmarks/gpu_check.sh                        # on a machine with a CUDA GPU (under 10 minutes)
    python benchmarks/gpu_check.py --cpu-smoke --output /tmp/gpu_check.json   # the same code paths, tiny, on CPU

Sections (each is timed and recorded on its own; a failing one records its error and the others still run):
- ``peak``: the GPU's bf16 matmul peak, measured (best of several 8192^3 matmuls), the denominator of every MFU;
- ``olmo2``, ``olmoe``: bf16-mixed training through the real Lightning Trainer of a shrunk OLMo2 (the olmo2-400m
  block, 4 layers) and a shrunk OLMoE (the olmoe-1.3b block, 4 layers, grouped-matmul experts), sequence 2048: step
  time, tokens/s, model FLOP/s (``nn.counts.flops_per_token``), MFU against the measured peak, peak memory;
- ``moe_parity``: the grouped-matmul MoE against the per-expert loop on the same weights and tokens, bf16 and fp32:
  largest output and gradient differences, and the speed ratio;
- ``over_encoding``: the shrunk OLMo2 with OE (m = 1,000,003, n = 3, k = 2) on the sparse path, replicated and
  row-sharded at world size 1 (same seed: the losses must agree), step time and peak memory of each.
``--cpu-smoke`` shrinks every size and step count so that all of this runs on a CPU in a minute or two; its figures
mean nothing, it checks that the script works before a GPU is at hand. The JSON goes to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lit_overtok
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lit_overtok.training.lightning_module import OverTokLM  # noqa: E402
from lit_overtok.nn.config import ModelConfig  # noqa: E402
from lit_overtok.nn.counts import flops_per_token, parameter_counts  # noqa: E402
from lit_overtok.nn.moe import MoEConfig, MoEFeedForward  # noqa: E402
from throughput import random_batches  # noqa: E402

FULL = dict(matmul=8192, matmul_repeats=10, layers=4, seq_len=2048, batch=8, vocab=50_280, steps=30, warmup=10,
            oe_m=1_000_003, moe_tokens=16_384)
SMOKE = dict(matmul=256, matmul_repeats=2, layers=2, seq_len=64, batch=2, vocab=512, steps=4, warmup=2,
             oe_m=1_001, moe_tokens=256)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int, repeats: int) -> float:
    """Best bf16 FLOP/s of ``size``^3 matmuls on the device."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class SyncedStepTimer(pl.Callback):
    """Wall time of each training step, the device synchronised at both ends."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))


def shrunk(preset: str, sizes: dict, smoke: bool, **overrides) -> ModelConfig:
    """The preset's block shape with fewer layers (and, for --cpu-smoke, a tiny width)."""
    shape = dict(preset=preset, vocab_size=sizes["vocab"], n_layer=sizes["layers"], max_seq_len=sizes["seq_len"])
    if smoke:
        shape.update(d_model=64, n_head=4, d_ff=128)
        if preset.startswith("olmoe"):
            shape["moe"] = {"num_experts": 8, "top_k": 2, "expert_d_ff": 32}
    return ModelConfig(**{**shape, **overrides})


def train(config: ModelConfig, sizes: dict, device: torch.device, peak: float) -> dict[str, Any]:
    """bf16-mixed Lightning steps on random tokens: step time, throughput, MFU, peak memory, losses."""
    pl.seed_everything(0, verbose=False)
    module = OverTokLM(model_config=config, optimizer={"lr": 3e-4, "warmup_steps": 2})
    timer = SyncedStepTimer()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = pl.Trainer(accelerator=device.type, devices=1, max_steps=sizes["steps"], precision="bf16-mixed",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], gradient_clip_val=1.0, limit_val_batches=0)
    batches = list(random_batches(config.vocab_size, sizes["batch"], sizes["seq_len"], sizes["steps"]))
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    step_s = statistics.median(timer.times[sizes["warmup"]:])
    tokens_per_s = sizes["batch"] * sizes["seq_len"] / step_s
    model_flops = flops_per_token(config, sizes["seq_len"]) * tokens_per_s
    counts = parameter_counts(config)
    return {"step_s": step_s, "tokens_per_s": tokens_per_s, "model_flops_per_s": model_flops,
            "mfu": model_flops / peak, "active_params": counts.active, "total_params": counts.total,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "losses": timer.losses, "batch": sizes["batch"], "seq_len": sizes["seq_len"], "layers": config.n_layer,
            "d_model": config.d_model}


def moe_parity(sizes: dict, device: torch.device, smoke: bool) -> dict[str, Any]:
    """Grouped-matmul experts against the per-expert loop: same weights, same tokens, outputs and gradients."""
    d_model, experts, top_k, d_ff = (64, 8, 2, 32) if smoke else (1024, 64, 8, 1024)
    result = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        layers = {backend: MoEFeedForward(d_model, MoEConfig(num_experts=experts, top_k=top_k, expert_d_ff=d_ff,
                                                             backend=backend), 0).to(device, dtype)
                  for backend in ("grouped_mm", "loop")}
        for p in layers["grouped_mm"].parameters():
            torch.nn.init.normal_(p, std=0.02)
        layers["loop"].load_state_dict(layers["grouped_mm"].state_dict())
        x = torch.randn(1, sizes["moe_tokens"], d_model, device=device, dtype=dtype)
        outputs, grads, times = {}, {}, {}
        for backend, layer in layers.items():
            x_in = x.clone().requires_grad_(True)
            synchronize(device)
            start = time.perf_counter()
            out = layer(x_in)
            out.float().square().mean().backward()
            synchronize(device)
            times[backend] = time.perf_counter() - start
            outputs[backend] = out.detach().float()
            grads[backend] = torch.cat([x_in.grad.flatten()] + [p.grad.flatten() for p in layer.parameters()]).float()
        scale = outputs["loop"].abs().max().item()
        result[str(dtype).removeprefix("torch.")] = {
            "max_abs_output_diff": (outputs["grouped_mm"] - outputs["loop"]).abs().max().item(),
            "output_scale": scale,
            "max_abs_grad_diff": (grads["grouped_mm"] - grads["loop"]).abs().max().item(),
            "grad_scale": grads["loop"].abs().max().item(),
            "time_grouped_over_loop": times["grouped_mm"] / times["loop"],
        }
    return result


def over_encoding(sizes: dict, device: torch.device, peak: float, smoke: bool) -> dict[str, Any]:
    oe = {"m": sizes["oe_m"], "n": 3, "k": 2, "sparse": True}
    runs = {name: train(shrunk("olmo2-400m", sizes, smoke, over_encoding={**oe, "sharded": sharded}), sizes, device,
                        peak) for name, sharded in (("replicated", False), ("sharded_world1", True))}
    runs["losses_agree"] = torch.allclose(torch.tensor(runs["replicated"]["losses"]),
                                          torch.tensor(runs["sharded_world1"]["losses"]), rtol=1e-3, atol=1e-3)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script only")
    parser.add_argument("--output", default="gpu_check.json", help="where the JSON summary goes")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); on a CPU use --cpu-smoke")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    sizes = SMOKE if args.cpu_smoke else FULL
    torch.set_float32_matmul_precision("high")
    summary: dict[str, Any] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda, "sections": {},
    }
    peak = 1.0

    def section(name: str, run: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            summary["sections"][name] = {"result": run(), "ok": True}
        except Exception:  # recorded, and the other sections still run
            summary["sections"][name] = {"ok": False, "error": traceback.format_exc(limit=8)}
        summary["sections"][name]["seconds"] = round(time.perf_counter() - start, 1)
        Path(args.output).write_text(json.dumps(summary, indent=1, default=str) + "\n")  # after every section
        print(f"gpu_check: {name}: {'ok' if summary['sections'][name]['ok'] else 'FAILED'} "
              f"({summary['sections'][name]['seconds']} s)", flush=True)

    section("peak", lambda: {"bf16_matmul_flops_per_s": matmul_peak(device, sizes["matmul"], sizes["matmul_repeats"])})
    if summary["sections"]["peak"]["ok"]:
        peak = summary["sections"]["peak"]["result"]["bf16_matmul_flops_per_s"]
    section("olmo2", lambda: train(shrunk("olmo2-400m", sizes, args.cpu_smoke), sizes, device, peak))
    section("olmoe", lambda: train(shrunk("olmoe-1.3b", sizes, args.cpu_smoke), sizes, device, peak))
    section("moe_parity", lambda: moe_parity(sizes, device, args.cpu_smoke))
    section("over_encoding", lambda: over_encoding(sizes, device, peak, args.cpu_smoke))
    summary["ok"] = all(s["ok"] for s in summary["sections"].values())
    Path(args.output).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps({name: s.get("result", s.get("error", "")[-200:]) if name != "over_encoding" else s.get("ok")
                      for name, s in summary["sections"].items()}, default=str)[:4000])
    print(json.dumps({"ok": summary["ok"], "output": args.output}))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
