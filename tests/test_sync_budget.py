"""The sync budget of torchchat/generate/distributed.py's docstring, counted on real processes.

Each rank counts, per phase (a turn's broadcast, a prefill, the decoded tokens), two things: its calls
of the helpers in torchchat/distributed/collectives.py, and every communication torch.distributed
itself starts (``CollectiveCount``, at the dispatcher's c10d and functional-collective ops, so a raw
``dist.barrier()`` or a DTensor collective is counted as well). Both must equal the docstring's
formula, written out again here, for TP 2, PP 2 and TP 2 x PP 2 on the tiny model.
"""

from __future__ import annotations

import io
from collections import Counter

import pytest

from tests.dist_utils import CollectiveCount, run_ranks
from tests.generators import tiny_source
from torchchat.distributed.parallel_dims import ParallelDims
from torchchat.generate.base import GenerationArgs, Turn

NEW_TOKENS = 5  # 1 from the prefill, then 4 decode steps


def budget_worker(rank: int, world: int, source, tp: int, pp: int):
    """Count every phase of two turns: the first meets new shapes, the second (same lengths) does not."""
    from torchchat.chat_format import chat_format_for
    from torchchat.distributed import collectives
    from torchchat.generate.distributed import DistributedGenerator
    from torchchat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(source)
    gen = DistributedGenerator.from_source(source, tokenizer, chat_format_for(tokenizer, source),
                                           ParallelDims(tp, pp, world), max_seq_len=64, out=io.StringIO(),
                                           err=io.StringIO())
    phases = {}

    def count(name, action):
        collectives.reset_counts()
        with CollectiveCount() as wire:
            result = action()
        phases[name] = collectives.counts(), dict(wire.counts)
        return result

    try:
        for label, batch in (("first", 1), ("again", 1), ("batch2", 2)):
            args = GenerationArgs(max_new_tokens=NEW_TOKENS, temperature=0, num_samples=batch)
            mine = Turn([1, 2, 3, 4, 5, 6, 7], args) if rank == 0 else None
            turn = count(f"{label}.turn", lambda: gen.share_input(mine))
            steps = gen.generate_tokens(turn)
            count(f"{label}.prefill", lambda: next(steps))
            count(f"{label}.decode", lambda: list(steps))
        count("end", lambda: gen.share_input(None))
        stage = gen.mesh.get_local_rank("pp")
        return phases, stage, len(gen.dims.stage_layers(gen.model_args.n_layers)[stage])
    finally:
        gen.close()


def expected_step(tp: int, pp: int, stage: int, layers: int, microbatches: int, steps: int, new_shape: bool):
    """The docstring's formula for ``steps`` forward steps on a rank of ``stage`` holding ``layers`` layers."""
    first, last = stage == 0, stage == pp - 1
    counts = {"broadcast_token": steps}
    if tp > 1:
        counts["tp_all_reduce"] = steps * microbatches * (2 * layers + first)
        if last:
            counts["tp_all_gather"] = steps * microbatches
    if pp > 1:
        if not last:
            counts["send_activation"] = steps * microbatches
        if not first:
            counts["recv_activation"] = steps * microbatches
        if new_shape:
            counts["stage_setup"] = 1
    return counts


def on_the_wire(helpers: dict[str, int], stage: int, pp: int) -> dict[str, int]:
    """The docstring's torch.distributed operations for these helper calls on a rank of ``stage``."""
    neighbours = (stage > 0) + (stage < pp - 1)
    per_call = {"broadcast_turn": {"broadcast": 2}, "broadcast_token": {"broadcast": 1},
                "tp_all_reduce": {"all_reduce": 1}, "tp_all_gather": {"all_gather": 1},
                "send_activation": {"send": 1}, "recv_activation": {"recv": 1},
                "stage_setup": {"send": neighbours, "recv": neighbours}}
    wire = Counter()
    for helper, calls in helpers.items():
        for kind, n in per_call[helper].items():
            wire[kind] += calls * n
    return dict(wire)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=lambda v: str(v))
def test_counted_collectives_equal_the_budget(tiny_model, tp, pp):
    results = run_ranks(budget_worker, tp * pp, tiny_source(tiny_model), tp, pp, timeout=90)
    decode_steps = NEW_TOKENS - 1
    for rank, (phases, stage, layers) in enumerate(results):
        def step(micro, steps, new):
            return expected_step(tp, pp, stage, layers, micro, steps, new)

        turn = {"broadcast_turn": 1}
        micro = 2 if pp > 1 else 1  # two sequences: two microbatches through two stages, else one batch of 2
        expected = {"first.turn": turn, "first.prefill": step(1, 1, True), "first.decode": step(1, decode_steps, True),
                    "again.turn": turn, "again.prefill": step(1, 1, False),  # the same shapes: no new stage
                    "again.decode": step(1, decode_steps, False),
                    "batch2.turn": turn, "batch2.prefill": step(micro, 1, True),
                    "batch2.decode": step(micro, decode_steps, True), "end": turn}
        assert list(phases) == list(expected)
        for phase, helpers in expected.items():
            where = f"rank {rank} (stage {stage}, {layers} layers, tp {tp}, pp {pp}), {phase}"
            counted, wire = phases[phase]
            assert counted == helpers, where
            assert wire == on_the_wire(helpers, stage, pp), f"{where}: torch.distributed's own operations"
