"""DistributedGenerator: one model over several processes, by tensor parallelism (TP), pipeline
parallelism (PP), or both on one DeviceMesh ("pp", "tp").

Layout: the layers are split into ``pp`` contiguous stages (uneven splits allowed: 30 over 4 is
8/8/7/7); inside each stage, ``tp`` processes share every layer by the DTensor plan of
``torchchat/distributed/tensor_parallel.py`` (heads and feed-forward split, vocab-sharded
embedding and output), run on plain local shards. Each rank loads only its own layers and shards,
and its KV cache holds only its own layers and heads. Rank 0 (first stage, tp rank 0) talks to
the user; tp rank 0 of the last stage samples every token and broadcasts it.

Sync budget, per process, counted by ``torchchat/distributed/collectives.py`` (names as there)
and checked by ``tests/test_sync_budget.py``. A rank of stage ``s`` holds ``L_s`` layers; a
forward step is the prefill of a turn, or one decoded token; ``M`` is the number of microbatches
(1 for one sequence; up to ``pp`` when ``num_samples`` > 1, see ``pipeline.microbatches``):

- per turn: ``broadcast_turn`` 1 (plus 1 when a chat or server session ends: None);
- per forward step:
  - ``broadcast_token`` 1 on every rank (the sampled tokens, from the sampling rank);
  - with tp > 1, per microbatch: ``tp_all_reduce`` 2 * L_s (after wo and w2 of each layer), +1 on
    the first stage (embedding); ``tp_all_gather`` 1 on the last stage (logits);
  - with pp > 1: ``send_activation`` M on every stage but the last, ``recv_activation`` M on
    every stage but the first (hidden states, to the same tp rank of the next stage);
- per new activation shape with pp > 1 (a prompt length not seen in the last few turns; the first
  decode step of a batch size): ``stage_setup`` 1, the pipelining library's warm-up vote.

So one decoded token of SmolLM2 (30 layers) at TP 3 costs each rank 61 all-reduces + 1
all-gather + 1 broadcast; at PP 2, 1 activation transfer per boundary + 1 broadcast.

On the wire (torch.distributed's own operations, which the test counts too, so that nothing in the
decode path communicates outside this budget): ``broadcast_turn`` is 2 broadcasts (the pickled
size, then the bytes); ``broadcast_token``, ``tp_all_reduce``, ``tp_all_gather`` 1 broadcast,
all-reduce, all-gather each; ``send_activation`` / ``recv_activation`` 1 send / receive each;
``stage_setup`` 1 send and 1 receive per neighbouring stage (a dummy each way). Nothing else: no
barrier, no other collective. In a bf16 (or fp16) model on CPU the ``tp_all_reduce`` after ``wo``
and ``w2`` carries float32 partial sums (rounded once, after the sum, as one process's linear
rounds: see ``RowwiseLinear``), twice the bytes of the model's dtype; the embedding's stays in the
model's dtype (its sum adds zeros: exact).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchchat import cpu
from torchchat.distributed.collectives import broadcast_token, broadcast_turn, new_turn_group
from torchchat.distributed.loading import load_rank_weights
from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.distributed.pipeline import Pipeline, StageModule, trim_to_stage
from torchchat.distributed.tensor_parallel import localize, parallelize
from torchchat.generate.base import Generator, Turn
from torchchat.generate.local import DTYPES
from torchchat.generate.stats import peak_memory_mb
from torchchat.model import Transformer


class WholeStage:
    """No pipeline (pp == 1): the model runs here whole (possibly TP-sharded)."""

    is_last = True

    def __init__(self, model: Transformer):
        self.model = model

    def setup_caches(self, max_batch: int, max_seq_len: int):
        self.model.setup_caches(max_batch, max_seq_len)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        input_pos = torch.arange(start_pos, start_pos + tokens.size(1), device=tokens.device)
        return self.model(tokens, input_pos)[:, -1]  # (B, vocab)


class DistributedGenerator(Generator):
    """A Generator whose model is split over the ranks of the default process group.

    Every rank runs the same calls (``run_generate``, ``run_chat``, ``share_input`` +
    ``complete``); only rank 0 reads the user (``is_io_rank``).
    """

    # Ctrl-C reaches every rank at once (torchrun, the self-launcher): it ends the job, not a reply.
    chat_help = "chat: type a message; /bye or Ctrl-D ends, Ctrl-C ends every rank"

    def __init__(self, runner, model_args, tokenizer, chat_format, dims: ParallelDims, mesh, *, max_seq_len: int,
                 max_batch: int = 1, device="cpu", turn_group=None, float32_prefill: bool = False, **kwargs):
        super().__init__(model_args, tokenizer, chat_format, max_seq_len=max_seq_len, device=device,
                         is_io_rank=dist.get_rank() == 0, **kwargs)
        self.runner = runner  # runs forward steps: WholeStage (no pipeline) or Pipeline
        self.dims = dims
        self.mesh = mesh
        self.turn_group = turn_group if turn_group is not None else new_turn_group()
        self.sampler_rank = int(mesh.mesh[-1, 0])  # tp rank 0 of the last stage decides every token
        self.is_sampler = dist.get_rank() == self.sampler_rank
        self.max_batch = max_batch
        # A prompt's bf16/fp16 linears as float32 GEMMs, as LocalGenerator's prefill on a CPU without native bf16
        self.float32_prefill = float32_prefill
        runner.setup_caches(max_batch, max_seq_len)
        self._closed = False

    @classmethod
    def from_source(cls, source, tokenizer, chat_format, dims: ParallelDims, *, max_seq_len: int, max_batch: int = 1,
                    dtype: str = "fp32", device: str = "cpu", localize_tp: bool = True, model_args=None,
                    **kwargs) -> "DistributedGenerator":
        """Build this rank's part of the model and load its weights (the default group must exist).

        ``localize_tp=False`` keeps DTensor parameters and hooks (slower; the reference in tests).
        ``model_args``: the source's ModelArgs when already read (the builder's Prepared has them); else read here.
        """
        from torchchat.checkpoint import read_model_args

        t0 = time.perf_counter()
        device = torch.device(device)
        args = model_args or read_model_args(source)
        dims.check_model(args, source.name)
        mesh = dims.build_mesh(device.type)
        turn_group = new_turn_group()  # every rank creates its groups in the same order
        stage_index = mesh.get_local_rank("pp")
        layers = dims.stage_layers(args.n_layers)[stage_index]
        model = _build_stage_model(source, args, dims, mesh, layers, DTYPES[dtype], device, localize_tp)
        if dims.pp > 1:
            runner = Pipeline(StageModule(model, is_last=stage_index == dims.pp - 1), stage_index, dims.pp,
                             mesh.get_group("pp"), device, DTYPES[dtype], args)
        else:
            runner = WholeStage(model)
        plain = dims.tp == 1 or localize_tp  # no DTensor: the CPU ops and modes below take plain tensors only
        on_cpu = device.type == "cpu"
        # The same CPU fast path as LocalGenerator, so that a rank computes what one process computes (and as
        # fast). One-row linears through the gemv op where they are plain tensors (localize's RowwiseLinear and
        # GatheredLinear call it themselves); a stage's batch-1 step in one block-op call without TP (a TP
        # rank's layers all-reduce inside the block).
        if on_cpu:
            cpu.install(model, linears=plain, fuse_layers=dims.tp == 1)
        float32_prefill = on_cpu and plain and DTYPES[dtype] != torch.float32 and not cpu.native_bf16()
        gen = cls(runner, args, tokenizer, chat_format, dims, mesh, max_seq_len=max_seq_len, max_batch=max_batch,
                  device=device, turn_group=turn_group, float32_prefill=float32_prefill, **kwargs)
        gen.log(f"stage {stage_index + 1}/{dims.pp} (layers {layers.start}-{layers.stop - 1}), "
                f"tp {mesh.get_local_rank('tp') + 1}/{dims.tp}: loaded {source.name} ({dtype}, {device}) in "
                f"{time.perf_counter() - t0:.2f} s, peak memory {peak_memory_mb(device):.0f} MB")
        return gen

    # ----- the Generator hooks -----

    def share_input(self, turn: Turn | None) -> Turn | None:
        return broadcast_turn(turn if self.is_io_rank else None, self.turn_group)

    def prefill(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        self._check_batch(tokens.size(0))
        linears = cpu.Float32Linears() if self.float32_prefill else contextlib.nullcontext()
        with torch.no_grad(), linears:  # never inference_mode: DTensor (the reference path) fails under it
            logits = self.runner.forward(tokens, start_pos)  # (B, vocab) on the last stage, else None
        return self._decide(logits, tokens.size(0))

    def decode_n_tokens(self, token: torch.Tensor, start_pos: int, n: int) -> Iterator[torch.Tensor]:
        for pos in range(start_pos, start_pos + n):
            with torch.no_grad():
                logits = self.runner.forward(token.view(-1, 1), pos)  # (B, vocab) on the last stage
            token = self._decide(logits, token.size(0))
            yield token

    # ----- internals -----

    def _decide(self, logits: torch.Tensor | None, batch: int) -> torch.Tensor:
        """One rank samples; every rank gets its tokens (B,), so all agree at any temperature."""
        if self.is_sampler:
            token = self.sample(logits).to(torch.long).contiguous()
        else:
            token = torch.empty(batch, dtype=torch.long, device=self.device)
        return broadcast_token(token, self.sampler_rank)

    def _check_batch(self, batch: int):
        if batch > self.max_batch:  # every rank runs the same turn: they all grow alike
            self.max_batch = batch
            self.runner.setup_caches(batch, self.max_seq_len)

    def log(self, line: str):
        """A line on stderr from every rank (the launcher prefixes each with its rank)."""
        print(line, file=self.err, flush=True)

    def close(self):
        """Destroy the process groups this generator created (the launcher destroys the default one)."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        groups = [self.turn_group] + [self.mesh.get_group(d) for d in ("pp", "tp")]
        for group in {id(g): g for g in groups}.values():
            if group is not dist.group.WORLD:  # a 1-D mesh over every rank may reuse the default group
                dist.destroy_process_group(group)


def _build_stage_model(source, args, dims: ParallelDims, mesh, layers: range, dtype: torch.dtype,
                       device: torch.device, localize_tp: bool) -> Transformer:
    """On meta: the whole model, trimmed to the stage, TP plan applied; then only this rank's weights load."""
    with torch.device("meta"):
        model = Transformer(args)
    stage_index = mesh.get_local_rank("pp")
    trim_to_stage(model, layers, stage_index, dims.pp)
    layouts = {}
    if dims.tp > 1:
        tp_mesh = mesh["tp"]
        plan = parallelize(model, tp_mesh)
        layouts = {name: p for name, p in model.named_parameters() if isinstance(p, DTensor)}
        if localize_tp:
            localize(model, plan, tp_mesh)
    load_rank_weights(source, model, layouts, dtype=dtype, device=device)
    return model.requires_grad_(False).eval()
