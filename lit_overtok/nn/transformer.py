"""The decoder-only transformer in the OLMo2 recipe (docs/method.md §3.2; OLMo-core's ``olmo2_*`` presets):
input embedding -> blocks -> final norm -> next-token head, plus the training-only multi-token heads, and its training
loss.

- blocks: ``block`` (reordered norm), ``attention`` (QK-norm, RoPE, KV cache), ``feed_forward`` (SwiGLU or MoE);
- init: truncated normal, std 0.02 (cut at 3 std), every parameter from its own generator seeded by its name,
  so adding a module (an Over-Encoding table, an extra head) never changes the initial values of the others;
  a module may draw its own parameters from a seed derived the same way (``hooks.InitialisesOwnParameters``);
- built where sharded: constructed under ``deferred_init.parameters_on_meta()`` (parameters without memory, buffers
  real), placed by a strategy (sharded by FSDP2), then ``materialize``d parameter by parameter on its device: each
  rank draws its part of the eager build's values, from the seed captured at construction.

Three seams are chosen by config: the input embedding (``embedding``: plain or Over-Encoding), the feed-forward of
each block (``feed_forward``: dense or MoE) and the output heads (``heads``, ``over_decoding``, ``mtp``).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from lit_overtok.nn import hooks
from lit_overtok.nn.attention import KVCache
from lit_overtok.nn.block import Block
from lit_overtok.nn.config import ModelConfig
from lit_overtok.nn.deferred_init import allocate_like, is_unplaced, replace_parameter, trunc_normal_part_
from lit_overtok.nn.embedding import build_input_embedding
from lit_overtok.nn.engram import Engram
from lit_overtok.nn.heads import NextTokenHead
from lit_overtok.nn.moe import pop_auxiliary_losses
from lit_overtok.nn.mtp import MultiTokenPredictionDS
from lit_overtok.nn.norms import RMSNorm
from lit_overtok.nn.over_decoding import JointDecodingLoss, JointNGramHead, OverDecodingHeads
from lit_overtok.nn.recompute import checkpointed
from lit_overtok.nn.rotary import RotaryEmbedding


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    embedding: int
    """Parameters of lookup tables (the 1-gram table and any Over-Encoding tables) and output unembeddings."""
    non_embedding: int
    active: int
    """Parameters used per token: for mixture-of-experts only the routed experts count."""
    active_non_embedding: int
    memory_tables: dict[str, int] = field(default_factory=dict)
    """Parameters of hashed n-gram memory tables per family ("oe", "ne", "engram"; ``hooks.memory_family``): part
    of ``total`` (and of ``embedding`` where the tables are ``nn.Embedding``s), listed to size fair arms."""

    def as_dict(self) -> dict[str, int]:
        """Flat counts for logging: the families' tables as ``memory_tables`` (all) and ``memory_tables_<family>``."""
        counts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "memory_tables"}
        counts["memory_tables"] = sum(self.memory_tables.values())
        counts.update({f"memory_tables_{family}": n for family, n in sorted(self.memory_tables.items())})
        return counts


