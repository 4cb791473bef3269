"""Pipeline parallelism with ``torch.distributed.pipelining``: the stage split and its driving.

``trim_to_stage`` deletes what a stage does not own (other layers; the embedding before the
first stage; the norm and output after the last), so parameter names and the KV cache of the
kept layers are the model's own. ``Pipeline`` runs a forward step (prefill or one decode token)
through ``PipelineStage`` + ``ScheduleGPipe``:

- stages have static shapes, so there is one stage object per activation shape (batch, tokens,
  microbatches), built on first use and cached (an LRU of a few: chat turns have new lengths).
  Example tensors give every shape up front, so receive buffers take the model's dtype;
- several sequences (``num_samples`` > 1) go through as microbatches, each using its own rows of
  the KV cache (``slot``), so that the stages work on different sequences at once;
- positions and cache rows travel as keyword tensors split along dim 0, as the schedule splits
  the batch: ``input_pos`` (B, T) with equal rows, ``slot`` (B,).

torch 2.13's ScheduleGPipe accepts fewer microbatches than stages, so a single sequence (the
usual decode) runs through the same schedule; it waits for each step's tokens anyway.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from torchchat.distributed.collectives import activation_recvs, activation_sends, stage_setup
from torchchat.model import KVCache, Transformer

CACHED_SHAPES = 8  # stage objects kept: decode's, and the prefill shapes of recent turns


def trim_to_stage(model: Transformer, layers: range, stage: int, num_stages: int):
    """Keep ``layers`` (global indices, names unchanged) and what the stage's place in the pipeline needs."""
    for name in list(model.layers):
        if int(name) not in layers:
            del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None  # receives hidden states
    if stage < num_stages - 1:
        model.norm = None  # sends hidden states
        model.output = None


class CacheRows(KVCache):
    """Rows [start, start + size) of a KVCache: the sequences of one microbatch (views, no copy)."""

    def __init__(self, cache: KVCache, start: int, size: int):
        nn.Module.__init__(self)
        self.k = cache.k[start:start + size]  # (size, n_kv_heads, max_seq_len, head_dim)
        self.v = cache.v[start:start + size]


class StageModule(nn.Module):
    """What a PipelineStage runs: the trimmed model on one microbatch, in its rows of the cache."""

    def __init__(self, model: Transformer, is_last: bool):
        super().__init__()
        self.model = model
        self.is_last = is_last
        self._rows: dict[tuple[int, int], list[KVCache]] = {}

    def setup_caches(self, max_batch: int, max_seq_len: int):
        if (max_batch, max_seq_len) == (self.model.max_batch, self.model.max_seq_len):
            return  # the layers may hold row views now: keep the full caches captured before
        self.model.setup_caches(max_batch, max_seq_len)
        self._full = [layer.attention.kv_cache for layer in self.model.layers.values()]
        self._rows.clear()

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """x: tokens (mb, T) or hidden (mb, T, dim); input_pos (mb, T), equal rows; slot (mb,) cache rows."""
        self._use_rows(int(slot[0]), slot.numel())
        out = self.model(x, input_pos[0])  # (mb, T, dim) or logits (mb, T or 1, vocab)
        return out[:, -1] if self.is_last else out  # the last stage: logits (mb, vocab)

    def _use_rows(self, start: int, size: int):
        rows = self._rows.get((start, size))
        if rows is None:
            rows = self._rows[(start, size)] = [CacheRows(c, start, size) for c in self._full]
        for layer, cache in zip(self.model.layers.values(), rows):
            layer.attention.kv_cache = cache


class _CountedStage(PipelineStage):
    """A PipelineStage whose activation transfers are counted by the sync budget."""

    def get_fwd_send_ops(self, fwd_chunk_id: int):
        return activation_sends(super().get_fwd_send_ops(fwd_chunk_id))

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        return activation_recvs(super().get_fwd_recv_ops(fwd_chunk_id))


class Pipeline:
    """Runs forward steps through the stages; the last stage gets logits (B, vocab), others None."""

    def __init__(self, module: StageModule, stage: int, num_stages: int, group, device: torch.device,
                 dtype: torch.dtype, args):
        self.module = module
        self.stage = stage
        self.num_stages = num_stages
        self.group = group  # the pp group of this rank's tp index
        self.device = device
        self.dtype = dtype
        self.args = args
        self._schedules: OrderedDict[tuple[int, int, int], ScheduleGPipe] = OrderedDict()

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def setup_caches(self, max_batch: int, max_seq_len: int):
        self.module.setup_caches(max_batch, max_seq_len)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor | None:
        """tokens (B, T) at positions [start_pos, start_pos + T): every rank passes the same ones."""
        batch, seq = tokens.shape
        schedule = self._schedule(batch, seq)
        input_pos = torch.arange(start_pos, start_pos + seq, device=self.device).expand(batch, seq)  # (B, T)
        slot = torch.arange(batch, device=self.device)  # (B,)
        inputs = (tokens,) if self.is_first else ()
        return schedule.step(*inputs, input_pos=input_pos, slot=slot)  # (B, vocab) on the last stage

    def _schedule(self, batch: int, seq: int) -> ScheduleGPipe:
        n_micro = microbatches(batch, self.num_stages)
        key = (batch // n_micro, seq, n_micro)
        schedule = self._schedules.get(key)
        if schedule is not None:
            self._schedules.move_to_end(key)
            return schedule
        if len(self._schedules) >= CACHED_SHAPES:
            self._schedules.popitem(last=False)  # every rank sees the same shapes: they evict alike
        stage_setup()
        stage = _CountedStage(self.module, self.stage, self.num_stages, self.device,
                              input_args=self._example_input(key[0], seq),
                              output_args=self._example_output(key[0], seq), group=self.group)
        schedule = self._schedules[key] = ScheduleGPipe(stage, n_micro)
        return schedule

    def _example_input(self, mb: int, seq: int) -> torch.Tensor:
        if self.is_first:
            return torch.empty(mb, seq, dtype=torch.long, device="meta")
        return torch.empty(mb, seq, self.args.dim, dtype=self.dtype, device="meta")

    def _example_output(self, mb: int, seq: int) -> torch.Tensor:
        if self.is_last:
            return torch.empty(mb, self.args.vocab_size, dtype=self.dtype, device="meta")
        return torch.empty(mb, seq, self.args.dim, dtype=self.dtype, device="meta")


def microbatches(batch: int, num_stages: int) -> int:
    """How many equal microbatches to cut ``batch`` sequences into: enough to fill the stages
    (the smallest divisor of ``batch`` not below min(batch, num_stages)); 1 for one sequence."""
    want = min(batch, num_stages)
    return next(d for d in range(want, batch + 1) if batch % d == 0)
