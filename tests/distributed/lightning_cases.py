"""Pieces of the multi-process training tests: a data module whose global batch does not depend on the world size,
a callback that records what must match one process (losses, full gradients, parameters, global metrics, outputs
on a probe batch), and one fit as a forked rank runs it. The CLI run of the two-"node" test imports the first two
by class path (``tests.distributed.lightning_cases``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lit_overtok.nn import hooks

VOCAB = 11
GLOBAL_BATCH, SEQ_LEN = 6, 12  # 6 rows split evenly over 1, 2 or 3 ranks
SEED = 1234
# Tables of 301 + 303 = 604 rows: 302 + 302 at 2 ranks, 202 + 202 + 200 at 3 (uneven); partly covered by the batches.
OE = {"m": 301, "n": 3, "k": 1, "sharded": True}
MODELS = {
    # OT: Over-Encoding + MTP-DS on the dense backbone; sparse tables (RowSparseAdamW).
    "dense_ot": {"preset": "tiny", "over_encoding": {**OE, "sparse": True}, "multi_token": {"mode": "mtp_ds", "n": 2}},
    # The same with replicated tables: DDP all-reduces their sparse gradients; from the sharded model's initial table
    # (``fit`` copies it in: each mode draws its own, see ``nn.over_encoding``) it trains as the sharded one.
    "dense_ot_replicated": {"preset": "tiny", "over_encoding": {**OE, "sparse": True, "sharded": False},
                            "multi_token": {"mode": "mtp_ds", "n": 2}},
    # MoE + Over-Encoding with dense table gradients (AdamW). The load-balancing loss is a product of per-batch
    # statistics, computed per rank's micro-batch (as OLMoE trains), so it cannot equal one process's on the
    # concatenated batch; it is off here, and the z-loss (a mean over tokens) on.
    "moe_oe": {"preset": "moe-tiny", "over_encoding": {**OE, "sparse": False}, "moe": {"lb_loss_weight": 0.0}},
    # LongCat's N-gram Embedding on the same sharded tables (rows 301 + 303 by its rule), id 2 ignored. (Its
    # combine: sqrt variant gives √3x larger logits, whose float rounding at the probe reached 1.6e-5 > atol.)
    "dense_ne": {"preset": "tiny", "over_encoding": {**OE, "m": 300, "sparse": True, "flavor": "longcat",
                                                     "ignore_ids": [2]}},
    # Engram before block 1 with sharded sparse tables: 2 orders x 2 heads, primes 151..167 (638 rows: 319 + 319 at
    # 2 ranks), hashed from the ids themselves (no tokenizer: the identity map).
    "dense_engram": {"preset": "tiny", "engram": {"layers": [1], "max_n": 3, "table_size": 151, "heads": 2,
                                                  "ngram_width": 16, "sparse": True, "sharded": True}},
}
# eps 1e-6 rather than 1e-8: Adam's step g/(|g| + eps) turns the float rounding of a gradient near eps into a
# change of up to lr (a table row whose gradient is 7e-9 in one process and 7.4e-9 summed over 3 ranks moved 1e-4
# apart); with a larger eps such gradients move their weights by ~lr·g/eps, so rounding stays rounding.
OPTIMIZER = {"lr": 0.01, "warmup_steps": 0, "weight_decay": 0.1, "eps": 1e-6}
CLIP = 0.5  # small enough to bind, so the global-norm clipping across ranks is exercised


def probe_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(99))


class FixedGlobalBatches(pl.LightningDataModule):
    """``steps`` fixed global batches of GLOBAL_BATCH sequences; rank r of w trains on its 1/w of the rows, so
    every world size sees the same global batch at every step (a resumed run too)."""

    def __init__(self, steps: int = 4) -> None:
        super().__init__()
        self.steps, self.vocab_size = steps, VOCAB
        self.rank, self.world = 0, 1

    def setup(self, stage: Optional[str] = None) -> None:
        if self.trainer is not None:
            self.rank, self.world = self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(7)
        share = GLOBAL_BATCH // self.world
        batches = []
        for _ in range(self.steps):
            windows = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)
            mine = windows[self.rank * share: (self.rank + 1) * share]
            batches.append({"input_ids": mine[:, :-1].contiguous(), "labels": mine[:, 1:].contiguous()})
        # A resumed run continues at the batch of its next step, as the project's data modules do.
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(batches[start:], batch_size=None)


def full_tensor(param_or_grad: torch.Tensor, like: torch.nn.Parameter) -> torch.Tensor:
    """The whole tensor in this process: an FSDP2 DTensor gathered, a row-sharded block all-gathered."""
    from torch.distributed.tensor import DTensor

    value = param_or_grad.detach()
    if value.is_sparse:
        value = value.to_dense()
    if isinstance(value, DTensor):
        return value.full_tensor()
    shape = hooks.global_shape(like)
    if shape is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return value.clone()
    chunk = -(-shape[0] // dist.get_world_size())
    padded = value.new_zeros(chunk, *shape[1:])
    padded[: value.shape[0]] = value
    gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered)[: shape[0]]


class Recorder(pl.Callback):
    """Writes ``record.pt`` (rank 0) to ``out``: the full initial parameters (as placed and initialised by the
    strategy), per step the loss averaged over ranks and every full gradient (before clipping), then the full
    parameters, the logged train/oe and train/moe metrics, and probe logits."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)
        self.losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial = {name: full_tensor(p, p) for name, p in pl_module.transformer.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(loss.item())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({name: full_tensor(p.grad, p) for name, p in pl_module.transformer.named_parameters()
                           if p.grad is not None})

    def on_train_end(self, trainer, pl_module) -> None:
        # RowSparseAdamW catches rows up when they are read or saved: compare the weights all caught up.
        flush = getattr(trainer.optimizers[0], "flush", None)
        if flush is not None:
            flush()
        params = {name: full_tensor(p, p) for name, p in pl_module.transformer.named_parameters()}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/oe/", "train/moe/"))}
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module.transformer(probe_ids())
        if trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save({"initial": self.initial, "losses": self.losses, "grads": self.grads, "params": params, "metrics": metrics,
                        "logits": logits, "world": trainer.world_size}, self.out / "record.pt")


@torch.no_grad()
def start_from_the_sharded_table(module, model_config: dict) -> None:
    """Give ``module``'s replicated tables the initial values its sharded twin of the same seed draws (row chunks),
    so both train from one table. The twin's tables stay an unplaced placeholder (no process group needed: a fit
    may follow another in this process); it is built under a forked RNG, so the run's stream is kept."""
    from lit_overtok.training.lightning_module import OverTokLM
    from lit_overtok.nn.sharded_table import trunc_normal_rows_

    with torch.random.fork_rng():
        sharded = {**model_config, "over_encoding": {**model_config["over_encoding"], "sharded": True}}
        twin = OverTokLM(model_config=sharded, optimizer=OPTIMIZER, vocab_size=VOCAB).transformer
    module.configure_model()  # allocated and initialised here (whole, no process group needed), then overwritten
    weight = module.transformer.embed.tables.weight
    std, seed = twin.embed.tables.initial_draw  # what placing the twin's tables would draw them with
    trunc_normal_rows_(weight.data, 0, weight.shape[0], std, seed)


def fit(model: str, strategy, out: str, steps: int = 4, devices: int = 1, num_nodes: int = 1,
        ckpt_path: Optional[str] = None, checkpoint_dir: Optional[str] = None) -> None:
    """One real Lightning fit of MODELS[model] on the fixed global batches; ``checkpoint_dir``: a checkpoint every
    2 steps (sharded folders ``step=2``, ``step=4``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_overtok.training.lightning_module import OverTokLM

    pl.seed_everything(SEED, verbose=False)
    module = OverTokLM(model_config=MODELS[model], optimizer=OPTIMIZER, vocab_size=VOCAB)
    if not MODELS[model].get("over_encoding", {"sharded": True})["sharded"]:
        start_from_the_sharded_table(module, MODELS[model])
    callbacks = [Recorder(out)]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", every_n_train_steps=2,
                                         save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, max_steps=steps,
        logger=False, enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1, gradient_clip_val=CLIP,
        use_distributed_sampler=False, callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=FixedGlobalBatches(steps), ckpt_path=ckpt_path)


def fit_on_rank(rank: int, world: int, cases: list[dict]) -> None:
    """The forked ranks' entry: several fits in turn, all ranks together (the environment names the ranks)."""
    from lightning.pytorch.strategies import DDPStrategy

    from lit_overtok.distributed.strategies import FSDP2Strategy, ShardedDDPStrategy

    for case in cases:
        strategy = {"ddp": ShardedDDPStrategy, "fsdp2": FSDP2Strategy, "plain_ddp": DDPStrategy}[case.pop("strategy")]()
        fit(devices=world, strategy=strategy, **case)
