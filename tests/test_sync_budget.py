"""The sync budget of torchchat/generate/distributed.py's docstring, counted on real processes.

Each rank counts, over a whole session, two things: its calls of the helpers in
torchchat/distributed/collectives.py, and every communication torch.distributed itself starts
(``CollectiveCount``, at the dispatcher's c10d and functional-collective ops, so a raw ``dist.barrier()`` or a
DTensor collective is counted as well). Both must equal the docstring's formula, written out again here, for
TP 2, PP 2 and TP 2 x PP 2 on the tiny model, given the number of forward steps rank 0 started: prompt chunks
of 4 tokens, a request of 2 samples (the cache rows grow from 1 to 2: a resize plan), then two requests at once
(in a pipeline, two steps in flight), then ``Generator.score`` of 3 windows (`eval`: scoring steps, which outgrow
the plan: a grow plan). Rank 0 speculates (a drafter that always drafts, k 2): its verification steps are among the
forward steps, at no other cost in operations.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest

from tests.dist_utils import CollectiveCount, run_ranks
from tests.generators import tiny_source
from torchchat.distributed.parallel_dims import ParallelDims
from dataclasses import replace

from torchchat.generate.base import GenerationArgs, Turn

ARGS = GenerationArgs(max_new_tokens=5, temperature=0)
PROMPT = [1, 2, 3, 4, 5, 6, 7]  # two chunks of at most 4 tokens
WINDOWS = [list(range(k, k + 8)) for k in (1, 9, 17)]  # scored from position 4: 2 windows a step in 2 cache rows
SPECULATE_K = 2


def always_drafting():
    """A drafter that always drafts (k copies of the newest token): every decode step is a verification."""
    from torchchat.generate.speculative import Draft, Drafter

    class Repeating(Drafter):
        def propose(self, context, slot, most, args, rng):
            return Draft(context[-1:] * most)
    return Repeating(SPECULATE_K)


def budget_worker(rank: int, world: int, source, tp: int, pp: int):
    """One session, counted; rank 0 also counts the steps it starts."""
    from torchchat.chat_format import chat_format_for
    from torchchat.distributed import collectives
    from torchchat.generate.distributed import DistributedGenerator
    from torchchat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    gen = DistributedGenerator.from_source(source, tokenizer, chat_format_for(tokenizer, source),
                                           ParallelDims(tp, pp, world), max_seq_len=64, prefill_chunk=4,
                                           out=io.StringIO(), err=io.StringIO(), speculate_k=SPECULATE_K,
                                           make_drafter=always_drafting)
    steps = _count_starts(gen)
    try:
        collectives.reset_counts()
        with CollectiveCount() as wire:
            if rank == 0:
                _session(gen)
            else:
                gen.follow()
        route = gen.route
        layers = len(gen.dims.stage_layers(gen.model_args.n_layers)[route.stage])
        return (collectives.counts(), dict(wire.counts), steps if rank == 0 else None, route.stage,
                gen.mesh.get_local_rank("tp"), layers)
    finally:
        gen.close()


def _session(gen):
    try:
        gen.run_until(gen.submit(Turn(PROMPT, replace(ARGS, num_samples=2))))  # 1 -> 2 cache rows first
        both = [gen.submit(Turn(PROMPT[:k], ARGS)) for k in (3, 6)]
        while not all(r.done for r in both):
            gen.step()
        gen.score(WINDOWS, 4)
    finally:
        gen.end_session()


def _count_starts(gen) -> Counter:
    """The forward steps rank 0 starts: "generate" and "score" (those with targets)."""
    started, start = Counter(), gen.start

    def counted(step):
        started["generate" if step.targets is None else "score"] += 1
        started["verify"] += step.verify  # among the "generate" ones
        start(step)
    gen.start = counted
    return started


def expected_helpers(tp: int, pp: int, rank: int, stage: int, tp_rank: int, layers: int, steps: int,
                     control: int, scoring: int = 0) -> dict[str, int]:
    """The docstring's formula for ``steps`` forward steps of generation, ``scoring`` ones and ``control`` plans
    (resizes, grows, the session's end)."""
    first, last = stage == 0, stage == pp - 1
    plans = steps + scoring + control
    forwards = steps + scoring
    counts = {}
    sends = (tp - 1 if rank == 0 else 0) + (not last)  # rank 0 to its tp peers; every stage to the next
    if sends:
        counts["send_plan"] = sends * plans
    if rank != 0:
        counts["recv_plan"] = plans
    if pp > 1:
        if not last:
            counts["send_activation"] = forwards
        if not first:
            counts["recv_activation"] = forwards
        if last and tp_rank == 0:
            counts.update(send_logits=steps, send_scores=scoring)
        if rank == 0:
            counts.update(recv_logits=steps, recv_scores=scoring)
    if tp > 1:
        counts["tp_all_reduce"] = forwards * (2 * layers + first)
        if last:
            counts.update(tp_all_gather=steps, tp_score_max=scoring, tp_score_sum=scoring)
    return {name: n for name, n in counts.items() if n}


def on_the_wire(helpers: dict[str, int]) -> dict[str, int]:
    """The docstring's torch.distributed operations for these helper calls: one each."""
    kind = {"send_plan": "send", "recv_plan": "recv", "send_activation": "send",
            "recv_activation": "recv", "send_logits": "send", "recv_logits": "recv", "tp_all_reduce": "all_reduce",
            "tp_all_gather": "all_gather", "send_scores": "send", "recv_scores": "recv", "tp_score_max": "all_reduce",
            "tp_score_sum": "all_reduce"}
    wire = Counter()
    for helper, calls in helpers.items():
        wire[kind[helper]] += calls
    return dict(wire)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=lambda v: str(v))
def test_counted_collectives_equal_the_budget(tiny_model, tp, pp):
    results = run_ranks(budget_worker, tp * pp, tiny_source(tiny_model), tp, pp, timeout=90)
    steps, scoring = results[0][2]["generate"], results[0][2]["score"]
    # at least: 2 chunks + 4 decode steps of the samples; 1 + 2 chunks and 4 decode steps of the two requests (more
    # where a pipeline runs the sequences in a group each)
    assert steps >= 13, steps
    assert results[0][2]["verify"] > 0, "no verification step ran"
    assert scoring == (2 if pp == 1 else 3), scoring  # 2 cache rows: 2 windows a step, 1 an in-flight step at pp 2
    for rank, (helpers, wire, _, stage, tp_rank, layers) in enumerate(results):
        where = f"rank {rank} (stage {stage}, tp rank {tp_rank}, {layers} layers; tp {tp}, pp {pp}; {steps} steps, " \
                f"{scoring} scoring)"
        # control plans: the resize to 2 rows, the grow for the first scoring step, the session's end
        expected = expected_helpers(tp, pp, rank, stage, tp_rank, layers, steps, control=3, scoring=scoring)
        assert helpers == expected, where
        assert wire == on_the_wire(expected), f"{where}: torch.distributed's own operations"
