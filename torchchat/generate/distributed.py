"""DistributedGenerator: one model over several processes, by tensor parallelism (TP), pipeline
parallelism (PP), or both on one DeviceMesh ("pp", "tp").

Layout: the layers are split into ``pp`` contiguous stages (uneven splits allowed: 30 over 4 is
8/8/7/7); inside each stage, ``tp`` processes share every layer by the DTensor plan of
``torchchat/distributed/tensor_parallel.py`` (heads and feed-forward split, vocab-sharded
embedding and output), run on plain local shards. Each rank loads only its own layers and shards,
and its KV cache holds only its own layers and heads, in ``max_batch`` rows.

Rank 0 (first stage, tp rank 0) runs the whole ``Generator``: it reads the user, schedules the sequences
(``scheduler.py``: joins, prompt chunks, decode steps, leaves), samples every token with each sequence's own
settings and generator, and writes the text. The other ranks keep no state of the requests: ``follow()``
runs each step's plan (``torchchat/distributed/plan.py``: the rows' tokens, positions and cache rows, in one
int64 message of a fixed size) until rank 0's ``end_session()``. With pp > 1 the steps overlap
(``max_in_flight = pp``): rank 0 starts a group of sequences while the others are in the pipe, and each
group's logits return to it as soon as the last stage has them (``pipeline.StepRoute``).

Sync budget, per process, counted by ``torchchat/distributed/collectives.py`` (names as there) and checked
by ``tests/test_sync_budget.py``. ``S`` forward steps (a prompt chunk, or one token of each sequence of a
group: any batch, any length), ``C`` control plans (one per resize of the cache rows, one per session end);
a rank of stage ``s`` holds ``L_s`` layers:

- the plan: ``recv_plan`` S + C on every rank but 0; ``send_plan`` S + C to each rank it goes on to: from
  rank 0 to its tp - 1 peers of the first stage, and from every stage but the last to the same tp rank of
  the next (each rank but 0 receives one plan a step: the messages of a broadcast, see ``send_plan``);
- with pp > 1: ``send_activation`` S on every stage but the last, ``recv_activation`` S on every stage but
  the first; ``send_logits`` S on tp rank 0 of the last stage, ``recv_logits`` S on rank 0 (each step's
  logits, which rank 0 samples);
- with tp > 1: ``tp_all_reduce`` S * (2 * L_s + 1 on the first stage) (after wo and w2 of each layer, and the
  vocab-sharded embedding); ``tp_all_gather`` S on the last stage (the logits).

So a decoded token of SmolLM2 (30 layers) costs at TP 3 each rank 61 all-reduces + 1 all-gather, and the plan
(2 sends on rank 0, 1 receive on the others); at PP 2, 3 point-to-point operations on each rank (plan, hidden
states, logits), whatever the number of sequences in the step.

Scoring (``Generator.score``, `eval`): a scoring forward (a batch of windows, its plan carrying their targets,
``plan.py`` SCORE) is one of the ``S`` steps above and costs what they cost, but for its ends: the last stage
returns the scored positions' log-probabilities (B, T) float32, not logits, so

- with pp > 1: ``send_scores`` / ``recv_scores`` instead of ``send_logits`` / ``recv_logits`` (one each);
- with tp > 1: on the last stage ``tp_score_max`` + ``tp_score_sum`` (the vocab-parallel log-softmax,
  ``torchchat/distributed/vocab_parallel.py``: 12 bytes a scored position) instead of ``tp_all_gather``;
- one more control plan (in ``C``), ``grow``, when a scoring step first outgrows the plan's size.

Per scoring forward, whatever its windows and their length: at TP t (one stage of L layers) 2L + 1 + 2
all-reduces on each rank and t - 1 plan sends on rank 0 (SmolLM2 at TP 3: 63 all-reduces, no all-gather); at
PP 2, 3 point-to-point operations on each rank (plan, hidden states, log-probabilities); at TP 2 x PP 2, a
first-stage rank 2 L_0 + 1 all-reduces, a last-stage rank 2 L_1 + 2; rank 0 sends the plan twice (its tp peer,
the next stage), sends its hidden states and receives the log-probabilities; rank 1 receives the plan and sends
it on, and its hidden states; the last stage's ranks receive the plan and the hidden states, and its tp rank 0
sends the log-probabilities.

On the wire (torch.distributed's own operations, which the test counts too, so that nothing in the decode
path communicates outside this budget): each helper is one operation: a send, a receive, an all-reduce, an
all-gather. Nothing else: no barrier, no other collective, nothing per request (joins, leaves and new tokens
are all in the plans). In a bf16 (or
fp16) model on CPU the ``tp_all_reduce`` after ``wo`` and ``w2`` carries float32 partial sums (rounded once,
after the sum, as one process's linear rounds: see ``RowwiseLinear``), twice the bytes of the model's dtype;
the embedding's stays in the model's dtype (its sum adds zeros: exact).

Speculative decoding (``--draft-*``, ``--prompt-lookup``; generate/speculative.py): the drafter runs on rank 0,
beside the scheduler (a draft model in rank 0's process); a verification step (``Step.verify``: each sequence's
newest token and up to k draft tokens) is a VERIFY plan, one of the ``S`` steps above at the same cost in
operations: nothing is added per verification. Only its sizes grow: every rank sizes its plans for k + 1 tokens a
row (``PlanLayout.verify_width``, from the same flags), the last stage returns the logits at every position
(B, T, V) instead of the last one's (``send_logits`` / ``recv_logits`` carry T times the bytes; under TP,
``tp_all_gather`` gathers every position's vocab shards). A verification of n draft tokens replaces up to n + 1
decode steps, so the collectives per generated token fall by the tokens kept per verification.

Waits: a plan may wait as long as a human (a chat between turns): plans travel on a long-timeout group, and
everything else, plans' senders included, waits at most TORCHCHAT_DIST_TIMEOUT_S (collectives.py).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchchat import cpu
from torchchat.distributed.collectives import new_long_group
from torchchat.distributed.loading import load_rank_weights
from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.distributed.process_group import collective_timeout
from torchchat.distributed.pipeline import StepRoute, trim_to_stage
from torchchat.distributed.plan import END, GROW, RESIZE, VERIFY, Plan, PlanLayout
from torchchat.distributed.tensor_parallel import GatheredLinear, localize, parallelize
from torchchat.generate.base import Generator
from torchchat.generate.local import DTYPES, positions_and_rows, step_as_rows, verify_as_rows
from torchchat.generate.scheduler import Step
from torchchat.generate.scoring import SCORE_ROWS, target_log_probs
from torchchat.generate.stats import peak_memory_mb
from torchchat.model import Transformer


class StagePart:
    """This rank's part of the model (a stage's layers, maybe TP shards): runs a step's rows through it.

    The last stage applies its output layer to each row's last position only, as LocalGenerator does for a
    prompt (and as a decode step's one position is anyway): the logits (B, V) that sampling reads. A scoring
    step's (one with ``targets``) last stage returns the scored positions' log-probabilities (B, T) float32
    instead: under TP from each rank's vocab shard (``GatheredLinear.log_probs``: nothing gathered)."""

    def __init__(self, model: Transformer, is_last: bool, float32_prefill: bool = False):
        self.model = model
        self.output = model.output if is_last else None
        model.output = None  # the model passes its (normed) hidden states through
        self.float32_prefill = float32_prefill  # a prompt's bf16/fp16 linears as float32 GEMMs (LocalGenerator's)

    def setup_caches(self, max_batch: int, max_seq_len: int):
        self.model.setup_caches(max_batch, max_seq_len)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x: tokens (B, T) or hidden states (B, T, dim) -> hidden states (B, T, dim), or logits (B, V) on the last
        stage."""
        if step.verify and verify_as_rows(self.model, step):  # as LocalGenerator verifies: B * T decode rows
            return self._verify_as_rows(x, step)
        input_pos, rows = positions_and_rows(step, x.device)  # as LocalGenerator passes them: the same kernels
        prompt = step.tokens.size(1) > 1
        linears = cpu.Float32Linears() if prompt and self.float32_prefill else contextlib.nullcontext()
        # a prompt on a busy machine: its torch ops on one thread, as LocalGenerator's
        threads = cpu.kernels.one_torch_thread_when_busy(x.device) if prompt else contextlib.nullcontext()
        with torch.no_grad(), linears, threads:  # never inference_mode: DTensor (the reference path) fails under it
            hidden = self.model(x, input_pos, rows)  # (B, T, dim)
            if self.output is None:
                return hidden
            if step.targets is not None:
                return self._score(hidden, step.targets.to(hidden.device))  # (B, T) float32
            if step.verify:  # speculative decoding: every position's logits
                every = getattr(self.output, "every_position", self.output)  # a vocab shard gathers them all
                return every(hidden)  # (B, T, V)
            return self.output(hidden[:, -1:])[:, -1]  # (B, V)

    def _verify_as_rows(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """A verification step through this stage's block op (local.verify_as_rows): hidden states (B, T, dim) on,
        or every position's logits (B, T, V) on the last stage."""
        batch, seq_len = step.tokens.shape
        _, input_pos, rows = step_as_rows(step, x.device)
        with torch.no_grad():
            hidden = self.model(x.reshape(batch * seq_len, 1, *x.shape[2:]), input_pos, rows)  # (B * T, 1, dim)
            out = hidden if self.output is None else self.output(hidden)  # (B * T, 1, dim or V)
        return out.view(batch, seq_len, -1)

    def _score(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(self.output, GatheredLinear):  # a vocab shard: a vocab-parallel log-softmax
            return self.output.log_probs(hidden, targets, SCORE_ROWS)
        # the whole vocabulary here (tp 1), or DTensor's output layer (the reference: it gathers the logits)
        return target_log_probs(self.output, hidden, targets)


class DistributedGenerator(Generator):
    """A Generator whose model is split over the ranks of the default process group.

    Rank 0 (``is_io_rank``) runs the generator; every other rank calls ``follow()`` (``run_generate`` and
    ``run_chat`` do) and runs the steps rank 0 plans until rank 0's ``end_session()``.
    """

    # Ctrl-C reaches every rank at once (torchrun, the self-launcher): it ends the job, not a reply.
    chat_help = "chat: type a message; /bye or Ctrl-D ends, Ctrl-C ends every rank"

    def __init__(self, part: StagePart, route: StepRoute, model_args, tokenizer, chat_format, dims: ParallelDims,
                 mesh, *, max_seq_len: int, max_batch: int = 1, device="cpu", groups=(), speculate_k: int = 0,
                 **kwargs):
        super().__init__(model_args, tokenizer, chat_format, max_seq_len=max_seq_len, max_batch=max_batch,
                         device=device, is_io_rank=route.rank == route.io_rank, **kwargs)
        self.part = part
        self.route = route
        self.dims = dims
        self.mesh = mesh
        self.max_in_flight = dims.pp  # a group of sequences per stage: the pipeline keeps every stage busy
        # a verification step feeds k + 1 tokens a row; every rank sizes its plans alike (the k of the flags; only
        # rank 0 has the drafter)
        if self.drafter is not None and self.drafter.k != speculate_k:
            raise ValueError(f"the drafter's k ({self.drafter.k}) is not speculate_k ({speculate_k})")
        self.layout = PlanLayout(max_batch, self.scheduler.prefill_chunk, verify_width=1 + speculate_k)
        self._groups = list(groups)  # the groups this generator created, destroyed by close()
        part.setup_caches(max_batch, max_seq_len)
        self._closed = False
        self._broken = False  # a step failed or was interrupted on this rank (see end_session)

    @classmethod
    def from_source(cls, source, tokenizer, chat_format, dims: ParallelDims, *, max_seq_len: int, max_batch: int = 1,
                    dtype: str = "fp32", device: str = "cpu", localize_tp: bool = True, model_args=None,
                    make_drafter=None, **kwargs) -> "DistributedGenerator":
        """Build this rank's part of the model and load its weights (the default group must exist).

        ``make_drafter``: speculative decoding, ``make_drafter() -> Drafter``, called on rank 0 only (the draft runs
        there, beside the scheduler); every rank passes ``speculate_k``, the drafter's k, to size the plans.

        ``localize_tp=False`` keeps DTensor parameters and hooks (slower; the reference in tests).
        ``model_args``: the source's ModelArgs when already read (the builder's Prepared has them); else read here.
        """
        from torchchat.checkpoint import read_model_args

        t0 = time.perf_counter()
        device = torch.device(device)
        args = model_args or read_model_args(source)
        dims.check_model(args, source.name)
        mesh = dims.build_mesh(device.type)
        route, groups = _route(mesh, device, DTYPES[dtype], args)
        layers = dims.stage_layers(args.n_layers)[route.stage]
        model = _build_stage_model(source, args, dims, mesh, layers, DTYPES[dtype], device, localize_tp)
        plain = dims.tp == 1 or localize_tp  # no DTensor: the CPU ops and modes below take plain tensors only
        on_cpu = device.type == "cpu"
        # The same CPU fast path as LocalGenerator, so that a rank computes what one process computes (and as
        # fast). One-row linears through the gemv op where they are plain tensors (localize's RowwiseLinear and
        # GatheredLinear call it themselves); a stage's batch-1 step in one block-op call without TP (a TP
        # rank's layers all-reduce inside the block).
        if on_cpu:
            cpu.install(model, linears=plain, fuse_layers=dims.tp == 1)
        float32_prefill = on_cpu and plain and DTYPES[dtype] != torch.float32 and not cpu.native_bf16()
        part = StagePart(model, route.is_last, float32_prefill)
        if make_drafter is not None and route.rank == route.io_rank:
            kwargs["drafter"] = make_drafter()
        gen = cls(part, route, args, tokenizer, chat_format, dims, mesh, max_seq_len=max_seq_len, max_batch=max_batch,
                  device=device, groups=groups, **kwargs)
        gen.log(f"stage {route.stage + 1}/{dims.pp} (layers {layers.start}-{layers.stop - 1}), "
                f"tp {mesh.get_local_rank('tp') + 1}/{dims.tp}: loaded {source.name} ({dtype}, {device}) in "
                f"{time.perf_counter() - t0:.2f} s, peak memory {peak_memory_mb(device):.0f} MB")
        return gen

    # ----- the Generator hooks, on rank 0 -----

    def forward(self, step: Step) -> torch.Tensor:
        self.start(step)
        return self.finish()

    def start(self, step: Step):
        with self._failing_breaks():
            if step.targets is not None and step.tokens.numel() > self.layout.score_tokens:
                self._grow_for_scoring(step.tokens.numel())
            plan = self.route.share_plan(self.layout.run(step.tokens, step.positions, step.rows, step.targets,
                                                         step.verify))
            if step.targets is None:
                self.route.expect_logits(step.tokens.size(0), step.tokens.size(1) if step.verify else None)
            else:
                self.route.expect_scores(*step.tokens.shape)
            self._run(self.layout.read(plan))  # what every rank reads from the plan, rank 0 included

    def finish(self) -> torch.Tensor:
        with self._failing_breaks():
            return self.route.take_logits()  # (B, V)

    def resize_batch(self, max_batch: int):
        """Every rank's caches grow to ``max_batch`` rows (nothing is in flight: the scheduler calls this
        between requests)."""
        with self._failing_breaks():
            self.route.drain()
            self.route.share_plan(self.layout.resize(max_batch))
            self._resize_here(max_batch)
        self._resized(max_batch)

    def _grow_for_scoring(self, score_tokens: int):
        """Every rank's plans grow to hold scoring steps of ``score_tokens`` tokens and their targets (a window
        of 512 tokens a row outgrows the scheduler's steps). Nothing drains: the caches do not change, and each
        link's plans arrive in order, each in the size its sender and receiver both had at the time."""
        self.route.share_plan(self.layout.grow(score_tokens))
        self.layout = self.layout.scoring(score_tokens)

    def end_session(self):
        """Release the followers; their ``follow()`` returns (a server's, or the CLI's ranks). Not after a step
        failed or was interrupted on this rank: the others may be anywhere in a step, and this process's exit is
        what ends them (their next transfer with it fails), not a plan they would not read."""
        if self._broken:
            return
        with self._failing_breaks():
            self.route.drain()
            self.route.share_plan(self.layout.end())
            self.route.drain()

    @contextlib.contextmanager
    def _failing_breaks(self):
        """Anything escaping a step (a lost peer, Ctrl-C) leaves the ranks out of step for good."""
        if self._broken:
            raise RuntimeError("an earlier step failed on this rank; the other ranks are out of step")
        try:
            yield
        except BaseException:
            self._broken = True
            raise

    # ----- every other rank -----

    def follow(self):
        """Run the plans rank 0 sends until it ends the session."""
        while True:
            plan = self.layout.read(self.route.share_plan(self.layout.empty()))
            if plan.kind == END:
                self.route.drain()  # the next stage has the END plan before this rank moves on
                return
            if plan.kind == RESIZE:
                self._resize_here(plan.batch)
            elif plan.kind == GROW:
                self.layout = self.layout.scoring(plan.score_tokens)
            else:
                self._run(plan)

    # ----- internals -----

    def _run(self, plan: Plan):
        """One step on this rank: its input, its layers, its output on to the next stage (or to rank 0)."""
        step = Step(plan.tokens, plan.positions, plan.rows, targets=plan.targets, verify=plan.kind == VERIFY)
        x = step.tokens.to(self.device) if self.route.is_first else self.route.hidden_in(*step.tokens.shape)
        self.route.pass_on(self.part.forward(x, step), scores=step.targets is not None)

    def _resize_here(self, max_batch: int):
        self.part.setup_caches(max_batch, self.max_seq_len)
        self.layout = self.layout.grown(max_batch)
        self.max_batch = max_batch

    def log(self, line: str):
        """A line on stderr from every rank (the launcher prefixes each with its rank)."""
        print(line, file=self.err, flush=True)

    def close(self):
        """Destroy the long-timeout groups this generator created. The mesh's groups stay until the default
        group goes (the launcher destroys it, and every group with it): DTensor caches meshes by equality, so a
        later generator of the same layout in this process (tests, benchmarks) gets this mesh back, groups
        included, in its parameters' placements."""
        if self._closed or not dist.is_initialized():
            return
        self._closed = True
        for group in {id(g): g for g in self._groups}.values():
            dist.destroy_process_group(group)


def _route(mesh, device: torch.device, dtype: torch.dtype, args) -> tuple[StepRoute, list]:
    """This rank's StepRoute, and the groups it made for it (every rank creates them, in the same order)."""
    plan_group = new_long_group()
    first, last = int(mesh.mesh[0, 0]), int(mesh.mesh[-1, 0])
    # The logits' way back, on the model's device (the default group's backend and timeout)
    logits_group = dist.new_group([first, last], timeout=collective_timeout()) if first != last else None
    route = StepRoute(mesh, dist.get_rank(), plan_group, mesh.get_group("pp"), logits_group, device, dtype,
                      args.dim, args.vocab_size)
    return route, [g for g in (plan_group, logits_group) if g not in (None, dist.GroupMember.NON_GROUP_MEMBER)]


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