class Transformer(nn.Module):
    """Input embedding -> blocks -> final norm -> next-token head (+ optional multi-token heads for training)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model_config.vocab_size is unset: link it from the data module or give it in the config")
        self.config = config
        # Captured now, so that parameters drawn after a meta-device build (``materialize``) get this build's values.
        self.init_seed = torch.initial_seed() % (2**31)
        self.embed = build_input_embedding(config)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # Engram's memory, added to the hidden state before the blocks it names (``nn.engram``).
        self.engram = None if config.engram is None else Engram(config.engram, config.vocab_size, config.d_model, config.norm_eps)
        if config.compile_blocks:
            for block in self.blocks:
                block.compile()  # in place: parameter names and checkpoints stay those of the eager model
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = build_next_token_head(config, tied_table=self.embed.wte if config.tie_embeddings else None)
        self.multi_token_head = build_multi_token_head(config, self.lm_head, self.rotary)
        self.init_weights()

    def hidden_states(self, input_ids_BT: torch.Tensor, caches: Optional[list[KVCache]] = None,
                      start: int = 0) -> torch.Tensor:
        """Final-normed hidden states for ``input_ids_BT[:, start:]``.

        The embedding always sees the whole id sequence, because an Over-Encoding lookup at position t needs the
        ids before t; with a KV cache only the new positions go through the blocks.
        """
        return self.backbone(self.embed(input_ids_BT)[:, start:], caches, start, input_ids_BT)

    def backbone(self, x_BTD: torch.Tensor, caches: Optional[list[KVCache]] = None, start: int = 0,
                 input_ids_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Blocks and final norm over embedded positions ``start .. start + T``; Engram also reads the ids (all of
        them from position 0, as the embedding)."""
        cos_TC, sin_TC = self.rotary(start, x_BTD.shape[1])
        recompute = self.config.activation_checkpointing and self.training and caches is None and torch.is_grad_enabled()
        memory = self.engram.layers if self.engram is not None else {}
        if memory:
            compressed_BT, pad = self.engram.compress(input_ids_BT)
        for i, block in enumerate(self.blocks):
            if str(i) in memory:
                args = (x_BTD, compressed_BT, pad, start, None if caches is None else caches[i].memory)
                x_BTD = x_BTD + (checkpointed(memory[str(i)], *args) if recompute else memory[str(i)](*args))
            if recompute:
                x_BTD = checkpointed(block, x_BTD, cos_TC, sin_TC)
            else:
                x_BTD = block(x_BTD, cos_TC, sin_TC, None if caches is None else caches[i])
        return self.norm(x_BTD)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V): the only output generation and evaluation use."""
        return self.lm_head(self.hidden_states(input_ids_BT))

    def loss(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training objective: next-token cross-entropy plus whatever the multi-token head and MoE layers add.

        Returns the total loss and named parts for logging; ``loss_next1`` is always the plain next-token loss.
        """
        # Embedded once: MTP-DS feeds the next token's input embedding (Over-Encoding's, in OT) to its modules.
        embedded_BTD = self.embed(input_ids_BT)
        hidden_BTD = self.backbone(embedded_BTD, input_ids_BT=input_ids_BT)
        loss_next1 = self.lm_head.loss(hidden_BTD, labels_BT)
        parts = {"loss_next1": loss_next1.detach()}
        total = loss_next1
        if self.multi_token_head is not None:
            extra, extra_parts = self.multi_token_head.loss(hidden_BTD, input_ids_BT, labels_BT, embedded_BTD=embedded_BTD)
            total = total + extra
            parts.update(extra_parts)
        aux, aux_parts = pop_auxiliary_losses(self)  # MoE load balancing and router z-loss (training only)
        if aux is not None:
            total = total + aux
            parts.update(aux_parts)
        return total, parts

    def new_kv_caches(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> list[KVCache]:
        shape = (batch_size, self.config.n_head, max_len, self.config.head_dim)
        memory = {} if self.engram is None else self.engram.new_cache(batch_size, self.config.d_model, dtype, device)
        return [KVCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device),
                        memory=memory.get(i)) for i in range(len(self.blocks))]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal(0, init_std) for matrices and tables, ones for norms, zeros for biases.

        Each parameter draws from a generator seeded by (global seed, parameter name), so the draw does not depend
        on which other modules exist or in which order they were built. Parameters on the meta device are drawn by
        ``materialize``, once placed.
        """
        norm_weights = self._norm_weights()
        own = self._init_own_parameters()
        for name, param in self.named_parameters():
            if not is_unplaced(param) and id(param) not in own:
                self._init_parameter(name, param, id(param) in norm_weights)

    @torch.no_grad()
    def materialize(self, device: torch.device) -> None:
        """After a meta-device build (``deferred_init``) and any sharding: allocate what this rank holds of each
        parameter on ``device`` and draw it, one parameter at a time, to the eager build's values; a no-op once done
        (Lightning calls ``configure_model`` at every fit/validate/test). Row-sharded tables are placed separately
        (``sharded_table.place_sharded_tables``)."""
        norm_weights = self._norm_weights()
        for name, param in list(self.named_parameters()):  # the first name of a tied weight, as ``init_weights``
            if not is_unplaced(param) or hooks.global_shape(param) is not None:
                continue
            real = allocate_like(param, device)
            self._init_parameter(name, real, id(param) in norm_weights)
            replace_parameter(self, param, real)

    def is_materialized(self) -> bool:
        return not any(is_unplaced(p) and hooks.global_shape(p) is None for p in self.parameters())

    def _apply(self, fn, recurse: bool = True):
        # Before ``materialize`` there is nothing to move: .to()/.cpu() (Lightning's teardown after an error raised
        # before configure_model) leave the model as it is, as they leave a sharded table's placeholder.
        return super()._apply(fn, recurse) if self.is_materialized() else self

    def _norm_weights(self) -> set[int]:
        return {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}

    def _init_own_parameters(self) -> set[int]:
        """Modules that draw some of their parameters themselves (Over-Encoding's tables, row chunk by row chunk)."""
        return {id(p) for name, m in self.named_modules() if isinstance(m, hooks.InitialisesOwnParameters)
                for p in m.init_own_parameters(self.config.init_std, self.init_seed + zlib.crc32(name.encode()))}

    def _init_parameter(self, name: str, param: torch.Tensor, is_norm: bool) -> None:
        if is_norm:
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            # Drawn on the CPU (a GPU-placed part gets the CPU build's values), chunk by chunk, this rank's part kept.
            generator = torch.Generator().manual_seed(self.init_seed + zlib.crc32(name.encode()))
            trunc_normal_part_(param, self.config.init_std, generator)

    def parameter_counts(self) -> ParameterCounts:
        """Total, vocabulary-sized (lookup tables and the unembedding), the rest, and what a token uses.

        ``embedding`` holds every lookup table (the 1-gram table, Over-Encoding tables) and the output unembedding, so
        ``non_embedding`` is the backbone the preset names refer to. Active counts route MoE experts at k/E.
        """
        vocab_sized = {id(p) for m in self.modules() if hooks.is_vocabulary_sized(m) for p in m.parameters()}
        unique = {id(p): p for p in self.parameters()}
        total = sum(hooks.global_numel(p) for p in unique.values())
        embedding = sum(hooks.global_numel(p) for i, p in unique.items() if i in vocab_sized)
        inactive = hooks.inactive_parameter_count(self)
        return ParameterCounts(
            total=total, embedding=embedding, non_embedding=total - embedding,
            active=total - inactive, active_non_embedding=total - embedding - inactive,
            memory_tables=hooks.memory_table_parameters(self),
        )


def build_next_token_head(config: ModelConfig, tied_table: Optional[nn.Embedding]) -> nn.Module:
    """The head generation and evaluation use: a V-way unembedding, or for joint n-gram decoding the first-token
    marginal of the V^n-way joint softmax."""
    if config.multi_token is not None and config.multi_token.mode == "joint":
        return JointNGramHead(config.d_model, config.vocab_size, config.multi_token.n, config.loss_chunk_logits)
    return NextTokenHead(config.d_model, config.vocab_size, config.padded_vocab_size, tied_table, config.loss_chunk_logits)


def build_multi_token_head(config: ModelConfig, lm_head: nn.Module, rotary: RotaryEmbedding) -> Optional[nn.Module]:
    """Training-only heads that predict tokens further ahead; None for the plain next-token objective.

    The returned module's ``loss(hidden_BTD, input_ids_BT, labels_BT, embedded_BTD=...)`` gives the weighted extra
    loss and named, detached parts (``loss_next2``, ...). Heads keep plain references to what they share with the
    model (its output head, its RoPE tables) and never register them.
    """
    multi_token = config.multi_token
    if multi_token is None or multi_token.mode == "none":
        return None
    if multi_token.mode == "mtp_ds":
        return MultiTokenPredictionDS(config, multi_token, lm_head, rotary)
    if multi_token.mode == "joint":
        return JointDecodingLoss(lm_head)
    return OverDecodingHeads(multi_token, config.d_model, config.vocab_size, config.padded_vocab_size, config.loss_chunk_logits)
